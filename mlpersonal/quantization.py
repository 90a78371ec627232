"""Post-training weight quantization of NeuralNetwork specs (coremltools' ``quantize_weights``).

``quantize_weights(spec_or_path, nbits, mode)`` returns a new spec (the input is untouched) whose
layer weights are stored as fp16 (``nbits=16``), linear n-bit (``linear``, ``linear_symmetric``)
or lookup-table n-bit (``linear_lut``, ``kmeans``, ``custom_lut``) ``WeightParams``, encoded by
:mod:`mlpersonal.codecs`. Updatable layers stay float32, as Core ML requires: they are skipped
(and reported) by default.

The quantizers here (:func:`linear_quantize`, :func:`kmeans_1d`, :func:`linear_lut`) are also
what the QAT modules in ``trainers.qat`` use.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Union

import numpy as np

from . import codecs
from .errors import InvalidInputError, InvalidModelError
from .proto import Model_pb2
from .specio import load_spec

MODES = ("linear", "linear_symmetric", "linear_lut", "kmeans", "custom_lut")
_ALIASES = {"kmeans_lut": "kmeans", "lut": "kmeans", "palettize": "kmeans"}
MIN_FP16_SPEC_VERSION = 2
MIN_QUANTIZED_SPEC_VERSION = 3
_NN_KINDS = ("neuralNetwork", "neuralNetworkClassifier", "neuralNetworkRegressor")

LayerSelector = Union[None, Iterable[str], Callable[[object], bool]]


# --- quantizers -------------------------------------------------------------------------------
def linear_quantize(w2d: np.ndarray, nbits: int, symmetric: bool = False):
    """Per-row linear quantization of ``w2d`` ``[C, L]``, coremltools' arithmetic exactly.

    Computed in float32, as coremltools 9.0 does (``np.array(wp.floatValue)`` is float32 with
    protobuf >= 5), so the packed bytes and scales match its output bit for bit. Returns ``(q uint8 [C, L], scale [C], bias [C])`` with ``w ~ scale * q + bias``; asymmetric
    uses the row's [min, max], symmetric ``[-r, r]`` with ``r = max|w|``.
    """
    w = np.asarray(w2d, dtype=np.float32)
    a, b = w.min(axis=1), w.max(axis=1)
    if symmetric:
        if nbits < 2:
            raise InvalidInputError("linear_symmetric needs at least 2 bits")
        r = np.maximum(np.abs(a), np.abs(b))
        scale = r / ((1 << nbits) / 2.0 - 1)
        bias = -(1 << nbits) / 2.0 * scale
        num = w - bias[:, None]
        den = np.broadcast_to(scale[:, None], num.shape)
        q = np.round(np.divide(num, den, out=np.zeros_like(num), where=np.abs(den) > 1e-6))
    else:
        scale = (b - a) / ((1 << nbits) - 1)
        inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=np.abs(scale) > 1e-6)
        bias = a
        q = np.round((w - a[:, None]) * inv[:, None])
    q = np.clip(q, 0, (1 << nbits) - 1).astype(np.uint8)
    return q, scale, bias


def linear_lut(w: np.ndarray, nbits: int):
    """A per-layer linear lookup table (coremltools' ``linear_lut``): ``(lut, q)``."""
    q, scale, bias = linear_quantize(np.asarray(w).reshape(1, -1), nbits)
    lut = np.arange(1 << nbits) * scale[0] + bias[0]
    return lut, q.ravel()


def kmeans_1d(x: np.ndarray, k: int, iters: int = 300, tol: float = 1e-10):
    """1-D k-means (Lloyd on sorted data, best of quantile and uniform starts).

    Returns ``(centroids [k] ascending float64, labels [x.size] int)``. Each Lloyd step costs
    O(k log n) after one sort, so million-value layers cluster in milliseconds.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    n = x.size
    if n == 0:
        return np.zeros(k), np.zeros(0, dtype=np.int64)
    xs = np.sort(x)
    uniq = np.unique(xs)
    if uniq.size <= k:
        lut = np.concatenate([uniq, np.full(k - uniq.size, uniq[-1])])
        return lut, np.searchsorted(uniq, x)
    csum = np.concatenate([[0.0], np.cumsum(xs)])
    csq = np.concatenate([[0.0], np.cumsum(xs * xs)])

    def lloyd(c):
        c = np.sort(c)
        for _ in range(iters):
            cuts = np.searchsorted(xs, (c[:-1] + c[1:]) / 2, side="right")
            lo = np.concatenate([[0], cuts])
            hi = np.concatenate([cuts, [n]])
            cnt = hi - lo
            sums = csum[hi] - csum[lo]
            new = np.where(cnt > 0, sums / np.maximum(cnt, 1), c)
            empty = np.flatnonzero(cnt == 0)
            if empty.size:  # re-seed empty clusters inside the widest cluster
                sse = (csq[hi] - csq[lo]) - sums * new
                for e in empty:
                    j = int(np.argmax(sse))
                    new[e] = xs[(lo[j] + hi[j]) // 2] if hi[j] > lo[j] else new[e]
                    sse[j] = -1
            new = np.sort(new)
            if np.max(np.abs(new - c)) <= tol * max(1.0, np.abs(xs).max()):
                c = new
                break
            c = new
        cuts = np.searchsorted(xs, (c[:-1] + c[1:]) / 2, side="right")
        lo = np.concatenate([[0], cuts])
        hi = np.concatenate([cuts, [n]])
        sums = csum[hi] - csum[lo]
        cnt = hi - lo
        sse = np.sum((csq[hi] - csq[lo]) - np.where(cnt > 0, sums**2 / np.maximum(cnt, 1), 0))
        return c, sse

    starts = [np.quantile(xs, (np.arange(k) + 0.5) / k),
              np.linspace(xs[0], xs[-1], k)]
    c = min((lloyd(s) for s in starts), key=lambda r: r[1])[0]
    labels = np.searchsorted((c[:-1] + c[1:]) / 2, x, side="left")
    return c, labels


def kmeans_lut(w: np.ndarray, nbits: int):
    """A k-means lookup table for ``w``: ``(lut [2**n], q)``."""
    lut, q = kmeans_1d(np.asarray(w).ravel(), 1 << nbits)
    return lut, q.astype(np.uint8)


# --- report -----------------------------------------------------------------------------------
@dataclass
class QuantizationReport:
    """What :func:`quantize_weights` did: one entry per weight quantized or skipped."""

    quantized: list = field(default_factory=list)   # (layer, field, storage, bytes before, after)
    skipped: list = field(default_factory=list)     # (layer, field or "", reason)

    @property
    def bytes_before(self) -> int:
        return sum(e[3] for e in self.quantized)

    @property
    def bytes_after(self) -> int:
        return sum(e[4] for e in self.quantized)

    def __str__(self) -> str:
        lines = [f"{'layer':<28} {'field':<8} {'storage':<14} {'bytes':>10} -> {'bytes':>10}"]
        for layer, fld, storage, b0, b1 in self.quantized:
            lines.append(f"{layer:<28} {fld:<8} {storage:<14} {b0:>10} -> {b1:>10}")
        for layer, fld, why in self.skipped:
            lines.append(f"{layer:<28} {fld:<8} skipped: {why}")
        return "\n".join(lines)


# --- weight slots of a layer ---------------------------------------------------------------------
@dataclass
class _Slot:
    field: str
    wp: object
    shape: tuple
    channels: int
    inner: Optional[int] = None
    role: str = "weights"   # weights | bias | other


def weight_slots(layer) -> list[_Slot]:
    """The float weight blobs of ``layer``, with their shapes and quantization channel axis."""
    kind = layer.WhichOneof("layer")
    p = getattr(layer, kind) if kind else None
    out: list[_Slot] = []
    if kind == "convolution":
        cout, kc = int(p.outputChannels), int(p.kernelChannels)
        kh, kw = (list(p.kernelSize) + [3, 3])[:2] if len(p.kernelSize) else (3, 3)
        g = max(int(p.nGroups), 1)
        if p.isDeconvolution:
            out.append(_Slot("weights", p.weights, (kc, cout // g, kh, kw), cout // g, kh * kw))
        else:
            out.append(_Slot("weights", p.weights, (cout, kc, kh, kw), cout))
        if p.hasBias:
            out.append(_Slot("bias", p.bias, (cout,), cout, role="bias"))
    elif kind == "innerProduct":
        o, i = int(p.outputChannels), int(p.inputChannels)
        out.append(_Slot("weights", p.weights, (o, i), o))
        if p.hasBias:
            out.append(_Slot("bias", p.bias, (o,), o, role="bias"))
    elif kind == "batchedMatmul":
        x1, x2 = int(p.weightMatrixFirstDimension), int(p.weightMatrixSecondDimension)
        if len(p.weights.floatValue) or len(p.weights.float16Value) or len(p.weights.rawValue):
            out.append(_Slot("weights", p.weights, (x2, x1), x2))
        if p.hasBias:
            out.append(_Slot("bias", p.bias, (x2,), x2, role="bias"))
    elif kind == "embedding":
        o, i = int(p.outputChannels), int(p.inputDim)
        out.append(_Slot("weights", p.weights, (o, i), o))
        if p.hasBias:
            out.append(_Slot("bias", p.bias, (o,), o, role="bias"))
    elif kind == "embeddingND":
        o, i = int(p.embeddingSize), int(p.vocabSize)
        out.append(_Slot("weights", p.weights, (o, i), o))
        if p.hasBias:
            out.append(_Slot("bias", p.bias, (o,), o, role="bias"))
    elif kind == "batchnorm":
        c = int(p.channels)
        for f in ("gamma", "beta", "mean", "variance"):
            out.append(_Slot(f, getattr(p, f), (c,), c, role="other"))
    elif kind == "scale":
        n = int(np.prod(p.shapeScale)) if len(p.shapeScale) else len(p.scale.floatValue)
        out.append(_Slot("scale", p.scale, (n,), n, role="other"))
        if p.hasBias:
            n = int(np.prod(p.shapeBias)) if len(p.shapeBias) else len(p.bias.floatValue)
            out.append(_Slot("bias", p.bias, (n,), n, role="other"))
    elif kind == "bias":
        n = int(np.prod(p.shape)) if len(p.shape) else len(p.bias.floatValue)
        out.append(_Slot("bias", p.bias, (n,), n, role="other"))
    elif kind in ("loadConstant", "loadConstantND"):
        n = int(np.prod(p.shape)) if len(p.shape) else len(p.data.floatValue)
        out.append(_Slot("data", p.data, (n,), n, role="other"))
    elif kind == "simpleRecurrent":
        o, i = int(p.outputVectorSize), int(p.inputVectorSize)
        out += [_Slot("weightMatrix", p.weightMatrix, (o, i), o),
                _Slot("recursionMatrix", p.recursionMatrix, (o, o), o)]
        if p.hasBiasVector:
            out.append(_Slot("biasVector", p.biasVector, (o,), o, role="bias"))
    elif kind == "gru":
        o, i = int(p.outputVectorSize), int(p.inputVectorSize)
        for g in ("updateGate", "resetGate", "outputGate"):
            out += [_Slot(g + "WeightMatrix", getattr(p, g + "WeightMatrix"), (o, i), o),
                    _Slot(g + "RecursionMatrix", getattr(p, g + "RecursionMatrix"), (o, o), o)]
            if p.hasBiasVectors:
                out.append(_Slot(g + "BiasVector", getattr(p, g + "BiasVector"), (o,), o, role="bias"))
    elif kind in ("uniDirectionalLSTM", "biDirectionalLSTM"):
        o, i = int(p.outputVectorSize), int(p.inputVectorSize)
        sets = [p.weightParams] if kind == "uniDirectionalLSTM" else list(p.weightParams)
        for k, wps in enumerate(sets):
            pre = "weightParams." if kind == "uniDirectionalLSTM" else f"weightParams[{k}]."
            for g in ("inputGate", "forgetGate", "blockInput", "outputGate"):
                out += [_Slot(pre + g + "WeightMatrix", getattr(wps, g + "WeightMatrix"), (o, i), o),
                        _Slot(pre + g + "RecursionMatrix", getattr(wps, g + "RecursionMatrix"), (o, o), o)]
                if p.params.hasBiasVectors:
                    out.append(_Slot(pre + g + "BiasVector", getattr(wps, g + "BiasVector"), (o,), o,
                                     role="bias"))
            if p.params.hasPeepholeVectors:
                for g in ("inputGate", "forgetGate", "outputGate"):
                    out.append(_Slot(pre + g + "PeepholeVector", getattr(wps, g + "PeepholeVector"),
                                     (o,), o, role="bias"))
    return out


def _select(selector: LayerSelector, all_names: set[str], strict: bool = True
            ) -> Callable[[object], bool]:
    if selector is None:
        return lambda layer: True
    if callable(selector):
        return selector
    names = {selector} if isinstance(selector, str) else set(selector)
    unknown = names - all_names
    if unknown and strict:
        raise InvalidInputError(
            f"layers {sorted(unknown)} are not in the model; its layers are {sorted(all_names)}")
    return lambda layer: layer.name in names


# --- encoding one blob --------------------------------------------------------------------------
def quantize_blob(wp, values: np.ndarray, nbits: int, mode: str, *, shape: tuple,
                  channels: int = 1, inner: Optional[int] = None, per_channel: bool = True,
                  lut_function: Optional[Callable] = None, where: str = "weights") -> None:
    """Encode float ``values`` (``shape``) into ``wp`` as fp16 / n-bit ``mode``."""
    values = np.asarray(values, dtype=np.float32).reshape(shape)
    if nbits == 16:
        codecs.encode_fp16(wp, values, where)
        return
    if mode in ("linear", "linear_symmetric"):
        if per_channel and channels > 1:
            cw = _channels_first(values, channels, inner)
            q, scale, bias = linear_quantize(cw, nbits, mode == "linear_symmetric")
            q = _channels_back(q, values.shape, channels, inner)
        else:
            q, scale, bias = linear_quantize(values.reshape(1, -1), nbits,
                                             mode == "linear_symmetric")
        codecs.encode_linear(wp, q.ravel(), nbits, scale, bias)
        return
    if mode == "linear_lut":
        lut, q = linear_lut(values, nbits)
    elif mode == "kmeans":
        lut, q = kmeans_lut(values, nbits)
    elif mode == "custom_lut":
        lut, q = _call_lut_function(lut_function, nbits, values, where)
    else:
        raise InvalidInputError(f"unknown quantization mode {mode!r}; use one of {MODES}")
    codecs.encode_lut(wp, np.asarray(q).ravel(), nbits, lut)


def _channels_first(values: np.ndarray, channels: int, inner: Optional[int]) -> np.ndarray:
    if inner is None:
        return values.reshape(channels, -1)
    return values.reshape(-1, channels, inner).transpose(1, 0, 2).reshape(channels, -1)


def _channels_back(q: np.ndarray, shape: tuple, channels: int, inner: Optional[int]) -> np.ndarray:
    if inner is None:
        return q.reshape(shape)
    return q.reshape(channels, -1, inner).transpose(1, 0, 2).reshape(shape)


def _call_lut_function(fn, nbits, values, where):
    if not callable(fn):
        raise InvalidInputError("mode='custom_lut' needs lut_function(nbits, weights) -> (lut, q)")
    lut, q = fn(nbits, values)
    lut = np.asarray(lut, dtype=np.float64).ravel()
    q = np.asarray(q).ravel()
    if lut.size != (1 << nbits):
        raise InvalidInputError(
            f"{where}: lut_function returned a table of {lut.size} values; {nbits} bits need "
            f"{1 << nbits}")
    if q.size != values.size or (q.size and (q.min() < 0 or q.max() >= lut.size)):
        raise InvalidInputError(
            f"{where}: lut_function must return {values.size} indices in 0..{lut.size - 1}")
    return lut, q.astype(np.uint8)


# --- the public entry point ----------------------------------------------------------------------
def quantize_weights(spec_or_path, nbits: int, mode: str = "linear", *,
                     lut_function: Optional[Callable] = None, per_channel: bool = True,
                     layers: LayerSelector = None, quantize_bias: bool = False,
                     skip_updatable: bool = True, return_report: bool = False):
    """Return a copy of the spec with weights quantized to ``nbits`` (1..8, or 16 for fp16).

    ``mode``: ``linear`` (per-channel [min, max] when ``per_channel``), ``linear_symmetric``,
    ``linear_lut``, ``kmeans`` (k-means lookup table), ``custom_lut`` (``lut_function(nbits, w)
    -> (lut, q)``, coremltools' signature). Lookup tables are per layer, as Core ML requires.
    ``layers``: names or a predicate ``layer -> bool`` choosing the layers to quantize.
    n-bit quantization touches weight matrices (and biases when ``quantize_bias``); fp16 converts
    every float blob of the selected layers. Updatable layers must stay float32 in Core ML:
    ``skip_updatable`` skips them (listed in the report, with a warning), otherwise an
    :class:`InvalidInputError` is raised. With ``return_report`` returns ``(spec, report)``.
    """
    mode = _ALIASES.get(mode, mode)
    if mode not in MODES:
        raise InvalidInputError(f"unknown quantization mode {mode!r}; use one of {MODES}")
    if nbits != 16 and not (isinstance(nbits, (int, np.integer)) and 1 <= nbits <= 8):
        raise InvalidInputError(f"nbits={nbits!r}: use 1..8 (n-bit) or 16 (fp16)")
    if mode == "custom_lut" and nbits != 16 and not callable(lut_function):
        raise InvalidInputError("mode='custom_lut' needs lut_function(nbits, weights) -> (lut, q)")
    if mode == "linear_symmetric" and nbits < 2:
        raise InvalidInputError("linear_symmetric needs at least 2 bits")
    if hasattr(spec_or_path, "spec") and not isinstance(spec_or_path, Model_pb2.Model):
        spec_or_path = spec_or_path.spec  # a loaded model
    src = load_spec(spec_or_path) if isinstance(spec_or_path, (str, os.PathLike, bytes)) \
        else spec_or_path
    if not isinstance(src, Model_pb2.Model):
        raise InvalidInputError(
            f"quantize_weights expects a spec or a path, got {type(src).__name__}")
    spec = Model_pb2.Model()
    spec.CopyFrom(src)
    report = QuantizationReport()
    opts = dict(nbits=int(nbits), mode=mode, lut_function=lut_function, per_channel=per_channel,
                quantize_bias=quantize_bias, skip_updatable=skip_updatable, report=report)
    found = _quantize_model(spec, layers, opts, prefix="")
    if not found:
        raise InvalidInputError(
            f"the model ({spec.WhichOneof('Type')}) holds no neural network to quantize")
    upd = [f"{l}" for l, f, why in report.skipped if why.startswith("updatable")]
    if upd:
        warnings.warn(f"quantize_weights left updatable layers {upd} in float32 (Core ML "
                      "requires updatable weights to stay float)", stacklevel=2)
    return (spec, report) if return_report else spec


def _quantize_model(spec, selector, opts, prefix: str) -> bool:
    kind = spec.WhichOneof("Type")
    if kind in _NN_KINDS:
        nn = getattr(spec, kind)
        if _quantize_nn(nn, selector, opts, prefix):
            need = MIN_FP16_SPEC_VERSION if opts["nbits"] == 16 else MIN_QUANTIZED_SPEC_VERSION
            spec.specificationVersion = max(int(spec.specificationVersion), need)
        return True
    if kind in ("pipeline", "pipelineClassifier", "pipelineRegressor"):
        pipe = spec.pipeline if kind == "pipeline" else getattr(spec, kind).pipeline
        found = False
        names = list(pipe.names)
        for i, sub in enumerate(pipe.models):
            name = names[i] if i < len(names) else str(i)
            found |= _quantize_model(sub, selector, opts, prefix=f"{prefix}{name}/")
        if found:
            need = max((m.specificationVersion for m in pipe.models), default=1)
            spec.specificationVersion = max(int(spec.specificationVersion), int(need))
        return found
    return False


def _quantize_nn(nn, selector, opts, prefix: str) -> bool:
    report: QuantizationReport = opts["report"]
    nbits, mode = opts["nbits"], opts["mode"]
    # names are checked against a plain network; inside pipelines each sub-model holds some
    choose = _select(selector, {l.name for l in nn.layers}, strict=not prefix)
    changed = False
    for layer in nn.layers:
        if not choose(layer):
            continue
        kind = layer.WhichOneof("layer")
        name = prefix + layer.name
        if kind in ("loop", "branch"):
            report.skipped.append((name, "", "nested networks (loop/branch) are not quantized"))
            continue
        for slot in weight_slots(layer):
            if slot.role == "bias" and nbits != 16 and not opts["quantize_bias"]:
                continue
            if slot.role == "other" and nbits != 16:
                continue
            wp = slot.wp
            if not len(wp.floatValue):
                if codecs.count_of(wp):
                    report.skipped.append((name, slot.field, f"already {codecs.storage_of(wp)}"))
                continue
            if layer.isUpdatable or wp.isUpdatable:
                if not opts["skip_updatable"]:
                    raise InvalidInputError(
                        f"layer {name!r} is updatable; Core ML requires updatable weights to stay "
                        "float32. Pass skip_updatable=True or select other layers.")
                report.skipped.append((name, slot.field, "updatable: must stay float32"))
                continue
            count = int(np.prod(slot.shape))
            if len(wp.floatValue) != count:
                raise InvalidModelError(
                    f"layer {name!r} ({slot.field}): holds {len(wp.floatValue)} values but its "
                    f"shape {slot.shape} needs {count}")
            before = codecs.stored_bytes(wp)
            values = np.asarray(wp.floatValue, dtype=np.float32)
            quantize_blob(wp, values, nbits, mode, shape=slot.shape, channels=slot.channels,
                          inner=slot.inner, per_channel=opts["per_channel"],
                          lut_function=opts["lut_function"], where=f"layer {name!r} ({slot.field})")
            report.quantized.append((name, slot.field, codecs.storage_of(wp), before,
                                     codecs.stored_bytes(wp)))
            changed = True
    return changed

