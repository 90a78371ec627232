"""Flexible input shapes: check that a network is fully convolutional, and declare the sizes.

- :func:`is_flexible` tells whether a torch module or a NeuralNetwork spec can run at other
  spatial sizes (no Linear / Flatten / fixed reshape before a global pooling) and why not.
- :func:`set_enumerated_shapes` / :func:`set_shape_range` (multi-array inputs) and
  :func:`set_enumerated_image_sizes` / :func:`set_image_size_range` (image inputs) write exactly
  the fields coremltools' ``flexible_shape_utils`` writes (``enumeratedShapes`` / ``shapeRange``,
  ``enumeratedSizes`` / ``imageSizeRange``; ``-1`` upper bound = unbounded) and raise the
  specification version as it does (3, or 4 for ND multi-arrays). Unlike coremltools they
  *replace* any earlier flexibility of the feature.
- Outputs follow (``outputs=True``): multi-array outputs whose size depends on the flexible input
  get an empty shape (what ``ct.convert`` writes for flexible models); image outputs get the same
  flexibility as the input, scaled by the ratio of their default sizes.

Image sizes are given as ``(width, height)`` pairs (Core ML's field order; "64x48" = 64 wide,
48 high). The runtime runs every allowed size without reloading and refuses other multi-array
shapes with an error listing what is allowed; images of another size are resized to the default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Iterable, Optional, Sequence

from mlpersonal.errors import ConversionError

MIN_FLEXIBLE_VERSION = 3   # coremltools._MINIMUM_FLEXIBLE_SHAPES_SPEC_VERSION
MIN_NDARRAY_VERSION = 4    # coremltools._MINIMUM_NDARRAY_SPEC_VERSION
_NN_KINDS = ("neuralNetwork", "neuralNetworkClassifier", "neuralNetworkRegressor")
SPATIAL = ("H", "W")


@dataclass
class FlexibilityReport:
    """Truthy when the network may run at other spatial sizes; ``reason`` says why not."""

    flexible: bool
    flexible_dims: tuple = ()
    reason: str = ""
    inputs: tuple = field(default_factory=tuple)

    def __bool__(self) -> bool:
        return self.flexible


# --------------------------------------------------------------------------- is_flexible
def is_flexible(module_or_spec: Any,
                input_shape: Optional[Sequence[int]] = None) -> FlexibilityReport:
    """Whether a torch module or a NeuralNetwork spec is fully convolutional.

    A network qualifies when nothing fixes the spatial size of its input before a global
    pooling: no ``Linear``/``Flatten``/``Unflatten`` (torch) or ``innerProduct``/``flatten``/
    ``reshape``/... (spec) on a blob whose height and width still follow the input's. Then
    ``flexible_dims == ("H", "W")``. For a module, ``input_shape`` (``(C, H, W)`` or
    ``(N, C, H, W)``) lets the check run the module to see the execution order and confirm it
    also runs at twice the size (catching ``view``/``reshape`` to fixed sizes in ``forward``).
    """
    from mlpersonal.proto import Model_pb2

    if isinstance(module_or_spec, Model_pb2.Model):
        return _spec_report(module_or_spec)
    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    if torch is not None and isinstance(module_or_spec, torch.nn.Module):
        return _module_report(module_or_spec, input_shape)
    raise ConversionError(f"is_flexible expects a torch.nn.Module or a Model_pb2.Model, got "
                          f"{type(module_or_spec).__name__}")


def _module_report(module, input_shape) -> FlexibilityReport:
    import torch
    from torch import nn

    from .probe import probe_inputs

    fixing = (nn.Linear, nn.Bilinear, nn.Flatten, nn.Unflatten, nn.LazyLinear)
    adaptive = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool1d,
                nn.AdaptiveMaxPool1d)
    names = {m: n for n, m in module.named_modules()}
    order: list = []
    probe_error = None
    if input_shape is not None:
        shape = tuple(int(s) for s in input_shape)
        shape = (1, *shape) if len(shape) == 3 else shape
        if len(shape) != 4:
            raise ConversionError(f"input_shape must be (C, H, W) or (N, C, H, W), "
                                  f"got {input_shape}")
        leaves = [m for m in module.modules() if not list(m.children())]
        hooks = [m.register_forward_pre_hook(lambda m, _a: order.append(m)) for m in leaves]
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                module(*probe_inputs(module, [shape], torch.zeros))
                order_at_default = list(order)
                try:
                    module(*probe_inputs(module, [(*shape[:2], shape[2] * 2, shape[3] * 2)], torch.zeros))
                except Exception as e:  # noqa: BLE001 - any failure means "size is fixed"
                    probe_error = e
        finally:
            for h in hooks:
                h.remove()
            module.train(was_training)
        order = order_at_default
    else:
        order = [m for m in module.modules() if not list(m.children())]
    for m in order:
        name = names.get(m, "?")
        if isinstance(m, adaptive):
            size = m.output_size if isinstance(m.output_size, tuple) else (m.output_size,)
            if all(s == 1 for s in size):
                # global pooling: what follows sees a fixed size
                return FlexibilityReport(True, SPATIAL, "")
            return FlexibilityReport(False, (), f"layer {name!r} ({type(m).__name__}) pools to a "
                                     f"fixed {size} grid, which Core ML can only express for "
                                     "one input size")
        if isinstance(m, fixing):
            return FlexibilityReport(False, (), f"layer {name!r} ({type(m).__name__}) fixes the "
                                     "input size")
    if probe_error is not None:
        err = f"{type(probe_error).__name__}: {probe_error}"
        return FlexibilityReport(False, (), f"the module does not run at twice the input size "
                                 f"({err}); a view/reshape in forward probably fixes the size")
    return FlexibilityReport(True, SPATIAL, "")


def _collapses(layer) -> bool:
    """Whether a layer's output no longer depends on its input's spatial size."""
    kind = layer.WhichOneof("layer")
    if kind == "pooling":
        return bool(layer.pooling.globalPooling)
    if kind == "reduce":
        return int(layer.reduce.axis) in (0, 1)  # CHW, HW
    if kind == "resizeBilinear":
        return len(layer.resizeBilinear.targetSize) == 2
    if kind and kind.startswith("reduce") and kind != "reduce":
        p = getattr(layer, kind)
        axes = {int(a) for a in p.axes}
        return bool(p.reduceAll) or {-1, -2} <= axes
    return False


def _fixes(layer) -> bool:
    """Whether a layer needs a fixed spatial size on its (varying) input."""
    kind = layer.WhichOneof("layer")
    if kind in ("innerProduct", "flatten", "flattenTo2D", "reshape", "reshapeStatic", "embedding",
                "embeddingND", "loadConstant", "loadConstantND"):
        return True
    if kind == "batchedMatMul":
        return int(layer.batchedMatMul.weightMatrixFirstDimension) > 0
    if kind == "convolution":
        return bool(layer.convolution.isDeconvolution) and len(layer.convolution.outputShape) > 0
    return False


def _analyze(spec, names: Optional[Iterable[str]] = None):
    """(blobs whose spatial size follows the inputs, first fixing layer or None)."""
    nn_spec = getattr(spec, spec.WhichOneof("Type"))
    varying = set(names) if names is not None else _spatial_inputs(spec)
    for layer in nn_spec.layers:
        if not any(b in varying for b in layer.input):
            continue
        if _fixes(layer):
            return varying, layer
        if not _collapses(layer):
            varying.update(layer.output)
    return varying, None


def _spatial_inputs(spec) -> set:
    out = set()
    for fd in spec.description.input:
        kind = fd.type.WhichOneof("Type")
        rank = len(fd.type.multiArrayType.shape) if kind == "multiArrayType" else 0
        if kind == "imageType" or rank >= 3:
            out.add(fd.name)
    return out


def _spec_report(spec) -> FlexibilityReport:
    kind = spec.WhichOneof("Type")
    if kind not in _NN_KINDS:
        return FlexibilityReport(False, (), f"a {kind!r} model has no layers whose input size "
                                 "could vary")
    inputs = tuple(sorted(_spatial_inputs(spec)))
    if not inputs:
        return FlexibilityReport(False, (), "no input has spatial dimensions (images or arrays of "
                                 "rank >= 3)")
    _, fixer = _analyze(spec, inputs)
    if fixer is not None:
        return FlexibilityReport(False, (), f"layer {fixer.name!r} ({fixer.WhichOneof('layer')}) "
                                 "fixes the input size", inputs)
    return FlexibilityReport(True, SPATIAL, "", inputs)


# --------------------------------------------------------------------------- helpers
def _feature(spec, name: str, kind: str):
    for fd in list(spec.description.input) + list(spec.description.output):
        if fd.name == name:
            have = fd.type.WhichOneof("Type")
            if have != kind:
                raise ConversionError(f"feature {name!r} is a {have}, not a {kind}")
            return fd
    names = [f.name for f in spec.description.input] + [f.name for f in spec.description.output]
    raise ConversionError(f"the model has no feature named {name!r} (features: {names})")


def _is_nd(spec) -> bool:
    kind = spec.WhichOneof("Type")
    return kind in _NN_KINDS and int(getattr(spec, kind).arrayInputShapeMapping) == 1


def _range(r, what: str) -> tuple[int, int]:
    if isinstance(r, int):
        return r, r
    try:
        lo, hi = (int(v) for v in r)
    except (TypeError, ValueError):
        raise ConversionError(f"{what} must be an int or a (lower, upper) pair, "
                              f"got {r!r}") from None
    lo = 1 if lo == 0 else lo  # as coremltools' ShapeRange
    if lo < 1 or (hi != -1 and (hi < 1 or hi < lo)):
        raise ConversionError(f"{what} ({lo}, {hi}) is not a valid range: lower >= 1 and upper "
                              ">= lower, or -1 for unbounded")
    return lo, hi


def _in_range(v: int, r: tuple[int, int]) -> bool:
    return r[0] <= v and (r[1] == -1 or v <= r[1])


def _bump(spec, version: int) -> None:
    spec.specificationVersion = max(spec.specificationVersion, version)


def _varying_outputs(spec, input_name: str) -> list:
    if spec.WhichOneof("Type") not in _NN_KINDS:
        return []
    varying, _ = _analyze(spec, [input_name])
    return [fd for fd in spec.description.output if fd.name in varying and fd.name != input_name]


def _clear_array_output(fd) -> None:
    m = fd.type.multiArrayType
    m.ClearField("shape")
    m.ClearField("ShapeFlexibility")


def _ratio(fd_out, fd_in) -> tuple[Fraction, Fraction]:
    o, i = fd_out.type.imageType, fd_in.type.imageType
    if not (i.width and i.height and o.width and o.height):
        raise ConversionError(f"image features {fd_in.name!r} and {fd_out.name!r} need "
                              "default sizes")
    return Fraction(o.width, i.width), Fraction(o.height, i.height)


def _scaled(v: int, f: Fraction, what: str) -> int:
    if v == -1:
        return -1
    s = v * f
    if s.denominator != 1:
        raise ConversionError(f"{what}: size {v} scaled by {f} is not whole; set the output's "
                              "flexibility yourself (outputs=False, then call again on the output)")
    return int(s)


# --------------------------------------------------------------------------- multi-arrays
def set_enumerated_shapes(spec, input_name: str, shapes: Sequence[Sequence[int]], *,
                          outputs: bool = True) -> None:
    """Allow ``shapes`` (plus the default shape) for the multi-array feature ``input_name``.

    ND specs get ``add_multiarray_ndshape_enumeration``'s fields (default first, spec >= 4);
    rank-5 specs those of ``add_enumerated_multiarray_shapes`` (shapes ``(C,)`` or ``(C, H, W)``,
    default last, spec >= 3).
    """
    fd = _feature(spec, input_name, "multiArrayType")
    m = fd.type.multiArrayType
    default = [int(s) for s in m.shape]
    wanted: list[list[int]] = []
    for s in shapes:
        s = [int(v) for v in s]
        if len(s) != len(default) or any(v < 1 for v in s):
            raise ConversionError(f"shape {tuple(s)} for {input_name!r} must have {len(default)} "
                                  f"positive dimensions like the default {tuple(default)}")
        if s not in wanted:
            wanted.append(s)
    nd = _is_nd(spec)
    if not nd and len(default) not in (1, 3):
        raise ConversionError(f"rank-5 networks take shapes (C,) or (C, H, W); {input_name!r} is "
                              f"{tuple(default)}")
    if default in wanted:
        wanted.remove(default)
    ordered = [default] + wanted if nd else wanted + [default]
    m.ClearField("ShapeFlexibility")
    for s in ordered:
        m.enumeratedShapes.shapes.add().shape.extend(s)
    _bump(spec, MIN_NDARRAY_VERSION if nd else MIN_FLEXIBLE_VERSION)
    if outputs:
        for out in _varying_outputs(spec, input_name):
            if out.type.WhichOneof("Type") == "multiArrayType":
                _clear_array_output(out)


def set_shape_range(spec, input_name: str, ranges: Sequence, *, outputs: bool = True) -> None:
    """Allow every shape within ``ranges`` (one ``(lower, upper)`` or int per dimension; upper
    ``-1`` = unbounded) for the multi-array feature ``input_name``.

    ND specs get ``set_multiarray_ndshape_range``'s fields (spec >= 4); rank-5 specs those of
    ``update_multiarray_shape_range`` (``(C,)`` or ``(C, H, W)`` ranges, spec >= 3).
    """
    fd = _feature(spec, input_name, "multiArrayType")
    m = fd.type.multiArrayType
    default = [int(s) for s in m.shape]
    if len(ranges) != len(default):
        raise ConversionError(f"{input_name!r} has {len(default)} dimensions {tuple(default)}; "
                              f"give one range per dimension, got {len(ranges)}")
    rs = [_range(r, f"range of dimension {i} of {input_name!r}") for i, r in enumerate(ranges)]
    nd = _is_nd(spec)
    if not nd and len(default) not in (1, 3):
        raise ConversionError(f"rank-5 networks take ranges for (C,) or (C, H, W); {input_name!r} "
                              f"is {tuple(default)}")
    for i, (d, r) in enumerate(zip(default, rs)):
        if not _in_range(d, r):
            raise ConversionError(f"the default size {d} of dimension {i} of {input_name!r} lies "
                                  f"outside the range {r}")
    m.ClearField("ShapeFlexibility")
    for lo, hi in rs:
        s = m.shapeRange.sizeRanges.add()
        s.lowerBound, s.upperBound = lo, hi
    _bump(spec, MIN_NDARRAY_VERSION if nd else MIN_FLEXIBLE_VERSION)
    if outputs:
        for out in _varying_outputs(spec, input_name):
            if out.type.WhichOneof("Type") == "multiArrayType":
                _clear_array_output(out)


# --------------------------------------------------------------------------- images
def _sizes(sizes) -> list[tuple[int, int]]:
    out = []
    for s in sizes:
        if isinstance(s, dict):
            w, h = s.get("width"), s.get("height")
        else:
            w, h = s
        w, h = int(w), int(h)
        if w < 1 or h < 1:
            raise ConversionError(f"image size {(w, h)} must be positive (width, height)")
        if (w, h) not in out:
            out.append((w, h))
    return out


def _write_sizes(fd, sizes: list[tuple[int, int]]) -> None:
    it = fd.type.imageType
    default = (int(it.width), int(it.height))
    ordered = [s for s in sizes if s != default] + [default] if default not in sizes else sizes
    it.ClearField("SizeFlexibility")
    for w, h in ordered:
        e = it.enumeratedSizes.sizes.add()
        e.height, e.width = h, w


def _write_range(fd, wr: tuple[int, int], hr: tuple[int, int]) -> None:
    it = fd.type.imageType
    it.ClearField("SizeFlexibility")
    r = it.imageSizeRange
    r.heightRange.lowerBound, r.heightRange.upperBound = hr
    r.widthRange.lowerBound, r.widthRange.upperBound = wr


def set_enumerated_image_sizes(spec, input_name: str, sizes: Sequence, *,
                               outputs: bool = True) -> None:
    """Allow the ``(width, height)`` ``sizes`` (plus the default) for image feature ``input_name``:
    the fields of coremltools' ``add_enumerated_image_sizes`` (default last when not listed)."""
    fd = _feature(spec, input_name, "imageType")
    sizes = _sizes(sizes)
    _write_sizes(fd, sizes)
    _bump(spec, MIN_FLEXIBLE_VERSION)
    if outputs:
        _outputs_follow(spec, fd, input_name, lambda out, fw, fh: _write_sizes(
            out, [(_scaled(w, fw, out.name), _scaled(h, fh, out.name)) for w, h in sizes]))


def set_image_size_range(spec, input_name: str, width_range, height_range, *,
                         outputs: bool = True) -> None:
    """Allow every size within ``width_range`` x ``height_range`` (``(lower, upper)``, upper ``-1``
    = unbounded) for image feature ``input_name``: the fields of ``update_image_size_range``."""
    fd = _feature(spec, input_name, "imageType")
    wr = _range(width_range, f"width range of {input_name!r}")
    hr = _range(height_range, f"height range of {input_name!r}")
    it = fd.type.imageType
    if not (_in_range(int(it.width), wr) and _in_range(int(it.height), hr)):
        raise ConversionError(f"the default size {it.width}x{it.height} of {input_name!r} lies "
                              f"outside width {wr} x height {hr}")
    _write_range(fd, wr, hr)
    _bump(spec, MIN_FLEXIBLE_VERSION)
    if outputs:
        _outputs_follow(spec, fd, input_name, lambda out, fw, fh: _write_range(
            out, tuple(_scaled(v, fw, out.name) for v in wr),
            tuple(_scaled(v, fh, out.name) for v in hr)))


def _outputs_follow(spec, fd, input_name: str, write_image) -> None:
    """Outputs that vary with ``input_name`` follow it: multi-arrays lose their fixed shape,
    images get the input's flexibility scaled by their size ratio (``write_image(out, fw, fh)``)."""
    for out in _varying_outputs(spec, input_name):
        kind = out.type.WhichOneof("Type")
        if kind == "multiArrayType":
            _clear_array_output(out)
        elif kind == "imageType":
            write_image(out, *_ratio(out, fd))
