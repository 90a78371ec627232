"""InferencePlan: a compiled :class:`~runtime.network.Network` run by onnxruntime for CPU prediction.

Why: the eager Network runs each spec layer as a separate torch op (NCHW max-pooling, unfused
ReLUs, per-op dispatch), several times slower than onnxruntime on the same model. The plan keeps
the torch layer callables in ``runtime.layers`` as the single source of layer semantics: it
*traces* the Network with ``torch.onnx.export`` (dynamic batch axis), tidies the graph (see
:func:`simplify`) and hands it to an ``onnxruntime.InferenceSession``, which fuses conv/relu,
runs convolutions in blocked (NCHWc) layouts and avoids per-op Python overhead.

Rules:

- built lazily, by the first prediction for each input-shape signature (~0.2-1 s once; flexible
  shapes get one session per signature, at most :data:`MAX_SIGNATURES`; sequences of any length
  share one when the traced graph is length-generic, checked at a second length); every
  prediction of a signature that verified, the first included, comes from the plan (but see
  recurrent networks below), so a model and its saved and reloaded copy predict bit-identically;
- traced and verified once per signature against the eager Network on the first two examples of
  the call's batch and on a reordered batch of another size made from them; any export failure
  or difference beyond ``1e-5`` (relative to the output's magnitude) turns the plan off for that
  signature, with a debug log, and the eager Network runs instead (e.g. a custom layer whose
  ``evaluate`` is numpy-only cannot be traced);
- networks with recurrent layers time batches of :data:`ENGINE_BATCH_MIN` or more on the plan
  and on the eager Network over their first calls (per power-of-two size bucket) and keep the
  eager one where it is clearly faster (torch's fused LSTM scales better with the batch);
- CPU only: cuda/mps models, low-precision autocast and every training path use the Network;
- weights changed in place (an update in progress) make the plan stale: the eager Network runs
  until the weights are stable again for two calls, then the plan is rebuilt;
- small models (up to 4 MB) also get a single-threaded session: for batch sizes up to
  :data:`SMALL_BATCH_MAX` the faster of the two, timed over the first calls of that size, runs
  (the sticker CNN at batch 1: 26 vs 39 us; larger nets keep both threads);
- thread-safe: building is serialized by a lock, ``InferenceSession.run`` is thread-safe;
- memory: after a build, the freed temporaries of tracing (several copies of the weights) are
  handed back to the OS (``malloc_trim`` where glibc has it).
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
import time
import warnings
from typing import Callable, Optional

import numpy as np
import torch

from .native import loaded_function

log = logging.getLogger(__name__)

#: most input-shape signatures (flexible shapes) one model keeps a session for
MAX_SIGNATURES = 8
#: batch sizes up to this may run on a single-threaded session when that measures faster
SMALL_BATCH_MAX = 8
#: calls on each session before a small batch size keeps one: untimed (a session's first runs
#: at a new shape plan memory and wake threads), then timed
CALIBRATION_WARMUP = 2
CALIBRATION_RUNS = 4
#: the single-threaded session must be at least this much faster to be kept
SMALL_MARGIN = 0.1
#: a single-threaded session is kept beside the main one for models up to this size (it holds
#: its own copy of the packed weights; larger models are compute-bound even at batch 1)
SMALL_SESSION_MAX_BYTES = 4 << 20
#: ... and whose session's first run takes at most this long per example (a network that
#: computes for longer gains nothing from a single thread, and checking it would cost seconds)
SMALL_SESSION_MAX_ROW_SECONDS = 0.02
#: networks with recurrent layers: batches from this size on are timed on the plan and on the
#: eager Network (torch's fused LSTM scales better with the batch than onnxruntime's LSTM op:
#: an LSTM 6->32 x 50 steps at batch 16 0.21 vs 0.14 ms, 64 about even, 128 0.52 vs 0.65, 256
#: 1.2 vs 2.2), the eager one kept when this much faster
ENGINE_BATCH_MIN = 64
ENGINE_MARGIN = 0.1
#: examples of a first batch a new signature is traced and verified on
PROBE_ROWS = 2
#: allowed difference between plan and eager outputs, relative to max(1, |eager output|)
TOLERANCE = 1e-5
OPSET = 17

#: ops whose output has their first input's axis 0 (shape-preserving or per-example)
_KEEP_AXIS0 = {"Relu", "Sigmoid", "Tanh", "Softmax", "LeakyRelu", "Elu", "Conv", "MaxPool",
               "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "BatchNormalization",
               "Sqrt", "Erf", "Exp", "Log", "Abs", "Neg", "Reciprocal", "Cast", "Identity"}
#: elementwise ops with numpy broadcasting (see simplify: rows stay rows)
_BROADCAST_OPS = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"}
#: reductions whose output keeps axis 0 unless they reduce over it
_REDUCE_OPS = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd"}

_FAILED = object()  # cache marker: this signature runs eagerly
_BATCH = np.iinfo(np.int64).min  # simplify(): "the batch size" inside a computed Reshape shape


class _Traced(torch.nn.Module):
    """Positional tensors in, the wanted blobs out: what ``torch.onnx.export`` traces."""

    def __init__(self, run: Callable, inputs: list[str], outputs: list[str]):
        super().__init__()
        self.run, self.inputs, self.outputs = run, inputs, outputs

    def forward(self, *xs):
        env = self.run(dict(zip(self.inputs, xs)))
        outs = tuple(env[o] for o in self.outputs)
        self.seen = {o: t.detach() for o, t in zip(self.outputs, outs)}  # real values: it ran
        return outs


class InferencePlan:
    """Runs ``run(blobs) -> env`` (a Network over batched blobs) through onnxruntime.

    ``run`` must map batched input blobs (axis 0 = batch) to a dict holding ``outputs``;
    ``params`` are the tensors whose in-place changes invalidate the plan.
    """

    def __init__(self, run: Callable, outputs: list[str], params: list[torch.Tensor],
                 sequences: frozenset = frozenset(), recurrent: bool = False):
        self._run = run
        self.outputs = list(outputs)
        self._params = list(params)
        #: the eager Network may beat onnxruntime at large batches (recurrent layers: torch's
        #: fused LSTM); per batch-size bucket (``n.bit_length()``) True when it runs them
        self._recurrent = recurrent
        self.eager_batches: dict[int, bool] = {}
        self._engine_trials: dict[int, list] = {}
        #: inputs whose 5-D blobs ``(B, Seq, C, 1, 1)`` are sequences: one session serves every
        #: length when the traced graph is length-generic (verified at another length), else
        #: each length gets its own (``_by_length``)
        self._sequences = frozenset(sequences)
        self._by_length = False
        self._sessions: dict = {}
        self._lock = threading.Lock()
        self._version = self._param_version()
        #: why the last signature fell back to eager (None when it did not)
        self.last_fallback_reason: Optional[str] = None

    @staticmethod
    def available() -> bool:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return False
        return True

    def _param_version(self) -> tuple:
        return tuple(p._version for p in self._params)

    def run(self, blobs: dict[str, torch.Tensor], n: int, build: bool = True) -> Optional[dict[str, np.ndarray]]:
        """The output blobs (float32 numpy arrays) for batched input ``blobs``, or None: the
        caller runs the Network. ``build=False``: only a ready session runs (no side effects
        otherwise), so a caller may try it before setting up an eager run; only then may blobs
        be C-contiguous float32 numpy arrays instead of tensors."""
        if self._params:
            version = self._param_version()
            if version != self._version:  # weights changed in place: stale until stable
                if not build:
                    return None
                with self._lock:
                    self._sessions.clear()
                    self._version = version
                return None
        arrays = {k: v if type(v) is np.ndarray else _as_numpy(v) for k, v in blobs.items()}
        key = self._key(blobs, arrays)
        entry = self._sessions.get(key)
        if entry is None:
            if not build:
                return None
            with self._lock:
                key = self._key(blobs, arrays)
                entry = self._sessions.get(key)
                if entry is None:
                    if len(self._sessions) >= MAX_SIGNATURES:
                        return None
                    entry, result = self._build(blobs)
                    self._sessions[self._key(blobs, arrays)] = entry  # _by_length may have changed
                    _trim_heap()  # the build's temporaries are gone now
                    return result  # this call's outputs (None: the signature runs eagerly)
        if entry is _FAILED:
            return None
        feed = arrays if len(entry.names) == len(arrays) else {k: arrays[k] for k in entry.names}
        if self._recurrent and n >= ENGINE_BATCH_MIN:
            eager = self.eager_batches.get(n.bit_length())
            if eager is None:
                return self._calibrate(entry, feed, blobs, n) if build else None
            if eager:
                return None  # the caller runs the Network
        return dict(zip(self.outputs, entry.run(self.outputs, feed, n)))

    def _calibrate(self, entry, feed, blobs, n: int) -> dict:
        """Run this call on the session or on the eager Network, timing it: the first calls of
        this batch-size bucket on the session, the next ones eagerly (in blocks: right after
        the other engine its threads still spin and slow this one down; each block's first
        calls are not counted); then keep the eager Network only if its best time is at least
        :data:`ENGINE_MARGIN` faster."""
        bucket = n.bit_length()
        trials = self._engine_trials.setdefault(bucket, [[], []])  # times of [plan, eager]
        eager = len(trials[0]) >= CALIBRATION_WARMUP + CALIBRATION_RUNS
        t = time.perf_counter()
        if eager:
            out = {k: _as_numpy(v) for k, v in self._eager(blobs).items()}
        else:
            out = dict(zip(self.outputs, entry.run(self.outputs, feed, n)))
        trials[eager].append(time.perf_counter() - t)
        decided = _second_faster(trials, ENGINE_MARGIN)
        if decided is not None:
            self.eager_batches[bucket] = decided
            self._engine_trials.pop(bucket, None)
        return out

    def _key(self, blobs, arrays) -> tuple:
        """The signature of these inputs: per input its shape without the batch axis (a
        sequence's length left out while one session serves every length) and dtype
        (float32 numpy blobs come only with build=False)."""
        key, seqs = [], self._seq_inputs(arrays)
        for k, v in blobs.items():
            shape = arrays[k].shape[1:]
            if k in seqs:
                shape = ("any length",) + shape[1:]
            key.append((k, shape, torch.float32 if type(v) is np.ndarray else v.dtype))
        return tuple(key)

    # --- building -------------------------------------------------------------------------
    def _eager(self, blobs) -> dict[str, torch.Tensor]:
        env = self._run(blobs)
        return {o: env[o] for o in self.outputs}

    def _seq_inputs(self, blobs) -> list[str]:
        """The inputs of ``blobs`` (tensors or arrays) holding sequences, ``(B, Seq, C, 1, 1)``,
        that one session serves at any length."""
        if self._by_length:
            return []
        return [k for k in self._sequences if k in blobs and blobs[k].ndim == 5]

    def _build(self, blobs):
        """(session entry or _FAILED, this call's outputs: the session's; on failure the eager
        reference's when the probe was the whole call, else None).

        Traced and verified on a probe of the first :data:`PROBE_ROWS` examples (and on another
        batch size made from them), not on the whole batch: the graph has a dynamic batch axis,
        and a large first batch would otherwise cost its eager activations and a trace at its
        size (resident growth of a first batch-64 call: small ResNet 99 -> 54 MiB, sticker CNN
        60 -> 51)."""
        eager, whole = None, all(v.shape[0] <= PROBE_ROWS for v in blobs.values())
        try:
            probe = {k: v[:PROBE_ROWS] for k, v in blobs.items()}
            seqs = self._seq_inputs(probe)
            # the trace runs the network on the probe: its outputs are the eager reference
            model, eager, raw = self._export(probe, seqs)
            threads = max(1, torch.get_num_threads())
            sess = ort_session(model, threads)
            names = [i.name for i in sess.get_inputs()]
            other = _other_batch(probe)
            # its rows are the probe's rows: their eager outputs, reordered the same way (a
            # network whose rows are not independent fails this check and runs eagerly)
            other_eager = _other_batch(eager)
            start = time.perf_counter()
            try:
                got = self._verify(sess, names, probe, eager)  # the answer when the probe is the call
                row_seconds = (time.perf_counter() - start) / len(next(iter(probe.values())))
                self._verify(sess, names, other, other_eager)
            except Exception as failure:  # noqa: BLE001 - shapes traced at the probe's batch size?
                try:
                    model = self._batch_generic(raw, probe, other, seqs)
                except ValueError:
                    raise failure from None
                sess = ort_session(model, threads)
                start = time.perf_counter()
                got = self._verify(sess, names, probe, eager)
                row_seconds = (time.perf_counter() - start) / len(next(iter(probe.values())))
                self._verify(sess, names, other, other_eager)
            if seqs:  # the same session must serve another length (an unrolled loop cannot)
                longer = _other_length(probe, seqs)
                try:
                    self._verify(sess, names, longer, self._eager(longer))
                except Exception:  # noqa: BLE001 - not length-generic: one session per length
                    self._by_length = True
                    self._sessions.clear()
                    return self._build(blobs)
            small = None
            if (threads > 1 and len(model) <= SMALL_SESSION_MAX_BYTES
                    and row_seconds <= SMALL_SESSION_MAX_ROW_SECONDS):
                small = ort_session(model, 1)
                self._verify(small, names, probe, eager)
                self._verify(small, names, other, other_eager)
            if not whole:
                got = sess.run(self.outputs, {k: _as_numpy(blobs[k]) for k in names})
        except Exception as e:  # noqa: BLE001 - any failure means: run the eager Network
            self.last_fallback_reason = f"{type(e).__name__}: {e}"
            log.debug("inference plan disabled for input shapes %s, running eagerly: %s",
                      {k: tuple(v.shape[1:]) for k, v in blobs.items()}, self.last_fallback_reason)
            if eager is not None and whole:  # the probe was this call: its eager outputs answer
                return _FAILED, {k: _as_numpy(v) for k, v in eager.items()}
            return _FAILED, None
        self.last_fallback_reason = None
        return _Signature(sess, small, names), dict(zip(self.outputs, got))

    def _verify(self, sess, names, blobs, eager) -> list:
        """The session's outputs for ``blobs``; raises unless they match ``eager``."""
        got = sess.run(self.outputs, {k: _as_numpy(blobs[k]) for k in names})
        checked = got
        for name, g in zip(self.outputs, got):
            ref = eager[name].detach().cpu().numpy()
            if g.shape != ref.shape:
                raise ValueError(f"output {name!r} has shape {g.shape}, eager gives {ref.shape}")
            nan = np.isnan(ref)
            if not np.array_equal(nan, np.isnan(g)):
                raise ValueError(f"output {name!r} has NaNs where eager has none, or vice versa")
            g, ref = g[~nan], ref[~nan]
            diff = float(np.max(np.abs(g - ref))) if ref.size else 0.0
            scale = max(1.0, float(np.max(np.abs(ref)))) if ref.size else 1.0
            if not diff <= TOLERANCE * scale:  # an inf output (inf - inf = nan) runs eagerly
                raise ValueError(f"output {name!r} differs from eager by {diff:.3g}")
        return checked

    def _batch_generic(self, raw: bytes, probe, other, sequences) -> bytes:
        """The tidied model of trace ``raw`` (of ``probe``) with the constants that depend on the
        batch size computed from it: traced again at ``other``'s size, the two graphs compared
        (:func:`batch_generic`). Raises when they differ otherwise."""
        _, _, raw2 = self._export(other, sequences)
        sizes = [_export_copy(next(iter(b.values()))).shape[0] for b in (probe, other)]
        merged = batch_generic(raw, raw2, *sizes)
        return simplify(merged)

    def _export(self, blobs, sequences=()) -> tuple[bytes, dict, bytes]:
        """The traced, tidied ONNX model of ``run`` for these input blobs (``sequences``: inputs
        whose axis 1, the sequence length, stays open too), the outputs the traced run computed
        for them, and the trace before tidying (renamed to blob names)."""
        inputs = list(blobs)
        example = tuple(_export_copy(blobs[k]) for k in inputs)
        module = _Traced(self._run, inputs, self.outputs)
        buf = io.BytesIO()
        # the graph's inputs and outputs are traced under names of our own and renamed to the
        # blob names afterwards: blob names such as "0" (models converted through onnx-coreml)
        # clash with the tracer's value names
        traced_in = [f"input_{i}" for i in range(len(inputs))]
        traced_out = [f"output_{i}" for i in range(len(self.outputs))]
        names = dict(zip(traced_in + traced_out, inputs + self.outputs))
        axes = {t: {0: "batch", 1: "sequence"} if names[t] in sequences else {0: "batch"}
                for t in names}
        # an updatable model's weights are Parameters that require grad, which tracing cannot
        # store as constants: off for the export (the plan is rebuilt when they change)
        trained = [p for p in self._params if p.requires_grad]
        try:
            for p in trained:
                p.requires_grad_(False)
            with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad(), \
                    _quiet_exporter():
                warnings.simplefilter("ignore")
                torch.onnx.export(module, example, buf, dynamo=False, input_names=traced_in,
                                  output_names=traced_out, dynamic_axes=axes, opset_version=OPSET,
                                  do_constant_folding=True)
        finally:
            for p in trained:
                p.requires_grad_(True)
        rows = len(next(iter(blobs.values())))
        raw = simplify(buf.getvalue(), rename=names, tidy=False)
        model = simplify(raw, batch=example[0].shape[0])
        return model, {k: v[:rows] for k, v in module.seen.items()}, raw


_SYMBOLICS_ADDED = False


@contextlib.contextmanager
def _quiet_exporter():
    """torch.onnx.export as the plan needs it:

    - ``aten::_unsafe_view`` (what ``reshape`` of a non-contiguous tensor becomes under
      ``torch.func.vmap``, e.g. an ND model's transpose -> reshapeStatic, the Keras flatten of
      TensorFlow-converted models) exports as an ONNX Reshape, like ``view``;
    - ``aten::_softmax`` (softmax under vmap: an ND model's softmaxND, attention) exports as an
      ONNX Softmax over that axis; ``aten::_to_copy`` (a dtype cast under vmap: an embedding's
      token ids) as an ONNX Cast;
    - a failing export does not print its TorchScript graph (~90 lines) to stdout: torch's
      ``setup_onnx_logging`` tests the function ``_jit_is_onnx_log_enabled`` instead of calling
      it, so the exporter's log is always on; the graph goes to this module's debug log.
    """
    global _SYMBOLICS_ADDED
    if not _SYMBOLICS_ADDED:
        from torch.onnx import register_custom_op_symbolic, symbolic_opset9

        register_custom_op_symbolic("aten::_unsafe_view", symbolic_opset9.view, 9)
        register_custom_op_symbolic("aten::_softmax", _softmax_symbolic, 13)
        register_custom_op_symbolic("aten::_to_copy", _to_copy_symbolic, 13)
        _SYMBOLICS_ADDED = True
    original = torch._C._jit_onnx_log
    torch._C._jit_onnx_log = lambda *parts: log.debug("torch.onnx: %s", " ".join(map(str, parts)))
    try:
        yield
    finally:
        torch._C._jit_onnx_log = original


def _softmax_symbolic(g, x, dim, half_to_float):
    from torch.onnx import symbolic_helper

    return g.op("Softmax", x, axis_i=symbolic_helper._get_const(dim, "i", "dim"))


#: torch ScalarType index -> ONNX TensorProto type (uint8, int8, int16, int32, int64, float16,
#: float32, float64, bool)
_ONNX_TYPES = {0: 2, 1: 3, 2: 5, 3: 6, 4: 7, 5: 10, 6: 1, 7: 11, 11: 9}


def _to_copy_symbolic(g, x, dtype, *rest):
    from torch.onnx import symbolic_helper

    if symbolic_helper._is_none(dtype):
        return x
    return g.op("Cast", x, to_i=_ONNX_TYPES[symbolic_helper._get_const(dtype, "i", "dtype")])


def _trim_heap() -> None:
    """Give the build's freed temporaries (traced model, graph copies: several times the weights)
    back to the OS where the C library can (glibc's malloc_trim; a no-op without it)."""
    trim = loaded_function("malloc_trim")
    if trim is not None:
        trim(0)


def ort_session(model: bytes, threads: int, spinning: bool = True):
    """A CPU onnxruntime session over ``threads`` intra-op threads (``spinning=False``: its
    workers sleep as soon as a run ends, for sessions whose caller runs torch ops next)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 4  # failures raise (a plan that fails verification runs eagerly)
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


class _Signature:
    """The sessions of one input signature: one with torch's thread count and, for small models,
    a single-threaded one. Tiny batches can run faster on one thread (no thread-pool hand-offs
    between ops). A batch size up to :data:`SMALL_BATCH_MAX` alternates between the two for its
    first calls (timing spread over calls, so one noisy moment does not decide), then keeps the
    single-threaded session only if its best time is at least :data:`SMALL_MARGIN` faster."""

    __slots__ = ("sess", "small", "names", "use_small", "_trials")

    def __init__(self, sess, small, names: list[str]):
        self.sess, self.small, self.names = _Run(sess), small and _Run(small), names
        self.use_small: dict[int, bool] = {}
        self._trials: dict[int, list] = {}

    def run(self, outputs: list[str], feed: dict, n: int) -> list:
        if self.small is None or n > SMALL_BATCH_MAX:
            return self.sess.run(outputs, feed)
        choice = self.use_small.get(n)
        if choice is not None:
            return (self.small if choice else self.sess).run(outputs, feed)
        trials = self._trials.setdefault(n, [[], []])  # times of [main, single-threaded]
        which = len(trials[0]) > len(trials[1])
        t = time.perf_counter()
        got = (self.small if which else self.sess).run(outputs, feed)
        trials[which].append(time.perf_counter() - t)
        decided = _second_faster(trials, SMALL_MARGIN)
        if decided is not None:
            self.use_small[n] = decided
            self._trials.pop(n, None)
        return got


def _second_faster(trials: list, margin: float) -> Optional[bool]:
    """Once both candidates have :data:`CALIBRATION_WARMUP` + :data:`CALIBRATION_RUNS` timed
    calls: whether the second one's best (after its warm-up calls) is at least ``margin``
    faster than the first one's; None before."""
    if min(len(trials[0]), len(trials[1])) < CALIBRATION_WARMUP + CALIBRATION_RUNS:
        return None
    first, second = (min(ts[CALIBRATION_WARMUP:]) for ts in trials)
    return second < (1.0 - margin) * first


class _Run:
    """``run(outputs, feed)`` of a verified session without the per-call re-validation of
    ``InferenceSession.run`` (feed names, OrtValue ownership; ~2 us of a 20 us batch-1 call):
    the plan feeds the same input names to every run of a session it verified."""

    __slots__ = ("run",)

    def __init__(self, sess):
        raw = getattr(sess, "_sess", None)  # onnxruntime's C++ session binding
        if raw is not None and callable(getattr(raw, "run", None)):
            self.run = lambda outputs, feed: raw.run(outputs, feed, None)
        else:
            self.run = sess.run


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype is not torch.float32:
        t = t.float()
    a = t.numpy()
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def _export_copy(t: torch.Tensor) -> torch.Tensor:
    """A normal (non-inference) tensor with ``t``'s values, batch >= 2 (no size-1 specialization)."""
    a = t.detach().cpu().numpy()
    if a.shape[0] < 2:
        a = np.concatenate([a, a])
    return torch.from_numpy(np.array(a))


def _other_length(blobs, sequences):
    """``blobs`` with two more steps on each sequence input (its last steps again)."""
    return {k: torch.cat([v, v[:, -2:]], 1) if k in sequences else v for k, v in blobs.items()}


def _other_batch(blobs):
    """The batch reversed plus its first example again (twice for one example, which is traced
    as two): another size, other data per row (of input blobs, or of the outputs they give)."""
    return {k: torch.cat([v.flip(0), v[:1]] + ([v[:1]] if len(v) == 1 else [])) for k, v in blobs.items()}


# --- graph tidying --------------------------------------------------------------------------
def _rename(g, names: dict[str, str]) -> None:
    """Rename graph values ``old -> new`` everywhere in ``g``; a value already called ``new``
    inside the graph is renamed out of the way first."""
    used = {v for n in g.node for v in (*n.input, *n.output)}
    used |= {v.name for v in (*g.input, *g.output, *g.initializer, *g.value_info)}
    moves = {}
    for new in names.values():
        if new in used and new not in names:
            k = 0
            while f"{new}__{k}" in used:
                k += 1
            moves[new] = f"{new}__{k}"
    moves.update(names)
    for n in g.node:
        n.input[:] = [moves.get(v, v) for v in n.input]
        n.output[:] = [moves.get(v, v) for v in n.output]
    for v in (*g.input, *g.output, *g.initializer, *g.value_info):
        v.name = moves.get(v.name, v.name)


def batch_generic(first: bytes, second: bytes, b1: int, b2: int) -> bytes:
    """Trace ``first`` (at batch size ``b1``) with each constant that differs from its twin in
    trace ``second`` (of the same network at ``b2``) computed from the batch size: an element
    ``k * b1`` there and ``k * b2`` here becomes ``k * B``, ``B`` the first input's axis 0.
    Under ``torch.func.vmap`` (ND models) a batched matmul traces its broadcast and reshape
    shapes as such constants (``(B * heads, L, d)``); a constant whose ``b1`` / ``b2`` rows all
    equal one row (a per-example constant vmap broadcast to the batch) becomes that row expanded
    to ``B`` rows. Raises ValueError when the traces differ in another way."""
    import onnx
    from onnx import helper, numpy_helper

    m1, m2 = onnx.load_from_string(first), onnx.load_from_string(second)
    g1, g2 = m1.graph, m2.graph
    if [n.op_type for n in g1.node] != [n.op_type for n in g2.node] or len(g1.initializer) != len(g2.initializer):
        raise ValueError("the traces at two batch sizes differ in structure")
    for i1, i2 in zip(g1.initializer, g2.initializer):
        if not np.array_equal(numpy_helper.to_array(i1), numpy_helper.to_array(i2)):
            raise ValueError(f"initializer {i1.name!r} depends on the batch size")
    batch = "__batch_size"
    nodes = [helper.make_node("Shape", [g1.input[0].name], [batch], start=0, end=1)]
    for n1, n2 in zip(g1.node, g2.node):
        if n1 == n2:
            nodes.append(n1)
            continue
        if n1.op_type != "Constant":
            raise ValueError(f"node {n1.name!r} differs between the traces")
        v1, v2 = (numpy_helper.to_array(n.attribute[0].t) for n in (n1, n2))
        out = n1.output[0]
        if (v1.ndim and v1.shape[0] == b1 and v2.shape == (b2, *v1.shape[1:])
                and (v1 == v1[:1]).all() and (v2 == v1[:1]).all()):
            # a per-example constant vmap broadcast to the batch (a class token to concatenate)
            nodes += [helper.make_node("Constant", [], [out + "__row"], value=numpy_helper.from_array(v1[:1])),
                      helper.make_node("Constant", [], [out + "__rest"], value=numpy_helper.from_array(
                          np.array(v1.shape[1:], np.int64))),
                      helper.make_node("Concat", [batch, out + "__rest"], [out + "__shape"], axis=0),
                      helper.make_node("Expand", [out + "__row", out + "__shape"], [out])]
            continue
        k = (v2.astype(np.int64) - v1) // (b2 - b1) if v1.dtype == np.int64 and v1.shape == v2.shape else None
        if k is None or v1.ndim > 1 or not np.array_equal(v2 - v1, k * (b2 - b1)) \
                or not np.array_equal(v1[k != 0], k[k != 0] * b1):
            raise ValueError(f"constant {out!r} depends on the batch size otherwise than k * B")
        flat = k.reshape(-1)
        const = np.where(flat != 0, 0, v1.reshape(-1))
        nodes += [helper.make_node("Constant", [], [out + "__k"], value=numpy_helper.from_array(flat)),
                  helper.make_node("Constant", [], [out + "__c"], value=numpy_helper.from_array(const)),
                  helper.make_node("Mul", [batch, out + "__k"], [out + "__kb"]),
                  helper.make_node("Add", [out + "__kb", out + "__c"], [out + "__v" if v1.ndim == 0 else out])]
        if v1.ndim == 0:  # a scalar
            nodes += [helper.make_node("Constant", [], [out + "__s"],
                                       value=numpy_helper.from_array(np.zeros(0, np.int64))),
                      helper.make_node("Reshape", [out + "__v", out + "__s"], [out])]
    if len(nodes) == len(g1.node) + 1:
        raise ValueError("no constant depends on the batch size")
    del g1.node[:]
    g1.node.extend(nodes)
    return m1.SerializeToString()


def simplify(model_bytes: bytes, rename: Optional[dict[str, str]] = None,
             batch: Optional[int] = None, tidy: bool = True) -> bytes:
    """Remove what tracing leaves that blocks onnxruntime's fusions or its dynamic batch axis;
    semantics unchanged (``rename``: graph value names to replace first, e.g. traced input
    names by blob names; ``batch``: the batch size the graph was traced at).

    - ``Reshape`` shapes computed as ``[Shape(t)[0], consts...]``, where ``t`` shares axis 0 with
      the reshaped tensor, become constants ``[0, consts...]`` (0 copies that axis; the batch
      size anywhere else in the shape keeps the computation);
    - constant ``Reshape`` shapes ``[batch, ...]`` of a tensor whose axis 0 is an input's batch
      axis become ``[0, ...]`` (a reshape under ``torch.func.vmap``, as ND models run, traces
      the batch size as a constant; a reshape that keeps the size of axis 0 keeps each row's
      values in that row, so this is the same reshape at the traced size);
    - ``Reshape -> Relu`` becomes ``Relu -> Reshape`` (elementwise ops commute with reshapes),
      so a ``Gemm`` / ``Conv`` is followed by its ReLU directly and gets fused with it; likewise
      a softmax over the channels of ``(B, K, 1, 1)`` runs on the ``(B, K)`` it was made from
      (onnxruntime transposes for a softmax axis that is not the last);
    - ``Reshape(Reshape(x, a), b)`` becomes ``Reshape(x, b)`` when both keep axis 0;
    - ``Reshape(x, [0, -1])`` of a 2-D ``x`` is dropped;
    - ``ReduceMean`` over the last two axes of a 4-D tensor becomes ``GlobalAveragePool``.

    The plan's verification against the eager Network guards these rewrites too.
    ``tidy=False``: only the renaming.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load_from_string(model_bytes)
    if rename:
        _rename(model.graph, rename)
    if not tidy:
        return model.SerializeToString()
    model = onnx.shape_inference.infer_shapes(model)
    g = model.graph
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in
             list(g.value_info) + list(g.input) + list(g.output) if v.type.tensor_type.HasField("shape")}
    nodes = [n for n in g.node]  # python list of the messages; written back at the end
    outputs = {o.name for o in g.output}
    consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    for node in nodes:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    producer = {o: n for n in nodes for o in n.output}
    rep: dict[str, str] = {}  # tensor -> a tensor with the same axis 0

    def same0(name: str) -> str:
        while name in rep:
            name = rep[name]
        return name

    def shape_value(name: str, data: str):
        """A Reshape's shape input as constants, 0 for ``Shape(t)[0]`` with ``t`` ~ ``data``."""
        if name in consts:
            return np.asarray(consts[name], dtype=np.int64).reshape(-1)
        n = producer.get(name)
        if n is None:
            return None
        if n.op_type == "Concat":
            parts = [shape_value(i, data) for i in n.input]
            return None if any(p is None for p in parts) else np.concatenate(parts)
        if n.op_type in ("Unsqueeze", "Reshape"):
            v = shape_value(n.input[0], data)
            return None if v is None else v.reshape(-1)
        axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
        if n.op_type == "Gather" and n.input[1] in consts and axis == 0:
            src = producer.get(n.input[0])
            idx = np.asarray(consts[n.input[1]]).reshape(-1)
            if (src is not None and src.op_type == "Shape" and not src.attribute
                    and idx.size == 1 and int(idx[0]) == 0 and same0(src.input[0]) == same0(data)):
                return np.array([_BATCH], dtype=np.int64)
        return None

    def keeps_batch(shape_name: str) -> bool:
        v = consts.get(shape_name)
        return v is not None and v.size > 0 and int(v.reshape(-1)[0]) == 0 and 0 not in v.reshape(-1)[1:]

    def set_shape(node, v: np.ndarray, suffix: str) -> None:
        """Give Reshape ``node`` the constant shape ``v``."""
        name = node.input[1] + suffix
        g.initializer.append(numpy_helper.from_array(v.astype(np.int64), name))
        consts[name] = v
        node.input[1] = name

    graph_inputs = {i.name for i in g.input}
    for node in nodes:
        if node.op_type == "Reshape" and node.input[1] not in consts:
            v = shape_value(node.input[1], node.input[0])
            if v is not None and _BATCH not in v[1:]:  # 0 copies the input's axis 0 only there
                set_shape(node, np.where(v == _BATCH, 0, v), "__const")
        elif (node.op_type == "Reshape" and batch and same0(node.input[0]) in graph_inputs
              and not any(a.name == "allowzero" and a.i for a in node.attribute)):
            v = np.asarray(consts[node.input[1]], dtype=np.int64).reshape(-1)
            if v.size and int(v[0]) == batch and 0 not in v[1:]:
                set_shape(node, np.concatenate([[0], v[1:]]), "__batch")
        data = [i for i in node.input if i not in consts]
        if node.op_type in _BROADCAST_OPS | {"MatMul"} and data and node.input:
            # tensors sharing axis 0 (same rank) and constants: rows stay rows when no constant
            # has an axis 0 of its own to broadcast against (lower rank, or size 1 there)
            others = [consts[i] for i in node.input if i in consts]
            rank = ranks.get(data[0], 0)
            shared = len({same0(d) for d in data}) == 1 and all(ranks.get(d, -1) == rank for d in data)
            if shared and all(c.ndim < rank or (c.ndim and c.shape[0] == 1) for c in others) and (
                    node.op_type != "MatMul" or (node.input[0] == data[0] and rank >= 2
                                                 and (len(data) == 1 or rank >= 3))):
                rep[node.output[0]] = same0(data[0])
        if node.op_type in _REDUCE_OPS and node.input and ranks.get(node.input[0]):
            axes = next((list(a.ints) for a in node.attribute if a.name == "axes"), None)
            if axes and 0 not in [a % ranks[node.input[0]] for a in axes]:
                rep[node.output[0]] = same0(node.input[0])
        keeps0 = (node.op_type in _KEEP_AXIS0
                  or (node.op_type == "Transpose"
                      and next((list(a.ints)[:1] for a in node.attribute if a.name == "perm"), [0]) == [0])
                  or (node.op_type == "Reshape" and keeps_batch(node.input[1]))
                  or (node.op_type == "Gemm"
                      and not any(a.name == "transA" and a.i for a in node.attribute)))
        if keeps0 and node.input and len(node.output) == 1:
            rep[node.output[0]] = same0(node.input[0])

    def prune(nodes):
        """Drop nodes whose outputs nobody reads (e.g. the old shape computations)."""
        live, keep = set(outputs), []
        for node in reversed(nodes):
            if any(o in live for o in node.output):
                keep.append(node)
                live.update(i for i in node.input if i)
        return keep[::-1]

    def readers(nodes, name):
        return sum(name in n.input for n in nodes)

    nodes = prune(nodes)
    changed = True
    while changed:
        changed = False
        for i, node in enumerate(nodes):
            r = producer.get(node.input[0]) if node.input else None
            if (node.op_type in ("Relu", "Softmax") and r is not None and r.op_type == "Reshape"
                    and r.output[0] not in outputs and readers(nodes, r.output[0]) == 1
                    and (node.op_type == "Relu" or _softmax_channels_of_2d(node, r, consts, ranks))):
                if node.op_type == "Softmax":  # (B, K) -> (B, K, 1, 1), softmax over K
                    del node.attribute[:]
                    node.attribute.append(helper.make_attribute("axis", 1))
                # x -> Reshape(s) -> t -> Relu -> y   ==>   x -> Relu -> t -> Reshape(s) -> y
                x, t, y = r.input[0], r.output[0], node.output[0]
                node.input[0], node.output[0] = x, t
                r.input[0], r.output[0] = t, y
                producer[t], producer[y] = node, r
                ranks[y] = ranks.get(t, -1)
                ranks[t] = ranks.get(x, -1)
                j = next(k for k, n in enumerate(nodes) if n is r)
                nodes[i], nodes[j] = r, node  # Relu now runs where the Reshape did
                changed = True
                break
            if (node.op_type == "Reshape" and r is not None and r.op_type == "Reshape"
                    and keeps_batch(node.input[1]) and keeps_batch(r.input[1])
                    and r.output[0] not in outputs and readers(nodes, r.output[0]) == 1):
                node.input[0] = r.input[0]
                nodes = [n for n in nodes if n is not r]
                changed = True
                break
    for node in list(nodes):  # Reshape(x (B, K), [0, -1]) is x
        shape = consts.get(node.input[1]) if node.op_type == "Reshape" else None
        if (shape is not None and shape.reshape(-1).tolist() == [0, -1]
                and ranks.get(node.input[0]) == 2 and node.output[0] not in outputs):
            for other in nodes:
                for k, name in enumerate(other.input):
                    if name == node.output[0]:
                        other.input[k] = node.input[0]
            nodes = [n for n in nodes if n is not node]
    for k, node in enumerate(nodes):
        axes = sorted(a % 4 for a in next((list(a.ints) for a in node.attribute
                                             if a.name == "axes"), []))
        keepdims = next((a.i for a in node.attribute if a.name == "keepdims"), 1)
        if (node.op_type == "ReduceMean" and ranks.get(node.input[0]) == 4 and axes == [2, 3]
                and keepdims == 1 and len(node.input) == 1):
            nodes[k] = helper.make_node("GlobalAveragePool", [node.input[0]], [node.output[0]],
                                        name=node.name)
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in g.node for i in n.input} | outputs
    kept = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(kept)
    del g.value_info[:]
    return model.SerializeToString()


def _softmax_channels_of_2d(softmax, reshape, consts, ranks) -> bool:
    """Softmax over axis 1 of ``Reshape(x (B, K), [0, K, 1, 1])``."""
    shape = consts.get(reshape.input[1])
    axis = next((a.i for a in softmax.attribute if a.name == "axis"), -1)
    return (shape is not None and shape.reshape(-1).tolist()[:1] == [0] and shape.size == 4
            and shape.reshape(-1)[1] > 0 and shape.reshape(-1)[2:].tolist() == [1, 1]
            and axis in (1, -3) and ranks.get(reshape.input[0]) == 2)
