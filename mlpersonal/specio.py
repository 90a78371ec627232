"""Reading and writing `.mlmodel` files (serialized ``Model_pb2.Model``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from google.protobuf.message import DecodeError

from .errors import InvalidModelError
from .fileio import atomic_write_bytes
from .proto import Model_pb2

#: Newest specification version we know (coremltools 9.0 writes up to 10 for ML programs).
MAX_SPECIFICATION_VERSION = 10
#: Refuse files larger than this before reading them (a model file is untrusted data).
MAX_FILE_BYTES = 2 * 1024**3

SpecLike = Union[str, os.PathLike, bytes, "Model_pb2.Model"]


def load_spec(source: SpecLike) -> Model_pb2.Model:
    """Return the ``Model_pb2.Model`` in ``source`` (a path, serialized bytes, or a spec).

    Raises :class:`InvalidModelError` naming the problem for anything that is not a readable
    Core ML model.
    """
    if isinstance(source, Model_pb2.Model):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _parse(bytes(source), "<bytes>")
    path = Path(source)
    if path.is_dir():
        raise InvalidModelError(
            f"{path} is a folder (an .mlpackage / ML program?); mlpersonal reads .mlmodel files "
            "(NeuralNetwork, kNN, pipeline specs). Convert with convert_to='neuralnetwork'."
        )
    if not path.exists():
        raise InvalidModelError(f"model file {path} does not exist; check the path")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise InvalidModelError(f"{path} is {size} bytes, larger than the {MAX_FILE_BYTES} limit")
    return _parse(path.read_bytes(), str(path))


def _parse(data: bytes, where: str) -> Model_pb2.Model:
    if not data:
        raise InvalidModelError(f"{where} is empty: not a Core ML model")
    spec = Model_pb2.Model()
    try:
        spec.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as e:
        raise InvalidModelError(
            f"{where} is not a valid .mlmodel (protobuf parse failed: {e}); the file is corrupt, "
            "truncated, or of another format"
        ) from None
    check_header(spec, where)
    return spec


def check_header(spec: Model_pb2.Model, where: str = "model") -> None:
    """Refuse a spec with no model type or an unknown specification version."""
    v = spec.specificationVersion
    if v <= 0 or v > MAX_SPECIFICATION_VERSION:
        raise InvalidModelError(
            f"{where}: specificationVersion {v} is not supported (expected 1..."
            f"{MAX_SPECIFICATION_VERSION}); the file is corrupt or from a newer Core ML"
        )
    if spec.WhichOneof("Type") is None:
        raise InvalidModelError(
            f"{where}: the spec holds no model (no Type field set); the file is truncated or corrupt"
        )


def save(spec: Model_pb2.Model, path: str | os.PathLike) -> Path:
    """Write ``spec`` to ``path`` atomically (temp file, fsync, rename)."""
    if not isinstance(spec, Model_pb2.Model):
        raise TypeError(f"save() expects a Model_pb2.Model, got {type(spec).__name__}")
    return atomic_write_bytes(path, spec.SerializeToString())
