"""mlpersonal: train in PyTorch, export Core ML .mlmodel files, run and personalize them anywhere.

The everyday API lives here; names resolve lazily so that ``import mlpersonal`` stays light and
the runtime never pulls in the trainers or exporters.
"""

from __future__ import annotations

import importlib

from .errors import (
    ConversionError,
    CustomLayerError,
    InvalidInputError,
    InvalidModelError,
    LinkedModelError,
    MLPersonalError,
    TrainingError,
    UnsupportedLayerError,
    UpdateParameterError,
)
from .specio import load_spec, save

__version__ = "0.1.0"

# public name -> "module:attribute"
_LAZY = {
    # runtime
    "load": "runtime:load",
    "CompiledModel": "runtime:CompiledModel",
    "UpdateTask": "runtime.update:UpdateTask",
    "ArrayBatchProvider": "runtime.batch:ArrayBatchProvider",
    "register_custom_layer": "runtime:register_custom_layer",
    "register_custom_model": "runtime:register_custom_model",
    # exporters
    "convert": "exporters:convert",
    "ImageType": "mlpersonal.features:ImageType",
    "TensorType": "mlpersonal.features:TensorType",
    "ClassifierConfig": "exporters:ClassifierConfig",
    "UpdateConfig": "exporters:UpdateConfig",
    "SGD": "exporters:SGD",
    "Adam": "exporters:Adam",
    "to_onnx": "exporters:to_onnx",
    "knn_classifier": "exporters:knn_classifier",
    "pipeline": "exporters:pipeline",
    "is_flexible": "exporters:is_flexible",
    # quantization
    "quantize_weights": "mlpersonal.quantization:quantize_weights",
    "compare_models": "mlpersonal.compare:compare_models",
}

__all__ = [
    "ConversionError", "CustomLayerError", "InvalidInputError", "InvalidModelError",
    "LinkedModelError", "MLPersonalError", "TrainingError", "UnsupportedLayerError",
    "UpdateParameterError", "load_spec", "save", *_LAZY,
]


def __getattr__(name: str):
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'mlpersonal' has no attribute {name!r}")
    mod, attr = target.split(":")
    value = getattr(importlib.import_module(mod), attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
