"""nn.LSTM and nn.RNN -> uni/biDirectionalLSTM / simpleRecurrent layers (one per torch layer).

Core ML's rank-5 blobs hold a sequence on an axis torch ops cannot name, so a sequence may only
flow between recurrent modules: the module consumes a model input declared as a sequence (its
``TensorType`` shape is ``(Seq, C)``; the Core ML input is ``(C,)`` and takes ``(Seq, 1, C)``) or
another recurrent module's output, and its output is used as

- the input of another ``nn.LSTM`` / ``nn.RNN`` (batch_first), or a model output (``(Seq, 1, H)``);
- its last step: ``out[:, -1]`` (also ``out[:, -1, :]``), or the final states ``h_n[-1]``,
  ``c_n[-1]`` (``h_n[0]`` / ``h_n.squeeze(0)`` for one layer; ``h_n[-2]`` and ``h_n[-1]``, the
  forward and backward halves, for a bidirectional LSTM): these are the layer's state outputs,
  ordinary ``(N, H)`` tensors for the rest of the graph (``torch.cat([h_n[-2], h_n[-1]], 1)``).

Supported: ``batch_first=True``, ``proj_size=0``, any ``num_layers``, bidirectional LSTMs (not
their ``out[:, -1]``: its backward half has read only the last step), nn.RNN with tanh. An
initial state ``lstm(x, (h0.unsqueeze(0), c0.unsqueeze(0)))`` (one layer, one direction; a stacked
LSTM streams as chained one-layer modules, each with its own state) with
``h0``, ``c0`` model inputs of shape ``(H,)`` becomes Core ML's streaming form: optional state
inputs (zeros when left out); return ``h_n[-1]``, ``c_n[-1]`` to carry the state to the next
chunk. torch's two biases are summed into Core ML's one. nn.GRU is refused: torch
applies the reset gate after the recurrent product, Core ML before it, so no weights map exactly.
"""

from __future__ import annotations

import operator

import numpy as np
import torch.nn as nn

from .ops import register_module

#: modules that read a sequence (nn.GRU only to be refused with its reason)
RECURRENT = (nn.LSTM, nn.RNN, nn.GRU)


def _np(t):
    return t.detach().cpu().numpy()


def _is_last_step(node, seq_node) -> bool:
    """``seq[:, -1]`` / ``seq[:, -1, :]``."""
    if node.op != "call_function" or node.target is not operator.getitem or node.args[0] is not seq_node:
        return False
    idx = node.args[1]
    full = slice(None, None, None)
    return (isinstance(idx, tuple) and len(idx) in (2, 3) and idx[0] == full and idx[1] == -1
            and all(i == full for i in idx[2:]))


def _last_layer_direction(node, states, layers: int, directions: int):
    """The direction (0 forward, 1 backward) of the last layer's state that ``node`` takes from
    torch's ``(layers * directions, N, H)`` states: ``h_n[-1]`` (``h_n[-2]`` is the forward one
    of a bidirectional module), ``h_n[i]`` with i >= the last layer's first index, or
    ``h_n.squeeze(0)`` for one layer and direction; None for anything else."""
    total = layers * directions
    if node.op == "call_function" and node.target is operator.getitem and node.args[0] is states:
        i = node.args[1]
        if isinstance(i, int) and -total <= i < total and i % total >= total - directions:
            return i % total - (total - directions)
        return None
    if node.op == "call_method" and node.target == "squeeze" and node.args[0] is states:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return 0 if total == 1 and dim == 0 else None
    return None


def _getitems(node) -> dict[int, object] | None:
    """{index: getitem node} of a tuple-valued node, None when it is used any other way."""
    out = {}
    for user in node.users:
        if (user.op != "call_function" or user.target is not operator.getitem
                or not isinstance(user.args[1], int)):
            return None
        out[user.args[1]] = user
    return out


def has_recurrent_module(module: nn.Module) -> bool:
    """Whether ``module`` holds an nn.LSTM / nn.RNN / nn.GRU: then a rank-2 input is a (Seq, C)
    sequence; without one it is a (C, L) feature map (converter and to_onnx alike)."""
    return any(isinstance(m, RECURRENT) for m in module.modules())


def is_sequence_consumer(gm, node) -> bool:
    """Whether fx ``node`` calls a recurrent module (which takes a sequence)."""
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), RECURRENT)


def is_sequence_output(gm, node) -> bool:
    """Whether fx ``node`` is a recurrent module's sequence output (``out`` of ``out, _ = ...``)."""
    return (node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0
            and isinstance(node.args[0], type(node)) and is_sequence_consumer(gm, node.args[0]))


def state_source(gm, node):
    """The ``(N, H)`` tensor node ``t`` when ``node`` is ``t.unsqueeze(0)`` (or ``t[None]``) given
    to recurrent modules as an initial state (their second argument) and used nowhere else."""
    if node.op == "call_method" and node.target == "unsqueeze" and node.args[1:] == (0,) and not node.kwargs:
        src = node.args[0]
    elif node.op == "call_function" and node.target is operator.getitem and node.args[1] is None:
        src = node.args[0]
    else:
        return None
    if not node.users or any(not is_sequence_consumer(gm, u) or not _in_state_arg(u, node)
                             for u in node.users):
        return None
    return src


def _state_arg(call) -> list:
    """The initial-state argument of a recurrent module call, as a list (``[]`` without one)."""
    hx = call.args[1] if len(call.args) > 1 else call.kwargs.get("hx")
    if hx is None:
        return []
    return list(hx) if isinstance(hx, (tuple, list)) else [hx]


def _in_state_arg(call, node) -> bool:
    return any(part is node for part in _state_arg(call))


#: what an initial state must look like, and how to stream a stacked module
STATE_FORM = ("(h0.unsqueeze(0), c0.unsqueeze(0)) (h0.unsqueeze(0) for nn.RNN) of a one-layer, "
              "one-direction module, with h0 and c0 of shape (N, H); to stream a stacked LSTM, "
              "chain one-layer modules, each given (and returning) its own state")


def state_hint(gm, node) -> str:
    """A sentence for errors about ``node`` when it builds a recurrent module's initial state."""
    if any(is_sequence_consumer(gm, u) and _in_state_arg(u, node) for u in node.users):
        return f". It builds a recurrent module's initial state, which must be {STATE_FORM}"
    return ""


def _initial_states(ctx, node, m, lstm: bool) -> list:
    """The blobs of the initial-state argument (``(h0, c0)`` / ``h0``), ``[]`` without one."""
    if len(node.args) < 2 and not node.kwargs:
        return []
    parts = _state_arg(node)
    sources = [state_source(ctx.gm, p) if hasattr(p, "op") else None for p in parts]
    if (len(node.args) > 2 or set(node.kwargs) - {"hx"} or len(parts) != (2 if lstm else 1)
            or None in sources or m.num_layers != 1 or m.bidirectional):
        raise ctx.unsupported(node, f"an initial state other than {STATE_FORM}")
    for src in sources:
        if src.op == "placeholder":
            ctx.state_inputs.add(ctx.blobs[src])  # Core ML: an optional input, zeros when left out
    return [ctx.inp(src) for src in sources]


def _state_input(ctx, name: str, hidden: int) -> str:
    """An optional ``(hidden,)`` model input for a simpleRecurrent layer's initial state: Core ML
    wants that layer to read one (exactly 2 inputs); left out, it is zeros."""
    blob = ctx.new_blob(f"{name}_h_in")
    fd = ctx.builder.spec.description.input.add()
    fd.name = blob
    fd.type.multiArrayType.shape.append(hidden)
    fd.type.multiArrayType.dataType = fd.type.multiArrayType.FLOAT32
    ctx.state_inputs.add(blob)
    return blob


def _check(ctx, node, m) -> None:
    why = []
    if not m.batch_first:
        why.append(f"batch_first=False (the model input's first axis is the batch: set "
                   f"`{node.target}.batch_first = True` before exporting, the trained weights "
                   "stay valid, and have forward() pass it (N, Seq, C) tensors)")
    if m.bidirectional and not isinstance(m, nn.LSTM):
        why.append("bidirectional=True")
    if getattr(m, "proj_size", 0):
        why.append(f"proj_size={m.proj_size}")
    if isinstance(m, nn.RNN) and m.nonlinearity != "tanh":
        why.append(f"nonlinearity={m.nonlinearity!r} (Core ML clips the pre-activation to "
                   "[-50, 50], which changes a ReLU's larger outputs; tanh is unaffected)")
    if why:
        raise ctx.unsupported(node, f"{type(m).__name__} with {', '.join(why)}")


def _uses(ctx, node, m, lstm: bool):
    """(sequence consumers?, [(node, "h" | "c", direction)] taking the last layer's states)."""
    items = _getitems(node)
    if items is None or set(items) - {0, 1}:
        raise ctx.unsupported(node, f"{type(m).__name__} output used other than as `out, state = ...`")
    seq_users, states = False, []
    out = items.get(0)
    for user in (out.users if out is not None else ()):
        if _is_last_step(user, out) and not m.bidirectional:
            states.append((user, "h", 0))  # the last output is the final hidden state
        elif (is_sequence_consumer(ctx.gm, user) and user.args[0] is out) or user.op == "output":
            seq_users = True  # another recurrent module, or a model output (Seq, 1, H)
        elif _is_last_step(user, out):
            raise ctx.unsupported(
                node, "out[:, -1] of a bidirectional LSTM: its backward half has read only the last "
                "step (Core ML's last output holds the backward state after the whole sequence); "
                "use torch.cat([h_n[-2], h_n[-1]], 1)")
        else:
            raise ctx.unsupported(
                node, f"its sequence output feeding {user.op} {user.target!r}; a sequence can only "
                "feed another nn.LSTM/nn.RNN or be reduced to its last step, out[:, -1]")
    state = items.get(1)
    if state is not None:
        parts = _getitems(state) if lstm else {0: state}
        if parts is None:
            raise ctx.unsupported(node, "its state tuple used other than as (h_n, c_n)")
        directions = 2 if m.bidirectional else 1
        for k, part in parts.items():
            for user in part.users:
                d = _last_layer_direction(user, part, m.num_layers, directions)
                if d is None:
                    raise ctx.unsupported(node, f"its final states used as {user.op} {user.target!r}; "
                                          "take the last layer's, h_n[-1] / c_n[-1] (and h_n[-2] "
                                          "for the forward half of a bidirectional LSTM)")
                states.append((user, "hc"[k], d))
    return seq_users, states


def _lstm_weights(m, k: int, suffix: str = ""):
    """Layer ``k``'s (recursion, input, biases) in the builder's [i, f, o, z] gate order (torch
    stacks i, f, g(z), o)."""
    w_ih, w_hh = _np(getattr(m, f"weight_ih_l{k}{suffix}")), _np(getattr(m, f"weight_hh_l{k}{suffix}"))
    wi, wf, wz, wo = np.split(w_ih, 4)
    ri, rf, rz, ro = np.split(w_hh, 4)
    bias = None
    if m.bias:
        b = _np(getattr(m, f"bias_ih_l{k}{suffix}")) + _np(getattr(m, f"bias_hh_l{k}{suffix}"))
        bi, bf, bz, bo = np.split(b, 4)
        bias = [bi, bf, bo, bz]
    return [ri, rf, ro, rz], [wi, wf, wo, wz], bias


def _emit(ctx, node, m, lstm: bool) -> str:
    _check(ctx, node, m)
    seq_users, states = _uses(ctx, node, m, lstm)
    x = ctx.sequence_blob(node.args[0], node)
    initial = _initial_states(ctx, node, m, lstm)
    hidden = m.hidden_size
    for k in range(m.num_layers):
        all_steps = k < m.num_layers - 1 or seq_users
        name, y = ctx.layer(node)
        cin = getattr(m, f"weight_ih_l{k}").shape[1]
        blobs = {(s, d): ctx.new_blob(f"{name}_{s}{'_back' if d else ''}") for s in "hc" for d in (0, 1)}
        if lstm and m.bidirectional:
            outs = [y, blobs["h", 0], blobs["c", 0], blobs["h", 1], blobs["c", 1]]
            ctx.builder.add_bidirlstm(name, *_lstm_weights(m, k), *_lstm_weights(m, k, "_reverse"),
                                      hidden, cin, [x], outs, output_all=all_steps,
                                      cell_clip_threshold=1e9)
        elif lstm:
            ctx.builder.add_unilstm(name, *_lstm_weights(m, k), hidden, cin, [x, *initial],
                                    [y, blobs["h", 0], blobs["c", 0]], output_all=all_steps,
                                    cell_clip_threshold=1e9)
        else:
            w_ih, w_hh = _np(getattr(m, f"weight_ih_l{k}")), _np(getattr(m, f"weight_hh_l{k}"))
            b = (_np(getattr(m, f"bias_ih_l{k}")) + _np(getattr(m, f"bias_hh_l{k}"))) if m.bias else None
            ctx.builder.add_simple_rnn(name, w_hh, w_ih, b if b is not None else np.zeros(hidden, np.float32),
                                       hidden, cin, "TANH", [x, *(initial or [_state_input(ctx, name, hidden)])],
                                       [y, blobs["h", 0]], output_all=all_steps)
            if b is None:
                ctx.builder.nn_spec.layers[-1].simpleRecurrent.hasBiasVector = False
                del ctx.builder.nn_spec.layers[-1].simpleRecurrent.biasVector.floatValue[:]
        x = y
    for user, s, d in states:  # the last layer's state outputs
        ctx.blobs[user] = blobs[s, d]
    if seq_users:  # y holds the whole sequence (else only its last step)
        ctx.sequences.add(y)
    return give_outputs(ctx, node, y, lstm)


def give_outputs(ctx, node, sequence: str, lstm: bool):
    """A recurrent module's ``out, state = ...`` items: ``out`` is ``sequence``, the state tuple
    (and its ``(h_n, c_n)``) hold no blob of their own (their users got theirs)."""
    items = _getitems(node)
    if 0 in items:
        ctx.blobs[items[0]] = sequence
    if 1 in items:
        ctx.blobs[items[1]] = ctx.SKIP
        for part in ((_getitems(items[1]) or {}).values() if lstm else ()):
            ctx.blobs[part] = ctx.SKIP
    return ctx.SKIP


@register_module(nn.LSTM)
def lstm(ctx, node, m: nn.LSTM) -> str:
    return _emit(ctx, node, m, lstm=True)


@register_module(nn.RNN)
def rnn(ctx, node, m: nn.RNN) -> str:
    return _emit(ctx, node, m, lstm=False)


@register_module(nn.GRU)
def gru(ctx, node, m: nn.GRU) -> str:
    raise ctx.unsupported(node, "nn.GRU: torch applies the reset gate after the recurrent matrix "
                          "(r * (W_hn h + b_hn)), Core ML's GRU before it (W_o (r * h)); no weights "
                          "reproduce torch's outputs. Use nn.LSTM or nn.RNN")
