"""innerProduct and embedding layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import register


@register("innerProduct")
def inner_product(layer, ctx):
    p = layer.innerProduct
    cin, cout = int(p.inputChannels), int(p.outputChannels)
    upd = layer.isUpdatable
    w = ctx.weights(p.weights, (cout, cin), "weights", updatable=upd)
    b = ctx.weights(p.bias, (cout,), "bias", updatable=upd) if p.hasBias else None

    def fc(x):
        # channel axis is -3 with H = W = 1 (rank >= 3); rank 1-2: last axis.
        if x.dim() >= 3:
            lead = x.shape[:-3]
            y = F.linear(x.reshape(*lead, -1), w, b)
            return y.reshape(*lead, cout, 1, 1)
        return F.linear(x, w, b)

    return fc


@register("embedding")
def embedding(layer, ctx):
    p = layer.embedding
    vocab, cout = int(p.inputDim), int(p.outputChannels)
    w = ctx.weights(p.weights, (cout, vocab), "weights")  # Core ML stores [outputChannels, inputDim]
    b = ctx.weights(p.bias, (cout,), "bias") if p.hasBias else None
    table = w.t().contiguous()

    def emb(x):
        idx = x.reshape(x.shape[0], -1)[:, 0].long() if x.dim() >= 3 else x.long().reshape(-1)
        y = F.embedding(idx, table)
        if b is not None:
            y = y + b
        return y.reshape(-1, cout, 1, 1) if not ctx.nd else y

    return emb
