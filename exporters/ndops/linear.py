"""nn.Linear over the last axis, matrix products (``@``, matmul, bmm, x @ W), nn.Embedding."""

from __future__ import annotations

import operator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import arg, example_shape, helper_layer, operand, register_function, register_method, register_module


def dense(ctx, name: str, src: str, weight: torch.Tensor, bias, out: str, rank: int) -> None:
    """``src @ weight.T + bias`` over the last axis of a rank-``rank`` example: an innerProduct
    (which can be updatable) up to rank 3, a batchedMatmul with weights above."""
    w = weight.detach().cpu().float().numpy()
    b = None if bias is None else bias.detach().cpu().float().numpy()
    cout, cin = w.shape
    if rank <= 3:
        ctx.builder.add_inner_product(name, w, b, cin, cout, b is not None, src, out)
    else:
        ctx.builder.add_batched_mat_mul(name, [src], out, weight_matrix_rows=cin,
                                        weight_matrix_columns=cout, W=np.ascontiguousarray(w.T), bias=b)


@register_module(nn.Linear)
def linear(ctx, node, m: nn.Linear) -> str:
    name, out = ctx.layer(node)
    dense(ctx, name, ctx.inp(node.args[0]), m.weight, m.bias, out, len(example_shape(ctx, node.args[0])))
    return out


@register_function(F.linear)
def linear_fn(ctx, node, target) -> str:
    """``F.linear(x, W, b)`` with a constant weight (and bias): as nn.Linear."""
    w, b = arg(node, 1, "weight"), arg(node, 2, "bias")
    if not ctx.is_constant(w) or (b is not None and not ctx.is_constant(b)):
        raise ctx.unsupported(node, "F.linear with a weight or bias computed from the inputs")
    name, out = ctx.layer(node)
    dense(ctx, name, ctx.inp(node.args[0]), ctx.constant(w), None if b is None else ctx.constant(b), out,
          len(example_shape(ctx, node.args[0])))
    return out


@register_function(operator.matmul, torch.matmul, torch.bmm)
@register_method("matmul", "bmm", "__matmul__")
def matmul(ctx, node, target) -> str:
    """A product of two activations (batchedMatmul, numpy broadcasting over leading axes), or of
    an activation and a constant matrix ``W`` (a batchedMatmul with weights)."""
    a, b = node.args[0], node.args[1]
    name, out = ctx.layer(node)
    if ctx.is_constant(b) and not ctx.is_constant(a) and len(ctx.shape(b)) == 2:
        w = ctx.constant(b)
        dense(ctx, name, ctx.inp(a), w.t(), None, out, len(example_shape(ctx, a)))
        return out
    for t in (a, b):
        if len(example_shape(ctx, t)) < 2:
            raise ctx.unsupported(node, "a matrix product with a vector operand (per example); "
                                        "unsqueeze it to a matrix")
    ctx.builder.add_batched_mat_mul(name, [operand(ctx, node, a), operand(ctx, node, b)], out)
    return out


@register_module(nn.Embedding)
def embedding(ctx, node, m: nn.Embedding) -> str:
    """Token ids ``(...)`` -> ``(..., E)``: expandDims to ``(..., 1)`` (what Core ML's embeddingND
    reads), then the lookup; weights stored ``(E, vocab)``."""
    if m.max_norm is not None:
        raise ctx.unsupported(node, "nn.Embedding(max_norm=...) (it renormalizes rows while looking up)")
    src = node.args[0]
    expanded = helper_layer(ctx, node, "ids")
    ctx.builder.add_expand_dims(expanded, ctx.inp(src), expanded, [-1])
    name, out = ctx.layer(node)
    w = m.weight.detach().cpu().float().numpy()
    ctx.builder.add_embedding_nd(name, expanded, out, m.num_embeddings, m.embedding_dim,
                                 np.ascontiguousarray(w.T))
    return out


@register_function(torch.einsum)
def einsum(ctx, node, target) -> str:
    """A two-operand einsum that is a batched matrix product (attention's ``bhqd,bhkd->bhqk`` and
    ``bhqk,bhkd->bhqd``): each operand transposed to (shared..., rows, contracted) /
    (shared..., contracted, columns), a batchedMatmul, the result transposed to the output's
    order. The first letter of every term is the batch axis."""
    from .tensor import transpose_layer

    equation, *operands = node.args
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    if not isinstance(equation, str) or "->" not in equation or len(operands) != 2 or "." in equation:
        raise ctx.unsupported(node, "einsum other than 'ab..,ab..->ab..' of two operands")
    (sa, sb), so = equation.replace(" ", "").split("->")[0].split(","), equation.replace(" ", "").split("->")[1]
    if not (sa[0] == sb[0] == so[0]) or any(len(set(s)) != len(s) for s in (sa, sb, so)):
        raise ctx.unsupported(node, f"einsum {equation!r} (the batch letter first in every term)")
    sa, sb, so = sa[1:], sb[1:], so[1:]
    shared = [c for c in so if c in sa and c in sb]
    rows = [c for c in so if c in sa and c not in sb]
    cols = [c for c in so if c in sb and c not in sa]
    summed = [c for c in sa if c in sb and c not in so]
    if len(rows) != 1 or len(cols) != 1 or len(summed) != 1 or set(sa) | set(sb) != set(so) | set(summed):
        raise ctx.unsupported(node, f"einsum {equation!r} (one row, one column and one summed letter)")
    blobs = []
    for src, sub, order in ((operands[0], sa, shared + rows + summed), (operands[1], sb, shared + summed + cols)):
        blob = ctx.inp(src)
        perm = [sub.index(c) for c in order]
        if perm != sorted(perm):
            moved = helper_layer(ctx, node, str(len(blobs)))
            transpose_layer(ctx, moved, blob, moved, perm)
            blob = moved
        blobs.append(blob)
    name, out = ctx.layer(node)
    result = shared + rows + cols
    perm = [result.index(c) for c in so]
    product = out if perm == sorted(perm) else helper_layer(ctx, node, "product")
    ctx.builder.add_batched_mat_mul(name if product == out else product, blobs, product)
    if product != out:
        transpose_layer(ctx, name, product, out, perm)
    return out
