"""activation layers (every ActivationParams kind), softmax, and the ND activation kinds."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mlpersonal.codecs import count_of

from . import register


def _channel_param(ctx, wp, field):
    """PReLU / parametric softplus alpha, beta: one value, or one per channel (axis -3)."""
    n = count_of(wp)
    t = ctx.weights(wp, (n,), field)
    return t.reshape(n, 1, 1) if n > 1 else t.reshape(())


def activation_fn(a, ctx):
    """The function of an ``ActivationParams`` (activation layers and recurrent gates)."""
    kind = a.WhichOneof("NonlinearityType")
    if kind == "ReLU":
        return F.relu
    if kind == "leakyReLU":
        alpha = float(a.leakyReLU.alpha)
        return lambda x: F.leaky_relu(x, alpha)
    if kind == "tanh":
        return torch.tanh
    if kind == "sigmoid":
        return torch.sigmoid
    if kind == "linear":
        al, be = float(a.linear.alpha), float(a.linear.beta)
        return lambda x: x * al + be
    if kind == "scaledTanh":
        al, be = float(a.scaledTanh.alpha), float(a.scaledTanh.beta)
        return lambda x: al * torch.tanh(be * x)
    if kind == "sigmoidHard":
        al, be = float(a.sigmoidHard.alpha), float(a.sigmoidHard.beta)
        return lambda x: torch.clamp(al * x + be, 0.0, 1.0)
    if kind == "ELU":
        alpha = float(a.ELU.alpha)
        return lambda x: F.elu(x, alpha)
    if kind == "thresholdedReLU":
        alpha = float(a.thresholdedReLU.alpha)
        return lambda x: torch.where(x >= alpha, x, torch.zeros_like(x))
    if kind == "softsign":
        return F.softsign
    if kind == "softplus":
        return F.softplus
    if kind == "PReLU":
        alpha = _channel_param(ctx, a.PReLU.alpha, "alpha")
        return lambda x: torch.where(x >= 0, x, x * alpha)
    if kind == "parametricSoftplus":
        alpha = _channel_param(ctx, a.parametricSoftplus.alpha, "alpha")
        beta = _channel_param(ctx, a.parametricSoftplus.beta, "beta")
        return lambda x: alpha * F.softplus(beta * x)
    raise ctx.unsupported(f"unknown activation kind {kind!r}")


@register("activation")
def activation(layer, ctx):
    return activation_fn(layer.activation, ctx)


@register("softmax")
def softmax(layer, ctx):
    """Classic softmax: over the channel axis (-3); rank < 3 blobs: the last axis."""
    return lambda x: torch.softmax(x, dim=-3 if x.dim() >= 3 else -1)


@register("softmaxND")
def softmax_nd(layer, ctx):
    axis = int(layer.softmaxND.axis)
    return lambda x: torch.softmax(x, dim=axis)


@register("clip")
def clip(layer, ctx):
    lo, hi = float(layer.clip.minVal), float(layer.clip.maxVal)
    return lambda x: torch.clamp(x, lo, hi)


@register("clampedReLU")
def clamped_relu(layer, ctx):
    """min(beta, x) for x >= 0, min(beta, alpha * x) otherwise."""
    al, be = float(layer.clampedReLU.alpha), float(layer.clampedReLU.beta)
    return lambda x: torch.clamp(torch.where(x >= 0, x, al * x), max=be)


@register("gelu")
def gelu(layer, ctx):
    mode = int(layer.gelu.mode)  # EXACT, TANH_APPROXIMATION, SIGMOID_APPROXIMATION
    if mode == 0:
        return F.gelu
    if mode == 1:
        return lambda x: F.gelu(x, approximate="tanh")
    return lambda x: x * torch.sigmoid(1.702 * x)


@register("erf")
def erf(layer, ctx):
    return torch.erf
