"""batchnorm (incl. instance norm), l2normalize, LRN, mvn, layerNormalization."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mlpersonal.codecs import count_of

from . import or_default, register, spatial


@register("batchnorm")
def batchnorm(layer, ctx):
    """y = gamma (x - mean) / sqrt(var + eps) + beta over axis -3; eps defaults to 1e-5.

    With ``computeMeanVar`` the statistics come from the input itself: per channel over the
    spatial axes of one example (instance norm) or over every axis but the channel one of the
    blob (batch norm; one example at a time, as Core ML predicts).
    """
    p = layer.batchnorm
    c = int(p.channels)
    eps = or_default(p.epsilon, 1e-5)
    gamma = ctx.weights(p.gamma, (c,), "gamma").reshape(c, 1, 1)
    beta = ctx.weights(p.beta, (c,), "beta").reshape(c, 1, 1)
    if p.computeMeanVar:
        inst = bool(p.instanceNormalization)
        stacked = not ctx.nd  # rank-5 blobs carry the batch on axis 0

        def bn_dynamic(x):
            r = x.dim()
            if inst:
                dims = (-2, -1)
            else:
                dims = tuple(i for i in range(int(stacked), r) if i != r - 3)
            mean = x.mean(dim=dims, keepdim=True)
            var = x.var(dim=dims, keepdim=True, unbiased=False)
            return (x - mean) / torch.sqrt(var + eps) * gamma + beta

        return bn_dynamic
    mean = ctx.weights(p.mean, (c,), "mean").reshape(c, 1, 1)
    var = ctx.weights(p.variance, (c,), "variance").reshape(c, 1, 1)
    scale = gamma / torch.sqrt(var + eps)
    shift = beta - mean * scale
    return lambda x: x * scale + shift


@register("l2normalize")
def l2normalize(layer, ctx):
    """x / sqrt(sum(x^2 over C, H, W) + eps), eps defaults to 1e-6."""
    eps = or_default(layer.l2normalize.epsilon, 1e-6)
    return lambda x: x / torch.sqrt(torch.sum(x * x, dim=(-3, -2, -1), keepdim=True) + eps)


@register("lrn")
def lrn(layer, ctx):
    """x / (k + alpha / n * sum of x^2 over n neighbouring channels) ^ beta; k defaults to 1."""
    p = layer.lrn
    n, a, b, k = int(p.localSize), float(p.alpha), float(p.beta), or_default(p.k, 1.0)
    return spatial(lambda x: F.local_response_norm(x, n, alpha=a, beta=b, k=k))


@register("mvn")
def mvn(layer, ctx):
    """Subtract the mean (and divide by sqrt(var + eps)) over H, W or over C, H, W."""
    p = layer.mvn
    dims = (-3, -2, -1) if p.acrossChannels else (-2, -1)
    eps = or_default(p.epsilon, 1e-6)
    norm = bool(p.normalizeVariance)

    def f(x):
        y = x - x.mean(dim=dims, keepdim=True)
        if norm:
            y = y / torch.sqrt((y * y).mean(dim=dims, keepdim=True) + eps)
        return y

    return f


@register("layerNormalization")
def layer_normalization(layer, ctx):
    p = layer.layerNormalization
    shape = tuple(int(s) for s in p.normalizedShape)
    n = int(torch.tensor(shape).prod()) if shape else 1
    gamma = ctx.weights(p.gamma, shape, "gamma") if count_of(p.gamma) == n else None
    beta = ctx.weights(p.beta, shape, "beta") if count_of(p.beta) == n else None
    eps = float(p.eps)
    return lambda x: F.layer_norm(x, shape, gamma, beta, eps)
