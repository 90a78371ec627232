"""Classic layers that move data between axes: flatten, concat, reshape, permute, split, slice,
crop, padding, sequenceRepeat, reorganizeData.

Rank-5 mode blobs are ``(B, C, H, W)``, or ``(B, S, C, H, W)`` once a sequence axis appears.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import ints, register, spatial
from .conv import border_amounts


def _with_seq(x):
    """A rank-5-mode blob as (B, S, C, H, W)."""
    return x if x.dim() == 5 else x.unsqueeze(1)


def _drop_unit_seq(y):
    return y.squeeze(1) if y.dim() == 5 and y.shape[1] == 1 else y


def _channels_last(x):
    """``(..., C, H, W)`` -> ``(..., H, W, C)``. Non-negative axes: torch.onnx writes
    ``movedim(-3, -1)`` as a Transpose with a negative perm entry, which onnxruntime refuses (every
    Keras-converted CNN, whose flatten is channel-last, lost the plan)."""
    return x.movedim(x.dim() - 3, x.dim() - 1)


@register("flatten")
def flatten(layer, ctx):
    channel_last = int(layer.flatten.mode) == 1

    def f(x):
        if channel_last:
            x = _channels_last(x)
        return x.reshape(*x.shape[:-3], -1, 1, 1)

    return f


@register("concat")
def concat(layer, ctx):
    if not layer.concat.sequenceConcat:
        return lambda *xs: torch.cat(xs, dim=-3)
    if ctx.nd:
        return lambda *xs: torch.cat(xs, dim=-5)
    return lambda *xs: _drop_unit_seq(torch.cat([_with_seq(x) for x in xs], dim=1))


@register("reshape")
def reshape(layer, ctx):
    """Target [C, H, W] (sequence kept) or [S, C, H, W], channel-first or channel-last order."""
    p = layer.reshape
    target = [int(t) for t in p.targetShape]
    if len(target) not in (3, 4):
        raise ctx.fail(f"targetShape {target} must have length 3 or 4")
    chw, seq = target[-3:], (target[0] if len(target) == 4 else None)
    channel_last = int(p.mode) == 1
    order = [chw[1], chw[2], chw[0]] if channel_last else chw

    def f(x):
        lead = list(x.shape[:-3])
        if seq is not None:
            if ctx.nd:  # [S, B, C, H, W]
                lead = [seq, *lead[1:]] if len(lead) >= 2 else [seq, *lead]
            else:  # [B, S, C, H, W]
                lead = [lead[0], seq]
        if channel_last:
            x = _channels_last(x)
        y = x.reshape(*lead, *order)
        if channel_last:
            y = y.movedim(y.dim() - 1, y.dim() - 3)
        return y if ctx.nd else _drop_unit_seq(y)

    return f


@register("permute")
def permute(layer, ctx):
    """Permute (Seq, C, H, W); the batch axis stays in place."""
    axis = ints(layer.permute.axis, (0, 1, 2, 3))
    if sorted(axis) != [0, 1, 2, 3]:
        raise ctx.fail(f"axis {axis} is not a permutation of [0, 1, 2, 3]")
    if ctx.nd:  # rank-5 blob [S, B, C, H, W]
        where = [0, 2, 3, 4]
        order = [where[axis[0]], 1] + [where[a] for a in axis[1:]]

        def f_nd(x):
            if x.dim() < 5:
                x = x.reshape((1,) * (5 - x.dim()) + tuple(x.shape))
            return x.permute(*order)

        return f_nd
    order = [0] + [a + 1 for a in axis]
    return lambda x: _drop_unit_seq(_with_seq(x).permute(*order))


@register("split")
def split(layer, ctx):
    n = int(layer.split.nOutputs) or len(layer.output)
    return lambda x: tuple(torch.chunk(x, n, dim=-3))


@register("slice")
def slice_(layer, ctx):
    """x[start:end:stride] along axis -3, -2 or -1 (numpy semantics, negative indices allowed)."""
    p = layer.slice
    dim = (-3, -2, -1)[int(p.axis)]
    start, end, step = int(p.startIndex), int(p.endIndex), max(int(p.stride), 1)
    idx = (Ellipsis, slice(start, end, step)) + (slice(None),) * (-1 - dim)
    return lambda x: x[idx]


@register("crop")
def crop(layer, ctx):
    p = layer.crop
    if len(layer.input) == 2:
        off = ints(p.offset, (0, 0))

        def crop_like(x, ref):
            h, w = ref.shape[-2:]
            return x[..., off[0]:off[0] + h, off[1]:off[1] + w]

        return crop_like
    t, b, l, r = border_amounts(p.cropAmounts)
    return lambda x: x[..., t:x.shape[-2] - b, l:x.shape[-1] - r]


@register("padding")
def padding(layer, ctx):
    p = layer.padding
    t, b, l, r = border_amounts(p.paddingAmounts)
    kind = p.WhichOneof("PaddingType") or "constant"
    if kind == "constant":
        value = float(p.constant.value)
        return lambda x: F.pad(x, (l, r, t, b), value=value)
    mode = "reflect" if kind == "reflection" else "replicate"
    return spatial(lambda x: F.pad(x, (l, r, t, b), mode=mode))


@register("sequenceRepeat")
def sequence_repeat(layer, ctx):
    n = int(layer.sequenceRepeat.nRepetitions) or 1
    if ctx.nd:
        return lambda x: torch.cat([x] * n, dim=-5)
    return lambda x: _drop_unit_seq(torch.cat([_with_seq(x)] * n, dim=1))


SPACE_TO_DEPTH, DEPTH_TO_SPACE, PIXEL_SHUFFLE = 0, 1, 2


@register("reorganizeData")
def reorganize_data(layer, ctx):
    p = layer.reorganizeData
    bs, mode = int(p.blockSize), int(p.mode)
    if bs < 2:
        raise ctx.fail(f"blockSize must be > 1, got {bs}")
    if mode == PIXEL_SHUFFLE:
        return spatial(lambda x: F.pixel_shuffle(x, bs))
    if mode == DEPTH_TO_SPACE:  # out[c, h*bs+i, w*bs+j] = in[(i*bs+j)*C_out + c, h, w]
        def d2s(x):
            n, c, h, w = x.shape
            y = x.reshape(n, bs, bs, c // (bs * bs), h, w).permute(0, 3, 4, 1, 5, 2)
            return y.reshape(n, c // (bs * bs), h * bs, w * bs)

        return spatial(d2s)

    def s2d(x):
        n, c, h, w = x.shape
        y = x.reshape(n, c, h // bs, bs, w // bs, bs).permute(0, 3, 5, 1, 2, 4)
        return y.reshape(n, c * bs * bs, h // bs, w // bs)

    return spatial(s2d)
