"""Shape ops of one example: reshapes, transposes, slicing, concatenation, splits, reductions."""

from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import arg, axis, example_shape, operand, register_function, register_method, register_module


@register_module(nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity)
@register_function(F.dropout, torch.dropout)
@register_method("contiguous", "float", "clone", "detach")
def identity(ctx, node, target) -> str:
    return ctx.inp(node.args[0])


@register_module(nn.Flatten, nn.Unflatten)
@register_function(torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze)
@register_method("view", "reshape", "flatten", "squeeze", "unsqueeze", "unflatten", "view_as", "reshape_as")
def reshape(ctx, node, target) -> str:
    """Any reshape keeping the batch axis: a reshapeStatic to the example's traced shape."""
    src = node.args[0]
    shape = example_shape(ctx, node)
    if shape == example_shape(ctx, src):
        return ctx.inp(src)
    if not 1 <= len(shape) <= 5:
        raise ctx.unsupported(node, f"a reshape to a rank-{len(shape)} example (Core ML: 1 to 5)")
    name, out = ctx.layer(node)
    ctx.builder.add_reshape_static(name, ctx.inp(src), out, list(shape))
    return out


def _perm(ctx, node) -> list[int]:
    rank = len(ctx.shape(node.args[0]))
    if node.target in (torch.transpose, "transpose") or node.target in (torch.swapaxes, "swapaxes"):
        perm = list(range(rank))
        d0, d1 = (int(d) % rank for d in (arg(node, 1, "dim0"), arg(node, 2, "dim1")))
        perm[d0], perm[d1] = perm[d1], perm[d0]
    elif node.target == "t" or node.target is torch.t:
        perm = list(range(rank))[:-2] + [rank - 1, rank - 2]
    elif len(node.args) == 2 and isinstance(node.args[1], (tuple, list)):
        perm = [int(d) % rank for d in node.args[1]]
    else:
        perm = [int(d) % rank for d in (node.args[1:] or arg(node, 1, "dims"))]
    if perm[0] != 0:
        raise ctx.unsupported(node, f"permutation {perm} moves the batch axis")
    return [p - 1 for p in perm[1:]]


@register_function(torch.permute, torch.transpose, torch.swapaxes)
@register_method("permute", "transpose", "swapaxes")
def permute(ctx, node, target) -> str:
    perm = _perm(ctx, node)
    if perm == sorted(perm):
        return ctx.inp(node.args[0])
    name, out = ctx.layer(node)
    transpose_layer(ctx, name, ctx.inp(node.args[0]), out, perm)
    return out


def transpose_layer(ctx, name: str, src: str, out: str, perm) -> None:
    ctx.builder.add_transpose(name, list(perm), src, out)


@register_function(torch.cat, torch.concat)
def cat(ctx, node, target) -> str:
    tensors = list(arg(node, 0, "tensors"))
    dim = axis(ctx, node, node, arg(node, 1, "dim", 0))
    name, out = ctx.layer(node)
    ctx.builder.add_concat_nd(name, [operand(ctx, node, t) for t in tensors], out, dim)
    return out


@register_function(torch.stack)
def stack(ctx, node, target) -> str:
    tensors = list(arg(node, 0, "tensors"))
    dim = axis(ctx, node, node, arg(node, 1, "dim", 0))
    name, out = ctx.layer(node)
    ctx.builder.add_stack(name, [operand(ctx, node, t, like=t) for t in tensors], out, dim)
    return out


def _slice(ctx, node, name: str, src: str, out: str, shape, bounds: dict) -> None:
    """sliceStatic of ``src`` (example ``shape``): ``bounds`` maps an axis to (start, end, step)."""
    begin, end, stride = [0] * len(shape), list(shape), [1] * len(shape)
    for ax, (b, e, s) in bounds.items():
        begin[ax], end[ax], stride[ax] = b, e, s
    ctx.builder.add_slice_static(name, src, out, begin, end, stride, [False] * len(shape),
                                 [False] * len(shape))


@register_function(torch.split, torch.chunk)
@register_method("split", "chunk")
def split(ctx, node, target) -> str:
    """torch.split / chunk: one sliceStatic per piece, each the blob of ``pieces[i]``."""
    src = node.args[0]
    shape = example_shape(ctx, src)
    chunk = target in (torch.chunk, "chunk")
    dim = arg(node, 2, "dim", 0)
    ax = axis(ctx, node, src, dim) % len(shape)
    size = shape[ax]
    if chunk:
        n = int(arg(node, 1, "chunks"))
        step = -(-size // n)
        sizes = [min(step, size - i) for i in range(0, size, step)]
    else:
        s = arg(node, 1, "split_size_or_sections", None)
        s = arg(node, 1, "split_size", s)
        sizes = [int(v) for v in s] if isinstance(s, (list, tuple)) else \
            [min(int(s), size - i) for i in range(0, size, int(s))]
    start = 0
    if any(u.target is not operator.getitem for u in node.users):
        raise ctx.unsupported(node, "a split whose pieces are used other than by index")
    bounds = []
    for n in sizes:
        bounds.append((start, start + n))
        start += n
    src_blob = ctx.inp(src)
    for user in node.users:
        i = int(user.args[1])
        name, out = ctx.layer(user)
        b, e = bounds[i]
        _slice(ctx, node, name, src_blob, out, shape, {ax: (b, e, 1)})
        ctx.blobs[user] = out
    return ctx.SKIP


@register_function(operator.getitem)
def getitem(ctx, node, target) -> str:
    """``x[:, 0]``, ``x[:, a:b, ::s]``, ``x[..., :k]``: a sliceStatic, then a reshapeStatic
    dropping the integer-indexed axes."""
    src, index = node.args
    if not ctx.is_tensor(src):
        raise ctx.unsupported(node, f"taking item {index!r} of {src}, which is not a tensor")
    shape = example_shape(ctx, src)
    index = index if isinstance(index, tuple) else (index,)
    if any(i is None for i in index):
        raise ctx.unsupported(node, "indexing with None (use unsqueeze)")
    if sum(i is Ellipsis for i in index) > 1:
        raise ctx.unsupported(node, "an index with two ellipses")
    if Ellipsis in index:
        k = index.index(Ellipsis)
        index = index[:k] + (slice(None),) * (len(shape) + 1 - (len(index) - 1)) + index[k + 1:]
    if not index or index[0] != slice(None):
        raise ctx.unsupported(node, "indexing the batch axis (keep it with x[:, ...])")
    bounds = {}
    for ax, i in enumerate(index[1:]):
        if isinstance(i, slice):
            b, e, s = ctx.value(i.start), ctx.value(i.stop), ctx.value(i.step)
            b, e, s = slice(b, e, s).indices(shape[ax])
            if s <= 0:
                raise ctx.unsupported(node, "a slice with a negative step")
            if (b, e, s) != (0, shape[ax], 1):
                bounds[ax] = (b, e, s)
        elif isinstance(i, int):
            i %= shape[ax]
            bounds[ax] = (i, i + 1, 1)
        elif isinstance(i, (list, tuple)) and i and all(isinstance(v, int) for v in i):
            picks = [v % shape[ax] for v in i]  # x[:, [-1], :] keeps the axis
            if picks != list(range(picks[0], picks[0] + len(picks))):
                raise ctx.unsupported(node, f"indexing with the positions {list(i)} (only consecutive ones)")
            bounds[ax] = (picks[0], picks[-1] + 1, 1)
        else:
            raise ctx.unsupported(node, f"an index of type {type(i).__name__}")
    src_blob = ctx.inp(src)
    out_shape = example_shape(ctx, node)
    if not bounds:
        return src_blob
    name, out = ctx.layer(node)
    sliced = out
    reshape_needed = len(out_shape) != len(shape)
    if reshape_needed:
        sliced = ctx.new_blob(f"{name}_slice")
        ctx.used_layers.add(sliced)
    _slice(ctx, node, sliced if reshape_needed else name, src_blob, sliced, shape, bounds)
    if reshape_needed:
        if not out_shape:
            raise ctx.unsupported(node, "indexing down to a scalar per example")
        ctx.builder.add_reshape_static(name, sliced, out, list(out_shape))
    return out


def _reduce(ctx, node, kind: str) -> str:
    src = node.args[0]
    dims = arg(node, 1, "dim", None)
    keep = bool(arg(node, 2, "keepdim", False))
    rank = len(ctx.shape(src))
    if dims is None:
        dims = list(range(1, rank))
    dims = [dims] if isinstance(dims, int) else list(dims)
    axes = sorted(axis(ctx, node, src, d) for d in dims)
    if not keep and len(axes) == rank - 1:
        raise ctx.unsupported(node, "a reduction to a scalar per example (keepdim=True keeps a shape)")
    name, out = ctx.layer(node)
    getattr(ctx.builder, f"add_reduce_{kind}")(name, ctx.inp(src), out, axes=axes, keepdims=keep)
    return out


def _reduce_converter(kind: str):
    def convert(ctx, node, target) -> str:
        return _reduce(ctx, node, kind)
    return convert


for _fn, _kind in ((torch.mean, "mean"), (torch.sum, "sum"), (torch.amax, "max"), (torch.amin, "min")):
    register_method(_fn.__name__)(register_function(_fn)(_reduce_converter(_kind)))
