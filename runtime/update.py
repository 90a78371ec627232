"""On-device update: :class:`UpdateTask` (Core ML's ``MLUpdateTask`` in Python idiom),
:class:`UpdateContext`, the neural-network updater and its losses.

Task life cycle::

    task = UpdateTask(model_or_path, training_data, parameters={...},
                      progress_handlers={"epoch_end": f}, completion_handler=done)
    task.resume()            # "ready" -> "running": trains in a background thread
    ctx = task.wait()        # -> "completed" | "cancelled" | "failed"

Everything the task needs is checked in the background thread *before the first optimizer step*
(model updatable, overrides inside the allowed range/set, every example valid). A failure ends
the task ``"failed"``: ``wait()`` returns the final context with ``ctx.error`` holding the
:class:`~mlpersonal.errors.MLPersonalError` and ``ctx.model`` ``None`` (nothing is written).
``CompiledModel.update(...)`` (the synchronous form) raises that error instead.

Events, in order: ``training_began`` once; ``mini_batch_end`` after every optimizer step;
``epoch_end`` after every epoch. Metrics: ``loss`` (the mini-batch's mean loss; for
``epoch_end`` the mean of the epoch's mini-batch losses; ``None`` at ``training_began``),
``epoch_index`` and ``mini_batch_index`` (0-based, the index restarts every epoch). Handlers
run in the training thread between steps and may call ``task.cancel()`` (honoured before the
next mini-batch) or ``task.resume(parameters={...})`` (checked at once against the model's
allowed values; applies from the next mini-batch, or epoch for epochs/shuffle/seed).

Losses (the spec's single loss layer, mean over the mini-batch):
- categorical cross-entropy: ``-log p[target]`` on the softmax output, computed stably as
  ``log_softmax`` of the softmax layer's input, i.e. ``torch.nn.CrossEntropyLoss`` on the logits;
- mean squared error: ``mean((input - target) ** 2)`` over every element, as
  ``torch.nn.MSELoss()`` (no 1/2 factor; Core ML's documentation does not define one).

Frozen-prefix cache: when layers that only depend on the model inputs through frozen layers
(no updatable layer upstream) feed the trained part, ``prepare`` runs them once over the whole
training set (no grad, chunks of :data:`CACHE_CHUNK` examples) and keeps their "boundary"
activations on the model's device; each mini-batch then runs only the layers after them. Exact:
those layers see the values they would have recomputed, and no gradient flows into a frozen
prefix. It is skipped (every mini-batch recomputes) when the activations would take more than
:data:`CACHE_BUDGET_BYTES` (1 GiB; ``MLPERSONAL_UPDATE_CACHE_BYTES`` overrides it, ``0`` turns the
cache off) and it stops before layers that are not per-example functions (ND-only kinds in
rank-5 models, batchnorm computing statistics from its input). ND models compute the prefix in
vmapped chunks, and when the layers after the cache give the same loss input on a batch as one
example at a time under vmap (a classifier head), mini-batches run them on the batch directly
(a transformer's head personalization: 1.7 ms per epoch vs 5.1 for a torch loop,
``benchmarks/update.py --only transformer``).

Threads: the task trains a private copy, so predictions on the original model from any thread
are unaffected; a snapshot (``ctx.model``) asked for from another thread waits for the step in
flight. ``cancel()`` from any thread lets at most the mini-batch in flight finish.

Optimizers (:mod:`runtime.optimizers`) do the arithmetic of ``torch.optim.SGD(lr, momentum)``
and ``torch.optim.Adam(lr, betas, eps)``.
Shuffling draws ``torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))``;
without a seed in the model (or the overrides) a random seed is drawn once per task. The last
partial mini-batch of an epoch is kept; a mini-batch size larger than the training set (Core ML
allows it) makes each epoch one step on all the examples.
"""

from __future__ import annotations

import itertools
import math
import os
import random
import threading
import warnings
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from mlpersonal.errors import (
    InvalidInputError,
    InvalidModelError,
    MLPersonalError,
    TrainingError,
    UpdateParameterError,
)
from mlpersonal.update_params import normalize_key, resolve
from mlpersonal.validate import RECURRENT_LAYER_KINDS

from . import optimizers
from .batch import ArrayBatchProvider
from .features import example_lengths, feature_kind, gather_feeds, padded_feeds, shape_groups
from .layers.recurrent import sequence_lengths, stepwise
from .device import precision
from .model import CompiledModel, compile_spec, load
from .native import loaded_function
from .network import unread_blobs
from .updating import Updater

EVENTS = ("training_began", "mini_batch_end", "epoch_end")
_EVENT_ALIASES = {"trainingBegan": "training_began", "miniBatchEnd": "mini_batch_end",
                  "epochEnd": "epoch_end"}
STATES = ("ready", "running", "completed", "cancelled", "failed")


# --- context -----------------------------------------------------------------------------------
class UpdateContext:
    """What handlers receive and :meth:`UpdateTask.wait` returns.

    ``task``, ``event`` (an event name, or the final state for the completion context),
    ``metrics`` (``loss``, ``epoch_index``, ``mini_batch_index``), ``parameters`` (the values in
    force), ``error`` (the MLPersonalError of a failed task, else ``None``) and ``model``: a
    predictable, savable CompiledModel (during training a snapshot made when first accessed).
    """

    def __init__(self, task: "UpdateTask", event: str, metrics: dict, parameters: dict, *,
                 model: Optional[CompiledModel] = None,
                 model_fn: Optional[Callable[[], CompiledModel]] = None,
                 error: Optional[MLPersonalError] = None):
        self.task = task
        self.event = event
        self.metrics = metrics
        self.parameters = parameters
        self.error = error
        self._model = model
        self._model_fn = model_fn

    @property
    def model(self) -> Optional[CompiledModel]:
        if self._model is None and self._model_fn is not None:
            self._model, self._model_fn = self._model_fn(), None
        return self._model

    def __repr__(self) -> str:
        return f"<UpdateContext {self.event} {self.metrics}{' error' if self.error else ''}>"


# --- task --------------------------------------------------------------------------------------
class UpdateTask:
    """Train a copy of an updatable model on ``training_data`` in a background thread.

    ``model_or_path``: a CompiledModel, a path, bytes or a spec (loaded with ``compute_units``).
    ``training_data``: feature dicts (or an :class:`~runtime.batch.ArrayBatchProvider` of
    columns), each with the model inputs and the target (a classifier's class label under its
    predicted-feature name; otherwise the loss layer's target name, e.g. ``"output_true"``). ``parameters``: overrides (``learning_rate``, ``epochs``, ... or Core ML's
    ``learningRate`` ...), checked against what the model allows. ``progress_handlers``:
    ``{"training_began" | "mini_batch_end" | "epoch_end": fn(ctx)}``;
    ``completion_handler(ctx)`` runs once when the task ends, whatever the outcome.
    """

    def __init__(self, model_or_path, training_data, parameters: Optional[dict] = None,
                 progress_handlers: Optional[dict] = None,
                 completion_handler: Optional[Callable[[UpdateContext], Any]] = None,
                 compute_units: Optional[str] = None):
        self._source = model_or_path
        if isinstance(training_data, ArrayBatchProvider):  # Core ML's MLBatchProvider
            training_data = training_data.to_list()
        self._data = training_data
        if parameters is not None and not isinstance(parameters, dict):
            raise UpdateParameterError(f"parameters must be a dict, got {type(parameters).__name__}")
        self._overrides = dict(parameters or {})
        self._handlers = _check_handlers(progress_handlers)
        if completion_handler is not None and not callable(completion_handler):
            raise MLPersonalError("completion_handler must be callable")
        self._completion = completion_handler
        self._compute_units = compute_units
        self._lock = threading.Lock()
        self._step_lock = threading.RLock()  # held by the training thread during each step
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._pending: dict = {}
        self._params = None  # the model's Parameter table, once known
        self._state = "ready"
        self._context: Optional[UpdateContext] = None
        self._thread: Optional[threading.Thread] = None  # the thread training (resume's, run's caller)
        self._background = False  # trained by resume()'s own thread

    # --- public ----------------------------------------------------------------------------
    @property
    def state(self) -> str:
        """``ready``, ``running``, ``completed``, ``cancelled`` or ``failed``."""
        return self._state

    @property
    def context(self) -> Optional[UpdateContext]:
        """The latest context (the final one once the task has ended)."""
        return self._context

    @property
    def error(self) -> Optional[MLPersonalError]:
        ctx = self._context
        return ctx.error if ctx is not None and self._done.is_set() else None

    def resume(self, parameters: Optional[dict] = None) -> None:
        """Start the task in a background thread, or (while running, e.g. from a handler)
        continue with new values."""
        with self._lock:
            if self._state == "ready":
                if parameters:
                    self._overrides.update(parameters)
                self._state = "running"
                self._background = True
                _release_openmp_pool()
                self._thread = threading.Thread(target=self._run, name="mlpersonal-update", daemon=True)
                self._thread.start()
                return
            if self._state != "running":
                raise MLPersonalError(f"cannot resume a task that is {self._state}")
            if parameters:
                if self._params is not None:  # check now, in the caller's thread
                    resolve(self._params, parameters)
                self._pending.update(parameters)

    def run(self, parameters: Optional[dict] = None) -> UpdateContext:
        """Train in the calling thread and return the final context (``ctx.error`` set on
        failure): :meth:`resume` + :meth:`wait` without a thread. Handlers run in this thread;
        :meth:`cancel` works from them or from another thread."""
        with self._lock:
            if self._state != "ready":
                raise MLPersonalError(f"cannot run a task that is {self._state}")
            if parameters:
                self._overrides.update(parameters)
            self._state = "running"
            self._thread = threading.current_thread()
        self._run()
        return self._context

    def cancel(self) -> None:
        """Stop after the mini-batch in flight (or at once if the task has not started); from
        any thread. The task ends ``"cancelled"`` with the model as trained so far."""
        with self._lock:
            if self._state == "ready":
                self._state = "cancelled"
                self._context = UpdateContext(self, "cancelled", _metrics(None, 0, 0), {})
                self._done.set()
                self._call_completion()
                return
        self._cancel.set()

    def wait(self, timeout: Optional[float] = None) -> UpdateContext:
        """Block until the task ends; return the final context (``ctx.error`` set on failure)."""
        if self._state == "ready":
            raise MLPersonalError("the update task has not been started: call task.resume() first")
        if self._thread is not None and threading.current_thread() is self._thread and not self._done.is_set():
            raise MLPersonalError("wait() called from a progress handler would never return")
        if not self._done.wait(timeout):
            raise TimeoutError(f"the update task is still running after {timeout} s")
        worker = self._thread
        if self._background and worker is not threading.current_thread():
            worker.join()  # resume()'s thread (run() trains in the caller's, which goes on)
        return self._context

    def __repr__(self) -> str:
        return f"<UpdateTask {self._state}>"

    # --- worker ----------------------------------------------------------------------------
    def _load(self) -> CompiledModel:
        src, cu = self._source, self._compute_units
        if isinstance(src, CompiledModel):
            if cu is None or cu == src.compute_units:
                return src
            spec = type(src.spec)()
            spec.CopyFrom(src.spec)
            return compile_spec(spec, cu, path=src.path)
        return load(src, cu or "all")

    def _apply_pending(self, values: dict) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        if pending:
            new = resolve(self._params, pending)
            values.update({normalize_key(k): new[normalize_key(k)] for k in pending})

    def _snapshot(self, up: Updater) -> CompiledModel:
        """A copy of the model as trained so far (never in the middle of a step, whatever the
        thread asking: the training thread holds ``_step_lock`` while it steps)."""
        with self._step_lock:
            return up.result().copy()

    def _emit(self, event: str, metrics: dict, values: dict, up: Updater) -> None:
        ctx = UpdateContext(self, event, metrics, dict(values), model_fn=lambda: self._snapshot(up))
        self._context = ctx
        handler = self._handlers.get(event)
        if handler is not None:
            try:
                handler(ctx)
            except MLPersonalError:
                raise
            except Exception as e:  # noqa: BLE001
                raise TrainingError(f"the {event!r} progress handler raised {type(e).__name__}: {e}") from e
        self._apply_pending(values)

    def _run(self) -> None:
        values: dict = {}
        self._latest = _metrics(None, 0, 0)  # the metrics of the last mini-batch / epoch
        try:
            model = self._load()
            with precision(model.device, False):  # float32 training (TF32 off on cuda)
                up = model.make_updater()
                if self._background and up.serial:
                    _one_openmp_thread()
                up.cancelled = self._cancel.is_set
                self._params = up.parameters()
                values = resolve(self._params, self._overrides)
                up.prepare(self._data, values)
                if not self._cancel.is_set():
                    self._emit("training_began", self._latest, values, up)
                self._epochs(up, values)
                state = "cancelled" if self._cancel.is_set() else "completed"
                with self._step_lock:
                    final = up.result()
                ctx = UpdateContext(self, state, self._latest, dict(values), model=final)
        except Exception as e:  # noqa: BLE001
            err = e if isinstance(e, MLPersonalError) else TrainingError(
                f"training failed: {type(e).__name__}: {e}")
            if err is not e:
                err.__cause__ = e
            state = "failed"
            ctx = UpdateContext(self, "failed", self._latest, dict(values), error=err)
        self._context = ctx
        self._state = state
        self._call_completion()
        self._done.set()

    def _epochs(self, up: Updater, values: dict) -> None:
        """Run the epochs until done or cancelled, emitting progress (metrics in ``_latest``)."""
        epoch = 0
        while epoch < up.num_epochs(values) and not self._cancel.is_set():
            losses = []
            steps = up.mini_batches(epoch, values)
            for index in itertools.count():
                with self._step_lock:
                    loss = next(steps, None)
                if loss is None:
                    break
                loss = float(loss)
                if not math.isfinite(loss):
                    raise TrainingError(
                        f"the loss became {loss} at epoch {epoch}, mini-batch {index}; lower the "
                        "learning rate or check the training data"
                    )
                losses.append(loss)
                self._latest = _metrics(loss, epoch, index)
                self._emit("mini_batch_end", self._latest, values, up)
                if self._cancel.is_set():
                    break
            if self._cancel.is_set():
                break
            self._latest = _metrics(sum(losses) / max(len(losses), 1), epoch, max(len(losses) - 1, 0))
            self._emit("epoch_end", self._latest, values, up)
            epoch += 1

    def _call_completion(self) -> None:
        if self._completion is None:
            return
        try:
            self._completion(self._context)
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"the update task's completion handler raised {type(e).__name__}: {e}",
                          RuntimeWarning, stacklevel=2)


def _release_openmp_pool() -> None:
    """Let the calling thread's idle OpenMP workers exit (``omp_pause_resource_all(soft)``; its
    next parallel op starts them again). libgomp stops its workers spin-waiting, process-wide,
    once its threads outnumber the cores, so with the caller's idle team beside the training
    thread's, each op of the training paid a wake-up: a CNN trained in the background at
    1.9-2.3x its time in the caller's thread, at 0.95-1.07x once the caller's team is released
    (benchmarks/update.py --only threads)."""
    fn = loaded_function("omp_pause_resource_all")
    if fn is not None:
        fn(1)  # omp_pause_soft; -1 (nothing done) inside a parallel region


def _one_openmp_thread() -> None:
    """Compute on one OpenMP thread in this (background) thread only; other threads keep
    torch's count. Recurrent training is many small ops: one thread runs them as fast as two
    (benchmarks/recurrent.py's LSTM), and a core stays free for the caller."""
    torch.get_num_threads()  # torch sets this thread's OpenMP count on first use: do it first
    fn = loaded_function("omp_set_num_threads")  # torch's OpenMP runtime; per calling thread
    if fn is not None:
        fn(1)


def _metrics(loss, epoch: int, mini_batch: int) -> dict:
    return {"loss": loss, "epoch_index": int(epoch), "mini_batch_index": int(mini_batch)}


def _check_handlers(handlers: Optional[dict]) -> dict:
    if handlers is None:
        return {}
    if not isinstance(handlers, dict):
        raise MLPersonalError("progress_handlers must be a dict {event name: callable}")
    out = {}
    for key, fn in handlers.items():
        event = _EVENT_ALIASES.get(key, key)
        if event not in EVENTS:
            raise MLPersonalError(f"unknown progress event {key!r}; events: {', '.join(EVENTS)}")
        if not callable(fn):
            raise MLPersonalError(f"the handler for {key!r} is not callable")
        out[event] = fn
    return out


# --- losses ------------------------------------------------------------------------------------
class CrossEntropyLoss:
    """Core ML's categorical cross-entropy on a softmax output; targets are class indices."""

    def __init__(self, model, msg):
        self.input = msg.input
        self.target = msg.target
        layers = {l.name: l for l in model.nn_spec.layers}
        producer = next((s for s in reversed(model.net.steps) if self.input in s.outputs), None)
        if producer is None:
            raise InvalidModelError(f"the loss input {self.input!r} is not produced by any layer")
        # softmax output: use its input (logits) with log_softmax, which is exact and stable
        self.from_logits = producer.kind in ("softmax", "softmaxND") and len(producer.inputs) == 1
        self.blob = producer.inputs[0] if self.from_logits else self.input
        self.axis = int(layers[producer.name].softmaxND.axis) if producer.kind == "softmaxND" else None

    def log_probs(self, env: dict, per_example: bool = False) -> torch.Tensor:
        """``(batch, classes)`` log-probabilities. ``per_example``: the blob holds one example
        at its declared (ND) shape, with no batch axis."""
        x = env[self.blob]
        n = 1 if per_example else x.shape[0]
        if self.axis is None and not per_example and x.dim() >= 3 and x.shape[-1] == x.shape[-2] == 1:
            x = x.reshape(x.shape[0], -1)  # (B, C, 1, 1): classes on the last axis
        if self.from_logits:
            dim = self.axis if self.axis is not None else (-3 if x.dim() >= 3 else -1)
            lp = F.log_softmax(x, dim=dim)
            lp = lp if dim in (-1, x.dim() - 1) else lp.movedim(dim, -1)
        else:
            lp = torch.log(x.clamp_min(torch.finfo(x.dtype).tiny))
            lp = lp.movedim(-3, -1) if x.dim() >= 3 else lp
        return lp.reshape(n, -1)

    def __call__(self, env: dict, target: torch.Tensor, per_example: bool = False) -> torch.Tensor:
        return F.nll_loss(self.log_probs(env, per_example), target)


class MeanSquaredErrorLoss:
    """Core ML's mean squared error: mean over every element of (input - target)^2."""

    def __init__(self, model, msg):
        self.input = msg.input
        self.target = msg.target
        self.blob = msg.input
        if not any(self.input in s.outputs for s in model.net.steps):
            raise InvalidModelError(f"the loss input {self.input!r} is not produced by any layer")

    def __call__(self, env: dict, target: torch.Tensor, per_example: bool = False) -> torch.Tensor:
        x = env[self.blob]
        return F.mse_loss(x, target.reshape(x.shape))


LOSSES = {
    "categoricalCrossEntropyLossLayer": CrossEntropyLoss,
    "meanSquaredErrorLossLayer": MeanSquaredErrorLoss,
}


# --- frozen-prefix cache settings -----------------------------------------------------------------
#: bytes the cached boundary activations may take (beyond it every mini-batch recomputes the
#: frozen prefix); ``MLPERSONAL_UPDATE_CACHE_BYTES`` overrides it, ``0`` turns the cache off
CACHE_BUDGET_BYTES = 1 << 30
#: examples per chunk while the frozen prefix runs over the training set
CACHE_CHUNK = 256
#: layer kinds whose rank-5 output row i depends on input row i only (classic layers treat the
#: axes before -3 as batch); ND-only kinds may address axis 0 and are recomputed instead
PER_EXAMPLE_KINDS = frozenset({
    "activation", "softmax", "convolution", "innerProduct", "embedding", "pooling", "batchnorm",
    "l2normalize", "lrn", "mvn", "flatten", "concat", "reshape", "permute", "split", "slice", "crop",
    "padding", "upsample", "resizeBilinear", "reduce", "unary", "scale", "bias", "add", "multiply",
    "max", "min", "average", "dot", "sequenceRepeat", "reorganizeData", "custom", "copy",
    "loadConstant", *RECURRENT_LAYER_KINDS,  # each example's sequence (and states) on its own
})


def cache_budget() -> int:
    """The frozen-prefix cache budget in bytes (0: off)."""
    v = os.environ.get("MLPERSONAL_UPDATE_CACHE_BYTES")
    try:
        return int(v) if v not in (None, "") else CACHE_BUDGET_BYTES
    except ValueError:
        return CACHE_BUDGET_BYTES


def _cacheable(step, layer, nd: bool) -> bool:
    """Can this frozen layer's output be computed once per example and reused every epoch?

    Batchnorm that computes its statistics from its input (``computeMeanVar`` without instance
    normalization) is kept out even though the runtime normalizes each example on its own: a
    batch-statistics reading of it must never be frozen into the cache. ND models train one
    example at a time, so every other ND layer is per-example by construction.
    """
    if step.kind == "batchnorm" and layer.batchnorm.computeMeanVar and not layer.batchnorm.instanceNormalization:
        return False
    return nd or step.kind in PER_EXAMPLE_KINDS


# --- the neural-network updater -----------------------------------------------------------------
class NeuralNetworkUpdater(Updater):
    """Backprop through the network into its updatable convolution/innerProduct weights."""

    def __init__(self, model):
        super().__init__(model)
        work = model.copy()
        work.path = None
        self.model = work
        self.net = work.net
        self.params = list(self.net.named_updatable().values())
        self.serial = any(step.kind in RECURRENT_LAYER_KINDS for step in self.net.steps)
        if not self.params:
            raise InvalidModelError(
                "the model is marked updatable but none of its layers is (no layer with "
                "isUpdatable convolution/innerProduct weights)"
            )
        up = work.nn_spec.updateParams
        if len(up.lossLayers) != 1:
            raise InvalidModelError(
                f"an updatable neural network needs exactly one loss layer, this one has {len(up.lossLayers)}"
            )
        which = up.lossLayers[0].WhichOneof("LossLayerType")
        if which not in LOSSES:
            raise InvalidModelError(f"loss layer kind {which!r} is not supported (use cross-entropy or MSE)")
        self.loss = LOSSES[which](work, getattr(up.lossLayers[0], which))
        self.optimizer_kind = up.optimizer.WhichOneof("OptimizerType")
        if self.optimizer_kind not in ("sgdOptimizer", "adamOptimizer"):
            raise InvalidModelError("the model's updateParams name no optimizer (sgdOptimizer or adamOptimizer)")
        self.plan = self._plan({self.loss.blob})
        self._dead = self._liveness(self.plan, keep=self.loss.blob)
        #: blobs the training plan computes and never reads (e.g. an LSTM's last cell state)
        self._unread = unread_blobs(self.plan, {self.loss.blob})
        self.target_name, self.target_mode = self._target()
        self.device = work.device
        self._opt: Optional[optimizers.SGD | optimizers.Adam] = None
        #: ND models: per-example losses through torch.func.vmap (checked in prepare) or a loop
        self._vmap = False
        #: ND models with a frozen-prefix cache: the layers after it run on the batch as they are
        self._batched_tail = False
        #: set by UpdateTask: a callable telling whether the task was cancelled
        self.cancelled: Callable[[], bool] = lambda: False
        #: the frozen-prefix cache in use: ``{"blobs": [...], "steps": n, "bytes": n}`` or None
        self.cache_info: Optional[dict] = None
        self.cached: Optional[dict] = None  # ND models: per-example boundary blobs, stacked
        #: rank-5 sequences of different lengths: each example's length when they train padded
        #: to one length per mini-batch (checked in prepare), else None (grouped by length)
        self.lengths: Optional[list[int]] = None

    # --- set-up ----------------------------------------------------------------------------
    def _plan(self, blobs, stop=frozenset()) -> list:
        """The layers ``blobs`` depend on, in spec order, not expanding past the ``stop`` blobs."""
        needed, plan = set(blobs) - set(stop), []
        for s in reversed(self.net.steps):
            if needed.intersection(s.outputs):
                plan.append(s)
                needed.update(b for b in s.inputs if b not in stop)
        return plan[::-1]

    @staticmethod
    def _liveness(plan: list, keep: Optional[str], outputs: frozenset = frozenset()) -> list:
        """Per step, the blobs no later step reads: dropped at once, so the allocator reuses
        their memory (keeping every blob alive made the forward pass ~3x slower on cpu).
        ``keep`` and ``outputs`` stay alive to the end."""
        last = {}
        for i, s in enumerate(plan):
            for b in s.inputs:
                last[b] = i
        dead: list = [[] for _ in plan]
        for b, i in last.items():
            if b != keep and b not in outputs:
                dead[i].append(b)
        return dead

    def _target(self) -> tuple[str, str]:
        work, d = self.model, self.model.spec.description
        names = [t.name for t in d.trainingInput]
        if isinstance(self.loss, MeanSquaredErrorLoss):
            return self.loss.target, "array"
        if work.is_classifier and (work._label_name in names or self.loss.target not in names):
            return work._label_name, "label"
        return self.loss.target, "index"

    def prepare(self, training_data, values: dict) -> None:
        if isinstance(training_data, (dict, str, bytes)) or not hasattr(training_data, "__iter__"):
            raise InvalidInputError("training_data must be a list of feature dicts (model inputs + target)")
        data = list(training_data)
        if not data:
            raise InvalidInputError("training_data is empty: give at least one example")
        for i, ex in enumerate(data):
            if not isinstance(ex, dict):
                raise InvalidInputError(f"training example {i} must be a dict of features, got {type(ex).__name__}")
            if self.target_name not in ex:
                raise InvalidInputError(
                    f"training example {i} has no target {self.target_name!r} (training inputs: "
                    f"{[t.name for t in self.model.spec.description.trainingInput] or self.model.input_names + [self.target_name]})"
                )
        from .features import encode_inputs

        feeds = encode_inputs(self.model._described()[0], data, self.device)
        self.n = len(data)
        # ND layers run one example at its declared shape; inputs given in mixed shapes (e.g.
        # sequences of different lengths) run one example at a time too
        batchable = not self.model.nd and not any(isinstance(v, list) for v in feeds.values())
        self.blobs = self._layout(self.model.to_blobs(feeds)) if batchable else None
        self.feeds = None if batchable else feeds  # per-example path only
        self.targets = self._encode_targets(data)
        if "learning_rate" not in values:
            raise InvalidModelError("the model's optimizer has no learningRate")
        self.seed = random.randrange(2**31) if values.get("seed") is None else None
        try:
            self._dry_run()
        except MLPersonalError:
            raise
        except (RuntimeError, IndexError, ValueError) as e:
            raise InvalidInputError(f"the training examples do not fit the model: {e}") from None
        self._cache_frozen_prefix()
        self._vmap = self.model.nd and self.blobs is None and self._vmap_agrees()
        self._batched_tail = self._vmap and self.cached is not None and self._batched_agrees()
        self.lengths = self._padding_agrees()
        if self.optimizer_kind == "sgdOptimizer":
            self._opt = optimizers.SGD(self.params, values["learning_rate"], values.get("momentum", 0.0))
        else:
            self._opt = optimizers.Adam(self.params, values["learning_rate"],
                                        (values.get("beta1", 0.9), values.get("beta2", 0.999)),
                                        values.get("eps", 1e-8))

    # --- frozen-prefix cache -----------------------------------------------------------------
    def _split(self) -> tuple[list, set]:
        """``(prefix steps, boundary blobs)``: the frozen layers whose outputs depend on model
        inputs only through frozen, per-example layers, and the blobs of that region (model
        inputs included) that the rest of the training plan reads."""
        layers = {l.name: l for l in self.model.nn_spec.layers}
        owners = self.net.updatable_layers
        cls = {b: "x" for b in self.model.input_names}  # x: batched and frozen; c: constant; t: trained
        for s in self.plan:
            kinds = {cls.get(b, "c") for b in s.inputs}
            if s.name in owners or "t" in kinds:
                c = "t"
            elif "x" not in kinds:
                c = "c"  # a constant (loadConstant, ...): recomputed, it costs nothing
            elif _cacheable(s, layers[s.name], self.model.nd):
                c = "x"
            else:
                c = "t"
            cls.update((b, c) for b in s.outputs)
        trained = [s for s in self.plan if cls[s.outputs[0]] == "t"]
        boundary = {b for s in trained for b in s.inputs if cls.get(b, "c") == "x"}
        if cls.get(self.loss.blob) == "x":
            boundary.add(self.loss.blob)
        prefix = self._plan(boundary) if boundary else []
        return [s for s in prefix if cls[s.outputs[0]] != "t"], boundary

    def _cache_frozen_prefix(self) -> None:
        """Run the frozen prefix once over every example and keep its boundary activations, so
        each mini-batch runs only the layers after them (exact: those layers see the very values
        they would have computed; no gradient flows into the prefix)."""
        budget = cache_budget()
        if budget <= 0:
            return
        prefix, boundary = self._split()
        if not prefix:
            return  # nothing frozen before the first trained layer
        downstream = self._plan({self.loss.blob}, stop=boundary)
        if not downstream:
            return
        steps, dead = self.plan, self._dead
        self.plan, self._dead = prefix, self._liveness(prefix, keep=None, outputs=boundary)
        try:
            with torch.no_grad():
                cache = self._cache_batched(boundary, budget) if self.blobs is not None \
                    else self._cache_per_example(boundary, budget)
        finally:
            self.plan, self._dead = steps, dead
        if cache is None:
            return
        if self.blobs is not None:
            self.blobs = cache
        elif not self.model.nd:  # inputs in mixed shapes, boundary blobs in one: batch them
            self.blobs, self.feeds = {b: t.flatten(0, 1) for b, t in cache.items()}, None
        else:
            self.cached, self.feeds = cache, None
        self.plan = downstream
        self._dead = self._liveness(downstream, keep=self.loss.blob)
        self.cache_info = {"blobs": sorted(boundary), "steps": len(prefix),
                           "bytes": sum(t.numel() * t.element_size() for t in cache.values())}

    def _cache_batched(self, boundary: set, budget: int) -> Optional[dict]:
        out: dict = {}
        n = self.n
        for s in range(0, n, CACHE_CHUNK):
            if self.cancelled():
                return None
            env = self._forward({k: v[s:s + CACHE_CHUNK] for k, v in self.blobs.items()})
            part = {b: env[b] for b in boundary}
            m = min(CACHE_CHUNK, n - s)
            if any(not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != m for t in part.values()):
                return None  # not one row per example: leave the plan as it is
            if not out:
                per = sum(t.numel() * t.element_size() for t in part.values()) / m
                if per * n > budget:
                    return None
                for b, t in part.items():
                    full = torch.empty((n, *t.shape[1:]), dtype=t.dtype, device=t.device)
                    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) \
                            and not t.is_contiguous():
                        full = full.contiguous(memory_format=torch.channels_last)
                    out[b] = full
            for b, t in part.items():
                out[b][s:s + m].copy_(t)
        return out

    def _cache_per_example(self, boundary: set, budget: int) -> Optional[dict]:
        if self.model.nd:
            out = self._cache_vmapped(boundary, budget)
            if out is not None:
                return out
        out: dict = {}
        for i in range(self.n):
            if self.cancelled():
                return None
            env = self._forward(self._example_blobs(i))
            part = {b: env[b] for b in boundary}
            if any(not isinstance(t, torch.Tensor) for t in part.values()):
                return None
            if not out:
                if sum(t.numel() * t.element_size() for t in part.values()) * self.n > budget:
                    return None
                out = {b: torch.empty((self.n, *t.shape), dtype=t.dtype, device=t.device) for b, t in part.items()}
            for b, t in part.items():
                if t.shape != out[b].shape[1:] or t.dtype != out[b].dtype:
                    return None  # shapes differ from example to example
                out[b][i].copy_(t)
        return out

    def _cache_vmapped(self, boundary: set, budget: int) -> Optional[dict]:
        """ND models: the frozen prefix over chunks of :data:`CACHE_CHUNK` examples in one
        ``torch.func.vmap`` pass each, or None (mixed shapes, a layer vmap cannot run, a result
        that differs from the example-by-example one on the first example: the loop runs)."""
        if self.feeds is None or any(type(v) is list for v in self.feeds.values()):
            return None
        out: dict = {}
        try:
            for start in range(0, self.n, CACHE_CHUNK):
                if self.cancelled():
                    return None
                ids = list(range(start, min(self.n, start + CACHE_CHUNK)))
                env = torch.func.vmap(self._forward)(self.model.to_blobs(gather_feeds(self.feeds, ids)))
                part = {b: env[b] for b in boundary}
                if not out:
                    per = sum(t[0].numel() * t.element_size() for t in part.values())
                    if per * self.n > budget:
                        return None
                    out = {b: torch.empty((self.n, *t.shape[1:]), dtype=t.dtype, device=t.device)
                           for b, t in part.items()}
                for b, t in part.items():
                    out[b][start:start + len(ids)].copy_(t)
        except Exception:  # noqa: BLE001 - anything vmap cannot run: the loop does
            return None
        first = self._forward(self._example_blobs(0))
        if not all(torch.allclose(out[b][0], first[b], rtol=1e-5, atol=1e-6) for b in boundary):
            return None
        return out

    def _encode_targets(self, data: list) -> torch.Tensor:
        name, mode = self.target_name, self.target_mode
        if mode == "label":
            labels = self.model.class_labels
            index = {lab: i for i, lab in enumerate(labels)}
            out = []
            for i, ex in enumerate(data):
                v = ex[name]
                v = v.item() if isinstance(v, (np.generic, torch.Tensor)) and np.size(v) == 1 else v
                if isinstance(v, (bytes, bytearray)):
                    v = v.decode()
                if isinstance(v, bool) or v not in index:
                    shown = labels if len(labels) <= 12 else labels[:12] + ["..."]
                    raise InvalidInputError(
                        f"training example {i}: unknown class label {v!r} for {name!r}; the model knows "
                        f"{shown}. A neural network classifier cannot learn new classes on device "
                        "(use a kNN classifier for that)"
                    )
                out.append(index[v])
            return torch.tensor(out, dtype=torch.int64, device=self.device)
        if mode == "index":
            out = []
            for i, ex in enumerate(data):
                arr = np.asarray(ex[name].detach().cpu() if isinstance(ex[name], torch.Tensor) else ex[name])
                if arr.size != 1 or not np.issubdtype(arr.dtype, np.number) or arr.reshape(-1)[0] != int(arr.reshape(-1)[0]):
                    raise InvalidInputError(
                        f"training example {i}: target {name!r} must be one integer class index, got {ex[name]!r}"
                    )
                out.append(int(arr.reshape(-1)[0]))
            t = torch.tensor(out, dtype=torch.int64, device=self.device)
            return t
        # array targets (MSE)
        fd = next((t for t in self.model.spec.description.trainingInput if t.name == name), None)
        shape = tuple(int(s) for s in fd.type.multiArrayType.shape) if fd is not None and \
            feature_kind(fd) == "multiArrayType" else None
        arrs = []
        for i, ex in enumerate(data):
            v = ex[name]
            try:
                arr = np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v, dtype=np.float32)
            except (TypeError, ValueError):
                raise InvalidInputError(f"training example {i}: target {name!r} is not numeric") from None
            if shape and arr.size != int(np.prod(shape)):
                raise InvalidInputError(
                    f"training example {i}: target {name!r} has shape {arr.shape}, the model expects {shape}"
                )
            if not np.isfinite(arr).all():
                raise InvalidInputError(f"training example {i}: target {name!r} contains NaN or Inf")
            arrs.append(arr.reshape(-1))
        if len({a.size for a in arrs}) > 1:
            raise InvalidInputError(f"training examples give target {name!r} in different sizes")
        return torch.from_numpy(np.stack(arrs)).to(self.device)

    def _layout(self, blobs: dict) -> dict:
        """Image-like blobs ``(N, C, H, W)`` in channels_last on cpu: torch's cpu convolution and
        max pooling run 1.4-1.8x faster on it (same values, a different memory order)."""
        if self.device.type != "cpu":
            return blobs
        return {k: (v.contiguous(memory_format=torch.channels_last)
                    if v.dim() == 4 and v.shape[-1] * v.shape[-2] > 1 else v) for k, v in blobs.items()}

    # --- training --------------------------------------------------------------------------
    def _forward(self, blobs: dict) -> dict:
        """Run the layers the loss needs; returns the live blobs (the loss input among them)."""
        env = dict(blobs)
        for s, dead in zip(self.plan, self._dead):
            r = s.fn(*[env[b] for b in s.inputs])
            if len(s.outputs) == 1:
                env[s.outputs[0]] = r
            else:
                env.update(zip(s.outputs, r))
            for b in dead:
                env.pop(b, None)
        return env

    def _dry_run(self) -> None:
        """Run the first examples once (no grad) to check shapes and targets before any step."""
        with torch.no_grad():
            if self.blobs is not None:
                env = self._forward({k: v[:2] for k, v in self.blobs.items()})
            else:
                env = self._forward(self._example_blobs(0))
            per_example = self.blobs is None and self.model.nd  # no batch axis
            if isinstance(self.loss, CrossEntropyLoss):
                c = self.loss.log_probs(env, per_example).shape[1]
                if self.model.is_classifier and c != len(self.model.class_labels):
                    raise InvalidModelError(
                        f"the softmax gives {c} values per example but the classifier has "
                        f"{len(self.model.class_labels)} labels"
                    )
                bad = ((self.targets < 0) | (self.targets >= c)).nonzero()
                if len(bad):
                    i = int(bad[0])
                    raise InvalidInputError(
                        f"training example {i}: class index {int(self.targets[i])} for "
                        f"{self.target_name!r} is outside 0..{c - 1}"
                    )
            else:
                per = env[self.loss.blob].numel() if per_example else env[self.loss.blob][0].numel()
                if per != self.targets.shape[1]:
                    raise InvalidInputError(
                        f"target {self.target_name!r} has {self.targets.shape[1]} values per example, "
                        f"the model's {self.loss.input!r} has {per}"
                    )
            self._batch_loss(slice(0, min(self.n, 2)))

    def _batch_loss(self, idx) -> torch.Tensor:
        """Mean loss over the examples ``idx`` (a slice or an index tensor)."""
        take = lambda t: t[idx]  # noqa: E731  (slices and index tensors keep channels_last)
        target = take(self.targets)
        if self.blobs is not None:
            env = self._forward({k: take(v) for k, v in self.blobs.items()})
            return self.loss(env, target)
        ids = range(self.n)[idx] if isinstance(idx, slice) else idx.tolist()
        if not self.model.nd and self.cached is None:
            if self.lengths is not None:
                return self._padded_loss(list(ids), target, self.lengths)
            return self._grouped_loss(list(ids), target)
        if self._batched_tail:  # the layers after the cache take the batch axis as they are
            index = torch.tensor(list(ids), device=self.device)
            return self.loss(self._forward({k: v[index] for k, v in self.cached.items()}), target)
        if self._vmap:
            return self._vmapped_loss(list(ids), target)
        # ND models (no batch axis): one example at a time
        total = 0.0
        for j, i in enumerate(ids):
            if self.cached is not None:
                env = self._forward({k: v[i] for k, v in self.cached.items()})
            else:
                env = self._forward(self._example_blobs(i))
            total = total + self.loss(env, target[j:j + 1], per_example=self.model.nd)
        return total / len(ids)

    def _vmapped_loss(self, ids: list, target: torch.Tensor) -> torch.Tensor:
        """ND models: the per-example losses of ``ids`` in one pass (``torch.func.vmap`` over the
        layers, which see one example without a batch axis, as in the loop), their mean."""
        if self.cached is not None:
            index = torch.tensor(ids, device=self.device)
            blobs = {k: v[index] for k, v in self.cached.items()}
        else:
            blobs = self.model.to_blobs(gather_feeds(self.feeds, ids))

        def one(example: dict, t: torch.Tensor) -> torch.Tensor:
            return self.loss(self._forward(example), t[None], per_example=True)

        return torch.func.vmap(one)(blobs, target).mean()

    def _vmap_agrees(self) -> bool:
        """Whether :meth:`_vmapped_loss` gives the example-by-example loss on the first examples
        (a layer that cannot run under vmap, or inputs in mixed shapes: keep the loop)."""
        if self.feeds is not None and any(type(v) is list for v in self.feeds.values()):
            return False
        idx = torch.arange(min(self.n, 3))
        with torch.no_grad():
            self._vmap = False
            ref = self._batch_loss(idx)
            try:
                self._vmap = True
                got = self._batch_loss(idx)
            except Exception:  # noqa: BLE001 - anything vmap cannot run: the loop does
                return False
            finally:
                self._vmap = False
        return bool(torch.allclose(got, ref, rtol=1e-5, atol=1e-6))

    def _batched_agrees(self) -> bool:
        """ND models with a frozen-prefix cache: whether the layers after it give, on a batch of
        cached examples with its batch axis, what they give one example at a time under vmap
        (the loss input and the loss on the first examples); then mini-batches skip vmap (head
        personalization after a cached encoder: ~0.3 ms of vmap per mini-batch)."""
        idx = torch.arange(min(self.n, 4))
        with torch.no_grad():
            try:
                blobs = {k: v[idx] for k, v in self.cached.items()}
                got = self._forward(blobs)[self.loss.blob]
                ref = torch.func.vmap(lambda ex: self._forward(ex)[self.loss.blob])(blobs)
                if got.shape != ref.shape or not torch.allclose(got, ref, rtol=1e-5, atol=1e-6):
                    return False
                self._batched_tail = True
                batched = self._batch_loss(idx)
                self._batched_tail = False
                return bool(torch.allclose(batched, self._batch_loss(idx), rtol=1e-5, atol=1e-6))
            except Exception:  # noqa: BLE001 - a layer that needs one example: keep vmap
                return False
            finally:
                self._batched_tail = False

    def _padding_agrees(self) -> Optional[list[int]]:
        """The examples' lengths when sequences of different lengths can train padded to one
        length per mini-batch: every layer the loss needs works step by step (``stepwise``) and
        the padded loss equals the grouped one on examples of distinct lengths; else None."""
        if self.model.nd or self.feeds is None:
            return None
        if not stepwise(self.plan, self.model.nn_spec.layers):
            return None
        lengths = example_lengths(self.feeds, {f.name for f in self.model._described()[0] if f.sequence})
        if lengths is None or len(set(lengths)) < 2:
            return None
        first = {}
        for i, n in enumerate(lengths):
            first.setdefault(n, i)
        ids = sorted(first.values())[:4]
        target = self.targets[ids]
        with torch.no_grad():
            ref = self._grouped_loss(ids, target)
            try:
                got = self._padded_loss(ids, target, lengths)
            except Exception:  # noqa: BLE001 - a layer that cannot run padded: keep the groups
                return None
        return lengths if bool(torch.allclose(got, ref, rtol=1e-5, atol=1e-6)) else None

    def _padded_loss(self, ids: list, target: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """Mean loss over sequences of different lengths run as one batch, padded at the end
        with zeros to the longest (recurrent layers stop each row at its own length)."""
        feeds = padded_feeds(self.feeds, ids, lengths)
        with sequence_lengths(torch.tensor([lengths[i] for i in ids]), self._unread):
            env = self._forward(self.model.to_blobs(feeds))
        return self.loss(env, target)

    def _grouped_loss(self, ids: list, target: torch.Tensor) -> torch.Tensor:
        """Mean loss over examples given in mixed shapes (e.g. sequences of different lengths):
        the examples of one shape run as one batch, the groups' means weighted by their sizes."""
        total = 0.0
        for js in shape_groups(self.feeds, ids):
            feeds = gather_feeds(self.feeds, [ids[j] for j in js])
            env = self._forward(self.model.to_blobs(feeds))
            total = total + self.loss(env, target[js]) * len(js)
        return total / len(ids)

    def _example_blobs(self, i: int) -> dict:
        """Example ``i``'s input blobs: without a batch axis for ND models, as a batch of one
        for rank-5 models given mixed shapes."""
        blobs = self.model.to_blobs(gather_feeds(self.feeds, [i]))
        return {k: t[0] for k, t in blobs.items()} if self.model.nd else blobs

    def _sync_hyperparameters(self, values: dict) -> None:
        opt = self._opt
        opt.lr = float(values["learning_rate"])
        if self.optimizer_kind == "sgdOptimizer":
            opt.momentum = float(values.get("momentum", 0.0))
        else:
            opt.betas = (float(values.get("beta1", 0.9)), float(values.get("beta2", 0.999)))
            opt.eps = float(values.get("eps", 1e-8))

    def mini_batches(self, epoch: int, values: dict) -> Iterator[float]:
        n = self.n
        perm = None
        if values.get("shuffle", False):
            seed = values.get("seed")
            seed = self.seed if seed is None else seed
            g = torch.Generator().manual_seed(int(seed) + int(epoch))
            perm = torch.randperm(n, generator=g).to(self.device)
        pos = 0
        while pos < n and not self.cancelled():
            bs = int(values.get("mini_batch_size") or n)
            idx = slice(pos, pos + bs) if perm is None else perm[pos:pos + bs]
            pos += bs
            self._sync_hyperparameters(values)
            loss = self._batch_loss(idx)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise TrainingError(
                    f"the loss became {value} at epoch {epoch} (examples {pos - bs}..{min(pos, n) - 1} "
                    "of the epoch's order); lower the learning rate or check the training data. "
                    "Nothing was written."
                )
            self._opt.zero_grad()
            loss.backward()
            self._opt.step()
            yield value

    def result(self) -> CompiledModel:
        for p in self.params:
            p.grad = None
        self.net.write_back()
        return self.model
