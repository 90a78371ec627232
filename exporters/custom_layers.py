"""Custom layer descriptions -> ``CustomLayerParams`` (what a custom conversion function returns).

A custom conversion function (``convert(..., custom_conversion_functions={ModuleType: fn})``)
returns a *description* dict::

    {"className": "Swish",                     # required: the registry key at load time
     "description": "x * sigmoid(beta * x)",   # optional free text
     "parameters": {"beta": 1.5},              # optional: name -> bool | int | float | str
     "weights": [np.ndarray, ...]}             # optional: stored as float32 WeightParams, flat

:func:`custom_layer_params` turns it into a ``NeuralNetwork_pb2.CustomLayerParams`` message
(copy it into ``layer.custom``); :func:`add_custom_layer` appends a whole ``custom`` layer to a
``NeuralNetworkBuilder`` via its ``add_custom`` (which also raises the spec version to the one
custom layers need). At load time the runtime looks ``className`` up in the registry filled by
``mlpersonal.register_custom_layer``; weights come back as flat float32 arrays in the same order.
"""

from __future__ import annotations

import numbers
from typing import Any, Mapping, Sequence

import numpy as np

from mlpersonal.codecs import encode_float
from mlpersonal.errors import ConversionError
from mlpersonal.proto import NeuralNetwork_pb2

_KEYS = {"className", "description", "parameters", "weights"}
_INT32 = (-(2**31), 2**31 - 1)


def _set_param(value_msg, name: str, value: Any, class_name: str) -> None:
    if isinstance(value, (bool, np.bool_)):
        value_msg.boolValue = bool(value)
    elif isinstance(value, numbers.Integral):
        v = int(value)
        if _INT32[0] <= v <= _INT32[1]:
            value_msg.intValue = v
        else:
            value_msg.longValue = v
    elif isinstance(value, numbers.Real):
        value_msg.doubleValue = float(value)
    elif isinstance(value, str):
        value_msg.stringValue = value
    else:
        raise ConversionError(
            f"custom layer {class_name!r}: parameter {name!r} is a {type(value).__name__}; "
            "parameters must be bool, int, float or str (put arrays in 'weights')"
        )


def custom_layer_params(desc: Mapping[str, Any]) -> "NeuralNetwork_pb2.CustomLayerParams":
    """A custom layer description dict (see the module docstring) -> ``CustomLayerParams``.

    Raises :class:`ConversionError` for a missing/empty className, unknown keys, parameters of
    unsupported types or weights that are not finite numeric arrays.
    """
    if not isinstance(desc, Mapping):
        raise ConversionError(f"a custom conversion function must return a dict describing the "
                              f"custom layer, got {type(desc).__name__}")
    unknown = set(desc) - _KEYS
    if unknown:
        raise ConversionError(f"custom layer description has unknown keys {sorted(unknown)}; "
                              f"allowed: {sorted(_KEYS)}")
    class_name = desc.get("className")
    if not isinstance(class_name, str) or not class_name:
        raise ConversionError("custom layer description needs a non-empty str 'className' (the "
                              "name the runtime's register_custom_layer uses)")
    p = NeuralNetwork_pb2.CustomLayerParams()
    p.className = class_name
    text = desc.get("description", "")
    if not isinstance(text, str):
        raise ConversionError(f"custom layer {class_name!r}: 'description' must be a str")
    p.description = text
    params = desc.get("parameters") or {}
    if not isinstance(params, Mapping):
        raise ConversionError(f"custom layer {class_name!r}: 'parameters' must be a dict")
    for name, value in params.items():
        if not isinstance(name, str) or not name:
            raise ConversionError(f"custom layer {class_name!r}: parameter names must be "
                                  "non-empty str")
        _set_param(p.parameters[name], name, value, class_name)
    weights = desc.get("weights") or []
    if isinstance(weights, np.ndarray) or not isinstance(weights, Sequence):
        raise ConversionError(f"custom layer {class_name!r}: 'weights' must be a list of arrays")
    for i, w in enumerate(weights):
        if hasattr(w, "detach"):  # a torch tensor
            w = w.detach().cpu().numpy()
        arr = np.asarray(w)
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool) or not np.isfinite(
                arr.astype(np.float64)).all():
            raise ConversionError(f"custom layer {class_name!r}: weights[{i}] must be a finite "
                                  "numeric array")
        encode_float(p.weights.add(), arr.astype(np.float32).ravel())
    return p


def add_custom_layer(builder, name: str, input_names: Sequence[str], output_names: Sequence[str],
                     desc: Mapping[str, Any]):
    """Append a ``custom`` layer described by ``desc`` to a ``NeuralNetworkBuilder``; returns it."""
    params = custom_layer_params(desc)
    return builder.add_custom(name, list(input_names), list(output_names), custom_proto_spec=params)
