"""Attention: F.scaled_dot_product_attention, nn.MultiheadAttention (batch_first), and
nn.TransformerEncoderLayer / nn.TransformerEncoder written out layer by layer.

Per example, heads live on the leading axis: Q ``(L, E)`` -> reshape ``(L, h, d)`` -> transpose
``(h, L, d)``; scores = batchedMatmul(Q, K, transposeB) ``(h, L, S)`` (+ mask), softmaxND over
the last axis, times V, back to ``(L, E)``. MultiheadAttention's ``1 / sqrt(d)`` is folded into
the query projection's weights.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import arg, example_shape, register_function, register_module
from .elementwise import gelu_layer, layer_norm_layer
from .linear import dense
from .tensor import transpose_layer

#: added to masked-out scores (torch uses -inf; a finite value keeps float16 copies finite and
#: gives the same softmax unless a whole row is masked, where torch's answer is NaN)
MASKED = -1e9


class _Layers:
    """Names layers ``<base>.<part>`` for a module written out as several layers; module parts
    (``linear1``, ``self_attn.out_proj``) are recorded under their module path, so that
    ``respect_trainable`` finds them."""

    def __init__(self, ctx, node, base: Optional[str] = None):
        self.ctx, self.node = ctx, node
        self.base = base if base is not None else (node.target if node.op == "call_module" else node.name)

    def sub(self, part: str) -> "_Layers":
        return _Layers(self.ctx, self.node, f"{self.base}.{part}")

    def name(self, part: str, module: bool = False) -> str:
        base = f"{self.base}.{part}"
        return self.ctx.unique_layer(base, base if module else None, blob=True)


def _const(ctx, names: _Layers, part: str, value: np.ndarray) -> str:
    blob = names.name(part)
    value = np.ascontiguousarray(value, np.float32)
    ctx.builder.add_load_constant_nd(blob, blob, value, value.shape)
    return blob


def _heads(ctx, names: _Layers, part: str, src: str, length: int, heads: int, dim: int) -> str:
    """``(L, h * d)`` -> ``(h, L, d)``."""
    split = names.name(f"{part}_split")
    ctx.builder.add_reshape_static(split, src, split, [length, heads, dim])
    out = names.name(f"{part}_heads")
    transpose_layer(ctx, out, split, out, [1, 0, 2])
    return out


@dataclass(frozen=True)
class _Mask:
    """What is added to the (h, L, S) scores: a constant (L, S) shared by every example and head
    (a causal mask, a registered buffer), and/or a blob computed from the inputs per example,
    broadcast against (h, L, S) (a key padding mask (S,))."""

    const: Optional[np.ndarray] = None
    blob: Optional[str] = None


def _attend(ctx, names: _Layers, q: str, k: str, v: str, mask: _Mask,
            scale: float = 1.0) -> tuple[str, str]:
    """softmax(q k^T * scale + mask) v over the last two axes: (output blob, weights blob)."""
    b = ctx.builder
    scores = names.name("scores")
    b.add_batched_mat_mul(scores, [q, k], scores, transpose_b=True)
    if scale != 1.0:
        scaled = names.name("scaled")
        b.add_multiply_broadcastable(scaled, [scores, _const(ctx, names, "scale", np.array([scale]))],
                                     scaled)
        scores = scaled
    for part, add in (("masked", None if mask.const is None else _const(ctx, names, "mask", mask.const)),
                      ("padded", mask.blob)):
        if add is not None:
            out = names.name(part)
            b.add_add_broadcastable(out, [scores, add], out)
            scores = out
    weights = names.name("weights")
    b.add_softmax_nd(weights, scores, weights, -1)
    out = names.name("context")
    b.add_batched_mat_mul(out, [weights, v], out)
    return out, weights


def _mask(ctx, node, value, bool_allows: bool, shape: tuple[int, int], names: "_Layers",
          per_example: bool = True) -> _Mask:
    """The additive mask of an attn_mask / key_padding_mask argument (a bool mask marks allowed
    positions with True when ``bool_allows`` (SDPA), masked ones otherwise; a float mask is
    added): a constant one of ``shape`` (L, S), or one computed from the inputs whose example
    broadcasts against (h, L, S) (``per_example``)."""
    if value is None:
        return _Mask()
    if not ctx.is_tensor(value):
        raise ctx.unsupported(node, f"an attention mask of type {type(value).__name__}")
    if ctx.is_constant(value):
        return _Mask(const=_constant_mask(ctx, node, value, bool_allows, shape))
    ex = example_shape(ctx, value)
    if not per_example or not ex or len(ex) > 3 or ex[-1] != shape[1] or (len(ex) > 1 and ex[-2] not in (1, shape[0])):
        raise ctx.unsupported(node, f"an attention mask computed from the inputs of shape "
                                    f"{tuple(ctx.shape(value))} (per example it must broadcast against "
                                    f"(heads, {shape[0]}, {shape[1]}))")
    src = ctx.inp(value)
    if ctx.node_dtype(value) is not torch.bool:
        return _Mask(blob=src)
    out = names.name("mask_add")  # True/False arrive as 1.0/0.0
    alpha, beta = (-MASKED, MASKED) if bool_allows else (MASKED, 0.0)
    ctx.builder.add_activation(out, "LINEAR", src, out, params=[alpha, beta])
    return _Mask(blob=out)


def _constant_mask(ctx, node, value, bool_allows: bool, shape: tuple[int, int]) -> np.ndarray:
    m = ctx.constant(value).detach().cpu()
    if tuple(m.shape) != tuple(shape):
        raise ctx.unsupported(node, f"an attention mask of shape {tuple(m.shape)} (only {shape}, "
                                    "shared by every example and head)")
    if m.dtype == torch.bool:
        masked = ~m if bool_allows else m
        return np.where(masked.numpy(), MASKED, 0.0).astype(np.float32)
    return np.maximum(m.float().numpy(), MASKED)


def _causal(length: int, source: int) -> np.ndarray:
    return np.triu(np.full((length, source), MASKED, np.float32), 1)


def _merge(a: Optional[np.ndarray], c: Optional[np.ndarray]) -> Optional[np.ndarray]:
    if a is None or c is None:
        return c if a is None else a
    return np.maximum(a + c, MASKED)


@register_function(F.scaled_dot_product_attention)
def scaled_dot_product_attention(ctx, node, target) -> str:
    q, k, v = (arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
    if float(arg(node, 4, "dropout_p", 0.0) or 0.0) != 0.0:
        raise ctx.unsupported(node, "attention dropout (dropout_p must be 0 in an exported model)")
    if arg(node, 7, "enable_gqa", False):
        raise ctx.unsupported(node, "grouped-query attention (enable_gqa=True)")
    qs, ks = example_shape(ctx, q), example_shape(ctx, k)
    if len(qs) < 2 or len(ks) < 2:
        raise ctx.unsupported(node, "attention over a rank-1 example")
    scale = arg(node, 6, "scale", None)
    scale = 1.0 / math.sqrt(qs[-1]) if scale is None else float(scale)
    names = _Layers(ctx, node)
    mask = _mask(ctx, node, arg(node, 3, "attn_mask", None), True, (qs[-2], ks[-2]), names)
    if arg(node, 5, "is_causal", False):
        mask = _Mask(_merge(mask.const, _causal(qs[-2], ks[-2])), mask.blob)
    out, _ = _attend(ctx, names, ctx.inp(q), ctx.inp(k), ctx.inp(v), mask, scale)
    return _rename(ctx, node, out)


def _rename(ctx, node, blob: str) -> str:
    """The node's blob: the last layer's output ``blob`` renamed after the node (a copy would
    cost a layer)."""
    layer = ctx.builder.nn_spec.layers[-1]
    assert list(layer.output) == [blob]
    layer.output[0] = ctx.new_blob(node.target if node.op == "call_module" else node.name)
    return layer.output[0]


def _projections(m: nn.MultiheadAttention) -> list[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    e = m.embed_dim
    if m._qkv_same_embed_dim:
        w = m.in_proj_weight
        ws = [w[:e], w[e:2 * e], w[2 * e:]]
    else:
        ws = [m.q_proj_weight, m.k_proj_weight, m.v_proj_weight]
    bs = [None] * 3 if m.in_proj_bias is None else [m.in_proj_bias[i * e:(i + 1) * e] for i in range(3)]
    return list(zip(ws, bs))


def multihead(ctx, node, m: nn.MultiheadAttention, names: _Layers, q: str, k: str, v: str,
              lengths: tuple[int, int], mask: _Mask,
              weights_mode: Optional[str] = None) -> tuple[str, Optional[str]]:
    """MultiheadAttention of (L, E) query and (S, E) key/value blobs: (output blob, attention
    weights blob (``weights_mode`` "mean" over heads or "heads") or None)."""
    if not m.batch_first:
        raise ctx.unsupported(node, "nn.MultiheadAttention(batch_first=False): Core ML keeps the batch "
                                    "axis first; build it with batch_first=True")
    if m.bias_k is not None or m.add_zero_attn:
        raise ctx.unsupported(node, "nn.MultiheadAttention with add_bias_kv or add_zero_attn")
    if m.dropout and m.training:
        raise ctx.unsupported(node, "attention dropout in training mode (call .eval())")
    h, e = m.num_heads, m.embed_dim
    d = e // h
    length, source = lengths
    scale = 1.0 / math.sqrt(d)
    heads = []
    for part, src, (w, bias), n in zip("qkv", (q, k, v), _projections(m), (length, source, source)):
        if part == "q":  # the score scale folded into the query projection
            w, bias = w * scale, None if bias is None else bias * scale
        proj = names.name(f"{part}_proj")
        dense(ctx, proj, src, w, bias, proj, 2)
        heads.append(_heads(ctx, names, part, proj, n, h, d))
    ctx_blob, weights = _attend(ctx, names, *heads, mask)
    back = names.name("merge")
    transpose_layer(ctx, back, ctx_blob, back, [1, 0, 2])
    flat = names.name("concat_heads")
    ctx.builder.add_reshape_static(flat, back, flat, [length, e])
    out = names.name("out_proj", module=True)
    dense(ctx, out, flat, m.out_proj.weight, m.out_proj.bias, out, 2)
    if weights_mode == "mean":
        avg = names.name("mean_weights")
        ctx.builder.add_reduce_mean(avg, weights, avg, axes=[0], keepdims=False)
        weights = avg
    return out, weights if weights_mode else None


def _check_example(ctx, node, a, what: str) -> tuple[int, int]:
    shape = example_shape(ctx, a)
    if len(shape) != 2:
        raise ctx.unsupported(node, f"{what} of shape {tuple(ctx.shape(a))}: (N, L, E) tokens expected")
    return shape


def _padding(ctx, node, value, source: int, names: _Layers) -> _Mask:
    """A key padding mask ((N, S): True or non-zero float added where a key is padding)."""
    if value is not None and (not ctx.is_tensor(value) or example_shape(ctx, value) != (source,)):
        raise ctx.unsupported(node, f"a key padding mask that is not (N, {source})")
    if value is not None and ctx.is_constant(value):
        raise ctx.unsupported(node, "a constant key padding mask (use attn_mask)")
    return _mask(ctx, node, value, False, (1, source), names)


def _getitem_users(ctx, node) -> dict[int, object]:
    users = {}
    for u in node.users:
        if u.target is not operator.getitem or not isinstance(u.args[1], int):
            raise ctx.unsupported(node, "an output tuple used other than by index ([0], [1])")
        users.setdefault(u.args[1], []).append(u)
    return users


@register_module(nn.MultiheadAttention)
def multihead_attention(ctx, node, m: nn.MultiheadAttention) -> str:
    query, key, value = (arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
    (length, _), (source, _) = (_check_example(ctx, node, t, n) for t, n in ((query, "a query"), (key, "a key")))
    names = _Layers(ctx, node)
    mask = _padding(ctx, node, arg(node, 3, "key_padding_mask", None), source, names)
    mask = _Mask(_mask(ctx, node, arg(node, 5, "attn_mask", None), False, (length, source), names,
                       per_example=False).const, mask.blob)
    users = _getitem_users(ctx, node)
    need = bool(arg(node, 4, "need_weights", True)) and 1 in users
    mode = ("mean" if arg(node, 6, "average_attn_weights", True) else "heads") if need else None
    if 1 in users and not need:
        raise ctx.unsupported(node, "attention weights read with need_weights=False")
    out, weights = multihead(ctx, node, m, names, ctx.inp(query), ctx.inp(key),
                             ctx.inp(value), (length, source), mask, mode)
    for i, blob in ((0, out), (1, weights)):
        for u in users.get(i, []):
            ctx.blobs[u] = blob
    return ctx.SKIP


def _activation(ctx, node, m, names: _Layers, src: str) -> str:
    out = names.name("activation")
    fn = m.activation
    if fn is F.relu or isinstance(fn, nn.ReLU):
        ctx.builder.add_activation(out, "RELU", src, out)
    elif fn is F.gelu or isinstance(fn, nn.GELU):
        gelu_layer(ctx, out, src, out, getattr(fn, "approximate", "none"))
    else:
        raise ctx.unsupported(node, f"a TransformerEncoderLayer activation {fn!r} (relu or gelu)")
    return out


def _add(ctx, names: _Layers, part: str, a: str, c: str) -> str:
    out = names.name(part)
    ctx.builder.add_add_broadcastable(out, [a, c], out)
    return out


def encoder_layer(ctx, node, m: nn.TransformerEncoderLayer, names: _Layers, src: str,
                  length: int, mask: _Mask) -> str:
    """One TransformerEncoderLayer (post-norm, or pre-norm with ``norm_first``)."""
    if not m.self_attn.batch_first:
        raise ctx.unsupported(node, "a TransformerEncoderLayer with batch_first=False: Core ML keeps "
                                    "the batch axis first; build it with batch_first=True")
    e = m.self_attn.embed_dim

    def norm(part: str, x: str) -> str:
        out = names.name(part, module=True)
        layer_norm_layer(ctx, node, getattr(m, part), out, x, out, (length, e))
        return out

    def attention(x: str) -> str:
        return multihead(ctx, node, m.self_attn, names.sub("self_attn"), x, x, x, (length, length), mask)[0]

    def feed_forward(x: str) -> str:
        hidden = names.name("linear1", module=True)
        dense(ctx, hidden, x, m.linear1.weight, m.linear1.bias, hidden, 2)
        out = names.name("linear2", module=True)
        dense(ctx, out, _activation(ctx, node, m, names, hidden), m.linear2.weight, m.linear2.bias, out, 2)
        return out

    x = src
    if m.norm_first:
        x = _add(ctx, names, "residual1", x, attention(norm("norm1", x)))
        return _add(ctx, names, "residual2", x, feed_forward(norm("norm2", x)))
    x = norm("norm1", _add(ctx, names, "residual1", x, attention(x)))
    return norm("norm2", _add(ctx, names, "residual2", x, feed_forward(x)))


def _encoder_call(ctx, node, mask_name: str, names: _Layers) -> tuple[object, int, int, _Mask]:
    """(src, L, E, additive mask) of ``encoder(src, <mask_name>, src_key_padding_mask, is_causal)``."""
    src = arg(node, 0, "src")
    length, e = _check_example(ctx, node, src, "an input")
    mask = _padding(ctx, node, arg(node, 2, "src_key_padding_mask", None), length, names)
    const = _mask(ctx, node, arg(node, 1, mask_name, None), False, (length, length), names,
                  per_example=False).const
    if arg(node, 3, "is_causal", None) and const is None:
        const = _causal(length, length)
    return src, length, e, _Mask(const, mask.blob)


@register_module(nn.TransformerEncoderLayer)
def transformer_encoder_layer(ctx, node, m: nn.TransformerEncoderLayer) -> str:
    names = _Layers(ctx, node)
    src, length, _, mask = _encoder_call(ctx, node, "src_mask", names)
    out = encoder_layer(ctx, node, m, names, ctx.inp(src), length, mask)
    return _rename(ctx, node, out)


@register_module(nn.TransformerEncoder)
def transformer_encoder(ctx, node, m: nn.TransformerEncoder) -> str:
    names = _Layers(ctx, node)
    src, length, e, mask = _encoder_call(ctx, node, "mask", names)
    x = ctx.inp(src)
    for i, layer in enumerate(m.layers):
        x = encoder_layer(ctx, node, layer, names.sub(f"layers.{i}"), x, length, mask)
    padding = arg(node, 2, "src_key_padding_mask", None)
    if (padding is not None and getattr(m, "use_nested_tensor", False) and mask.const is None
            and torch.backends.mha.get_fastpath_enabled()):
        # torch's inference path runs the unpadded tokens as a nested tensor and pads the result
        # with zeros (before the final norm): padded positions come out 0
        keep = names.name("keep")
        ctx.builder.add_equal(keep, [ctx.inp(padding)], keep, alpha=0.0)
        column = names.name("keep_column")
        ctx.builder.add_reshape_static(column, keep, column, [length, 1])
        zeroed = names.name("unpadded")
        ctx.builder.add_multiply_broadcastable(zeroed, [x, column], zeroed)
        x = zeroed
    if m.norm is not None:
        out = names.name("norm", module=True)
        layer_norm_layer(ctx, node, m.norm, out, x, out, (length, e))
        x = out
    return _rename(ctx, node, x)
