"""Padding, pixel (un)shuffle, reshape / flatten / permute, slicing and chunks, concatenation."""

from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.nn as nn
import torch.fx as fx
import torch.nn.functional as F

from . import arg, check_4d, helper_layer, register_function, register_method, register_module
from .pooling import reduce_axes


_PAD_MODES = {"constant": "constant", "reflect": "reflection", "replicate": "replication"}


def _pad(ctx, node, amounts, mode: str, value: float) -> str:
    """Core ML's padding layer: (left, right[, top, bottom]) of the last axes; a (N, C, L)
    tensor pads its length only."""
    amounts = [int(a) for a in amounts]
    rank = len(ctx.shape(node.args[0]))
    if mode not in _PAD_MODES or len(amounts) not in (2, 4) or min(amounts) < 0 or rank not in (3, 4) \
            or (rank == 3 and len(amounts) != 2):
        raise ctx.unsupported(node, f"padding {amounts} in mode {mode!r} of a rank-{rank} tensor "
                                    "(the last one or two axes of (N, C, L) / (N, C, H, W), "
                                    "not negative; constant, reflect or replicate)")
    left, right = amounts[:2]
    top, bottom = amounts[2:] if len(amounts) == 4 else (0, 0)
    name, out = ctx.layer(node)
    ctx.builder.add_padding(name, left=left, right=right, top=top, bottom=bottom, value=float(value),
                            input_name=ctx.inp(node.args[0]), output_name=out,
                            padding_type=_PAD_MODES[mode])
    return out


@register_module(nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d,
                 nn.ConstantPad1d, nn.ReflectionPad1d, nn.ReplicationPad1d)
def pad_module(ctx, node, m) -> str:
    name = type(m).__name__
    mode = "reflect" if "Reflection" in name else "replicate" if "Replication" in name else "constant"
    return _pad(ctx, node, m.padding, mode, getattr(m, "value", 0.0))


@register_function(F.pad)
def pad_function(ctx, node, target) -> str:
    return _pad(ctx, node, ctx.value(arg(node, 1, "pad")), arg(node, 2, "mode", "constant"),
                arg(node, 3, "value", None) or 0.0)


def _swap_channel_blocks(ctx, node, src: str, first: int, second: int, hw: tuple,
                         last: Optional[tuple] = None) -> str:
    """Channels ordered (first, second) -> (second, first), as classic layers: reshape to
    (first, second, H * W), swap the first two axes (permute), reshape back (as the layer and
    blob ``last`` when given)."""
    b = ctx.builder
    split = helper_layer(ctx, node, "split")
    b.add_reshape(split, src, split, (first, second, hw[0] * hw[1]), 0)
    swapped = helper_layer(ctx, node, "swap")
    b.add_permute(swapped, (0, 2, 1, 3), split, swapped)
    name, out = last or (helper_layer(ctx, node, "order"),) * 2
    b.add_reshape(name, swapped, out, (first * second, *hw), 0)
    return out


@register_module(nn.PixelShuffle, nn.PixelUnshuffle)
@register_function(F.pixel_shuffle, F.pixel_unshuffle)
def pixel_shuffle(ctx, node, target) -> str:
    """torch orders the channels (C, r, r) where Core ML's iOS 11 DEPTH_TO_SPACE (its iOS 14
    PIXEL_SHUFFLE cannot sit in every network) orders them (r, r, C): the channel blocks are
    swapped around it with reshape/permute layers (no arithmetic, so exact)."""
    shuffle = isinstance(target, nn.PixelShuffle) or target is F.pixel_shuffle
    r = int(target.upscale_factor if isinstance(target, nn.PixelShuffle) else
            target.downscale_factor if isinstance(target, nn.PixelUnshuffle) else arg(node, 1, "factor"))
    check_4d(ctx, node, "pixel shuffling")
    c, h, w = ctx.blob_shape(ctx.shape(node.args[0]))
    src, b = ctx.inp(node.args[0]), ctx.builder
    if shuffle:
        src = _swap_channel_blocks(ctx, node, src, c // (r * r), r * r, (h, w))
        name, out = ctx.layer(node)
        b.add_reorganize_data(name, src, out, "DEPTH_TO_SPACE", r)
        return out
    moved = helper_layer(ctx, node, "s2d")
    b.add_reorganize_data(moved, src, moved, "SPACE_TO_DEPTH", r)
    return _swap_channel_blocks(ctx, node, moved, r * r, c, (h // r, w // r), last=ctx.layer(node))

@register_module(nn.Dropout, nn.Dropout2d, nn.AlphaDropout, nn.Identity)
@register_function(F.dropout, F.dropout2d, torch.dropout)
@register_method("contiguous", "float")
def identity(ctx, node, target) -> str:
    """Dropped at inference (dropout), or a no-op on Core ML's float blobs (contiguous, float):
    the node's value is its input's blob."""
    return ctx.inp(node.args[0])


@register_module(nn.Flatten, nn.Unflatten)
@register_function(torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze)
@register_method("view", "reshape", "flatten", "squeeze", "unsqueeze", "unflatten")
def reshape(ctx, node, target) -> str:
    """A reshape that keeps the blob (C, H, W) is free; (N, C, H, W) -> (N, -1) is flatten; any
    other per-example reshape (e.g. a decoder's (N, C*H*W) -> (N, C, H, W)) is Core ML's reshape
    layer: the blobs hold every shape's elements in torch's order, so channel-first reshaping
    matches torch's view."""
    src = node.args[0]
    before, after = ctx.shape(src), ctx.shape(node)
    if ctx.blob_shape(before) == ctx.blob_shape(after):
        return ctx.inp(src)
    name, out = ctx.layer(node)
    if len(after) == 2 and len(before) > 2:
        ctx.builder.add_flatten(name, 0, ctx.inp(src), out)  # CHANNEL_FIRST: torch order
    else:
        ctx.builder.add_reshape(name, ctx.inp(src), out, tuple(ctx.blob_shape(after)), 0)
    return out


def _varargs(node, name: str) -> tuple:
    """The sizes after the tensor of ``x.permute(0, 2, 1)`` / ``x.permute((0, 2, 1))`` /
    ``torch.permute(x, dims=...)`` (repeat alike)."""
    if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)):
        return tuple(node.args[1])
    return tuple(node.args[1:]) or tuple(arg(node, 1, name))


def _blob_axes(rank: int) -> list:
    """Torch axis of an (N, ...) tensor -> its axis in Core ML's (Seq, C, H, W): (N, C, L) has
    C on 1 and L on W (3); (N, C, H, W) maps one to one."""
    return [0, 1, 3] if rank == 3 else [0, 1, 2, 3]


@register_function(torch.permute, torch.transpose)
@register_method("permute", "transpose")
def permute(ctx, node, target) -> str:
    """A permutation of the non-batch axes of a rank-3 or rank-4 tensor: Core ML's permute layer
    (e.g. NCHW <-> NHWC around channels-last LayerNorm / Linear)."""
    rank = len(ctx.shape(node.args[0]))
    if target in (torch.transpose, "transpose"):
        perm = list(range(rank))
        d0, d1 = (int(d) % rank for d in (arg(node, 1, "dim0"), arg(node, 2, "dim1")))
        perm[d0], perm[d1] = perm[d1], perm[d0]
    else:
        perm = [int(d) % rank for d in _varargs(node, "dims")]
    if rank not in (3, 4) or perm[0] != 0:
        raise ctx.unsupported(node, f"permutation {perm} of a rank-{rank} tensor (the batch axis "
                                    "stays first; ranks 3 and 4)")
    if perm == list(range(rank)):
        return ctx.inp(node.args[0])
    axes, core = _blob_axes(rank), [0, 1, 2, 3]
    for out_axis, in_axis in enumerate(perm):
        core[axes[out_axis]] = axes[in_axis]
    name, out = ctx.layer(node)
    ctx.builder.add_permute(name, tuple(core), ctx.inp(node.args[0]), out)
    return out


@register_function(torch.cat, torch.concat)
def cat(ctx, node, target) -> str:
    tensors = list(arg(node, 0, "tensors"))
    dim = arg(node, 1, "dim", 0)
    rank = len(ctx.shape(node))
    if any(len(ctx.shape(t)) != rank for t in tensors) or dim % rank != 1:
        raise ctx.unsupported(node, f"concatenation along dim={dim} (only channels, dim=1)")
    name, out = ctx.layer(node)
    ctx.builder.add_elementwise(name, [ctx.inp(t) for t in tensors], out, "CONCAT")
    return out


#: torch.max / torch.min with a dim (functions and methods): their [0] is a reduction
_ARG_REDUCTIONS = {torch.max: "MAX", torch.min: "MIN", "max": "MAX", "min": "MIN"}
#: torch.chunk / torch.split (functions and methods) a getitem may read a part of
_SPLITS = {torch.chunk: "chunk", torch.split: "split", "chunk": "chunk", "split": "split"}
_SLICE_AXES = ("channel", "height", "width")


def _slice_axis(ctx, node, rank: int, dim: int) -> str:
    """Core ML's slice axis of torch axis ``dim`` (not the batch axis) of a rank-2..4 tensor."""
    dim %= rank
    blob_axis = {2: {1: 0}, 3: {1: 0, 2: 2}, 4: {1: 0, 2: 1, 3: 2}}[rank].get(dim)
    if blob_axis is None:
        raise ctx.unsupported(node, f"slicing the batch axis (dim={dim})")
    return _SLICE_AXES[blob_axis]


def _split_bounds(ctx, node, src) -> tuple[int, list[tuple[int, int]]]:
    """(dim, [(start, end) of each part]) of a torch.chunk / torch.split node."""
    kind = _SPLITS[src.target]
    size_arg, dim = arg(src, 1, "chunks" if kind == "chunk" else "split_size_or_sections"), arg(src, 2, "dim", 0)
    shape = ctx.shape(src.args[0])
    n = shape[int(dim) % len(shape)]
    if kind == "chunk":
        step = -(-n // int(size_arg))
        sizes = [min(step, n - s) for s in range(0, n, step)]
    elif isinstance(size_arg, int):
        sizes = [min(size_arg, n - s) for s in range(0, n, size_arg)]
    else:
        sizes = [int(v) for v in size_arg]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return int(dim), [(a, a + k) for a, k in zip(starts, sizes)]


def _slice(ctx, node, src_blob: str, axis: str, start: int, end: int, step: int, last: bool) -> str:
    name, out = ctx.layer(node) if last else (helper_layer(ctx, node, f"slice_{axis}"),) * 2
    ctx.builder.add_slice(name, src_blob, out, axis, start, end, step)
    return out


@register_function(operator.getitem)
def getitem(ctx, node, target) -> str:
    """``torch.chunk(x, n, dim)[i]`` / ``torch.split(...)[i]`` and basic slicing
    ``x[:, a:b, ::s, c:]`` of non-batch axes: Core ML's slice layer along the channel, height or
    width axis (one per sliced axis; explicit non-negative bounds). ``torch.max(x, dim)[0]`` (the
    values; min too): a reduce."""
    src, index = node.args
    if isinstance(src, fx.Node) and src.target in _ARG_REDUCTIONS and index == 0:
        dim = arg(src, 1, "dim")
        if not isinstance(dim, int):
            raise ctx.unsupported(node, f"{src.target}(...)[0] without an integer dim")
        return reduce_axes(ctx, node, _ARG_REDUCTIONS[src.target], src.args[0], dim)
    if isinstance(src, fx.Node) and src.op in ("call_function", "call_method") and src.target in _SPLITS:
        dim, bounds = _split_bounds(ctx, node, src)
        rank = len(ctx.shape(src.args[0]))
        start, end = bounds[int(index)]
        return _slice(ctx, node, ctx.inp(src.args[0]), _slice_axis(ctx, node, rank, dim), start, end, 1, True)
    if not ctx.is_tensor(src):
        raise ctx.unsupported(node, "indexing a value that is not a tensor of the graph")
    shape = ctx.shape(src)
    index = index if isinstance(index, tuple) else (index,)
    if Ellipsis in index or any(not isinstance(i, slice) for i in index) or not index \
            or index[0] != slice(None) or len(index) > len(shape):
        raise ctx.unsupported(node, f"indexing with {index} (only slices of the non-batch axes, "
                                    "e.g. x[:, 2:5], x[:, :, ::2])")
    cuts = []
    for dim, sl in enumerate(index[1:], start=1):
        start, end, step = sl.indices(shape[dim])
        if step < 1:
            raise ctx.unsupported(node, f"a slice with step {step} (only positive steps)")
        if (start, end, step) != (0, shape[dim], 1):
            cuts.append((_slice_axis(ctx, node, len(shape), dim), start, end, step))
    blob = ctx.inp(src)
    if not cuts:
        return blob
    for k, (axis, start, end, step) in enumerate(cuts):
        blob = _slice(ctx, node, blob, axis, start, end, step, k == len(cuts) - 1)
    return blob


@register_method("expand", "expand_as")
def expand(ctx, node, target) -> str:
    """Broadcasting a (C, 1, 1) / (C, 1, W) / (C, H, 1) blob over height and width: Core ML's
    nearest upsampling by the whole new size (copies, so exact)."""
    before, after = ctx.shape(node.args[0]), ctx.shape(node)
    if len(before) != len(after) or before[:2] != after[:2] or len(after) not in (3, 4):
        raise ctx.unsupported(node, f"expanding {tuple(before)} to {tuple(after)} (only height / "
                                    "width axes of size 1)")
    (_, h, w), (_, oh, ow) = ctx.blob_shape(before), ctx.blob_shape(after)
    if (h not in (1, oh)) or (w not in (1, ow)):
        raise ctx.unsupported(node, f"expanding {tuple(before)} to {tuple(after)}")
    if (h, w) == (oh, ow):
        return ctx.inp(node.args[0])
    name, out = ctx.layer(node)
    ctx.builder.add_upsample(name, oh // h, ow // w, ctx.inp(node.args[0]), out, mode="NN")
    return out


@register_method("repeat")
def repeat(ctx, node, target) -> str:
    """``x.repeat(1, k, 1[, 1])``: k copies along the channels (a concat layer)."""
    reps = [int(r) for r in ctx.value(list(_varargs(node, "repeats")))]
    rank = len(ctx.shape(node.args[0]))
    if len(reps) != rank or reps[0] != 1 or any(r != 1 for r in reps[2:]):
        raise ctx.unsupported(node, f"repeat {reps} (only along the channels, e.g. x.repeat(1, k, 1, 1))")
    if reps[1] == 1:
        return ctx.inp(node.args[0])
    name, out = ctx.layer(node)
    ctx.builder.add_elementwise(name, [ctx.inp(node.args[0])] * reps[1], out, "CONCAT")
    return out
