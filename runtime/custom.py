"""Registries of custom layer and custom model implementations, looked up by className only.

A ``className`` stored in a model file is a key into these dictionaries and nothing else: it is
never imported, evaluated or unpickled. Register implementations *before* loading a model::

    import mlpersonal as mp

    class Swish:                                  # Core ML's MLCustomLayer, in Python idiom
        def __init__(self, parameters: dict): self.beta = parameters.get("beta", 1.0)
        def set_weight_data(self, weights: list): pass          # flat float32 arrays
        def output_shapes(self, input_shapes): return list(input_shapes)
        def evaluate(self, inputs: list) -> list:              # numpy in, numpy out
            x = inputs[0]; return [x / (1 + np.exp(-self.beta * x))]
        def forward(self, x):                                  # optional torch path (gradients)
            return x * torch.sigmoid(self.beta * x)

    mp.register_custom_layer("Swish", Swish)

    class Doubler:                                # Core ML's MLCustomModel, in Python idiom
        def __init__(self, description, parameters: dict): ...
        def predict(self, features: dict) -> dict: ...
        def predict_batch(self, batch: list) -> list: ...      # optional (default: a loop)

    mp.register_custom_model("Doubler", Doubler)

Layer protocol (see :mod:`runtime.layers.custom`): ``__init__(parameters)``, optional
``set_weight_data(weights)``, optional ``output_shapes(input_shapes)``, and ``evaluate(inputs)``
and/or ``forward(*tensors)``. Model protocol (see :mod:`runtime.custom_model`):
``__init__(description, parameters)``, ``predict(features)``, optional ``predict_batch(batch)``.
"""

from __future__ import annotations

from typing import Any

from mlpersonal.errors import CustomLayerError

#: className -> implementation class (see register_custom_layer)
CUSTOM_LAYERS: dict[str, Any] = {}
#: className -> implementation class (see register_custom_model)
CUSTOM_MODELS: dict[str, Any] = {}


def _check_name(class_name: str, what: str) -> str:
    if not isinstance(class_name, str) or not class_name:
        raise CustomLayerError(f"register_custom_{what}: class_name must be a non-empty str, "
                               f"got {class_name!r}")
    return class_name


def register_custom_layer(class_name: str, impl: Any) -> None:
    """Make class ``impl`` implement the custom layers whose className is ``class_name``.

    ``impl(parameters)`` must give an object with ``evaluate(inputs)`` (numpy, no gradients) and/or
    ``forward(*tensors)`` (torch; preferred when present, and gradients flow through it during
    updates). Registering again replaces the implementation for models loaded afterwards.
    """
    _check_name(class_name, "layer")
    if not callable(impl) or not (hasattr(impl, "evaluate") or hasattr(impl, "forward")):
        raise CustomLayerError(
            f"register_custom_layer({class_name!r}, ...): the implementation must be a class with "
            "an evaluate(inputs) method (numpy) and/or a forward(*tensors) method (torch)"
        )
    CUSTOM_LAYERS[class_name] = impl


def register_custom_model(class_name: str, impl: Any) -> None:
    """Make class ``impl`` implement the custom models whose className is ``class_name``.

    ``impl(description, parameters)`` must give an object with ``predict(features) -> dict`` and
    optionally ``predict_batch(list_of_features) -> list_of_dicts``.
    """
    _check_name(class_name, "model")
    if not callable(impl) or not (hasattr(impl, "predict") or hasattr(impl, "predict_batch")):
        raise CustomLayerError(
            f"register_custom_model({class_name!r}, ...): the implementation must be a class with "
            "a predict(features) method (and optionally predict_batch(batch))"
        )
    CUSTOM_MODELS[class_name] = impl


def unregister_custom_layer(class_name: str) -> None:
    """Forget the implementation registered for ``class_name`` (no error when there is none)."""
    CUSTOM_LAYERS.pop(class_name, None)


def unregister_custom_model(class_name: str) -> None:
    """Forget the implementation registered for ``class_name`` (no error when there is none)."""
    CUSTOM_MODELS.pop(class_name, None)


def param_values(params) -> dict[str, Any]:
    """A protobuf map of ``Custom{Layer,Model}ParamValue`` -> ``{name: python value}``."""
    out: dict[str, Any] = {}
    for name in sorted(params):
        v = params[name]
        kind = v.WhichOneof("value")
        if kind is None:
            raise CustomLayerError(f"custom parameter {name!r} holds no value")
        val = getattr(v, kind)
        out[name] = bool(val) if kind == "boolValue" else val
    return out
