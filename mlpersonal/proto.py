"""The Core ML spec types: coremltools' generated protobuf modules, re-exported in one place."""

import logging as _logging

# coremltools logs harmless warnings at import on Linux (no native runtime, untested torch).
_logging.getLogger("coremltools").setLevel(_logging.ERROR)

from coremltools.proto import (  # noqa: E402
    DataStructures_pb2,
    FeatureTypes_pb2,
    Model_pb2,
    NearestNeighbors_pb2,
    NeuralNetwork_pb2,
    Parameters_pb2,
)

Model = Model_pb2.Model

__all__ = [
    "DataStructures_pb2",
    "FeatureTypes_pb2",
    "Model",
    "Model_pb2",
    "NearestNeighbors_pb2",
    "NeuralNetwork_pb2",
    "Parameters_pb2",
]
