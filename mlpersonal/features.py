"""Input declarations for the exporter: ImageType and TensorType (coremltools-like)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

from .errors import ConversionError

_COLORS = {"grayscale": 1, "rgb": 3, "bgr": 3}


def _check_name(name) -> str:
    if not isinstance(name, str) or not name or not name.isidentifier():
        raise ConversionError(
            f"input name {name!r} must be a non-empty identifier-like string (e.g. 'image')"
        )
    return name


def _check_shape(name: str, shape, ranks: Sequence[int]) -> tuple[int, ...]:
    try:
        shp = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ConversionError(f"input {name!r}: shape {shape!r} must be a tuple of ints") from None
    if len(shp) not in ranks or any(s <= 0 for s in shp) or any(s != t for s, t in zip(shp, shape)):
        raise ConversionError(
            f"input {name!r}: shape {tuple(shape)!r} must hold {' or '.join(map(str, ranks))} "
            "positive ints, without the batch axis"
        )
    return shp


@dataclass(frozen=True)
class ImageType:
    """An image input ``(C, H, W)``; the model sees ``pixel * scale + bias`` (Core ML scaler).

    ``bias`` is one value or one per channel (in the model's colour order). Flexible sizes (the
    network must be fully convolutional): ``enumerated_sizes=[(width, height), ...]`` or
    ``size_range=((min_w, max_w), (min_h, max_h))`` with ``-1`` for an unbounded maximum.
    """

    name: str
    shape: tuple
    color: str = "rgb"
    scale: float = 1.0
    bias: Union[float, Sequence[float]] = 0.0
    enumerated_sizes: Optional[Sequence[tuple]] = None
    size_range: Optional[tuple] = None

    def __post_init__(self):
        _check_name(self.name)
        shape = _check_shape(self.name, self.shape, (3,))
        object.__setattr__(self, "shape", shape)
        if self.color not in _COLORS:
            raise ConversionError(
                f"input {self.name!r}: color {self.color!r} must be 'grayscale', 'rgb' or 'bgr'"
            )
        if shape[0] != _COLORS[self.color]:
            raise ConversionError(
                f"input {self.name!r}: a {self.color} image has {_COLORS[self.color]} channel(s), "
                f"but shape {shape} declares {shape[0]}"
            )
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
            raise ConversionError(f"input {self.name!r}: scale must be one number, got {self.scale!r}")
        bias = self.bias
        if isinstance(bias, (int, float)) and not isinstance(bias, bool):
            bias = (float(bias),) * shape[0]
        else:
            try:
                bias = tuple(float(b) for b in bias)
            except (TypeError, ValueError):
                raise ConversionError(f"input {self.name!r}: bias {self.bias!r} must be numbers") from None
            if len(bias) != shape[0]:
                raise ConversionError(
                    f"input {self.name!r}: bias has {len(bias)} values, the image has "
                    f"{shape[0]} channel(s)"
                )
        object.__setattr__(self, "bias", bias)
        object.__setattr__(self, "scale", float(self.scale))
        if self.enumerated_sizes is not None and self.size_range is not None:
            raise ConversionError(f"input {self.name!r}: give enumerated_sizes or size_range, not both")

    @property
    def is_flexible(self) -> bool:
        return self.enumerated_sizes is not None or self.size_range is not None


@dataclass(frozen=True)
class TensorType:
    """A multi-array input: ``(C,)`` or ``(C, H, W)`` without the batch axis (rank-5 mapping), or
    rank 2: read by ``nn.LSTM`` / ``nn.RNN`` (batch_first), ``(Seq, C)``: a sequence of
    ``C``-vectors, whose Core ML input is ``(C,)``, taking sequences of any length as
    ``(Seq, 1, C)``; read by other modules (``nn.Conv1d``, 1-D pooling), ``(C, L)``: a 1-D feature
    map, whose Core ML input is ``(C, 1, L)``.

    Flexible shapes: ``enumerated_shapes=[(C, H, W), ...]`` or ``shape_range=[(lo, hi)] * rank``
    (``-1``: unbounded maximum).

    ``dtype="int32"``: token ids (``(L,)`` read by ``nn.Embedding``), a Core ML INT32 multi-array;
    the module is traced on ids 0 and 1.
    """

    name: str
    shape: tuple = field(default=())
    enumerated_shapes: Optional[Sequence[tuple]] = None
    shape_range: Optional[Sequence[tuple]] = None
    dtype: str = "float32"

    def __post_init__(self):
        _check_name(self.name)
        object.__setattr__(self, "shape", _check_shape(self.name, self.shape, (1, 2, 3)))
        if self.dtype not in ("float32", "int32"):
            raise ConversionError(f"input {self.name!r}: dtype must be 'float32' or 'int32' (token "
                                  f"ids), got {self.dtype!r}")
        if self.is_sequence and self.is_flexible:
            raise ConversionError(f"input {self.name!r}: a (Seq, C) sequence takes any length "
                                  "already; it has no enumerated_shapes or shape_range")
        if self.enumerated_shapes is not None and self.shape_range is not None:
            raise ConversionError(f"input {self.name!r}: give enumerated_shapes or shape_range, not both")

    @property
    def is_flexible(self) -> bool:
        return self.enumerated_shapes is not None or self.shape_range is not None

    @property
    def is_sequence(self) -> bool:
        """Declared rank 2: ``(Seq, C)`` for a recurrent module (or ``(C, L)`` for a 1-D
        convolution; the exporters tell the two apart by what reads the input)."""
        return len(self.shape) == 2


InputType = Union[ImageType, TensorType]
