"""Recurrent layers: simpleRecurrent, gru, uniDirectionalLSTM, biDirectionalLSTM.

Core ML's blobs are ``[Seq, Batch, C, 1, 1]``. Rank-5 mode holds them batch first: ``(B, C, 1, 1)``
for a sequence of one, ``(B, S, C, 1, 1)`` otherwise; ND mode holds one example's
``(S, Batch, C, 1, 1)`` literally. State inputs/outputs (``h``, ``c``) are ``[1, Batch, H, 1, 1]``;
a state input that is not connected starts at zero. Every pre-activation is clipped to
``[-50, 50]`` and an LSTM cell state to ``cellClipThreshold`` (50 when unset), as the spec says;
activation parameters left at 0 take their usual values (:data:`_PARAM_DEFAULTS`).
Gate weights are ``[H, C]`` (input) and ``[H, H]`` (recursion) row-major, one matrix per gate.

Padded batches: inside ``with sequence_lengths(lengths)`` a batch of sequences padded at the end
to one length runs as if each row had its own length: a row's state stops changing after its
last step (its final state is the one after its own last step), a reversed direction starts at
each row's own last step, and sequence outputs past a row's length are padding (zeros or stale
values). Update tasks use it to train sequences of different lengths in one mini-batch.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator, Optional

import torch

from mlpersonal.errors import InvalidInputError
from mlpersonal.validate import RECURRENT_LAYER_KINDS

from . import or_default, register
from .activation import activation_fn

CLIP = 50.0
_SPATIAL = ("PReLU", "parametricSoftplus")  # per-channel parameters on axis -3


#: parameters a recurrent activation takes when they are 0 (coremltools' builder and the Keras
#: converter write these activations without parameters; Keras' hard sigmoid is 0.2 x + 0.5)
_PARAM_DEFAULTS = {"sigmoidHard": {"alpha": 0.2, "beta": 0.5}, "linear": {"alpha": 1.0},
                   "scaledTanh": {"alpha": 1.0, "beta": 1.0}}


def _act(a, ctx, default: Callable) -> Callable:
    """A recurrent activation: ``default`` when the ActivationParams is empty."""
    kind = a.WhichOneof("NonlinearityType") if a is not None else None
    if kind is None:
        return default
    if kind in _PARAM_DEFAULTS:
        a = type(a).FromString(a.SerializeToString())  # the spec itself stays as it is
        sub = getattr(a, kind)
        for field, value in _PARAM_DEFAULTS[kind].items():
            setattr(sub, field, or_default(getattr(sub, field), value))
    fn = activation_fn(a, ctx)
    if kind in _SPATIAL:  # their parameters broadcast over (C, 1, 1): give them that shape
        return lambda x: fn(x[..., None, None])[..., 0, 0]
    return fn


def _acts(params, ctx, defaults: tuple) -> list[Callable]:
    params = list(params)
    return [_act(params[i] if i < len(params) else None, ctx, d) for i, d in enumerate(defaults)]


class _Layout:
    """Converts between blobs and ``(S, N, C)`` sequences / ``(N, H)`` states."""

    def __init__(self, ctx, size: int, name: str):
        self.nd, self.size, self.name = ctx.nd, size, name

    def sequence(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (1, 1) or x.shape[-3] != self.size or x.dim() < (3 if self.nd else 4):
            raise InvalidInputError(
                f"layer {self.name!r} takes sequences of {self.size}-vectors "
                f"([Seq, Batch, {self.size}, 1, 1]), got a blob of shape {tuple(x.shape)}")
        if self.nd:  # (S, Batch, C, 1, 1) of one example
            return x.reshape(-1, x.shape[-4] if x.dim() >= 4 else 1, self.size)
        if x.dim() == 4:  # (B, C, 1, 1): a sequence of one
            return x.reshape(1, x.shape[0], self.size)
        return x.reshape(x.shape[0], -1, self.size).transpose(0, 1)

    def output(self, y: torch.Tensor) -> torch.Tensor:
        """``(S, N, H)`` -> the output blob (a sequence of one keeps rank-5 mode's 4-D form)."""
        h = y.shape[-1]
        if self.nd:
            return y.reshape(*y.shape, 1, 1)
        if y.shape[0] == 1:
            return y.reshape(y.shape[1], h, 1, 1)
        return y.transpose(0, 1).reshape(y.shape[1], y.shape[0], h, 1, 1)

    def state(self, blob: Optional[torch.Tensor], n: int, h: int, like: torch.Tensor) -> torch.Tensor:
        if blob is None:
            return like.new_zeros(n, h)
        if blob.numel() != n * h:
            raise InvalidInputError(
                f"layer {self.name!r}: a state input must hold {h} values per sequence "
                f"([1, Batch, {h}, 1, 1]), got shape {tuple(blob.shape)}")
        return blob.reshape(n, h)

    def state_out(self, s: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if s is None else self.output(s.unsqueeze(0))


def _gates(ctx, wp, names, shape: tuple, field: str = "", updatable: bool = False):
    """The WeightParams ``names`` of message ``wp`` (``field``: its path in the layer)."""
    return [ctx.weights(getattr(wp, n), shape, f"{field}.{n}" if field else n, updatable=updatable)
            for n in names]


def _stacked(ctx, wp, names, shape: tuple, field: str = "", updatable: bool = False):
    """The WeightParams ``names`` of message ``wp`` stacked on axis 0 (one tensor, one
    Parameter when updatable)."""
    return ctx.stacked_weights([getattr(wp, n) for n in names], shape,
                               [f"{field}.{n}" if field else n for n in names], updatable=updatable)


_LENGTHS: contextvars.ContextVar[Optional[tuple]] = contextvars.ContextVar(
    "sequence_lengths", default=None)


@contextlib.contextmanager
def sequence_lengths(lengths: torch.Tensor, unread: frozenset = frozenset()) -> Iterator[None]:
    """Recurrent layers run inside this block treat a batch's sequences as padded at the end:
    row ``n`` is ``lengths[n]`` steps long (an int64 tensor, one entry per row). ``unread``:
    blobs no one reads (an LSTM whose cell-state output is unread runs torch's fused kernel)."""
    token = _LENGTHS.set((lengths, unread))
    try:
        yield
    finally:
        _LENGTHS.reset(token)


#: layer kinds that work step by step on a rank-5 sequence blob ``(B, S, C, H, W)`` (or carry a
#: recurrent state): sequences of different lengths, padded to one, can share a batch through
#: them (:func:`sequence_lengths`); see :func:`stepwise`
STEPWISE_KINDS = frozenset({
    "activation", "softmax", "innerProduct", "embedding", "batchnorm", "l2normalize", "flatten",
    "concat", "split", "unary", "scale", "bias", "add", "multiply", "max", "min", "average",
    "dot", "copy", *RECURRENT_LAYER_KINDS,
})


def stepwise(steps, layers) -> bool:
    """Do these steps (of a Network built from the spec ``layers``) each compute every step of
    a sequence from that step alone (or, recurrent, from the steps before it)? Not: a concat
    along the sequence, batchnorm with its own statistics, kinds outside :data:`STEPWISE_KINDS`."""
    by_name = {layer.name: layer for layer in layers}
    for step in steps:
        layer = by_name[step.name]
        if step.kind == "concat" and layer.concat.sequenceConcat:
            return False
        if step.kind == "batchnorm" and layer.batchnorm.computeMeanVar:
            return False
        if step.kind not in STEPWISE_KINDS:
            return False
    return True


def _cell_read(layer, index: int) -> bool:
    """Whether the layer's cell-state output ``index`` exists and may be read."""
    if len(layer.output) <= index:
        return False
    padded = _LENGTHS.get()
    return padded is None or layer.output[index] not in padded[1]


def _row_lengths(seq: torch.Tensor) -> Optional[torch.Tensor]:
    """The rows' lengths of ``seq`` ``(S, N, C)`` when it is a padded batch of sequences of
    different lengths, else None (every row runs all ``S`` steps)."""
    padded = _LENGTHS.get()
    lengths = padded and padded[0]
    if lengths is None or seq.shape[0] < 2 or lengths.shape != (seq.shape[1],):
        return None
    lengths = lengths.to(seq.device)
    return None if bool((lengths == seq.shape[0]).all()) else lengths


def _reversed_rows(seq: torch.Tensor, lengths: Optional[torch.Tensor]) -> torch.Tensor:
    """``seq`` with each row's first ``lengths[n]`` steps in reverse order (padding stays put);
    its own inverse."""
    if lengths is None:
        return seq.flip(0)
    t = torch.arange(seq.shape[0], device=seq.device)[:, None]
    index = torch.where(t < lengths, lengths - 1 - t, t)  # (S, N)
    return seq.gather(0, index[..., None].expand_as(seq))


def _masks(lengths: Optional[torch.Tensor], steps: int, like: torch.Tensor) -> Optional[torch.Tensor]:
    """``(S, N, 1)`` booleans: whether step ``t`` of row ``n`` is inside its sequence."""
    if lengths is None:
        return None
    return (torch.arange(steps, device=like.device)[:, None] < lengths)[..., None]


def _clip(t: torch.Tensor) -> torch.Tensor:
    return t.clamp(-CLIP, CLIP)


def _outputs(layer, outs: tuple):
    """The outputs the layer names: ``y`` alone, or ``y`` and its states."""
    return outs[0] if len(layer.output) == 1 else outs[:len(layer.output)]


def _check_arity(layer, ctx, inputs: int, outputs: int) -> None:
    """At most ``inputs`` inputs (x and its states) and ``outputs`` outputs (y and its states)."""
    if not 1 <= len(layer.input) <= inputs or not 1 <= len(layer.output) <= outputs:
        raise ctx.fail(f"a {layer.WhichOneof('layer')} layer takes 1 to {inputs} inputs and gives 1 to "
                       f"{outputs} outputs (the sequence and its states), this one has "
                       f"{len(layer.input)} and {len(layer.output)}")


def _inputs(xs: tuple, count: int) -> list:
    """The layer's inputs padded with None for unconnected states."""
    return list(xs) + [None] * (count - len(xs))


def _one_state(layer, ctx, p, c: int, h: int, project: Callable, step: Callable) -> Callable:
    """A layer with inputs ``x[, h_in]`` and outputs ``y[, h_out]`` (simpleRecurrent, gru):
    ``project(xs (S, N, C))`` the input terms of every step at once, ``step(p_t, y) -> y_t``."""
    _check_arity(layer, ctx, 2, 2)
    lay, seq_out, reverse = _Layout(ctx, c, layer.name), p.sequenceOutput, p.reverseInput

    def run(*xs):
        x, h0 = _inputs(xs, 2)
        seq = lay.sequence(x)
        lengths = _row_lengths(seq)
        seq = _reversed_rows(seq, lengths) if reverse else seq
        proj = project(seq)
        masks = _masks(lengths, seq.shape[0], seq)
        y, ys = lay.state(h0, seq.shape[1], h, seq), []
        for t in range(seq.shape[0]):
            y = step(proj[t], y) if masks is None else torch.where(masks[t], step(proj[t], y), y)
            ys.append(y)
        out = torch.stack(ys) if seq_out else y.unsqueeze(0)
        return _outputs(layer, (lay.output(out), lay.state_out(y)))

    return run


@register("simpleRecurrent")
def simple_recurrent(layer, ctx):
    """y_t = f(clip(W x_t + R y_{t-1} + b))."""
    p = layer.simpleRecurrent
    c, h = int(p.inputVectorSize), int(p.outputVectorSize)
    w = ctx.weights(p.weightMatrix, (h, c), "weightMatrix")
    r = ctx.weights(p.recursionMatrix, (h, h), "recursionMatrix")
    b = ctx.weights(p.biasVector, (h,), "biasVector") if p.hasBiasVector else None
    f = _act(p.activation if p.HasField("activation") else None, ctx, torch.tanh)

    def step(p_t, y):
        return f(_clip(p_t + y @ r.t()))

    return _one_state(layer, ctx, p, c, h, lambda xs: torch.nn.functional.linear(xs, w, b), step)


@register("gru")
def gru(layer, ctx):
    """z = f(W_z x + R_z y + b_z), r = f(W_r x + R_r y + b_r), o = g(W_o x + R_o (y * r) + b_o),
    y_t = (1 - z) * o + z * y_{t-1} (pre-activations clipped)."""
    p = layer.gru
    c, h = int(p.inputVectorSize), int(p.outputVectorSize)
    gates = ("updateGate", "resetGate", "outputGate")
    w = _stacked(ctx, p, [g + "WeightMatrix" for g in gates], (h, c))
    r = _stacked(ctx, p, [g + "RecursionMatrix" for g in gates], (h, h))
    b = _stacked(ctx, p, [g + "BiasVector" for g in gates], (h,)) if p.hasBiasVectors else None
    f, g = _acts(p.activations, ctx, (torch.sigmoid, torch.tanh))
    r_zr, r_o = r[:2 * h].t(), r[2 * h:].t()

    def step(p_t, y):
        pz, pr, po = p_t.split(h, -1)
        rz, rr = (y @ r_zr).split(h, -1)
        z, r = f(_clip(pz + rz)), f(_clip(pr + rr))
        o = g(_clip(po + (y * r) @ r_o))
        return (1 - z) * o + z * y

    def project(xs):
        return torch.nn.functional.linear(xs, w, b)

    return _one_state(layer, ctx, p, c, h, project, step)


_LSTM_W = ("inputGateWeightMatrix", "forgetGateWeightMatrix", "blockInputWeightMatrix",
           "outputGateWeightMatrix")
_LSTM_R = ("inputGateRecursionMatrix", "forgetGateRecursionMatrix", "blockInputRecursionMatrix",
           "outputGateRecursionMatrix")
_LSTM_B = ("inputGateBiasVector", "forgetGateBiasVector", "blockInputBiasVector",
           "outputGateBiasVector")
_LSTM_P = ("inputGatePeepholeVector", "forgetGatePeepholeVector", "outputGatePeepholeVector")


def _batched(x: torch.Tensor) -> bool:
    """Whether ``x`` is an example inside ``torch.func.vmap`` (ND models batch that way): torch's
    fused LSTM has no batching rule there, the step-by-step form runs instead."""
    is_batched = getattr(getattr(torch._C, "_functorch", None), "is_batchedtensor", None)
    return bool(is_batched(x)) if is_batched is not None else False


def _lstm_direction(ctx, params, wp, acts, c: int, h: int, field: str, updatable: bool):
    """``run(xs (S, N, C), h0, c0) -> (ys (S, N, H), h_last, c_last)`` of one LSTM direction."""
    w = _stacked(ctx, wp, _LSTM_W, (h, c), field, updatable)  # gates i, f, z, o: torch's order
    r = _stacked(ctx, wp, _LSTM_R, (h, h), field, updatable)
    b = _stacked(ctx, wp, _LSTM_B, (h,), field, updatable) if params.hasBiasVectors else None
    peep = _gates(ctx, wp, _LSTM_P, (h,), field, updatable) if params.hasPeepholeVectors else None
    f, g, act_h = _acts(acts, ctx, (torch.sigmoid, torch.tanh, torch.tanh))
    forget_bias, coupled = params.forgetBias, params.coupledInputAndForgetGate
    cell_clip = or_default(params.cellClipThreshold, CLIP)
    if not cell_clip > 0:  # NaN or negative: no cell value could satisfy it
        raise ctx.fail(f"cellClipThreshold {params.cellClipThreshold} must be a positive number")
    # torch's fused LSTM computes the same thing with the standard gates: the [-50, 50] clip
    # does not change a float32 sigmoid/tanh, and a cell grows by at most 1 a step, so it cannot
    # reach the cell clip within a call when |c0| + steps stays below it (checked per call; a
    # trace for the ONNX plan, which becomes onnxruntime's LSTM op, takes it only when no cell
    # state is fed in, and otherwise keeps the step-by-step form, clip included)
    standard = (f is torch.sigmoid and g is torch.tanh and act_h is torch.tanh and peep is None
                and not coupled)

    ones = None
    if forget_bias:  # a vector of ones added to the forget gate's bias
        ones = torch.zeros(4 * h, device=ctx.device, dtype=ctx.dtype)
        ones[h:2 * h] = 1.0
    no_bias = torch.zeros(4 * h, device=ctx.device, dtype=ctx.dtype)  # torch's second bias

    def bias():
        if ones is None:
            return b
        return ones if b is None else b + ones

    def fusable(xs, c0, c0_is_zero: bool) -> bool:
        if not standard:
            return False
        if c0_is_zero or not c0.numel():  # static: the same answer in a trace
            return xs.shape[0] <= cell_clip
        return not torch.jit.is_tracing() and xs.shape[0] + float(c0.abs().max()) <= cell_clip

    def run(xs, h0, c0, c0_is_zero: bool = False, lengths: Optional[torch.Tensor] = None,
            cell_out: bool = True):
        """``lengths``: the rows are padded sequences of these lengths (see the module doc);
        ``cell_out=False``: the caller does not read the last cell state (None then)."""
        if fusable(xs, c0, c0_is_zero) and (lengths is None or not cell_out) and not _batched(xs):
            bb = bias()
            weights = [w, r] + ([bb, no_bias] if bb is not None else [])
            ys, y, cell = torch.lstm(xs, (h0[None], c0[None]), weights, bb is not None, 1, 0.0,
                                     torch.is_grad_enabled(), False, False)
            if lengths is None:
                return ys, y[0], cell[0]
            # padded rows: the fused kernel runs on past a row's end (torch's packed-sequence
            # LSTM is ~8x slower on cpu); a row's output is its step ``length - 1``, what comes
            # after it no output depends on
            return ys, ys[lengths - 1, torch.arange(xs.shape[1], device=xs.device)], None
        proj = torch.nn.functional.linear(xs, w, bias())
        rec = r.t()
        masks = _masks(lengths, xs.shape[0], xs)
        y, cell, ys = h0, c0, []
        for t in range(xs.shape[0]):
            pi, pf, pz, po = (proj[t] + y @ rec).split(h, -1)
            if peep is not None:
                pi, pf = pi + peep[0] * cell, pf + peep[1] * cell
            i = f(_clip(pi))
            fg = 1 - i if coupled else f(_clip(pf))
            new_cell = (cell * fg + i * g(_clip(pz))).clamp(-cell_clip, cell_clip)
            if peep is not None:
                po = po + peep[2] * new_cell
            new_y = act_h(new_cell) * f(_clip(po))
            if masks is None:
                y, cell = new_y, new_cell
            else:
                y, cell = torch.where(masks[t], new_y, y), torch.where(masks[t], new_cell, cell)
            ys.append(y)
        return torch.stack(ys), y, cell

    return run


@register("uniDirectionalLSTM")
def uni_lstm(layer, ctx):
    """Inputs ``x[, h_in, c_in]``, outputs ``y[, h_out, c_out]`` (LSTMParams equations)."""
    p = layer.uniDirectionalLSTM
    c, h = int(p.inputVectorSize), int(p.outputVectorSize)
    _check_arity(layer, ctx, 3, 3)
    step = _lstm_direction(ctx, p.params, p.weightParams, p.activations, c, h, "weightParams",
                           layer.isUpdatable)
    lay, seq_out, reverse = _Layout(ctx, c, layer.name), p.params.sequenceOutput, p.reverseInput

    def run(*xs):
        x, h0, c0 = _inputs(xs, 3)
        seq = lay.sequence(x)
        n, lengths = seq.shape[1], _row_lengths(seq)
        ys, y, cell = step(_reversed_rows(seq, lengths) if reverse else seq,
                           lay.state(h0, n, h, seq), lay.state(c0, n, h, seq), c0 is None, lengths,
                           cell_out=_cell_read(layer, 2))
        return _outputs(layer, (lay.output(ys if seq_out else y.unsqueeze(0)), lay.state_out(y),
                                lay.state_out(cell)))

    return run


@register("biDirectionalLSTM")
def bi_lstm(layer, ctx):
    """Inputs ``x[, h_f, c_f, h_b, c_b]``, outputs ``y[, h_f, c_f, h_b, c_b]``; ``y`` is the forward
    and backward outputs side by side (2H channels), the backward ones aligned with the input
    positions (at step t: the state after reading x_S ... x_t)."""
    p = layer.biDirectionalLSTM
    c, h = int(p.inputVectorSize), int(p.outputVectorSize)
    _check_arity(layer, ctx, 5, 5)
    if len(p.weightParams) != 2:
        raise ctx.fail(f"a bidirectional LSTM needs 2 weightParams (forward, backward), "
                       f"has {len(p.weightParams)}")
    fwd = _lstm_direction(ctx, p.params, p.weightParams[0], p.activationsForwardLSTM, c, h,
                          "weightParams[0]", False)
    bwd = _lstm_direction(ctx, p.params, p.weightParams[1], p.activationsBackwardLSTM, c, h,
                          "weightParams[1]", False)
    lay, seq_out = _Layout(ctx, c, layer.name), p.params.sequenceOutput

    def run(*xs):
        x, hf, cf, hb, cb = _inputs(xs, 5)
        seq = lay.sequence(x)
        n, lengths = seq.shape[1], _row_lengths(seq)
        yf, hf, cf = fwd(seq, lay.state(hf, n, h, seq), lay.state(cf, n, h, seq), cf is None, lengths,
                         cell_out=_cell_read(layer, 2))
        yb, hb, cb = bwd(_reversed_rows(seq, lengths), lay.state(hb, n, h, seq),
                         lay.state(cb, n, h, seq), cb is None, lengths, cell_out=_cell_read(layer, 4))
        y = (torch.cat([yf, _reversed_rows(yb, lengths)], -1) if seq_out
             else torch.cat([hf, hb], -1).unsqueeze(0))
        return _outputs(layer, (lay.output(y), lay.state_out(hf), lay.state_out(cf),
                                lay.state_out(hb), lay.state_out(cb)))

    return run
