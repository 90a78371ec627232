"""activation layers (every ActivationParams kind)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import register


def _channel_param(ctx, wp, field, x_channels=None):
    """PReLU / parametric softplus alpha, beta: one value or one per channel (axis -3)."""
    from mlpersonal.codecs import count_of

    n = count_of(wp)
    t = ctx.weights(wp, (n,), field)
    return t.reshape(n, 1, 1) if n > 1 else t.reshape(())


def _activation_fn(a, ctx):
    kind = a.WhichOneof("NonlinearityType")
    if kind == "ReLU":
        return F.relu
    if kind == "leakyReLU":
        alpha = a.leakyReLU.alpha
        return lambda x: F.leaky_relu(x, alpha)
    if kind == "tanh":
        return torch.tanh
    if kind == "sigmoid":
        return torch.sigmoid
    if kind == "linear":
        al, be = a.linear.alpha, a.linear.beta
        return lambda x: x * al + be
    if kind == "scaledTanh":
        al, be = a.scaledTanh.alpha, a.scaledTanh.beta
        return lambda x: al * torch.tanh(be * x)
    if kind == "sigmoidHard":
        al, be = a.sigmoidHard.alpha, a.sigmoidHard.beta
        return lambda x: torch.clamp(al * x + be, 0.0, 1.0)
    if kind == "ELU":
        alpha = a.ELU.alpha
        return lambda x: F.elu(x, alpha)
    if kind == "thresholdedReLU":
        alpha = a.thresholdedReLU.alpha
        return lambda x: torch.where(x > alpha, x, torch.zeros_like(x))
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
        return lambda x: alpha * torch.log1p(torch.exp(beta * x))
    raise ctx.fail(f"unknown activation kind {kind!r}")


@register("activation")
def activation(layer, ctx):
    return _activation_fn(layer.activation, ctx)


@register("softmax")
def softmax(layer, ctx):
    """Classic softmax: over the channel axis (-3)."""
    return lambda x: torch.softmax(x, dim=-3) if x.dim() >= 3 else torch.softmax(x, dim=-1)


@register("softmaxND")
def softmax_nd(layer, ctx):
    axis = int(layer.softmaxND.axis)
    return lambda x: torch.softmax(x, dim=axis)
