"""The op-mapping registry of ND networks (``EXACT_ARRAY_MAPPING``, Core ML 3 layers).

A network holding attention (``nn.MultiheadAttention``, ``nn.TransformerEncoder(Layer)``,
``F.scaled_dot_product_attention``), a product of two activations (``q @ k.transpose(-2, -1)``,
``torch.einsum``) or an ``nn.Embedding`` of token ids has no rank-5 form:
:func:`exporters.converter.convert` then writes it in ND mode, where each blob has exactly the
per-example shape of its torch tensor (the torch shape without the batch axis) and Core ML 3's
ND layers (batchedMatmul, softmaxND, transpose, reshapeStatic, ...) apply.

A converter ``fn(ctx, node, target)`` works like those of :mod:`exporters.ops` and returns the
node's blob. Constant tensors (parameters, buffers and what is computed from them alone, e.g.
``self.cls.expand(x.shape[0], -1, -1)``) are folded while converting: :func:`operand` writes
them as a loadConstantND where an op reads them.

Modules: :mod:`.linear` (Linear, matmul, einsum, Embedding), :mod:`.attention`, :mod:`.tensor`
(shape ops, reductions), :mod:`.elementwise` (arithmetic, comparisons, softmax, GELU, Layer/
Group/RMSNorm), :mod:`.spatial` (convolutions, pooling, batch/instance norm, upsampling on the
rank-5 layout).
"""

from __future__ import annotations

import operator
from typing import Callable

import numpy as np
import torch

from mlpersonal.registry import registrar

from .. import ops
from ..ops import arg, helper_layer  # noqa: F401 - shared argument/name helpers

Converter = Callable[..., str]
MODULES: dict[type, Converter] = {}
FUNCTIONS: dict[object, Converter] = {}
METHODS: dict[str, Converter] = {}

register_module, register_function, register_method = map(registrar, (MODULES, FUNCTIONS, METHODS))

#: ops only ND mode can express: a graph holding one is exported in ND mode
ND_ONLY_MODULES: tuple = (torch.nn.MultiheadAttention, torch.nn.TransformerEncoderLayer,
                          torch.nn.TransformerEncoder, torch.nn.Embedding)
ND_ONLY_FUNCTIONS = {torch.nn.functional.scaled_dot_product_attention, torch.matmul, torch.bmm,
                     operator.matmul, torch.einsum}
ND_ONLY_METHODS = {"matmul", "bmm", "__matmul__"}


def lookup(node, target) -> Converter | None:
    """ND mode's own converter; else a rank-5 one that emits per-element layers (as it is) or one
    convolution / pooling / batchnorm layer (on the example's rank-5 layout: :mod:`.spatial`)."""
    conv = ops.lookup(node, target, (MODULES, FUNCTIONS, METHODS))
    if conv is not None:
        return conv
    classic = ops.lookup(node, target)
    if classic in elementwise.SHARED:
        return classic
    if classic in spatial.LIFTED:
        return spatial.lifted(classic)
    return None


# --- shapes and axes --------------------------------------------------------------------------

def example_shape(ctx, a) -> tuple[int, ...]:
    """The Core ML shape of ``a``'s blob: its torch shape without the batch axis."""
    return tuple(int(s) for s in ctx.shape(a)[1:])


def axis(ctx, node, a, dim: int) -> int:
    """Torch axis ``dim`` of tensor ``a`` as a (negative) Core ML axis; the batch axis refused."""
    rank = len(ctx.shape(a))
    d = int(dim) % rank
    if d == 0:
        raise ctx.unsupported(node, "an op over the batch axis (dim 0)")
    return d - rank


# --- constants ---------------------------------------------------------------------------------

def operand(ctx, node, a, like=None) -> str:
    """The blob of tensor operand ``a`` of ``node``; a constant (folded tensor or python number)
    becomes a loadConstantND holding one example's value (a leading axis of the torch rank of
    ``like`` (default: the node) is the batch axis, of size 1 or the batch size)."""
    if ctx.is_tensor(a) and not ctx.is_constant(a):
        return ctx.inp(a)
    if not ctx.is_tensor(a):
        a = ctx.value(a)  # a number, maybe computed from shapes: (e // heads) ** 0.5
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        value = np.array([a], np.float32)
    elif ctx.is_tensor(a):
        value = per_example(ctx, node, ctx.constant(a), len(ctx.shape(like if like is not None else node)))
    else:
        raise ctx.unsupported(node, f"an operand of type {type(a).__name__}")
    name = helper_layer(ctx, node, "const")
    shape = value.shape or (1,)
    ctx.builder.add_load_constant_nd(name, name, np.ascontiguousarray(value, np.float32).reshape(shape),
                                     shape)
    return name


def per_example(ctx, node, value: torch.Tensor, rank: int) -> np.ndarray:
    """One example's part of a constant that broadcasts against rank-``rank`` (batched) tensors."""
    v = value.detach().cpu().float()
    if v.dim() == rank:
        if v.shape[0] != 1 and not bool((v == v[:1]).all()):
            raise ctx.unsupported(node, f"a constant of shape {tuple(v.shape)} whose rows differ along "
                                        "the batch axis")
        v = v[0]
    return v.numpy()


from . import attention, elementwise, linear, recurrent, spatial, tensor  # noqa: E402,F401  (they register themselves)
