"""Arithmetic with numpy broadcasting, comparisons and masks, softmax, GELU, Layer/Group/RMSNorm;
the per-element converters of :mod:`exporters.ops` (ReLU, sigmoid, exp, clamp, ...) serve ND mode
unchanged (:data:`SHARED`)."""

from __future__ import annotations

import operator
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..ops import activation as act5
from ..ops import elementwise as elem5
from . import (
    arg, axis, example_shape, helper_layer, operand, register_function, register_method, register_module,
)

#: rank-5 converters that emit only per-element layers (activation, unary, scalar add/multiply
#: with alpha), which Core ML applies to a blob of any rank: ND mode uses them as they are
SHARED = frozenset({
    act5.relu, act5.sigmoid, act5.tanh, act5.leaky_relu, act5.elu, act5.hardtanh, act5.hardsigmoid,
    act5.hardswish, act5.silu, act5.softplus, act5.softsign, act5.mish, act5.hardshrink,
    act5.softshrink, act5.tanhshrink, elem5.power, elem5.clamp, elem5.negate,
}) | {ops.FUNCTIONS[f] for f in (torch.exp, torch.log, torch.sqrt, torch.rsqrt, torch.abs, torch.reciprocal)}

_BROADCASTABLE = {"add": "add_add_broadcastable", "sub": "add_subtract_broadcastable",
                  "mul": "add_multiply_broadcastable", "div": "add_divide_broadcastable"}


def _binary(ctx, node, kind: str) -> str:
    """``a op b`` with numpy broadcasting over one example's axes; constants and numbers become
    loadConstantND blobs."""
    a, b = node.args[0], node.args[1]
    if node.kwargs.get("alpha", 1) != 1 or (len(node.args) > 2 and node.args[2] != 1):
        raise ctx.unsupported(node, f"{kind} with alpha != 1")
    if kind == "div" and node.kwargs.get("rounding_mode"):
        raise ctx.unsupported(node, "division with a rounding_mode")
    live = [t for t in (a, b) if ctx.is_tensor(t) and not ctx.is_constant(t)]
    rank = len(ctx.shape(node))
    if any(len(ctx.shape(t)) != rank for t in live):
        raise ctx.unsupported(node, f"{kind} of tensors of different ranks (torch would align the "
                                    "batch axis with another one); unsqueeze the smaller one")
    blobs = [operand(ctx, node, t) for t in (a, b)]
    name, out = ctx.layer(node)
    getattr(ctx.builder, _BROADCASTABLE[kind])(name, blobs, out)
    return out


def _binary_converter(kind: str):
    def convert(ctx, node, target) -> str:
        return _binary(ctx, node, kind)
    return convert


for _kind, _fns in (("add", (operator.add, operator.iadd, torch.add)),
                    ("sub", (operator.sub, operator.isub, torch.sub)),
                    ("mul", (operator.mul, operator.imul, torch.mul)),
                    ("div", (operator.truediv, operator.itruediv, torch.div))):
    register_method(_kind, f"{_kind}_")(register_function(*_fns)(_binary_converter(_kind)))


@register_module(nn.Softmax)
@register_function(F.softmax, torch.softmax)
@register_method("softmax")
def softmax(ctx, node, target) -> str:
    dim = target.dim if isinstance(target, nn.Module) else arg(node, 1, "dim")
    if dim is None:
        raise ctx.unsupported(node, "softmax without dim")
    name, out = ctx.layer(node)
    ctx.builder.add_softmax_nd(name, ctx.inp(node.args[0]), out, axis(ctx, node, node.args[0], dim))
    return out


@register_module(nn.GELU)
@register_function(F.gelu)
def gelu(ctx, node, target) -> str:
    approx = target.approximate if isinstance(target, nn.Module) else arg(node, 1, "approximate", "none")
    name, out = ctx.layer(node)
    gelu_layer(ctx, name, ctx.inp(node.args[0]), out, approx)
    return out


def gelu_layer(ctx, name: str, src: str, out: str, approximate: str = "none") -> None:
    modes = {"none": "EXACT", "tanh": "TANH_APPROXIMATION"}
    if approximate not in modes:
        raise ctx.unsupported(ctx.node, f"GELU approximate={approximate!r}")
    ctx.builder.add_gelu(name, src, out, modes[approximate])


@register_module(nn.LayerNorm)
def layer_norm(ctx, node, m: nn.LayerNorm) -> str:
    name, out = ctx.layer(node)
    layer_norm_layer(ctx, node, m, name, ctx.inp(node.args[0]), out, example_shape(ctx, node.args[0]))
    return out


@register_function(F.layer_norm)
def layer_norm_fn(ctx, node, target) -> str:
    """``F.layer_norm(x, shape, weight, bias, eps)`` with constant (or no) weight and bias."""
    shape = tuple(ctx.value(arg(node, 1, "normalized_shape")))
    params = [arg(node, 2, "weight"), arg(node, 3, "bias")]
    if any(p is not None and not ctx.is_constant(p) for p in params):
        raise ctx.unsupported(node, "F.layer_norm with a weight or bias computed from the inputs")
    weight, bias = (None if p is None else ctx.constant(p) for p in params)
    m = SimpleNamespace(normalized_shape=shape, weight=weight, bias=bias, eps=float(arg(node, 4, "eps", 1e-5)))
    return layer_norm(ctx, node, m)


def layer_norm_layer(ctx, node, m: nn.LayerNorm, name: str, src: str, out: str, shape) -> None:
    """Core ML's layerNormalization over the trailing ``m.normalized_shape`` axes."""
    norm = tuple(int(s) for s in m.normalized_shape)
    if tuple(shape[len(shape) - len(norm):]) != norm or len(norm) > len(shape):
        raise ctx.unsupported(node, f"LayerNorm over {norm} of a {tuple(shape)} example")
    gamma = (m.weight.detach().cpu().float().numpy() if m.weight is not None
             else np.ones(norm, np.float32)).reshape(norm)
    beta = (m.bias.detach().cpu().float().numpy() if getattr(m, "bias", None) is not None
            else np.zeros(norm, np.float32)).reshape(norm)
    ctx.builder.add_layer_normalization(name, src, out, list(norm), gamma, beta, eps=float(m.eps))


@register_module(nn.GroupNorm)
def group_norm(ctx, node, m: nn.GroupNorm) -> str:
    """GroupNorm of a (C, ...) example: reshaped to (groups, rest), a layerNormalization over
    the rest, reshaped back, then gamma / beta per channel (broadcast multiply and add)."""
    shape = example_shape(ctx, node.args[0])
    if len(shape) < 2:
        raise ctx.unsupported(node, "GroupNorm of a tensor without spatial axes (N, C)")
    g, b = m.num_groups, ctx.builder
    rest = int(np.prod(shape)) // g
    grouped, normed = helper_layer(ctx, node, "groups"), helper_layer(ctx, node, "normed")
    b.add_reshape_static(grouped, ctx.inp(node.args[0]), grouped, [g, rest])
    b.add_layer_normalization(normed, grouped, normed, [rest], np.ones(rest, np.float32),
                              np.zeros(rest, np.float32), eps=float(m.eps))
    name, out = ctx.layer(node)
    if not m.affine:
        b.add_reshape_static(name, normed, out, list(shape))
        return out
    back = helper_layer(ctx, node, "chw")
    b.add_reshape_static(back, normed, back, list(shape))
    column = [shape[0]] + [1] * (len(shape) - 1)
    gamma, beta, scaled = (helper_layer(ctx, node, part) for part in ("gamma", "beta", "scaled"))
    b.add_load_constant_nd(gamma, gamma, m.weight.detach().cpu().float().numpy().reshape(column), column)
    b.add_load_constant_nd(beta, beta, m.bias.detach().cpu().float().numpy().reshape(column), column)
    b.add_multiply_broadcastable(scaled, [back, gamma], scaled)
    b.add_add_broadcastable(name, [scaled, beta], out)
    return out


@register_module(nn.RMSNorm)
def rms_norm(ctx, node, m: nn.RMSNorm) -> str:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the trailing ``normalized_shape`` axes: a
    square, a reduceMean, Core ML's unary rsqrt (whose epsilon is added under the root), two
    broadcast multiplies."""
    norm = tuple(int(s) for s in m.normalized_shape)
    shape = example_shape(ctx, node.args[0])
    if tuple(shape[len(shape) - len(norm):]) != norm or len(norm) > len(shape):
        raise ctx.unsupported(node, f"RMSNorm over {norm} of a {tuple(shape)} example")
    eps = m.eps if m.eps is not None else float(torch.finfo(torch.float32).eps)
    b, x = ctx.builder, ctx.inp(node.args[0])
    square, mean, inv = (helper_layer(ctx, node, part) for part in ("square", "mean_square", "rsqrt"))
    b.add_multiply_broadcastable(square, [x, x], square)
    b.add_reduce_mean(mean, square, mean, axes=list(range(-len(norm), 0)), keepdims=True)
    b.add_unary(inv, mean, inv, "rsqrt", epsilon=float(eps))
    name, out = ctx.layer(node)
    if m.weight is None:
        b.add_multiply_broadcastable(name, [x, inv], out)
        return out
    normed = helper_layer(ctx, node, "normed")
    b.add_multiply_broadcastable(normed, [x, inv], normed)
    weight = helper_layer(ctx, node, "weight")
    w = m.weight.detach().cpu().float().numpy()
    b.add_load_constant_nd(weight, weight, w, w.shape)
    b.add_multiply_broadcastable(name, [normed, weight], out)
    return out


# --- comparisons and masks: Core ML answers 1.0 / 0.0 where torch answers True / False ----------
_COMPARE = {"eq": ("add_equal", {}), "ne": ("add_not_equal", {}),
            "gt": ("add_greater_than", {}), "ge": ("add_greater_than", {"use_greater_than_equal": True}),
            "lt": ("add_less_than", {}), "le": ("add_less_than", {"use_less_than_equal": True})}


def _compare_converter(op: str):
    method, extra = _COMPARE[op]

    def convert(ctx, node, target) -> str:
        a, b = node.args[0], node.args[1]
        if not ctx.is_tensor(a):
            raise ctx.unsupported(node, "a comparison whose first operand is not a tensor")
        name, out = ctx.layer(node)
        if not ctx.is_tensor(b):  # a number: the layer's alpha
            getattr(ctx.builder, method)(name, [ctx.inp(a)], out, alpha=float(ctx.value(b)), **extra)
        else:
            getattr(ctx.builder, method)(name, [operand(ctx, node, a), operand(ctx, node, b)], out, **extra)
        return out
    return convert


for _op in _COMPARE:
    register_method(_op, f"__{_op}__")(register_function(getattr(operator, _op), getattr(torch, _op))(
        _compare_converter(_op)))


@register_function(operator.invert, torch.logical_not)
@register_method("logical_not", "__invert__")
def logical_not(ctx, node, target) -> str:
    if ctx.node_dtype(node.args[0]) is not torch.bool:
        raise ctx.unsupported(node, "~ of a non-boolean tensor (bitwise not)")
    name, out = ctx.layer(node)
    ctx.builder.add_logical(name, [ctx.inp(node.args[0])], out, "NOT")
    return out


@register_function(torch.where)
def where(ctx, node, target) -> str:
    """``torch.where(cond, x, y)``: whereBroadcastable (numbers and constants as loadConstantND)."""
    if len(node.args) + len(node.kwargs) < 3:
        raise ctx.unsupported(node, "torch.where(cond) (the indices form)")
    cond, x, y = (arg(node, i, n) for i, n in enumerate(("condition", "input", "other")))
    name, out = ctx.layer(node)
    ctx.builder.add_where_broadcastable(name, [operand(ctx, node, t) for t in (cond, x, y)], out)
    return out


@register_function(torch.masked_fill)
@register_method("masked_fill")
def masked_fill(ctx, node, target) -> str:
    """``x.masked_fill(mask, value)``: whereBroadcastable(mask, value, x)."""
    x, mask, value = node.args[0], node.args[1], arg(node, 2, "value")
    if ctx.is_tensor(value):
        raise ctx.unsupported(node, "masked_fill with a tensor value")
    name, out = ctx.layer(node)
    ctx.builder.add_where_broadcastable(
        name, [operand(ctx, node, mask), operand(ctx, node, float(ctx.value(value))), operand(ctx, node, x)], out)
    return out
