"""Activations (classic kinds, and GELU, SiLU, Hardswish ... composed of them), softmax, resizing."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import (
    arg, channel_dim, check_4d, helper_layer, input_channels, register_function, register_method,
    register_module,
)


def _activation(ctx, node, kind: str, params=None) -> str:
    name, out = ctx.layer(node)
    ctx.builder.add_activation(name, kind, ctx.inp(node.args[0]), out, params=params)
    return out


@register_module(nn.ReLU)
@register_function(F.relu, torch.relu, torch.relu_, F.relu_)
@register_method("relu", "relu_")
def relu(ctx, node, target) -> str:
    return _activation(ctx, node, "RELU")


@register_module(nn.Sigmoid)
@register_function(torch.sigmoid, F.sigmoid)
@register_method("sigmoid")
def sigmoid(ctx, node, target) -> str:
    return _activation(ctx, node, "SIGMOID")


@register_module(nn.Tanh)
@register_function(torch.tanh, F.tanh)
@register_method("tanh")
def tanh(ctx, node, target) -> str:
    return _activation(ctx, node, "TANH")


@register_module(nn.LeakyReLU)
@register_function(F.leaky_relu)
def leaky_relu(ctx, node, target) -> str:
    slope = target.negative_slope if isinstance(target, nn.Module) else arg(node, 1, "negative_slope", 0.01)
    return _activation(ctx, node, "LEAKYRELU", [float(slope)])


@register_module(nn.ELU)
@register_function(F.elu)
def elu(ctx, node, target) -> str:
    alpha = target.alpha if isinstance(target, nn.Module) else arg(node, 1, "alpha", 1.0)
    return _activation(ctx, node, "ELU", float(alpha))


def _gated(ctx, node, kind: str, params=None) -> str:
    """``x * act(x)`` (SiLU: sigmoid, Hardswish: hard sigmoid): the gate, then a multiply."""
    x = ctx.inp(node.args[0])
    gate = helper_layer(ctx, node, "gate")
    ctx.builder.add_activation(gate, kind, x, gate, params=params)
    name, out = ctx.layer(node)
    ctx.builder.add_elementwise(name, [x, gate], out, "MULTIPLY")
    return out


#: torch's hard sigmoid, relu6(x + 3) / 6, as Core ML's sigmoidHard min(max(a x + b, 0), 1)
_HARD_SIGMOID = [1.0 / 6.0, 0.5]


@register_module(nn.Hardtanh)  # nn.ReLU6 too (a Hardtanh from 0 to 6)
@register_function(F.hardtanh, F.hardtanh_, F.relu6)
def hardtanh(ctx, node, target) -> str:
    """``clamp(x, lo, hi)`` (ReLU6: 0..6) as ``lo + (hi - lo) * sigmoidHard((x - lo) / (hi - lo))``:
    two classic activations (Core ML's clip layer needs ND mode)."""
    if isinstance(target, nn.Module):
        lo, hi = float(target.min_val), float(target.max_val)
    elif target is F.relu6:
        lo, hi = 0.0, 6.0
    else:
        lo, hi = float(arg(node, 1, "min_val", -1.0)), float(arg(node, 2, "max_val", 1.0))
    if not hi > lo:
        raise ctx.unsupported(node, f"hardtanh with max_val {hi} <= min_val {lo}")
    unit = helper_layer(ctx, node, "unit")
    ctx.builder.add_activation(unit, "SIGMOID_HARD", ctx.inp(node.args[0]), unit,
                               params=[1.0 / (hi - lo), -lo / (hi - lo)])
    name, out = ctx.layer(node)
    ctx.builder.add_activation(name, "LINEAR", unit, out, params=[hi - lo, lo])
    return out


@register_module(nn.Hardsigmoid)
@register_function(F.hardsigmoid)
def hardsigmoid(ctx, node, target) -> str:
    return _activation(ctx, node, "SIGMOID_HARD", _HARD_SIGMOID)


@register_module(nn.Hardswish)
@register_function(F.hardswish)
def hardswish(ctx, node, target) -> str:
    return _gated(ctx, node, "SIGMOID_HARD", _HARD_SIGMOID)


@register_module(nn.SiLU)
@register_function(F.silu)
def silu(ctx, node, target) -> str:
    return _gated(ctx, node, "SIGMOID")


@register_module(nn.PReLU)
def prelu(ctx, node, m: nn.PReLU) -> str:
    """One slope per channel (a single learned slope is repeated over the channels)."""
    channels = input_channels(ctx, node)
    alpha = m.weight.detach().cpu().numpy().astype(np.float32).reshape(-1)
    if alpha.size not in (1, channels):
        raise ctx.unsupported(node, f"PReLU with {alpha.size} slopes for {channels} channels")
    return _activation(ctx, node, "PRELU", np.resize(alpha, channels))


@register_module(nn.Softplus)
@register_function(F.softplus)
def softplus(ctx, node, target) -> str:
    """``log(1 + exp(beta x)) / beta``; torch returns ``x`` where ``beta x`` exceeds its
    threshold, which Core ML has no parameter for: thresholds below 15 are refused (above it
    the two differ by less than exp(-15))."""
    if isinstance(target, nn.Module):
        beta, threshold = float(target.beta), float(target.threshold)
    else:
        beta, threshold = float(arg(node, 1, "beta", 1.0)), float(arg(node, 2, "threshold", 20.0))
    if threshold < 15:
        raise ctx.unsupported(node, f"Softplus with threshold {threshold} < 15 (Core ML's "
                                    "softplus has no threshold)")
    if beta == 1.0:
        return _activation(ctx, node, "SOFTPLUS")
    channels = input_channels(ctx, node)
    return _activation(ctx, node, "PARAMETRICSOFTPLUS",
                       [np.full(channels, 1.0 / beta, np.float32), np.full(channels, beta, np.float32)])


#: Abramowitz & Stegun 7.1.26: erf(z) = 1 - t (a1 + t (a2 + ... + t a5)) exp(-z^2),
#: t = 1 / (1 + p z), z >= 0; |error| <= 1.5e-7
_ERF_P = 0.3275911
_ERF_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


@register_module(nn.GELU)
@register_function(F.gelu)
def gelu(ctx, node, target) -> str:
    """GELU from classic layers (Core ML's gelu layer is an iOS 14 layer, which rank-5 networks
    with multi-array inputs cannot hold). ``approximate='tanh'``: torch's formula exactly,
    ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``. Exact GELU: ``0.5 x + 0.5 |x| erf(|x| /
    sqrt(2))`` (erf is odd) with erf to 1.5e-7 (A&S 7.1.26), so the output is within ~1e-7 |x|."""
    approx = target.approximate if isinstance(target, nn.Module) else arg(node, 1, "approximate", "none")
    if approx not in ("none", "tanh"):
        raise ctx.unsupported(node, f"GELU with approximate={approx!r}")
    b, x = ctx.builder, ctx.inp(node.args[0])

    def helper(suffix):
        return helper_layer(ctx, node, suffix)

    def mul(a, c, suffix):
        out = helper(suffix)
        b.add_elementwise(out, [a, c], out, "MULTIPLY")
        return out

    def linear(a, alpha, beta, suffix):
        out = helper(suffix)
        b.add_activation(out, "LINEAR", a, out, params=[float(alpha), float(beta)])
        return out

    if approx == "tanh":
        x3 = mul(mul(x, x, "x2"), x, "x3")
        inner = helper("inner")
        b.add_elementwise(inner, [x, linear(x3, 0.044715, 0.0, "cubic")], inner, "ADD")
        th = helper("tanh")
        b.add_activation(th, "SCALED_TANH", inner, th, params=[1.0, float(np.sqrt(2.0 / np.pi))])
        name, out = ctx.layer(node)
        b.add_elementwise(name, [x, linear(th, 0.5, 0.5, "gate")], out, "MULTIPLY")
        return out
    a = helper("abs")
    b.add_unary(a, x, a, "abs")
    t = helper("t")  # 1 / (1 + p |x| / sqrt(2))
    b.add_unary(t, a, t, "inverse", scale=_ERF_P / np.sqrt(2.0), shift=1.0, epsilon=1e-45)
    h = linear(t, _ERF_A[4], _ERF_A[3], "h4")
    for k in (2, 1, 0):
        h = linear(mul(h, t, f"ht{k}"), 1.0, _ERF_A[k], f"h{k}")
    e = helper("exp")  # exp(-x^2 / 2)
    b.add_unary(e, mul(x, x, "x2"), e, "exp", scale=-0.5)
    erf = linear(mul(mul(h, t, "poly"), e, "tail"), -1.0, 1.0, "erf")
    s = helper("sum")
    b.add_elementwise(s, [x, mul(a, erf, "odd")], s, "ADD")
    name, out = ctx.layer(node)
    b.add_activation(name, "LINEAR", s, out, params=[0.5, 0.0])
    return out


def _softmax_dim(node, target):
    if isinstance(target, nn.Module):
        return target.dim
    return arg(node, 1, "dim")


@register_module(nn.Softmax)
@register_function(F.softmax, torch.softmax)
@register_method("softmax")
def softmax(ctx, node, target) -> str:
    channel_dim(ctx, node, _softmax_dim(node, target))
    name, out = ctx.layer(node)
    ctx.builder.add_softmax(name, ctx.inp(node.args[0]), out)
    return out


@register_module(nn.LogSoftmax)
@register_function(F.log_softmax, torch.log_softmax)
@register_method("log_softmax")
def log_softmax(ctx, node, target) -> str:
    """Only as a classifier's last op, where Core ML wants the probabilities: becomes softmax."""
    if not ctx.classifier_output(node):
        raise ctx.unsupported(node, "LogSoftmax except as the last op of a classifier "
                                    "(where it becomes the softmax giving the probabilities)")
    return softmax(ctx, node, target)


@register_module(nn.Upsample)  # UpsamplingNearest2d / UpsamplingBilinear2d too
@register_function(F.interpolate, F.upsample)
def upsample(ctx, node, target) -> str:
    """Nearest upsampling of (N, C, H, W) by whole factors (from ``scale_factor`` or ``size``):
    Core ML's upsample layer; bilinear with ``align_corners=True``: its resizeBilinear layer
    (strict end-point alignment). torch's default bilinear grid (``align_corners=False``) exists
    in Core ML only as an iOS 13 upsample mode, which a rank-5 network with multi-array inputs
    cannot hold (Core ML refuses the model): refused."""
    if isinstance(target, nn.Module):
        mode, align = target.mode, bool(target.align_corners)
    else:
        mode, align = arg(node, 3, "mode", "nearest"), bool(arg(node, 4, "align_corners", False))
    check_4d(ctx, node, "upsampling")
    (h, w), (oh, ow) = ctx.shape(node.args[0])[2:], ctx.shape(node)[2:]
    if mode not in ("nearest", "bilinear"):
        raise ctx.unsupported(node, f"upsampling mode {mode!r} (nearest and bilinear convert)")
    if mode == "bilinear" and not align:
        raise ctx.unsupported(node, "bilinear upsampling with align_corners=False (Core ML has "
                              "that grid only in ND networks); pass align_corners=True, or use "
                              "nearest")
    if oh % h or ow % w or oh < h or ow < w:
        raise ctx.unsupported(node, f"resizing {h}x{w} to {oh}x{ow} (whole upsampling factors only)")
    name, out = ctx.layer(node)
    if mode == "nearest":
        ctx.builder.add_upsample(name, oh // h, ow // w, ctx.inp(node.args[0]), out, mode="NN")
    else:
        ctx.builder.add_resize_bilinear(name, ctx.inp(node.args[0]), out, oh, ow,
                                        mode="STRICT_ALIGN_ENDPOINTS_MODE")
    return out


@register_module(nn.Softsign)
@register_function(F.softsign)
def softsign(ctx, node, target) -> str:
    return _activation(ctx, node, "SOFTSIGN")


@register_module(nn.Mish)
@register_function(F.mish)
def mish(ctx, node, target) -> str:
    """``x * tanh(softplus(x))``: softplus, tanh, multiply (torch's softplus threshold of 20 is
    where the two differ by less than exp(-20))."""
    x, b = ctx.inp(node.args[0]), ctx.builder
    soft = helper_layer(ctx, node, "softplus")
    b.add_activation(soft, "SOFTPLUS", x, soft)
    gate = helper_layer(ctx, node, "tanh")
    b.add_activation(gate, "TANH", soft, gate)
    name, out = ctx.layer(node)
    b.add_elementwise(name, [x, gate], out, "MULTIPLY")
    return out


def _difference(ctx, node, a: str, b: str) -> str:
    """The node's output ``a - b`` (Core ML's classic layers add; ``b`` is negated first)."""
    negated = helper_layer(ctx, node, "negated")
    ctx.builder.add_elementwise(negated, [b], negated, "MULTIPLY", alpha=-1.0)
    name, out = ctx.layer(node)
    ctx.builder.add_elementwise(name, [a, negated], out, "ADD")
    return out


def _odd_pair(ctx, node, kind: str, params) -> str:
    """``f(x) - f(-x)`` for a classic activation ``f`` (the shrink functions are odd)."""
    x, b = ctx.inp(node.args[0]), ctx.builder
    pos = helper_layer(ctx, node, "pos")
    b.add_activation(pos, kind, x, pos, params=params)
    flipped = helper_layer(ctx, node, "flip")
    b.add_elementwise(flipped, [x], flipped, "MULTIPLY", alpha=-1.0)
    neg = helper_layer(ctx, node, "neg")
    b.add_activation(neg, kind, flipped, neg, params=params)
    return _difference(ctx, node, pos, neg)


@register_module(nn.Hardshrink)
@register_function(F.hardshrink)
def hardshrink(ctx, node, target) -> str:
    """``x`` where ``|x| > lambda``, else 0: thresholded ReLU of x minus that of -x."""
    lam = target.lambd if isinstance(target, nn.Module) else arg(node, 1, "lambd", 0.5)
    return _odd_pair(ctx, node, "THRESHOLDEDRELU", float(lam))


@register_module(nn.Softshrink)
@register_function(F.softshrink)
def softshrink(ctx, node, target) -> str:
    """``x - lambda`` above lambda, ``x + lambda`` below -lambda, else 0:
    ``relu(x - lambda) - relu(-x - lambda)`` (a linear shift into a ReLU, on both sides)."""
    lam = float(target.lambd if isinstance(target, nn.Module) else arg(node, 1, "lambd", 0.5))
    x, b = ctx.inp(node.args[0]), ctx.builder
    parts = []
    for sign, suffix in ((1.0, "pos"), (-1.0, "neg")):
        shifted = helper_layer(ctx, node, f"{suffix}_shift")
        b.add_activation(shifted, "LINEAR", x, shifted, params=[sign, -lam])
        part = helper_layer(ctx, node, suffix)
        b.add_activation(part, "RELU", shifted, part)
        parts.append(part)
    return _difference(ctx, node, *parts)


@register_module(nn.Tanhshrink)
@register_function(F.tanhshrink)
def tanhshrink(ctx, node, target) -> str:
    """``x - tanh(x)``."""
    x, b = ctx.inp(node.args[0]), ctx.builder
    th = helper_layer(ctx, node, "tanh")
    b.add_activation(th, "TANH", x, th)
    return _difference(ctx, node, x, th)
