"""The ``custom`` layer kind: ``CustomLayerParams`` run by an implementation from the registry.

The layer's ``className`` is looked up in :data:`runtime.custom.CUSTOM_LAYERS` (filled by
``mlpersonal.register_custom_layer``) and nowhere else; an unknown className fails at load.

What the implementation sees (Core ML's MLCustomLayer protocol, in Python idiom):

- ``impl(parameters)``: ``{name: bool | int | float | str}`` decoded from the layer's
  ``CustomLayerParamValue`` map;
- ``set_weight_data(weights)`` (optional): one flat float32 numpy array per ``WeightParams`` in the
  layer's ``weights`` (in order; float32, fp16 or raw storage decoded by ``mlpersonal.codecs``);
- ``output_shapes(input_shapes)`` (optional): shapes of the outputs for the given input shapes;
  when present, the outputs of ``evaluate`` are checked against it;
- ``evaluate(inputs) -> outputs``: lists of numpy float32 arrays;
- ``forward(*tensors) -> tensor | tuple`` (optional): the torch path, preferred when present.

Arrays and tensors are in the runtime's blob layout: a leading batch axis, then ``(C, H, W)`` in
rank-5 models (spec v1-v3 style), or the declared rank in ND models.

Gradients: only the torch ``forward`` path is differentiable. An ``evaluate``-only layer works
for prediction and for updating layers *after* it, but an update that needs gradients to flow
*through* it (an updatable layer before it) raises :class:`CustomLayerError` asking for a torch
``forward`` rather than silently training nothing.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from mlpersonal.codecs import decode
from mlpersonal.errors import CustomLayerError

from . import register


def _what(layer) -> str:
    return f"custom layer {layer.name!r} (className {layer.custom.className!r})"


def lookup_layer_impl(layer, registry: dict) -> Any:
    """The registered implementation class for ``layer.custom.className`` (registry lookup only)."""
    from ..custom import CUSTOM_LAYERS

    name = layer.custom.className
    if not name:
        raise CustomLayerError(f"custom layer {layer.name!r} has no className")
    impl = registry.get(name) or CUSTOM_LAYERS.get(name)
    if impl is None:
        raise CustomLayerError(
            f"{_what(layer)} has no registered implementation. Call "
            f"mlpersonal.register_custom_layer({name!r}, Impl) before loading the model, where "
            "Impl has __init__(parameters), set_weight_data(weights), output_shapes(input_shapes) "
            "and evaluate(inputs) and/or a torch forward(*tensors)"
        )
    return impl


def _as_list(out, n: int, what: str, method: str) -> list:
    if isinstance(out, (list, tuple)):
        outs = list(out)
    else:
        outs = [out]
    if len(outs) != n:
        raise CustomLayerError(f"{what}: {method} returned {len(outs)} outputs, the layer has {n}")
    return outs


@register("custom")
def custom(layer, ctx) -> Callable:
    from ..custom import param_values

    p = layer.custom
    impl = lookup_layer_impl(layer, ctx.custom_layers)
    what = _what(layer)
    params = param_values(p.parameters)
    weights = [decode(wp, None, ctx.where(f"weights[{i}]")) for i, wp in enumerate(p.weights)]
    try:
        obj = impl(params)
        if hasattr(obj, "set_weight_data"):
            obj.set_weight_data(weights)
    except CustomLayerError:
        raise
    except Exception as e:  # noqa: BLE001 - user code: report which layer failed
        raise CustomLayerError(f"{what}: the implementation failed to initialize: {e!r}") from e
    n_out = len(layer.output)

    if hasattr(obj, "forward"):
        def run_forward(*xs):
            outs = _as_list(obj.forward(*xs), n_out, what, "forward")
            for o in outs:
                if not isinstance(o, torch.Tensor):
                    raise CustomLayerError(f"{what}: forward must return torch tensors, "
                                           f"got {type(o).__name__}")
            return outs[0] if n_out == 1 else tuple(outs)

        return run_forward

    if not hasattr(obj, "evaluate"):
        raise CustomLayerError(f"{what}: the implementation has neither evaluate() nor forward()")

    def run_evaluate(*xs):
        if torch.is_grad_enabled() and any(x.requires_grad for x in xs):
            raise CustomLayerError(
                f"{what} only has evaluate() (numpy), so gradients cannot flow through it to the "
                "updatable layers before it; give the implementation a torch forward(*tensors)"
            )
        arrays = [x.detach().cpu().numpy() for x in xs]
        expected = None
        if hasattr(obj, "output_shapes"):
            shapes = obj.output_shapes([a.shape for a in arrays])
            expected = [tuple(int(d) for d in s) for s in shapes]
        outs = [np.asarray(o, dtype=np.float32) for o in
                _as_list(obj.evaluate(arrays), n_out, what, "evaluate")]
        if expected is not None:
            got = [o.shape for o in outs]
            if got != expected:
                raise CustomLayerError(f"{what}: evaluate returned shapes {got}, but "
                                       f"output_shapes promised {expected}")
        dev = xs[0].device if xs else ctx.device
        ts = [torch.from_numpy(np.ascontiguousarray(o)).to(dev) for o in outs]
        return ts[0] if n_out == 1 else tuple(ts)

    return run_evaluate
