"""ND shape kinds (what ct.convert emits): reshapeStatic, rankPreservingReshape, reshapeLike,
flattenTo2D, transpose, squeeze, expandDims, concatND, stack, splitND, sliceStatic, reverse,
tile, copy, getShape, broadcastTo*, constantPad. Blobs hold one example at their declared shape."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import register


@register("reshapeStatic")
def reshape_static(layer, ctx):
    shape = [int(s) for s in layer.reshapeStatic.targetShape]
    return lambda x: x.reshape(shape)


@register("rankPreservingReshape")
def rank_preserving_reshape(layer, ctx):
    """0 keeps the input's size on that axis, -1 is inferred."""
    target = [int(s) for s in layer.rankPreservingReshape.targetShape]
    return lambda x: x.reshape([x.shape[i] if s == 0 else s for i, s in enumerate(target)])


@register("reshapeLike")
def reshape_like(layer, ctx):
    return lambda x, ref: x.reshape(ref.shape)


@register("flattenTo2D")
def flatten_to_2d(layer, ctx):
    axis = int(layer.flattenTo2D.axis)

    def f(x):
        a = axis % x.dim() if axis < 0 else axis
        return x.reshape(math.prod(x.shape[:a]), -1)

    return f


@register("transpose")
def transpose(layer, ctx):
    axes = [int(a) for a in layer.transpose.axes]
    return lambda x: x.permute(*axes)


@register("squeeze")
def squeeze(layer, ctx):
    p = layer.squeeze
    axes = tuple(int(a) for a in p.axes)
    if p.squeezeAll or not axes:
        return lambda x: x.squeeze() if x.dim() > 1 or x.numel() != 1 else x.reshape(1)

    def f(x):
        if x.dim() <= len(axes):
            return x.reshape(1)
        for a in sorted((a % x.dim() for a in axes), reverse=True):  # one axis at a time: a
            x = x.squeeze(a)  # multi-axis squeeze has no ONNX export under vmap (the plan)
        return x

    return f


@register("expandDims")
def expand_dims(layer, ctx):
    axes = [int(a) for a in layer.expandDims.axes]

    def f(x):
        rank = x.dim() + len(axes)
        for a in sorted(a % rank for a in axes):  # ascending: each lands where the output has it
            x = x.unsqueeze(a)
        return x

    return f


@register("concatND")
def concat_nd(layer, ctx):
    p = layer.concatND
    axis = int(p.axis)
    if p.interleave:
        return lambda *xs: torch.stack(xs, dim=(axis % xs[0].dim()) + 1).flatten(axis % xs[0].dim(),
                                                                              axis % xs[0].dim() + 1)
    return lambda *xs: torch.cat(xs, dim=axis)


@register("stack")
def stack(layer, ctx):
    axis = int(layer.stack.axis)
    return lambda *xs: torch.stack(xs, dim=axis)


@register("splitND")
def split_nd(layer, ctx):
    p = layer.splitND
    axis, sizes = int(p.axis), [int(s) for s in p.splitSizes]
    n = int(p.numSplits) or len(layer.output)
    if sizes:
        return lambda x: tuple(torch.split(x, sizes, dim=axis))
    return lambda x: tuple(torch.split(x, x.shape[axis] // n, dim=axis))


@register("sliceStatic")
def slice_static(layer, ctx):
    p = layer.sliceStatic
    begin, end, strides = list(p.beginIds), list(p.endIds), list(p.strides)
    bmask, emask, squeeze = list(p.beginMasks), list(p.endMasks), list(p.squeezeMasks)
    idx = []
    for i in range(len(begin)):
        if squeeze and squeeze[i]:
            idx.append(int(begin[i]))
            continue
        b = None if (bmask and bmask[i]) else int(begin[i])
        e = None if (emask and emask[i]) else int(end[i])
        idx.append(slice(b, e, int(strides[i]) if strides else 1))
    idx = tuple(idx)
    return lambda x: x[idx]


@register("reverse")
def reverse(layer, ctx):
    dims = [i for i, r in enumerate(layer.reverse.reverseDim) if r]
    return lambda x: torch.flip(x, dims)


@register("tile")
def tile(layer, ctx):
    reps = [int(r) for r in layer.tile.reps]
    return lambda x: x.repeat(*reps) if len(reps) >= x.dim() else x.repeat(
        *([1] * (x.dim() - len(reps)) + reps))


@register("copy")
def copy(layer, ctx):
    return lambda x: x


@register("getShape")
def get_shape(layer, ctx):
    return lambda x: torch.tensor(x.shape, dtype=torch.float32, device=ctx.device)


@register("broadcastToLike")
def broadcast_to_like(layer, ctx):
    return lambda x, ref: x.expand(torch.broadcast_shapes(x.shape, ref.shape))


@register("broadcastToStatic")
def broadcast_to_static(layer, ctx):
    shape = [int(s) for s in layer.broadcastToStatic.targetShape]
    return lambda x: x.expand(torch.broadcast_shapes(x.shape, tuple(shape)))


@register("constantPad")
def constant_pad(layer, ctx):
    p = layer.constantPad
    if p.padToGivenOutputSizeMode:
        raise ctx.unsupported("padToGivenOutputSizeMode is not supported")
    amounts = [int(a) for a in p.padAmounts]
    pairs = [(amounts[2 * i], amounts[2 * i + 1]) for i in range(len(amounts) // 2)]
    flat = [v for pair in reversed(pairs) for v in pair]  # F.pad wants last axis first
    value = float(p.value)
    return lambda x: F.pad(x, flat, value=value)
