"""nn.LSTM / nn.RNN in ND mode: their sequence output is an ordinary ``(L, H)`` tensor there, so
it may feed attention, pooling or anything else (in the rank-5 mode a sequence can only reach
another recurrent module or its last step).

Core ML's recurrent layers read ``(Seq, Batch, C, 1, 1)`` in ND mode: the example's ``(L, C)`` is
reshaped to ``(L, 1, C, 1, 1)``, each torch layer becomes one uni/biDirectionalLSTM /
simpleRecurrent layer (named after the module, so ``respect_trainable`` finds them), and the last
one's outputs are reshaped back: the sequence to ``(L, H * directions)``, a final state
``h_n[-1]`` / ``c_n[-1]`` (``h_n[-2]``: the forward half of a bidirectional LSTM) to ``(H,)``.
The weight layout and the refusals are those of :mod:`exporters.recurrent`.
"""

from __future__ import annotations

import numpy as np
import torch.nn as nn

from ..recurrent import _check, _getitems, _last_layer_direction, _lstm_weights, _np, give_outputs
from . import example_shape, register_module


def _state_users(ctx, node, m, lstm: bool) -> list:
    """[(node, "h" | "c", direction)] reading the last layer's final states."""
    items = _getitems(node)
    if items is None or set(items) - {0, 1}:
        raise ctx.unsupported(node, f"{type(m).__name__} output used other than as `out, state = ...`")
    users, state = [], items.get(1)
    if state is None:
        return users
    parts = _getitems(state) if lstm else {0: state}
    if parts is None:
        raise ctx.unsupported(node, "its state tuple used other than as (h_n, c_n)")
    for k, part in parts.items():
        for user in part.users:
            d = _last_layer_direction(user, part, m.num_layers, 2 if m.bidirectional else 1)
            if d is None:
                raise ctx.unsupported(node, f"its final states used as {user.op} {user.target!r}; take "
                                            "the last layer's, h_n[-1] / c_n[-1] (h_n[-2]: the forward "
                                            "half of a bidirectional LSTM)")
            users.append((user, "hc"[k], d))
    return users


def _reshape(ctx, blob: str, base: str, shape: list) -> str:
    out = ctx.new_blob(base)
    ctx.used_layers.add(out)
    ctx.builder.add_reshape_static(out, blob, out, shape)
    return out


def _emit(ctx, node, m, lstm: bool) -> str:
    _check(ctx, node, m)
    if len(node.args) > 1 or node.kwargs:
        raise ctx.unsupported(node, f"an initial state of {type(m).__name__} in a network exported in "
                                    "ND mode (start from zeros)")
    length, cin = example_shape(ctx, node.args[0])
    users = _state_users(ctx, node, m, lstm)
    hidden, directions = m.hidden_size, 2 if m.bidirectional else 1
    x = _reshape(ctx, ctx.inp(node.args[0]), f"{node.name}_steps", [length, 1, cin, 1, 1])
    for k in range(m.num_layers):
        name, y = ctx.layer(node)
        width = getattr(m, f"weight_ih_l{k}").shape[1]
        blobs = {(s, d): ctx.new_blob(f"{name}_{s}{'_back' if d else ''}") for s in "hc" for d in (0, 1)}
        if lstm and m.bidirectional:
            ctx.builder.add_bidirlstm(name, *_lstm_weights(m, k), *_lstm_weights(m, k, "_reverse"), hidden,
                                      width, [x], [y, blobs["h", 0], blobs["c", 0], blobs["h", 1], blobs["c", 1]],
                                      output_all=True, cell_clip_threshold=1e9)
        elif lstm:
            ctx.builder.add_unilstm(name, *_lstm_weights(m, k), hidden, width, [x],
                                    [y, blobs["h", 0], blobs["c", 0]], output_all=True, cell_clip_threshold=1e9)
        else:
            w_ih, w_hh = _np(getattr(m, f"weight_ih_l{k}")), _np(getattr(m, f"weight_hh_l{k}"))
            b = (_np(getattr(m, f"bias_ih_l{k}")) + _np(getattr(m, f"bias_hh_l{k}"))) if m.bias else None
            state = ctx.new_blob(f"{name}_h0")  # Core ML's simpleRecurrent reads a state: zeros
            ctx.used_layers.add(state)
            ctx.builder.add_load_constant_nd(state, state, np.zeros((1, 1, hidden, 1, 1), np.float32),
                                             [1, 1, hidden, 1, 1])
            ctx.builder.add_simple_rnn(name, w_hh, w_ih, b if b is not None else np.zeros(hidden, np.float32),
                                       hidden, width, "TANH", [x, state], [y, blobs["h", 0]], output_all=True)
        x = y
    for user, s, d in users:
        ctx.blobs[user] = _reshape(ctx, blobs[s, d], user.name, [hidden])
    out = _getitems(node).get(0)
    sequence = _reshape(ctx, x, out.name, [length, hidden * directions]) if out is not None else None
    return give_outputs(ctx, node, sequence, lstm)


@register_module(nn.LSTM, nn.RNN)
def recurrent(ctx, node, m) -> str:
    return _emit(ctx, node, m, lstm=isinstance(m, nn.LSTM))
