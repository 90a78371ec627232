"""reduce (classic, over C/H/W axes) and the ND reduce*, argMax and argMin kinds."""

from __future__ import annotations

import torch

from . import or_default, register

SUM, AVG, PROD, LOGSUM, SUMSQUARE, L1, L2, MAX, MIN, ARGMAX = range(10)
_AXES = {0: (-3, -2, -1), 1: (-2, -1), 2: (-3,), 3: (-2,), 4: (-1,)}  # CHW, HW, C, H, W


def _prod(x, dims, keep):
    for d in sorted(dims, reverse=True):
        x = torch.prod(x, dim=d, keepdim=True)
    return x if keep else x.squeeze(dims)


def _reducer(op, eps=1e-6):
    """op name -> f(x, dims, keepdim)."""
    return {
        SUM: lambda x, d, k: torch.sum(x, dim=d, keepdim=k),
        AVG: lambda x, d, k: torch.mean(x, dim=d, keepdim=k),
        PROD: _prod,
        LOGSUM: lambda x, d, k: torch.sum(torch.log(x + eps), dim=d, keepdim=k),
        SUMSQUARE: lambda x, d, k: torch.sum(x * x, dim=d, keepdim=k),
        L1: lambda x, d, k: torch.sum(torch.abs(x), dim=d, keepdim=k),
        L2: lambda x, d, k: torch.sqrt(torch.sum(x * x, dim=d, keepdim=k)),
        MAX: lambda x, d, k: torch.amax(x, dim=d, keepdim=k),
        MIN: lambda x, d, k: torch.amin(x, dim=d, keepdim=k),
    }[op]


@register("reduce")
def reduce(layer, ctx):
    p = layer.reduce
    mode, dims = int(p.mode), _AXES[int(p.axis)]
    if mode == ARGMAX:
        if len(dims) != 1:
            raise ctx.fail("ARGMAX reduces one axis (C, H or W) only")
        return lambda x: torch.argmax(x, dim=dims[0], keepdim=True).to(x.dtype)
    if mode > ARGMAX:
        raise ctx.unsupported(f"unknown reduce mode {mode}")
    fn = _reducer(mode, or_default(p.epsilon, 1e-6))
    return lambda x: fn(x, dims, True)


_ND = {"reduceSum": SUM, "reduceMean": AVG, "reduceProd": PROD, "reduceLogSum": LOGSUM,
       "reduceSumSquare": SUMSQUARE, "reduceL1": L1, "reduceL2": L2, "reduceMax": MAX,
       "reduceMin": MIN}


def _reduce_nd(layer, ctx):
    kind = layer.WhichOneof("layer")
    p = getattr(layer, kind)
    axes, keep, every = tuple(int(a) for a in p.axes), bool(p.keepDims), bool(p.reduceAll)
    fn = _reducer(_ND[kind], 0.0) if kind != "reduceLogSum" else (
        lambda x, d, k: torch.log(torch.sum(x, dim=d, keepdim=k)))

    def f(x):
        dims = tuple(range(x.dim())) if every or not axes else axes
        return fn(x, dims, keep)

    return f


for _kind in _ND:
    register(_kind)(_reduce_nd)


@register("reduceLogSumExp")
def reduce_logsumexp(layer, ctx):
    p = layer.reduceLogSumExp
    axes, keep, every = tuple(int(a) for a in p.axes), bool(p.keepDims), bool(p.reduceAll)
    return lambda x: torch.logsumexp(x, dim=tuple(range(x.dim())) if every or not axes else axes,
                                     keepdim=keep)


def _arg(fn):
    def build(layer, ctx):
        p = getattr(layer, layer.WhichOneof("layer"))
        axis, keep = int(p.axis), not p.removeDim
        return lambda x: fn(x, dim=axis, keepdim=keep).to(x.dtype)

    return build


register("argMax")(_arg(torch.argmax))
register("argMin")(_arg(torch.argmin))
