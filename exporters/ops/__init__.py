"""The op-mapping registry: one small converter per torch module type, function or method.

A converter ``fn(ctx, node, target)`` emits classic (rank-5 mapping) NeuralNetwork layers for one
``torch.fx`` node through ``ctx`` (see :class:`exporters.converter.Context`) and returns the name of
the blob holding the node's value. ``target`` is the module instance for ``call_module`` nodes and
the function / method name otherwise. Ops that only relabel a blob (dropout, a no-op view) return
their input blob and emit nothing.

Blob layout: a torch tensor ``(N, C)`` is the blob ``(C, 1, 1)``, ``(N, C, L)`` is ``(C, 1, L)``
and ``(N, C, H, W)`` is ``(C, H, W)``; channels are axis 1 in torch and -3 in the blob.

Modules by op family: :mod:`.conv`, :mod:`.activation`, :mod:`.pooling`, :mod:`.normalization`,
:mod:`.shape`, :mod:`.elementwise`; this package holds the registry and the helpers they share.
"""

from __future__ import annotations

from typing import Callable

from mlpersonal.registry import registrar

Converter = Callable[..., str]
MODULES: dict[type, Converter] = {}
FUNCTIONS: dict[object, Converter] = {}
METHODS: dict[str, Converter] = {}


#: ``@register_module(nn.Conv2d, ...)``, ``@register_function(F.relu, ...)``,
#: ``@register_method("relu", ...)``: a converter for those targets
register_module, register_function, register_method = map(registrar, (MODULES, FUNCTIONS, METHODS))


def lookup(node, target, tables=(MODULES, FUNCTIONS, METHODS)) -> Converter | None:
    """The converter for an fx node (``target``: module instance, function or method name) in
    ``tables`` (modules by type, functions, method names; exporters.ndops passes its own)."""
    modules, functions, methods = tables
    if node.op == "call_module":
        for cls in type(target).__mro__:
            if cls in modules:
                return modules[cls]
        return None
    if node.op == "call_method":
        return methods.get(target)
    return functions.get(target)


# --- argument helpers --------------------------------------------------------------------------

def arg(node, i: int, name: str, default=None):
    """Positional argument ``i`` or keyword ``name`` of an fx node."""
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def pair(v) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[1])) if len(v) > 1 else (int(v[0]), int(v[0]))
    return int(v), int(v)


def channel_dim(ctx, node, dim) -> None:
    """Raise unless ``dim`` is torch's channel axis (1) for the node's input."""
    rank = len(ctx.shape(node.args[0]))
    if dim is None or (int(dim) % rank) != 1:
        raise ctx.unsupported(node, f"only over the channel axis (dim=1), got dim={dim}")


# --- shared layer helpers ---------------------------------------------------------------------

def helper_layer(ctx, node, suffix: str) -> str:
    """A fresh name for an extra layer of ``node`` and its output blob (the same string)."""
    name = ctx.new_blob(f"{node.name}_{suffix}")
    ctx.used_layers.add(name)
    return name


def input_channels(ctx, node) -> int:
    """The channel count (blob axis -3) of the node's input."""
    return int(ctx.blob_shape(ctx.shape(node.args[0]))[0])


def check_rank(ctx, node, rank: int, what: str):
    if len(ctx.shape(node.args[0])) != rank:
        layout = "(N, C, H, W)" if rank == 4 else "(N, C, L)"
        raise ctx.unsupported(node, f"{what} of a tensor that is not {layout}")


def check_4d(ctx, node, what: str = "2-D pooling"):
    check_rank(ctx, node, 4, what)


# the converters register themselves on import
from . import activation, conv, elementwise, normalization, pooling, shape  # noqa: E402,F401
