"""Pooling (2-D, 1-D, adaptive, global) and reductions over channels / height / width."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import (
    arg, check_4d, check_rank, helper_layer, pair, register_function, register_method,
    register_module,
)


def _pool(ctx, node, kind, kernel, stride, padding, ceil_mode=False, count_include_pad=True) -> str:
    kh, kw = pair(kernel)
    sh, sw = pair(stride if stride not in (None, ()) else kernel)
    ph, pw = pair(padding)
    name, out = ctx.layer(node)
    ctx.builder.add_pooling(
        name, height=kh, width=kw, stride_height=sh, stride_width=sw, layer_type=kind,
        padding_type="INCLUDE_LAST_PIXEL" if ceil_mode else "VALID",
        input_name=ctx.inp(node.args[0]), output_name=out,
        exclude_pad_area=not count_include_pad,
        padding_top=ph, padding_bottom=ph, padding_left=pw, padding_right=pw,
    )
    return out


def _one_d(v) -> int:
    """The one value of a 1-D pooling argument (an int or a 1-tuple)."""
    return int(v[0]) if isinstance(v, (tuple, list)) else int(v)


@register_module(nn.MaxPool1d, nn.AvgPool1d)
def pool1d(ctx, node, m) -> str:
    """1-D pooling over (N, C, L): a 1 x k pooling of the (C, 1, L) blob."""
    check_rank(ctx, node, 3, type(m).__name__)
    if isinstance(m, nn.MaxPool1d) and (_one_d(m.dilation) != 1 or m.return_indices):
        raise ctx.unsupported(node, "MaxPool1d with dilation or return_indices")
    k = _one_d(m.kernel_size)
    s = _one_d(m.stride) if m.stride not in (None, ()) else k
    kind = "MAX" if isinstance(m, nn.MaxPool1d) else "AVERAGE"
    return _pool(ctx, node, kind, (1, k), (1, s), (0, _one_d(m.padding)), m.ceil_mode,
                 getattr(m, "count_include_pad", True))


@register_function(F.max_pool1d, torch.max_pool1d, F.avg_pool1d, torch.avg_pool1d)
def pool1d_fn(ctx, node, target) -> str:
    """``F.max_pool1d(x, k, stride, padding, dilation, ceil_mode)`` /
    ``F.avg_pool1d(x, k, stride, padding, ceil_mode, count_include_pad)``: as the modules."""
    is_max = target in (F.max_pool1d, torch.max_pool1d)
    k = arg(node, 1, "kernel_size")
    stride = arg(node, 2, "stride", None)
    module = (nn.MaxPool1d(k, stride, arg(node, 3, "padding", 0), arg(node, 4, "dilation", 1),
                           arg(node, 6, "return_indices", False), arg(node, 5, "ceil_mode", False))
              if is_max else
              nn.AvgPool1d(k, stride, arg(node, 3, "padding", 0), arg(node, 4, "ceil_mode", False),
                           arg(node, 5, "count_include_pad", True)))
    return pool1d(ctx, node, module)


@register_module(nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d)
def adaptive_pool1d(ctx, node, m) -> str:
    check_rank(ctx, node, 3, type(m).__name__)
    kind = "AVERAGE" if isinstance(m, nn.AdaptiveAvgPool1d) else "MAX"
    length, size = ctx.shape(node.args[0])[2], _one_d(m.output_size)
    if size == 1:
        name, out = ctx.layer(node)
        ctx.builder.add_pooling(name, 1, 1, 1, 1, kind, "VALID", ctx.inp(node.args[0]), out,
                                is_global=True)
        return out
    if length % size:
        raise ctx.unsupported(node, f"adaptive pooling from length {length} to {size} (sizes must divide)")
    return _pool(ctx, node, kind, (1, length // size), (1, length // size), 0)


@register_module(nn.MaxPool2d)
def max_pool2d(ctx, node, m: nn.MaxPool2d) -> str:
    check_4d(ctx, node)
    if pair(m.dilation) != (1, 1) or m.return_indices:
        raise ctx.unsupported(node, "MaxPool2d with dilation or return_indices")
    return _pool(ctx, node, "MAX", m.kernel_size, m.stride, m.padding, m.ceil_mode)


@register_function(F.max_pool2d, torch.max_pool2d)
def max_pool2d_fn(ctx, node, target) -> str:
    check_4d(ctx, node)
    if pair(arg(node, 4, "dilation", 1)) != (1, 1) or arg(node, 6, "return_indices", False):
        raise ctx.unsupported(node, "max_pool2d with dilation or return_indices")
    k = arg(node, 1, "kernel_size")
    return _pool(ctx, node, "MAX", k, arg(node, 2, "stride", None), arg(node, 3, "padding", 0),
                 arg(node, 5, "ceil_mode", False))


@register_module(nn.AvgPool2d)
def avg_pool2d(ctx, node, m: nn.AvgPool2d) -> str:
    check_4d(ctx, node)
    if m.divisor_override:
        raise ctx.unsupported(node, "AvgPool2d with divisor_override")
    return _pool(ctx, node, "AVERAGE", m.kernel_size, m.stride, m.padding, m.ceil_mode,
                 m.count_include_pad)


@register_function(F.avg_pool2d, torch._C._nn.avg_pool2d)
def avg_pool2d_fn(ctx, node, target) -> str:
    check_4d(ctx, node)
    if arg(node, 6, "divisor_override", None):
        raise ctx.unsupported(node, "avg_pool2d with divisor_override")
    return _pool(ctx, node, "AVERAGE", arg(node, 1, "kernel_size"), arg(node, 2, "stride", None),
                 arg(node, 3, "padding", 0), arg(node, 4, "ceil_mode", False),
                 arg(node, 5, "count_include_pad", True))


def _adaptive(ctx, node, kind: str, output_size) -> str:
    check_4d(ctx, node)
    h, w = ctx.shape(node.args[0])[2:]
    oh, ow = pair(output_size)
    oh, ow = oh or h, ow or w
    if (oh, ow) == (1, 1):
        name, out = ctx.layer(node)
        ctx.builder.add_pooling(name, 1, 1, 1, 1, kind, "VALID", ctx.inp(node.args[0]), out,
                                is_global=True)
        return out
    if h % oh or w % ow:
        raise ctx.unsupported(node, f"adaptive pooling from {h}x{w} to {oh}x{ow} (sizes must divide)")
    k = (h // oh, w // ow)
    return _pool(ctx, node, kind, k, k, 0)


@register_module(nn.AdaptiveAvgPool2d)
def adaptive_avg_pool2d(ctx, node, m) -> str:
    return _adaptive(ctx, node, "AVERAGE", m.output_size)


@register_module(nn.AdaptiveMaxPool2d)
def adaptive_max_pool2d(ctx, node, m) -> str:
    if m.return_indices:
        raise ctx.unsupported(node, "AdaptiveMaxPool2d with return_indices")
    return _adaptive(ctx, node, "MAX", m.output_size)


@register_function(F.adaptive_avg_pool2d)
def adaptive_avg_pool2d_fn(ctx, node, target) -> str:
    return _adaptive(ctx, node, "AVERAGE", arg(node, 1, "output_size"))


@register_function(F.adaptive_max_pool2d)
def adaptive_max_pool2d_fn(ctx, node, target) -> str:
    if arg(node, 2, "return_indices", False):
        raise ctx.unsupported(node, "adaptive_max_pool2d with return_indices")
    return _adaptive(ctx, node, "MAX", arg(node, 1, "output_size"))


@register_function(torch.mean)
@register_method("mean")
def mean(ctx, node, target) -> str:
    """``x.mean((2, 3))`` over the spatial axes of (N, C, H, W), ``x.mean(2)`` over the length of
    (N, C, L): global average pooling (Core ML backpropagates through it); other axes: a reduce."""
    dims = arg(node, 1, "dim")
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    rank = len(ctx.shape(node.args[0]))
    spatial = {4: [2, 3], 3: [2]}.get(rank)
    if spatial is None or sorted(d % rank for d in dims) != spatial:
        return reduce_axes(ctx, node, "AVG")
    name, out = ctx.layer(node)
    ctx.builder.add_pooling(name, 1, 1, 1, 1, "AVERAGE", "VALID", ctx.inp(node.args[0]), out,
                            is_global=True)
    return out


#: torch axes (without the batch axis) of a rank-2/3/4 tensor -> Core ML's reduce axis
_REDUCE_AXES = {
    2: {(1,): "C"},
    3: {(1,): "C", (2,): "W", (1, 2): "CHW"},
    4: {(1,): "C", (2,): "H", (3,): "W", (2, 3): "HW", (1, 2, 3): "CHW"},
}


def reduce_axes(ctx, node, mode: str, src=None, dims=None) -> str:
    """sum / mean / amax / amin over non-batch axes: Core ML's reduce layer (reduced axes kept as
    1), reshaped to the blob of torch's result when ``keepdim=False`` drops axes. ``src`` and
    ``dims`` default to the node's first two arguments."""
    src = node.args[0] if src is None else src
    shape = ctx.shape(src)
    rank, dims = len(shape), arg(node, 1, "dim") if dims is None else dims
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    axis = _REDUCE_AXES.get(rank, {}).get(tuple(sorted({int(d) % rank for d in dims})))
    if axis is None:
        raise ctx.unsupported(node, f"{mode.lower()} over dims {dims} of a rank-{rank} tensor (the "
                                    "non-batch axes: channels, height, width or their spatial / "
                                    "all combinations)")
    kept = list(ctx.blob_shape(shape))
    for i, a in enumerate("CHW"):
        kept[i] = 1 if a in axis else kept[i]
    want = ctx.blob_shape(ctx.shape(node))
    reshape = tuple(kept) != tuple(want)
    name, out = ctx.layer(node)
    mid = helper_layer(ctx, node, "kept") if reshape else out
    ctx.builder.add_reduce(name if not reshape else mid, ctx.inp(src), mid, axis, mode)
    if reshape:
        ctx.builder.add_reshape(name, mid, out, tuple(want), 0)
    return out


def _reduction(mode: str):
    def convert(ctx, node, target) -> str:
        return reduce_axes(ctx, node, mode)
    return convert


for _mode, _fn, _method in (("SUM", torch.sum, "sum"), ("MAX", torch.amax, "amax"),
                            ("MIN", torch.amin, "amin")):
    register_method(_method)(register_function(_fn)(_reduction(_mode)))


@register_function(torch.argmax)
@register_method("argmax")
def argmax(ctx, node, target) -> str:
    """``argmax`` over channels, height or width: Core ML's reduce ARGMAX (the index as a float
    in the blob; a segmentation head's class map)."""
    dim = arg(node, 1, "dim")
    rank = len(ctx.shape(node.args[0]))
    if not isinstance(dim, int) or len(_REDUCE_AXES.get(rank, {}).get(((int(dim) % rank),), "")) != 1:
        raise ctx.unsupported(node, f"argmax over dim={dim} (one of the channel, height or width axes)")
    return reduce_axes(ctx, node, "ARGMAX", dims=int(dim))
