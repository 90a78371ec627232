"""innerProduct, embedding, embeddingND and batchedMatmul layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import register


@register("innerProduct")
def inner_product(layer, ctx):
    """Rank 1-3: over the last axis; rank 4-5: over the last three axes, output (..., C_out, 1, 1)."""
    p = layer.innerProduct
    cin, cout = int(p.inputChannels), int(p.outputChannels)
    upd = layer.isUpdatable
    w = ctx.weights(p.weights, (cout, cin), "weights", updatable=upd)
    b = ctx.weights(p.bias, (cout,), "bias", updatable=upd) if p.hasBias else None

    def fc(x):
        if x.dim() <= 3:
            return F.linear(x, w, b)
        # no x.shape read: traced under vmap (ND models' plan) a shape is no list of ints
        return F.linear(x.flatten(-3), w, b)[..., None, None]

    return fc


@register("embedding")
def embedding(layer, ctx):
    """Indices in a (..., 1, 1, 1) blob -> (..., C_out, 1, 1); weights stored [C_out, inputDim]."""
    p = layer.embedding
    vocab, cout = int(p.inputDim), int(p.outputChannels)
    table = ctx.weights(p.weights, (cout, vocab), "weights").t().contiguous()
    b = ctx.weights(p.bias, (cout,), "bias") if p.hasBias else None

    def emb(x):
        lead = x.shape[:-3] if x.dim() >= 3 else x.shape
        y = F.embedding(x.reshape(lead).long(), table)
        if b is not None:
            y = y + b
        return y.reshape(*lead, cout, 1, 1)

    return emb


@register("embeddingND")
def embedding_nd(layer, ctx):
    """Indices in a (..., 1) blob -> (..., embeddingSize); weights stored [embeddingSize, vocab]."""
    p = layer.embeddingND
    vocab, size = int(p.vocabSize), int(p.embeddingSize)
    table = ctx.weights(p.weights, (size, vocab), "weights").t().contiguous()
    b = ctx.weights(p.bias, (size,), "bias") if p.hasBias else None

    def emb(x):
        y = F.embedding(x[..., 0].long(), table)
        return y + b if b is not None else y

    return emb


@register("batchedMatmul")
def batched_matmul(layer, ctx):
    """numpy-style matmul of two inputs, or input @ W (+ bias) with W stored column major."""
    p = layer.batchedMatmul
    if len(layer.input) == 1:
        x1, x2 = int(p.weightMatrixFirstDimension), int(p.weightMatrixSecondDimension)
        w = ctx.weights(p.weights, (x2, x1), "weights")  # column major [X1, X2] == row major W^T
        b = ctx.weights(p.bias, (x2,), "bias") if p.hasBias else None
        return lambda a: F.linear(a, w, b)
    ta, tb = bool(p.transposeA), bool(p.transposeB)

    def mm(a, c):
        a = a.unsqueeze(0) if a.dim() == 1 else (a.transpose(-1, -2) if ta else a)
        c = c.unsqueeze(-1) if c.dim() == 1 else (c.transpose(-1, -2) if tb else c)
        return torch.matmul(a, c)  # rank max(2, rank a, rank b), as Core ML

    return mm
