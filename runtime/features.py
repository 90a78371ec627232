"""User feature values <-> batched tensors, following the model description.

Inputs are encoded to a "user layout": multi-arrays ``(B, *declared_shape)``, images
``(B, C, H, W)`` float pixel values 0..255 in the model's colour order, int64/double ``(B,)``,
strings and dictionaries as lists. Outputs come back the same way and are split per example.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from mlpersonal.errors import InvalidInputError

from .batch import ArrayBatchProvider, DictionaryColumn

GRAYSCALE, RGB, BGR = 10, 20, 30
_F32 = np.dtype(np.float32)
_U8 = np.dtype(np.uint8)
_NUMERIC_KINDS = "biuf"  # numpy dtype kinds of bool, signed/unsigned int, float (not complex)
#: ArrayFeatureType.DOUBLE / FLOAT16 -> numpy (the network computes float32; FLOAT32 and INT32
#: outputs keep what it computed)
_OUTPUT_FLOATS = {65600: np.float64, 65552: np.float16}


def feature_kind(fd) -> str:
    return fd.type.WhichOneof("Type") or "undefined"


def array_shape(fd) -> tuple[int, ...]:
    return tuple(fd.type.multiArrayType.shape)  # repeated int64: already python ints


class Feature:
    """One feature description read once (name, kind, declared array shape, optional), so that
    encoding and decoding do no protobuf look-ups per call; ``fd`` is the description itself."""

    __slots__ = ("fd", "name", "kind", "shape", "optional", "sequence", "float_type")

    def __init__(self, fd):
        self.fd, self.name, self.kind = fd, fd.name, feature_kind(fd)
        self.shape = array_shape(fd) if self.kind == "multiArrayType" else ()
        #: the numpy type a multi-array output comes back as when it is declared DOUBLE or
        #: FLOAT16 (Core ML hands out MLMultiArrays of the declared type), else None
        self.float_type = _OUTPUT_FLOATS.get(int(fd.type.multiArrayType.dataType)) \
            if self.kind == "multiArrayType" else None
        self.optional = bool(fd.type.isOptional)
        #: a rank-1 ``(C,)`` multi-array of a rank-5 network, which also takes a sequence of
        #: vectors as ``(Seq, 1, C)`` (set by the network model)
        self.sequence = False


class Features(tuple):
    """What :func:`describe` returns: a tuple of :class:`Feature`."""


def describe(fds: Sequence) -> Features:
    """Feature descriptions (or already described features) -> :class:`Features`."""
    if type(fds) is Features:
        return fds
    return Features(f if isinstance(f, Feature) else Feature(f) for f in fds)


def allowed_array_shapes(fd) -> tuple[list, object]:
    """(enumerated shapes, ranges or None) a multi-array input allows, besides its default."""
    m = fd.type.multiArrayType
    flex = m.WhichOneof("ShapeFlexibility")
    if flex == "enumeratedShapes":
        return [tuple(int(s) for s in e.shape) for e in m.enumeratedShapes.shapes], None
    if flex == "shapeRange":
        return [], [(int(r.lowerBound), int(r.upperBound)) for r in m.shapeRange.sizeRanges]
    return [], None


def _shape_allowed(shape, fd) -> bool:
    default = array_shape(fd)
    enum, ranges = allowed_array_shapes(fd)
    if tuple(shape) == default or tuple(shape) in enum:
        return True
    if ranges is not None and len(ranges) == len(shape):
        return all(lo <= s and (hi < 0 or s <= hi) for s, (lo, hi) in zip(shape, ranges))
    return False


def _to_numpy(value, name: str, index: int) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        arr = np.asarray(value)
    except Exception as e:  # noqa: BLE001
        raise InvalidInputError(f"example {index}: feature {name!r} is not array-like ({e})") from None
    if arr.dtype.kind not in _NUMERIC_KINDS:
        raise InvalidInputError(
            f"example {index}: feature {name!r} must be numeric (real), got dtype {arr.dtype}"
        )
    return arr


def sequence_steps(shape: tuple, default: tuple) -> int:
    """The length of a sequence value (``(Seq, 1, C)`` or ``(Seq, C)``) for a declared ``(C,)``,
    else 0."""
    if len(default) == 1 and len(shape) in (2, 3) and shape[-1:] == default and shape[1:-1] in ((), (1,)):
        return int(shape[0])
    return 0


def encode_array(fd, value, index: int, sequence: bool = False) -> np.ndarray:
    """One multi-array value as float32 of an allowed shape (``sequence``: also ``(Seq, 1, C)``
    or ``(Seq, C)`` for a declared ``(C,)``, answered as ``(Seq, 1, C)``)."""
    name = fd.name
    arr = _to_numpy(value, name, index).astype(np.float32, copy=False)
    default = array_shape(fd)
    steps = sequence_steps(arr.shape, default) if sequence else 0
    if steps:
        arr = arr.reshape(steps, 1, default[0])  # a sequence of vectors, (Seq, C) taken too
    elif arr.shape != default and not _shape_allowed(arr.shape, fd):
        if default and arr.size == int(np.prod(default)) and allowed_array_shapes(fd) == ([], None):
            arr = arr.reshape(default)
        else:
            enum, ranges = allowed_array_shapes(fd)
            allowed = [default] + enum + ([f"ranges {ranges}"] if ranges else []) + (
                [f"(Seq, 1, {default[0]}) for a sequence"] if sequence else [])
            raise InvalidInputError(
                f"example {index}: feature {name!r} has shape {tuple(arr.shape)}, the model "
                f"accepts {', '.join(map(str, allowed))}"
            )
    _check_finite(arr, name, index)
    return arr


def plain_arrays(values: list, default: tuple):
    """``(B, *default)`` float32 (a new array) when every value is a float32 numpy array of the
    declared shape ``default``, else None (values that need conversion or checks one by one).
    Not checked for NaN/Inf."""
    if not values or not all([type(v) is np.ndarray and v.dtype is _F32 and v.shape == default
                              for v in values]):
        return None
    if len(values) == 1:
        return values[0][None].copy()
    if default:
        return np.concatenate(values).reshape(len(values), *default)
    return np.stack(values)


def _encode_arrays(fd, values: list, device: torch.device, default: tuple, sequence: bool = False):
    """Multi-array values -> one ``(B, *shape)`` tensor, or a list of tensors (mixed shapes).

    Fast path: float32 numpy arrays of the declared shape ``default`` skip per-example
    conversion and are checked for NaN/Inf once, batched (same errors as :func:`encode_array`).
    An optional input left out is zeros of the declared shape (Core ML: a recurrent layer's
    initial state).
    """
    if fd.type.isOptional and any(v is None for v in values):
        values = [np.zeros(default, np.float32) if v is None else v for v in values]
    stacked = plain_arrays(values, default)
    steps = sequence_steps(values[0].shape, default) if sequence and type(values[0]) is np.ndarray else 0
    if stacked is None and steps:  # sequences of one length: at once, as (B, Seq, 1, C)
        stacked = plain_arrays(values, values[0].shape)
        if stacked is not None:
            stacked = stacked.reshape(len(values), steps, 1, default[0])
    if stacked is not None:  # the common case: no per-example conversion
        arrs, fast = values, range(len(values))
    else:
        arrs, fast = [], []
        for i, v in enumerate(values):
            if type(v) is np.ndarray and v.dtype == np.float32 and v.shape == default:
                arrs.append(v)
                fast.append(i)
            else:
                arrs.append(encode_array(fd, v, i, sequence))
        if len({a.shape for a in arrs}) > 1:  # mixed flexible shapes
            for i in fast:
                _check_finite(arrs[i], fd.name, i)
            return [torch.from_numpy(np.array(a)).to(device) for a in arrs]
        stacked = arrs[0][None].copy() if len(arrs) == 1 else np.stack(arrs)
    def check():
        if fast and not np.isfinite(stacked).all():  # report the first bad example
            for i in fast:
                _check_finite(arrs[i], fd.name, i)

    return _checked_tensor(stacked, device, check)


def _encode_array_column(fd, col, device: torch.device, default: tuple, sequence: bool = False):
    """A ``(B, *shape)`` array column -> one tensor without per-example work when it is float32
    of the declared shape (other dtypes are converted once); otherwise row by row, with the
    per-example rules and errors of :func:`encode_array`."""
    arr = col.detach().cpu().numpy() if isinstance(col, torch.Tensor) else col
    if arr.dtype != _F32:
        if arr.dtype.kind not in _NUMERIC_KINDS:
            raise InvalidInputError(f"feature {fd.name!r} must be numeric (real), got dtype {arr.dtype}")
        arr = arr.astype(np.float32)
    steps = sequence_steps(arr.shape[1:], default) if sequence else 0
    if steps:  # (B, Seq, 1, C) or (B, Seq, C): sequences of one length
        arr = arr.reshape(len(arr), steps, 1, default[0])
    elif arr.shape[1:] != default:
        return _encode_arrays(fd, list(arr), device, default, sequence)
    if not (arr.flags.c_contiguous and arr.flags.writeable):
        arr = np.array(arr, order="C")
    def check():
        if not np.isfinite(arr).all():
            bad = int(np.flatnonzero(~np.isfinite(arr.reshape(len(arr), -1)).all(axis=1))[0])
            _check_finite(arr[bad], fd.name, bad)

    return _checked_tensor(arr, device, check)


#: arrays from this size on go to a cuda device through pinned memory, asynchronously, while
#: the host checks them (H100: 3.2 MB 0.49 -> 0.37 ms; 200 KB even; 3 KB 21 -> 37 us)
PINNED_COPY_MIN_BYTES = 1 << 20


def _checked_tensor(arr: np.ndarray, device: torch.device, check: Callable[[], None]) -> torch.Tensor:
    """``arr`` as a tensor on ``device`` once ``check()`` (the NaN/Inf test, raising
    InvalidInputError) passes; a large array bound for cuda is checked on the host while it is
    copied (through pinned memory, asynchronously) to the GPU."""
    t = torch.from_numpy(arr)
    kind = getattr(device, "type", device)
    if kind == "cuda" and arr.nbytes >= PINNED_COPY_MIN_BYTES:
        t = t.pin_memory().to(device, non_blocking=True)
        check()
        return t
    check()
    return t if kind == "cpu" else t.to(device)


def _check_finite(arr: np.ndarray, name: str, index: int) -> None:
    if not np.isfinite(arr).all():
        raise InvalidInputError(f"example {index}: feature {name!r} contains NaN or Inf values")


def image_size(fd) -> tuple[int, int]:
    it = fd.type.imageType
    return int(it.width), int(it.height)


def _image_size_allowed(fd, w: int, h: int) -> bool:
    it = fd.type.imageType
    flex = it.WhichOneof("SizeFlexibility")
    if flex == "enumeratedSizes":
        return any(s.width == w and s.height == h for s in it.enumeratedSizes.sizes)
    if flex == "imageSizeRange":
        wr, hr = it.imageSizeRange.widthRange, it.imageSizeRange.heightRange
        return (wr.lowerBound <= w and (wr.upperBound < 0 or w <= wr.upperBound)
                and hr.lowerBound <= h and (hr.upperBound < 0 or h <= hr.upperBound))
    return False


def encode_image(fd, value, index: int) -> np.ndarray:
    """An image value -> ``(C, H, W)`` float32 pixel values 0..255 in the model's colour order.
    Pillow is imported only for files, PIL images and resizing (a first call importing it for a
    numpy array of the model's size took ~0.1 s)."""
    name = fd.name
    space = int(fd.type.imageType.colorSpace) or RGB
    loaded = sys.modules.get("PIL.Image")  # a PIL image value means Pillow is imported already
    if isinstance(value, (str, os.PathLike)):
        from PIL import Image

        p = Path(value)
        if not p.is_file():
            raise InvalidInputError(f"example {index}: image file {p} for {name!r} does not exist")
        try:
            with Image.open(p) as im:
                im.load()
                value = im.copy()
        except Exception as e:  # noqa: BLE001
            raise InvalidInputError(f"example {index}: cannot read image {p} for {name!r}: {e}") from None
    if loaded is None or not isinstance(value, loaded.Image):
        arr = _to_numpy(value, name, index)
        if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
            arr = np.moveaxis(arr, 0, -1)  # CHW -> HWC
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
            raise InvalidInputError(
                f"example {index}: image {name!r} must be HxW or HxWxC (C=1,3,4), got shape {arr.shape}"
            )
        if arr.dtype.kind == "f":
            if not np.isfinite(arr).all():
                raise InvalidInputError(f"example {index}: image {name!r} contains NaN or Inf")
            if arr.min() < 0 or arr.max() > 1.0:
                raise InvalidInputError(
                    f"example {index}: float image {name!r} must hold values in [0, 1] "
                    "(pass a uint8 array for 0..255 pixel values)"
                )
            arr = np.round(arr * 255.0).astype(np.uint8)
        elif arr.dtype != np.uint8:
            if arr.min() < 0 or arr.max() > 255:
                raise InvalidInputError(f"example {index}: image {name!r} values must lie in 0..255")
            arr = arr.astype(np.uint8)
        channels_match = arr.ndim == 2 if space == GRAYSCALE else (arr.ndim == 3 and arr.shape[-1] == 3)
        if channels_match and _size_kept(fd, arr.shape[1], arr.shape[0]):
            return _pixels_to_chw(arr, space)  # what the PIL round trip below gives, without it
        from PIL import Image

        value = Image.fromarray(arr)
    from PIL import Image

    im = value.convert("L" if space == GRAYSCALE else "RGB")
    if not _size_kept(fd, *im.size):
        im = im.resize(image_size(fd), Image.BILINEAR)
    return _pixels_to_chw(np.asarray(im), space)


def pixel_batch(fd, col: np.ndarray):
    """uint8 pixels of every example at once, ``(B, H, W)`` (grayscale) or ``(B, H, W, 3)``
    (RGB) at a size the model takes -> ``(B, C, H, W)`` float32 in the model's colour order, as
    :func:`encode_image` gives per example; None for anything else (encoded per example)."""
    space = int(fd.type.imageType.colorSpace) or RGB
    if col.dtype != np.uint8 or col.ndim != (3 if space == GRAYSCALE else 4):
        return None
    if (space != GRAYSCALE and col.shape[-1] != 3) or not _size_kept(fd, col.shape[2], col.shape[1]):
        return None
    arr = col.astype(np.float32)
    if space == GRAYSCALE:
        return arr[:, None]
    arr = np.moveaxis(arr, -1, 1)
    return np.ascontiguousarray(arr[:, ::-1] if space == BGR else arr)


def plain_pixels(fd, values: list):
    """:func:`pixel_batch` of per-example uint8 pixel arrays of one shape, else None."""
    if not values or not all([type(v) is np.ndarray and v.dtype is _U8 for v in values]):
        return None
    shape = values[0].shape
    if not all([v.shape == shape for v in values]):
        return None
    return pixel_batch(fd, values[0][None] if len(values) == 1 else np.stack(values))


def _size_kept(fd, w: int, h: int) -> bool:
    """Whether an image of ``w`` x ``h`` is fed as it is (the model's size or an allowed one)."""
    return (w, h) == image_size(fd) or _image_size_allowed(fd, w, h)


def _pixels_to_chw(arr: np.ndarray, space: int) -> np.ndarray:
    """uint8 ``HxW`` (grayscale) or ``HxWx3`` (RGB) pixels -> float32 ``(C, H, W)`` in the
    model's colour order."""
    arr = arr.astype(np.float32)
    if space == GRAYSCALE:
        return arr[None]
    arr = np.moveaxis(arr, -1, 0)
    return arr[::-1].copy() if space == BGR else np.ascontiguousarray(arr)


def shape_groups(feeds: dict[str, Any], ids: Sequence[int]) -> list[list[int]]:
    """Positions in ``ids`` grouped by the shapes of their examples' per-example values (inputs
    given in mixed shapes are lists of tensors), groups in first-seen order."""
    lists = [v for v in feeds.values() if type(v) is list]
    groups: dict = {}
    for j, i in enumerate(ids):
        key = tuple(tuple(getattr(v[i], "shape", ())) for v in lists)
        groups.setdefault(key, []).append(j)
    return list(groups.values())


def example_lengths(feeds: dict[str, Any], sequences: set) -> Optional[list[int]]:
    """Each example's sequence length when every input given in mixed shapes is one of the
    ``sequences`` inputs (``(Seq, 1, C)`` tensors, or a ``(C,)`` vector: length 1) and an
    example's sequence inputs agree on their length; else None."""
    lists = {k: v for k, v in feeds.items() if type(v) is list}
    if not lists or not set(lists) <= set(sequences):
        return None
    lengths = None
    for v in lists.values():
        mine = [t.shape[0] if t.dim() == 3 else 1 for t in v]
        if lengths is not None and mine != lengths:
            return None
        lengths = mine
    return lengths


def padded_feeds(feeds: dict[str, Any], ids: Sequence[int], lengths: Sequence[int]) -> dict[str, Any]:
    """The examples ``ids`` of encoded ``feeds`` as one batch, their sequences (see
    :func:`example_lengths`) padded at the end with zeros to the longest: ``(B, Seq, 1, C)``."""
    out = {}
    for k, v in feeds.items():
        if type(v) is list:
            rows = [v[i].reshape(lengths[i], 1, -1) for i in ids]
            out[k] = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
        else:
            out[k] = v[torch.tensor(list(ids), device=v.device)]
    return out


def gather_feeds(feeds: dict[str, Any], members: Sequence[int]) -> dict[str, Any]:
    """The examples ``members`` of encoded ``feeds`` as one batch: batched tensors indexed,
    per-example tensors (of one shape) stacked, other per-example values (strings) listed."""
    if len(members) == 1:  # a view, not a copy
        i = members[0]
        return {k: v[i:i + 1] if isinstance(v, torch.Tensor)
                else v[i].unsqueeze(0) if isinstance(v[i], torch.Tensor) else [v[i]]
                for k, v in feeds.items()}
    out = {}
    for k, v in feeds.items():
        if isinstance(v, torch.Tensor):
            out[k] = v[torch.tensor(list(members), device=v.device)]
        elif isinstance(v[members[0]], torch.Tensor):
            out[k] = torch.stack([v[i] for i in members])
        else:
            out[k] = [v[i] for i in members]
    return out


def encode_inputs(inputs: Sequence, examples: Sequence[dict], device: torch.device) -> dict[str, Any]:
    """Encode a list of feature dicts into batched values, one entry per model input.

    ``inputs``: the model's input descriptions, or their :func:`describe` (cached by models).
    """
    if isinstance(examples, dict):
        raise InvalidInputError("predict_batch expects a list of feature dicts (or an "
                                "ArrayBatchProvider of columns), got one dict")
    inputs = describe(inputs)
    columns = examples.columns if isinstance(examples, ArrayBatchProvider) else None
    all_dicts = columns is None and all([type(ex) is dict for ex in examples])
    out: dict[str, Any] = {}
    for f in inputs:
        name, kind, fd = f.name, f.kind, f.fd
        if columns is not None:
            if name not in columns and not f.optional:
                raise InvalidInputError(f"the batch has no column {name!r} (the model's inputs "
                                        f"are {[g.name for g in inputs]})")
            col = columns.get(name)
            if kind == "multiArrayType" and isinstance(col, (np.ndarray, torch.Tensor)):
                out[name] = _encode_array_column(fd, col, device, f.shape, f.sequence)
                continue
            if kind == "imageType" and isinstance(col, np.ndarray):
                pixels = pixel_batch(fd, col)
                if pixels is not None:
                    out[name] = torch.from_numpy(pixels).to(device)
                    continue
            values = [None] * len(examples) if col is None else list(col)
        else:
            try:
                values = [ex[name] for ex in examples] if all_dicts else None
            except KeyError:
                values = None
        if values is None:  # not plain dicts, or a missing feature: check one by one
            values = []
            for i, ex in enumerate(examples):
                if not isinstance(ex, dict):
                    raise InvalidInputError(f"example {i} must be a dict of features, got {type(ex).__name__}")
                if name not in ex:
                    if f.optional:
                        values.append(None)
                        continue
                    raise InvalidInputError(
                        f"example {i}: missing input feature {name!r} (the model's inputs are "
                        f"{[g.name for g in inputs]})"
                    )
                values.append(ex[name])
        if kind == "multiArrayType":
            out[name] = _encode_arrays(fd, values, device, f.shape, f.sequence)
        elif kind == "imageType":
            pixels = plain_pixels(fd, values)  # uint8 arrays at a size the model takes: at once
            if pixels is not None:
                out[name] = torch.from_numpy(pixels).to(device)
                continue
            arrs = [encode_image(fd, v, i) for i, v in enumerate(values)]
            shapes = {a.shape for a in arrs}
            if len(shapes) > 1:
                out[name] = [torch.from_numpy(a).to(device) for a in arrs]
            else:
                out[name] = torch.from_numpy(np.stack(arrs)).to(device)
        elif kind == "int64Type":
            try:
                out[name] = torch.tensor([int(v) for v in values], dtype=torch.int64, device=device)
            except (TypeError, ValueError):
                raise InvalidInputError(f"feature {name!r} must be integers, got {values[:3]}...") from None
        elif kind == "doubleType":
            try:
                t = torch.tensor([float(v) for v in values], dtype=torch.float32, device=device)
            except (TypeError, ValueError):
                raise InvalidInputError(f"feature {name!r} must be numbers, got {values[:3]}...") from None
            if not torch.isfinite(t).all():
                raise InvalidInputError(f"feature {name!r} contains NaN or Inf")
            out[name] = t
        elif kind == "stringType":
            for i, v in enumerate(values):
                if not isinstance(v, str):
                    raise InvalidInputError(f"example {i}: feature {name!r} must be a str, got {type(v).__name__}")
            out[name] = list(values)
        else:
            out[name] = list(values)
    return out


def _to_array(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.float32 and t.device.type == "cpu" and not t.requires_grad:
        return t.numpy()
    return t.detach().float().cpu().numpy() if t.is_floating_point() else t.detach().cpu().numpy()


def decode_outputs(outputs: Sequence, batched: dict[str, Any], n: int,
                   columns: bool = False) -> list[dict] | ArrayBatchProvider:
    """Batched outputs -> one dict of python/numpy values per example, or (``columns=True``) an
    :class:`~runtime.batch.ArrayBatchProvider`: arrays stay ``(n, ...)``, class probabilities a
    :class:`~runtime.batch.DictionaryColumn`, other kinds per-example lists.

    ``outputs``: the model's output descriptions, or their :func:`describe` (cached by models).
    """
    cols: dict[str, Any] = {}
    for f in describe(outputs):
        name, kind = f.name, f.kind
        if name not in batched:
            continue
        v = batched[name]
        if type(v) is list and v and isinstance(v[0], torch.Tensor):  # mixed shapes, per example
            v = [_to_array(t) for t in v]
            if f.float_type is not None:
                v = [a.astype(f.float_type) if a.dtype.kind == "f" else a for a in v]
        if isinstance(v, torch.Tensor):
            arr = _to_array(v)
            if kind == "doubleType":
                v = [float(a) for a in arr.reshape(n, -1)[:, 0].tolist()]
            elif kind == "int64Type":
                v = [int(a) for a in arr.reshape(n, -1)[:, 0].tolist()]
            elif f.float_type is not None and arr.dtype.kind == "f":
                v = arr.astype(f.float_type)
            else:
                v = arr
        elif type(v) is DictionaryColumn and not columns:
            v = v.tolist()
        cols[name] = v
    if columns:
        return ArrayBatchProvider._of(cols, n)
    result: list[dict] = [{} for _ in range(n)]
    for name, v in cols.items():
        for r, value in zip(result, v):
            r[name] = value
    return result
