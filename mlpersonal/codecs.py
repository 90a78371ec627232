"""Weight codecs: Core ML ``WeightParams`` <-> float32 arrays.

One codec for the runtime, the exporter and the quantizer: float32 (``floatValue``), fp16
(``float16Value``, little-endian), and n-bit (1..8) packed ``rawValue`` with linear
(``w = scale[c] * q + bias[c]``) or lookup-table (``w = lut[c][q]``) quantization.

Packing follows Core ML (coremltools ``_convert_array_to_nbit_quantized_bytes``): each value's
``n`` bits are written most significant bit first, values one after another in a single bit
stream, bytes filled from their most significant bit, the last byte zero-padded. 8-bit values are
one byte each. Per-channel parameters index the channel axis: output-channel major by default
(``c = i // (count / channels)``); a layer whose channel axis is not the first (deconvolution,
``[Cin, Cout/groups, kH, kW]``) passes ``inner`` = the number of values per channel run
(``c = (i // inner) % channels``).

Scale/bias lists hold 1 (per layer) or ``channels`` values; a lookup table holds ``2**n`` values
(per layer, what Core ML's validator accepts) or ``channels * 2**n`` (one table per channel,
table ``c`` at ``[c * 2**n, (c + 1) * 2**n)``; an mlpersonal extension).
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
    """Number of values stored in ``wp`` (decoded), without decoding.

    For n-bit data this is an upper bound (the last byte may hold padding).
    """
    if len(wp.floatValue):
        return len(wp.floatValue)
    if len(wp.float16Value):
        return len(wp.float16Value) // 2
    if len(wp.rawValue) and wp.HasField("quantization") and wp.quantization.numberOfBits:
        return len(wp.rawValue) * 8 // wp.quantization.numberOfBits
    return len(wp.rawValue) // 4


def decode(wp, count: Optional[int] = None, where: str = "weights",
           channels: Optional[int] = None, *, inner: Optional[int] = None) -> np.ndarray:
    """Decode ``wp`` to a flat float32 array of ``count`` values (checked when given).

    ``channels`` is the number of quantization channels (output channels), needed for
    per-channel quantization; ``inner`` the number of consecutive values per channel run when
    the channel axis is not the first one (see the module docstring).
    """
    if len(wp.floatValue):
        arr = np.asarray(wp.floatValue, dtype=np.float32)
    elif len(wp.float16Value):
        raw = wp.float16Value
        if len(raw) % 2:
            raise InvalidModelError(f"{where}: float16Value has an odd number of bytes ({len(raw)})")
        arr = np.frombuffer(raw, dtype="<f2").astype(np.float32)
    elif len(wp.rawValue):
        arr = _decode_raw(wp, count, where, channels, inner)
    else:
        arr = np.zeros(0, dtype=np.float32)
    if count is not None and arr.size != count:
        raise InvalidModelError(
            f"{where}: holds {arr.size} values but the layer's shape needs {count}; "
            "the model is corrupt or its weights are missing"
        )
    return arr


# --- bit packing ------------------------------------------------------------------------------
def pack_bits(q: np.ndarray, nbits: int) -> bytes:
    """Pack unsigned ints ``q`` (each < 2**nbits) into Core ML's MSB-first n-bit stream."""
    nbits = _check_nbits(nbits, "numberOfBits")
    q = np.asarray(q).ravel()
    if q.size and (q.min() < 0 or q.max() >= (1 << nbits)):
        raise ValueError(f"quantized values must lie in 0..{(1 << nbits) - 1}")
    q = q.astype(np.uint8)
    if nbits == 8:
        return q.tobytes()
    bits = np.unpackbits(q[:, None], axis=1)[:, 8 - nbits:]
    return np.packbits(bits.ravel()).tobytes()


def unpack_bits(raw: bytes, count: int, nbits: int) -> np.ndarray:
    """The first ``count`` n-bit values of Core ML's packed stream ``raw`` as uint8."""
    data = np.frombuffer(raw, dtype=np.uint8)
    if nbits == 8:
        return data[:count].copy()
    bits = np.unpackbits(data)[: count * nbits].reshape(count, nbits)
    padded = np.zeros((count, 8), dtype=np.uint8)
    padded[:, 8 - nbits:] = bits
    return np.packbits(padded, axis=1).ravel()


def packed_size(count: int, nbits: int) -> int:
    """Bytes Core ML expects in ``rawValue`` for ``count`` n-bit values."""
    return (count * nbits + 7) // 8


def _check_nbits(nbits, where: str) -> int:
    n = int(nbits)
    if not 1 <= n <= 8:
        raise InvalidModelError(f"{where} is {nbits}; n-bit quantization needs 1..8 bits")
    return n


def channel_index(count: int, channels: int, inner: Optional[int] = None) -> np.ndarray:
    """Quantization channel of each flat value (see the module docstring)."""
    if inner is None:
        inner = count // channels
    return (np.arange(count) // max(inner, 1)) % channels


# --- decoding --------------------------------------------------------------------------------
def _decode_raw(wp, count, where, channels, inner) -> np.ndarray:
    if not wp.HasField("quantization"):
        raw = wp.rawValue
        if len(raw) % 4:
            raise InvalidModelError(f"{where}: rawValue of {len(raw)} bytes is not float32 data")
        return np.frombuffer(raw, dtype="<f4").copy()
    qp = wp.quantization
    nbits = _check_nbits(qp.numberOfBits, f"{where}: quantization.numberOfBits")
    if count is None:
        count = len(wp.rawValue) * 8 // nbits
    count = int(count)
    need = packed_size(count, nbits)
    if len(wp.rawValue) != need:
        raise InvalidModelError(
            f"{where}: rawValue holds {len(wp.rawValue)} bytes but {count} {nbits}-bit values "
            f"need {need}; the model is corrupt"
        )
    q = unpack_bits(wp.rawValue, count, nbits)
    kind = qp.WhichOneof("QuantizationType")
    channels = int(channels) if channels else 1
    if kind == "linearQuantization":
        scale = np.asarray(qp.linearQuantization.scale, dtype=np.float32)
        bias = np.asarray(qp.linearQuantization.bias, dtype=np.float32)
        scale = _per_channel(scale, "scale", count, channels, inner, where)
        bias = _per_channel(bias, "bias", count, channels, inner, where)
        return q.astype(np.float32) * scale + bias
    if kind == "lookupTableQuantization":
        lut = np.asarray(qp.lookupTableQuantization.floatValue, dtype=np.float32)
        size = 1 << nbits
        if lut.size == size:
            return lut[q]
        if channels > 1 and lut.size == channels * size:
            if count % channels:
                raise InvalidModelError(
                    f"{where}: {count} values do not split into {channels} channels")
            c = channel_index(count, channels, inner)
            return lut.reshape(channels, size)[c, q]
        per_ch = f" or {channels * size} ({channels} per-channel tables)" if channels > 1 else ""
        raise InvalidModelError(
            f"{where}: quantization.lookupTableQuantization.floatValue holds {lut.size} values; "
            f"a {nbits}-bit table needs {size} (2^{nbits}){per_ch}"
        )
    raise InvalidModelError(
        f"{where}: quantization has neither linearQuantization nor lookupTableQuantization set"
    )


def _per_channel(v: np.ndarray, field: str, count: int, channels: int, inner, where: str):
    if v.size == 1:
        return v[0]
    if v.size == channels and channels > 1:
        if count % channels:
            raise InvalidModelError(f"{where}: {count} values do not split into {channels} channels")
        return v[channel_index(count, channels, inner)]
    expect = f"1 or {channels}" if channels > 1 else "1"
    raise InvalidModelError(
        f"{where}: quantization.linearQuantization.{field} holds {v.size} values; expected "
        f"{expect} (per layer or per output channel)"
    )


# --- encoding --------------------------------------------------------------------------------
def encode_float(wp, values: np.ndarray) -> None:
    """Store ``values`` in ``wp`` as plain float32 (clearing any other storage)."""
    updatable = wp.isUpdatable
    wp.Clear()
    wp.isUpdatable = updatable
    wp.floatValue.extend(np.asarray(values, dtype=np.float32).ravel())


def encode_fp16(wp, values: np.ndarray, where: str = "weights") -> None:
    """Store ``values`` as little-endian float16 in ``float16Value``."""
    v = np.asarray(values, dtype=np.float32).ravel()
    if v.size and np.abs(v).max() >= 65504:
        raise InvalidModelError(f"{where}: holds values beyond float16's range (|w| >= 65504)")
    wp.Clear()
    wp.float16Value = v.astype("<f2").tobytes()


def encode_linear(wp, q: np.ndarray, nbits: int, scale, bias) -> None:
    """Store n-bit ints ``q`` with linear ``scale``/``bias`` (1 or one per channel)."""
    scale = np.atleast_1d(np.asarray(scale, dtype=np.float32)).ravel()
    bias = np.atleast_1d(np.asarray(bias, dtype=np.float32)).ravel()
    raw = pack_bits(q, nbits)
    wp.Clear()
    wp.quantization.numberOfBits = int(nbits)
    wp.quantization.linearQuantization.scale.extend(scale.tolist())
    wp.quantization.linearQuantization.bias.extend(bias.tolist())
    wp.rawValue = raw


def encode_lut(wp, q: np.ndarray, nbits: int, lut) -> None:
    """Store n-bit indices ``q`` into lookup table(s) ``lut`` (``2**n`` or ``C * 2**n`` values)."""
    lut = np.asarray(lut, dtype=np.float32).ravel()
    if lut.size % (1 << int(nbits)):
        raise ValueError(f"a {nbits}-bit lookup table needs a multiple of {1 << int(nbits)} values")
    raw = pack_bits(q, nbits)
    wp.Clear()
    wp.quantization.numberOfBits = int(nbits)
    wp.quantization.lookupTableQuantization.floatValue.extend(lut.tolist())
    wp.rawValue = raw


def stored_bytes(wp) -> int:
    """Bytes of weight payload in ``wp`` (values + scale/bias/table floats)."""
    n = 4 * len(wp.floatValue) + len(wp.float16Value) + len(wp.rawValue)
    if wp.HasField("quantization"):
        qp = wp.quantization
        n += 4 * (len(qp.linearQuantization.scale) + len(qp.linearQuantization.bias)
                  + len(qp.lookupTableQuantization.floatValue))
    return n
