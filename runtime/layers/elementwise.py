"""Element-wise layers over one or several inputs: add, multiply, average, max, min, dot, scale,
bias, the *Broadcastable kinds, comparisons, logical ops and whereBroadcastable."""

from __future__ import annotations

import functools

import numpy as np
import torch

from . import register


def _reduce(op, one=None):
    """A builder folding ``op`` over all inputs; ``one(x, alpha)`` handles a single input."""

    def build(layer, ctx):
        alpha = float(getattr(getattr(layer, layer.WhichOneof("layer")), "alpha", 0.0))

        def f(*xs):
            if len(xs) == 1 and one is not None:
                return one(xs[0], alpha)
            return functools.reduce(op, xs)

        return f

    return build


register("add")(_reduce(torch.add, lambda x, a: x + a))
register("multiply")(_reduce(torch.mul, lambda x, a: x * a))
register("max")(_reduce(torch.maximum))
register("min")(_reduce(torch.minimum))

for _kind, _op in {
    "addBroadcastable": torch.add, "subtractBroadcastable": torch.sub,
    "multiplyBroadcastable": torch.mul, "divideBroadcastable": torch.div,
    "maxBroadcastable": torch.maximum, "minBroadcastable": torch.minimum,
    "powBroadcastable": torch.pow, "floorDivBroadcastable": lambda a, b: torch.floor(a / b),
    "modBroadcastable": torch.remainder,
    "logicalAnd": lambda a, b: ((a != 0) & (b != 0)).float(),
    "logicalOr": lambda a, b: ((a != 0) | (b != 0)).float(),
    "logicalXor": lambda a, b: ((a != 0) ^ (b != 0)).float(),
}.items():
    register(_kind)(_reduce(_op))


@register("average")
def average(layer, ctx):
    return lambda *xs: functools.reduce(torch.add, xs) / len(xs)


@register("dot")
def dot(layer, ctx):
    """Dot product (or cosine similarity) over axis -3 of two (..., C, 1, 1) blobs."""
    cos = bool(layer.dot.cosineSimilarity)

    def f(a, b):
        if cos:
            a = a / torch.linalg.vector_norm(a, dim=-3, keepdim=True)
            b = b / torch.linalg.vector_norm(b, dim=-3, keepdim=True)
        return torch.sum(a * b, dim=-3, keepdim=True)

    return f


def _chw_param(ctx, wp, shape, field):
    """A scale/bias of shape [1], [C], [1, H, W] or [C, H, W] -> broadcastable over (..., C, H, W)."""
    shape = [int(s) for s in shape] or [1]
    t = ctx.weights(wp, (int(np.prod(shape)),), field)
    if len(shape) == 1:
        return t.reshape(-1, 1, 1) if shape[0] > 1 else t.reshape(())
    if len(shape) != 3:
        raise ctx.fail(f"{field} shape {shape} must be [1], [C], [1, H, W] or [C, H, W]")
    return t.reshape(shape)


@register("scale")
def scale(layer, ctx):
    p = layer.scale
    s = _chw_param(ctx, p.scale, p.shapeScale, "scale")
    b = _chw_param(ctx, p.bias, p.shapeBias, "bias") if p.hasBias else None
    return (lambda x: x * s + b) if b is not None else (lambda x: x * s)


@register("bias")
def bias(layer, ctx):
    b = _chw_param(ctx, layer.bias.bias, layer.bias.shape, "bias")
    return lambda x: x + b


def _compare(op):
    def build(layer, ctx):
        alpha = float(getattr(layer, layer.WhichOneof("layer")).alpha)

        def f(a, b=None):
            return op(a, alpha if b is None else b).to(a.dtype)

        return f

    return build


for _kind, _op in {"greaterThan": torch.gt, "greaterEqual": torch.ge, "lessThan": torch.lt,
                   "lessEqual": torch.le, "equal": torch.eq, "notEqual": torch.ne}.items():
    register(_kind)(_compare(_op))


@register("logicalNot")
def logical_not(layer, ctx):
    return lambda x: (x == 0).to(x.dtype)


@register("whereBroadcastable")
def where(layer, ctx):
    return lambda cond, a, b: torch.where(cond != 0, a, b)
