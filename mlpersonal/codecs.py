"""Weight codecs: Core ML ``WeightParams`` <-> float32 arrays.

One codec for the runtime, the exporter and the quantizer: float32 (``floatValue``), fp16
(``float16Value``), and n-bit packed ``rawValue`` with linear or lookup-table quantization.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .errors import InvalidModelError


def storage_of(wp) -> str:
    """A short description of how ``wp`` is stored: float32, fp16, 8-bit linear, 4-bit lut, ..."""
    if len(wp.floatValue):
        return "float32"
    if len(wp.float16Value):
        return "fp16"
    if len(wp.rawValue):
        if wp.HasField("quantization"):
            q = wp.quantization
            kind = q.WhichOneof("QuantizationType")
            kind = {"linearQuantization": "linear", "lookupTableQuantization": "lut"}.get(kind, kind)
            return f"{q.numberOfBits}-bit {kind}"
        return "raw"
    return "empty"


def count_of(wp) -> int:
    """Number of values stored in ``wp`` (decoded), without decoding."""
    if len(wp.floatValue):
        return len(wp.floatValue)
    if len(wp.float16Value):
        return len(wp.float16Value) // 2
    if len(wp.rawValue) and wp.HasField("quantization") and wp.quantization.numberOfBits:
        return len(wp.rawValue) * 8 // wp.quantization.numberOfBits
    return len(wp.rawValue) // 4


def decode(wp, count: Optional[int] = None, where: str = "weights",
           channels: Optional[int] = None) -> np.ndarray:
    """Decode ``wp`` to a flat float32 array of ``count`` values (checked when given).

    ``channels`` is the number of output channels, needed for per-channel quantization
    (values are laid out output-channel major).
    """
    if len(wp.floatValue):
        arr = np.asarray(wp.floatValue, dtype=np.float32)
    elif len(wp.float16Value):
        raw = wp.float16Value
        if len(raw) % 2:
            raise InvalidModelError(f"{where}: float16Value has an odd number of bytes ({len(raw)})")
        arr = np.frombuffer(raw, dtype="<f2").astype(np.float32)
    elif len(wp.rawValue):
        arr = _decode_raw(wp, count, where, channels)
    else:
        arr = np.zeros(0, dtype=np.float32)
    if count is not None and arr.size != count:
        raise InvalidModelError(
            f"{where}: holds {arr.size} values but the layer's shape needs {count}; "
            "the model is corrupt or its weights are missing"
        )
    return arr


def _decode_raw(wp, count, where, channels) -> np.ndarray:
    if not wp.HasField("quantization"):
        raw = wp.rawValue
        if len(raw) % 4:
            raise InvalidModelError(f"{where}: rawValue of {len(raw)} bytes is not float32 data")
        return np.frombuffer(raw, dtype="<f4").copy()
    raise InvalidModelError(f"{where}: quantized weights are not supported yet")


def encode_float(wp, values: np.ndarray) -> None:
    """Store ``values`` in ``wp`` as plain float32 (clearing any other storage)."""
    updatable = wp.isUpdatable
    wp.Clear()
    wp.isUpdatable = updatable
    wp.floatValue.extend(np.asarray(values, dtype=np.float32).ravel())
