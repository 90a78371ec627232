"""Elementwise arithmetic with tensors and numbers, and elementwise math (Core ML's unary layer, clamp, normalize)."""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F

from . import arg, helper_layer, register_function, register_method


def _elementwise(ctx, node, mode: str) -> str:
    a, b = node.args[0], node.args[1]
    if node.kwargs.get("alpha", 1) != 1:
        raise ctx.unsupported(node, "add with alpha != 1")
    tensors = [x for x in (a, b) if ctx.is_tensor(x)]
    scalars = [x for x in (a, b) if not ctx.is_tensor(x)]
    if scalars and not isinstance(scalars[0], (int, float)):
        raise ctx.unsupported(node, f"{mode.lower()} with an operand of type {type(scalars[0]).__name__}")
    rank = len(ctx.shape(node))
    if any(len(ctx.shape(t)) != rank for t in tensors):
        raise ctx.unsupported(node, "broadcasting between tensors of different ranks")
    name, out = ctx.layer(node)
    if scalars:
        alpha = float(scalars[0])
        ctx.builder.add_elementwise(name, [ctx.inp(tensors[0])], out, mode, alpha=alpha)
    else:
        ctx.builder.add_elementwise(name, [ctx.inp(t) for t in tensors], out, mode)
    return out


@register_function(operator.add, operator.iadd, torch.add)
@register_method("add", "add_")
def add(ctx, node, target) -> str:
    return _elementwise(ctx, node, "ADD")


@register_function(operator.mul, operator.imul, torch.mul)
@register_method("mul", "mul_")
def mul(ctx, node, target) -> str:
    return _elementwise(ctx, node, "MULTIPLY")


def _scaled(ctx, node, blob: str, alpha: float, suffix: str) -> str:
    """An extra ``multiply`` layer computing ``alpha * blob`` (named after the node)."""
    name = helper_layer(ctx, node, suffix)
    ctx.builder.add_elementwise(name, [blob], name, "MULTIPLY", alpha=alpha)
    return name


@register_function(operator.sub, operator.isub, torch.sub)
@register_method("sub", "sub_")
def sub(ctx, node, target) -> str:
    """``a - b``: ``add(a, -1 * b)``; a scalar operand becomes the add's alpha."""
    a, b = node.args[0], node.args[1]
    if node.kwargs.get("alpha", 1) != 1:
        raise ctx.unsupported(node, "sub with alpha != 1")
    if ctx.is_tensor(a) and ctx.is_tensor(b):
        if len(ctx.shape(a)) != len(ctx.shape(b)):
            raise ctx.unsupported(node, "broadcasting between tensors of different ranks")
        neg = _scaled(ctx, node, ctx.inp(b), -1.0, "neg")
        name, out = ctx.layer(node)
        ctx.builder.add_elementwise(name, [ctx.inp(a), neg], out, "ADD")
        return out
    if ctx.is_tensor(a) and isinstance(b, (int, float)):
        name, out = ctx.layer(node)
        ctx.builder.add_elementwise(name, [ctx.inp(a)], out, "ADD", alpha=-float(b))
        return out
    if ctx.is_tensor(b) and isinstance(a, (int, float)):
        neg = _scaled(ctx, node, ctx.inp(b), -1.0, "neg")
        name, out = ctx.layer(node)
        ctx.builder.add_elementwise(name, [neg], out, "ADD", alpha=float(a))
        return out
    raise ctx.unsupported(node, "sub of these operand types")


@register_function(operator.truediv, operator.itruediv, torch.div)
@register_method("div", "div_")
def div(ctx, node, target) -> str:
    """``x / c`` for a number ``c``: multiply by ``1 / c``; ``c / x``: ``c`` times Core ML's
    inverse."""
    a, b = node.args[0], node.args[1]
    if node.kwargs.get("rounding_mode"):
        raise ctx.unsupported(node, "division with a rounding_mode")
    if ctx.is_tensor(b) and isinstance(a, (int, float)) and not ctx.is_tensor(a):
        return _unary(ctx, node, "inverse", b, times=float(a))
    if not (ctx.is_tensor(a) and isinstance(b, (int, float)) and b != 0):
        raise ctx.unsupported(node, "division except tensor / non-zero number or number / tensor")
    name, out = ctx.layer(node)
    ctx.builder.add_elementwise(name, [ctx.inp(a)], out, "MULTIPLY", alpha=1.0 / float(b))
    return out


#: Core ML's unary layer computes f(x + epsilon) for these; 1e-45 (the smallest float32) makes
#: that torch's f(x) (the builder's own choice for log)
_UNARY_EPS = {"log": 1e-45, "rsqrt": 1e-45, "inverse": 1e-45}


def _unary(ctx, node, mode: str, x=None, alpha: float = 1.0, times: float = 1.0) -> str:
    """Core ML's unary layer ``f(x)`` (``alpha``: POWER's exponent), scaled by ``times``."""
    src = ctx.inp(node.args[0] if x is None else x)
    scaled = helper_layer(ctx, node, mode) if times != 1.0 else None
    name, out = ctx.layer(node)
    ctx.builder.add_unary(scaled or name, src, scaled or out, mode, alpha=float(alpha),
                          epsilon=_UNARY_EPS.get(mode, 1e-6))
    if scaled:
        ctx.builder.add_elementwise(name, [scaled], out, "MULTIPLY", alpha=times)
    return out


def _math(mode: str):
    def convert(ctx, node, target) -> str:
        return _unary(ctx, node, mode)
    return convert


for _mode, _fns, _methods in (("exp", (torch.exp,), ("exp",)), ("log", (torch.log,), ("log",)),
                              ("sqrt", (torch.sqrt,), ("sqrt",)), ("rsqrt", (torch.rsqrt,), ("rsqrt",)),
                              ("abs", (torch.abs, operator.abs), ("abs",)),
                              ("inverse", (torch.reciprocal,), ("reciprocal",))):
    register_method(*_methods)(register_function(*_fns)(_math(_mode)))


@register_function(torch.pow, operator.pow)
@register_method("pow")
def power(ctx, node, target) -> str:
    """``x ** p`` for a number ``p`` (Core ML's unary power)."""
    x, p = node.args[0], arg(node, 1, "exponent")
    if not ctx.is_tensor(x) or ctx.is_tensor(p) or not isinstance(p, (int, float)):
        raise ctx.unsupported(node, "power except tensor ** number")
    return _unary(ctx, node, "power", alpha=float(p))


@register_function(torch.clamp, torch.clip)
@register_method("clamp", "clip", "clamp_", "clip_")
def clamp(ctx, node, target) -> str:
    """``clamp(x, lo, hi)`` from classic layers (Core ML's clip layer needs ND mode): ``max(x, lo)``
    is the unary threshold; ``min(., hi) = -max(-., -hi)``."""
    lo, hi = arg(node, 1, "min"), arg(node, 2, "max")
    if any(ctx.is_tensor(v) or not (v is None or isinstance(v, (int, float))) for v in (lo, hi)) \
            or (lo is None and hi is None):
        raise ctx.unsupported(node, "clamp except with number bounds")
    b, src = ctx.builder, ctx.inp(node.args[0])
    if hi is None:
        name, out = ctx.layer(node)
        b.add_unary(name, src, out, "threshold", alpha=float(lo))
        return out
    if lo is not None:
        floor = helper_layer(ctx, node, "min")
        b.add_unary(floor, src, floor, "threshold", alpha=float(lo))
        src = floor
    neg = helper_layer(ctx, node, "neg")
    b.add_activation(neg, "LINEAR", src, neg, params=[-1.0, 0.0])
    cap = helper_layer(ctx, node, "cap")
    b.add_unary(cap, neg, cap, "threshold", alpha=-float(hi))
    name, out = ctx.layer(node)
    b.add_activation(name, "LINEAR", cap, out, params=[-1.0, 0.0])
    return out


@register_function(F.normalize)
def normalize(ctx, node, target) -> str:
    """``F.normalize(x, dim=1)`` of (N, C) vectors: Core ML's l2normalize (over the whole blob,
    which is the vector here), ``x / sqrt(sum x^2 + 1e-24)`` = torch's ``x / max(|x|, 1e-12)``
    away from zero vectors."""
    p, dim = arg(node, 1, "p", 2.0), arg(node, 2, "dim", 1)
    shape = ctx.shape(node.args[0])
    if float(p) != 2.0 or int(dim) % len(shape) != 1 or math.prod(ctx.blob_shape(shape)[1:]) != 1:
        raise ctx.unsupported(node, f"normalize with p={p}, dim={dim} of a {tuple(shape[1:])} tensor "
                                    "per example (only p=2 over the channels of (N, C) vectors)")
    name, out = ctx.layer(node)
    ctx.builder.add_l2_normalize(name, ctx.inp(node.args[0]), out, epsilon=1e-24)
    return out


@register_function(torch.maximum, torch.minimum, torch.max, torch.min)
@register_method("maximum", "minimum", "max", "min")
def extreme(ctx, node, target) -> str:
    """The elementwise max / min of two same-shaped tensors: Core ML's max / min layers.
    (``torch.max(x, dim)`` gives a tuple; its values, ``[0]``, convert as a reduce.)"""
    a, b = node.args[0], arg(node, 1, "other")
    name_ = getattr(target, "__name__", target)
    if not (ctx.is_tensor(a) and ctx.is_tensor(b)) or ctx.shape(a) != ctx.shape(b):
        raise ctx.unsupported(node, f"{name_} except of two tensors of one shape (or torch.{name_}"
                                    "(x, dim)[0], the values along an axis)")
    name, out = ctx.layer(node)
    add = ctx.builder.add_elementwise
    add(name, [ctx.inp(a), ctx.inp(b)], out, "MAX" if name_ in ("max", "maximum") else "MIN")
    return out


@register_function(operator.neg, torch.neg, torch.negative)
@register_method("neg", "negative")
def negate(ctx, node, target) -> str:
    name, out = ctx.layer(node)
    ctx.builder.add_elementwise(name, [ctx.inp(node.args[0])], out, "MULTIPLY", alpha=-1.0)
    return out
