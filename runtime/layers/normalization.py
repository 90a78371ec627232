"""batchnorm (and instance normalization)."""

from __future__ import annotations

import torch

from . import register


@register("batchnorm")
def batchnorm(layer, ctx):
    p = layer.batchnorm
    c = int(p.channels)
    eps = float(p.epsilon)
    gamma = ctx.weights(p.gamma, (c,), "gamma").reshape(c, 1, 1)
    beta = ctx.weights(p.beta, (c,), "beta").reshape(c, 1, 1)
    if p.computeMeanVar or p.instanceNormalization:
        inst = bool(p.instanceNormalization)

        def bn_dynamic(x):
            dims = (-2, -1) if inst else tuple(i for i in range(x.dim()) if i != x.dim() - 3)
            mean = x.mean(dim=dims, keepdim=True)
            var = x.var(dim=dims, keepdim=True, unbiased=False)
            return (x - mean) / torch.sqrt(var + eps) * gamma + beta

        return bn_dynamic
    mean = ctx.weights(p.mean, (c,), "mean").reshape(c, 1, 1)
    var = ctx.weights(p.variance, (c,), "variance").reshape(c, 1, 1)
    scale = gamma / torch.sqrt(var + eps)
    shift = beta - mean * scale
    return lambda x: x * scale + shift
