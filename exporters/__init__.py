"""torch module -> Core ML spec: op mapping registry, classifier/regressor, update params, kNN,
pipelines, quantized weights, flexible shapes, custom conversion hooks, ONNX export.

Names resolve lazily from the module that defines them.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "convert": "exporters.convert",
    "ClassifierConfig": "exporters.convert",
    "UpdateConfig": "exporters.updatable",
    "SGD": "exporters.updatable",
    "Adam": "exporters.updatable",
    "make_updatable": "exporters.updatable",
    "to_onnx": "exporters.onnx_export",
    "knn_classifier": "exporters.knn",
    "pipeline": "exporters.pipeline",
    "is_flexible": "exporters.flexible",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'exporters' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value
