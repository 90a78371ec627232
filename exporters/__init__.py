"""torch module -> Core ML spec: op mapping registry, classifier/regressor, update params, kNN,
pipelines, quantized weights, flexible shapes, custom conversion hooks, ONNX export."""

from .converter import ClassifierConfig, convert
from .custom_layers import add_custom_layer, custom_layer_params
from .flexible import (
    is_flexible,
    set_enumerated_image_sizes,
    set_enumerated_shapes,
    set_image_size_range,
    set_shape_range,
)
from .knn import knn_classifier
from .onnx_export import to_onnx
from .pipelines import linked_model, pipeline
from .quantized import apply_qat_weights, quantized_weight_params
from .updatable import SGD, Adam, UpdateConfig, make_updatable

__all__ = [
    "Adam", "ClassifierConfig", "SGD", "UpdateConfig", "add_custom_layer", "apply_qat_weights",
    "convert", "custom_layer_params", "is_flexible", "knn_classifier", "linked_model",
    "make_updatable", "pipeline", "quantized_weight_params", "set_enumerated_image_sizes",
    "set_enumerated_shapes", "set_image_size_range", "set_shape_range", "to_onnx",
]
