"""NeuralNetwork / NeuralNetworkClassifier / NeuralNetworkRegressor models."""

from __future__ import annotations

import math
import threading
from typing import Any, Optional

import numpy as np
import torch

from mlpersonal.errors import InvalidInputError, InvalidModelError
from mlpersonal.validate import RECURRENT_LAYER_KINDS

from .batch import ArrayBatchProvider, DictionaryColumn
from .features import (BGR, GRAYSCALE, array_shape, decode_outputs, describe, example_lengths,
                       feature_kind, gather_feeds, padded_feeds, pixel_batch, plain_arrays,
                       plain_pixels, sequence_steps, shape_groups)
from .layers.recurrent import sequence_lengths, stepwise
from .model import CompiledModel, register_model_kind
from .network import Network, unread_blobs

EXACT_ARRAY_MAPPING = 1
RANK4_IMAGE_MAPPING = 1
#: a batch of sequences in this many different lengths or more runs padded to one length in one
#: eager pass instead of one plan run per length (64 windows of 30 lengths: see README)
PAD_MIN_LENGTHS = 3


def _row(out: dict[str, Any], j: int) -> dict[str, Any]:
    """Example ``j`` of batched outputs, keeping a batch axis of one."""
    return {k: v[j:j + 1] if isinstance(v, (torch.Tensor, np.ndarray)) else [v[j]] for k, v in out.items()}


@register_model_kind("neuralNetwork", "neuralNetworkClassifier", "neuralNetworkRegressor")
class NeuralNetworkModel(CompiledModel):
    """A compiled neural network; its :attr:`net` is a ``torch.nn.Module`` over named blobs."""

    def __init__(self, spec, device, **kw):
        super().__init__(spec, device, **kw)
        self.kind = spec.WhichOneof("Type")
        self.nn_spec = getattr(spec, self.kind)
        self.nd = int(self.nn_spec.arrayInputShapeMapping) == EXACT_ARRAY_MAPPING
        from .custom import CUSTOM_LAYERS  # registry of custom layer implementations

        inputs = [f.name for f in spec.description.input]
        self.net = Network(self.nn_spec.layers, inputs=inputs, nd=self.nd, device=device,
                           custom_layers=CUSTOM_LAYERS)
        self._preprocess = self._compile_preprocessing()
        self.is_classifier = self.kind == "neuralNetworkClassifier"
        if self.is_classifier:
            self._setup_classifier()
        for fd in spec.description.output:
            if self.is_classifier and fd.name in (self._label_name, self._probs_name):
                continue
            if fd.name not in self.net.blobs:
                raise InvalidModelError(
                    f"output {fd.name!r} is not produced by any layer of the network"
                )
        # ND models run one example at a time at its declared shape; batches go through vmap.
        self._rank4_images = int(self.nn_spec.imageInputShapeMapping) == RANK4_IMAGE_MAPPING
        self._inputs = describe(spec.description.input)
        if not self.nd:  # rank-5 networks also take (Seq, 1, C) sequences for a (C,) input
            for f in self._inputs:
                f.sequence = f.kind == "multiArrayType" and len(f.shape) == 1
        self._io = (self._inputs, describe(spec.description.output))
        self._token_inputs = _token_inputs(self.nn_spec, inputs)
        self._outputs_cache = None  # see _output_plan
        self._plan = None  # runtime.plan.InferencePlan, made on the first CPU prediction
        self._graphs = None  # runtime.cuda_graphs.CudaGraphPlan, made on the first CUDA prediction
        self._plan_lock = threading.Lock()
        self._plain = None  # see _plain_io
        self._stepwise: Optional[bool] = None  # see _pad_lengths

    # --- set-up ----------------------------------------------------------------------------
    def _setup_classifier(self):
        d = self.spec.description
        self._label_name = d.predictedFeatureName or "classLabel"
        self._probs_name = d.predictedProbabilitiesName
        which = self.nn_spec.WhichOneof("ClassLabels")
        if which is None:
            raise InvalidModelError("classifier has no class labels (stringClassLabels/int64ClassLabels)")
        self.class_labels = list(getattr(self.nn_spec, which).vector)
        if self.nn_spec.labelProbabilityLayerName:
            self._probs_blob = self.nn_spec.labelProbabilityLayerName
        elif self._probs_name and self._probs_name in self.net.blobs:
            self._probs_blob = self._probs_name
        elif self.net.steps:
            self._probs_blob = self.net.steps[-1].outputs[0]
        else:
            raise InvalidModelError("classifier network has no layers")
        if self._probs_blob not in self.net.blobs:
            raise InvalidModelError(f"probability blob {self._probs_blob!r} is not produced by the network")

    def _compile_preprocessing(self):
        steps = {}
        for pp in self.nn_spec.preprocessing:
            name = pp.featureName or (self.spec.description.input[0].name if self.spec.description.input else "")
            fd = next((f for f in self.spec.description.input if f.name == name), None)
            if fd is None:
                raise InvalidModelError(f"preprocessing names input {name!r}, which the model lacks")
            which = pp.WhichOneof("preprocessor")
            if which == "scaler":
                s = pp.scaler
                space = int(fd.type.imageType.colorSpace) if feature_kind(fd) == "imageType" else GRAYSCALE
                if space == GRAYSCALE:
                    bias = [s.grayBias]
                elif space == BGR:
                    bias = [s.blueBias, s.greenBias, s.redBias]
                else:
                    bias = [s.redBias, s.greenBias, s.blueBias]
                scale = float(s.channelScale) if s.channelScale != 0 else 1.0
                b = torch.tensor(bias, dtype=torch.float32, device=self.device).reshape(-1, 1, 1)
                steps[name] = (lambda x, scale=scale, b=b: x * scale + b)
            elif which == "meanImage":
                mean = torch.tensor(np.asarray(pp.meanImage.meanImage, dtype=np.float32), device=self.device)
                steps[name] = (lambda x, mean=mean: x - mean.reshape(x.shape[1:]))
        return steps

    # --- update ----------------------------------------------------------------------------
    def make_updater(self):
        """A :class:`runtime.update.NeuralNetworkUpdater` training a private copy of this model."""
        from .update import NeuralNetworkUpdater

        return NeuralNetworkUpdater(self)

    # --- running ---------------------------------------------------------------------------
    def to_blobs(self, feeds: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Model inputs (user layout) -> network input blobs, preprocessing applied."""
        return self.preprocess(self.layout(feeds))

    def preprocess(self, blobs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Apply the spec's image preprocessing (scaler / mean image) to laid-out input blobs."""
        if not self._preprocess:
            return blobs
        pre = self._preprocess
        return {k: (pre[k](v) if k in pre else v) for k, v in blobs.items()}

    def layout(self, feeds: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Model inputs (user layout) -> network input blobs (internal layout), no preprocessing.

        Rank-5 mode: ``(B, C, H, W)`` blobs. ND mode: ``(B, *per-example blob)`` where the
        per-example blob has the declared shape (images: ``[1, C, H, W]`` or ``[1, 1, C, H, W]``).
        """
        blobs = {}
        for f in self._inputs:
            x = feeds[f.name]
            kind = f.kind
            if kind == "multiArrayType":
                if not self.nd:
                    if x.dim() == 2:
                        x = x.reshape(x.shape[0], x.shape[1], 1, 1)
                    elif f.sequence and x.dim() == 4:  # [B, Seq, 1, C]: vectors in sequence
                        x = x.reshape(x.shape[0], x.shape[1], x.shape[3], 1, 1)
                    elif x.dim() == 6:  # [B, Seq, 1, C, H, W] from a rank-5 declared shape
                        x = x.reshape(x.shape[0], x.shape[1], *x.shape[-3:])
                    elif x.dim() != 4:
                        x = x.reshape(x.shape[0], -1, 1, 1)
                    if x.dim() == 5 and x.shape[1] == 1:  # a sequence of one is no sequence
                        x = x.reshape(x.shape[0], *x.shape[2:])
            elif kind == "imageType":
                if self.nd:
                    x = x.reshape(x.shape[0], *([1] if self._rank4_images else [1, 1]), *x.shape[1:])
            elif kind in ("int64Type", "doubleType"):
                x = x.to(torch.float32).reshape(-1, 1, 1, 1) if not self.nd else x.to(torch.float32).reshape(-1, 1)
            else:
                continue  # strings / dictionaries never reach the layers
            blobs[f.name] = x
        return blobs

    def _output_plan(self) -> list:
        """Per non-classifier output: (name, declared multi-array shape or (), its size)."""
        if self._outputs_cache is None:
            plan = []
            for fd in self.spec.description.output:
                if self.is_classifier and fd.name in (self._label_name, self._probs_name):
                    continue
                declared = array_shape(fd) if feature_kind(fd) == "multiArrayType" else ()
                plan.append((fd.name, declared, int(np.prod(declared)) if declared else 0))
            self._outputs_cache = plan
        return self._outputs_cache

    def from_blobs(self, env: dict[str, torch.Tensor], n: int) -> dict[str, Any]:
        """Network blobs (tensors, or numpy arrays from the plan) -> model outputs (user layout)."""
        out: dict[str, Any] = {}
        for name, declared, size in self._outputs_cache or self._output_plan():
            t = env[name]
            if type(t) is np.ndarray:
                t = torch.from_numpy(t)
            if not self.nd:
                per = math.prod(t.shape[1:]) if t.dim() else 1
                if declared and size == per:
                    t = t.reshape(n, *declared)
                elif t.dim() == 4 and t.shape[-1] == 1 and t.shape[-2] == 1:
                    t = t.reshape(n, -1)
                elif t.dim() == 5 and t.shape[-2:] == (1, 1) and len(declared) <= 1:
                    t = t.reshape(n, t.shape[1], 1, t.shape[2])  # vectors in sequence: (Seq, 1, C)
            out[name] = t
        if self.is_classifier:
            out[self._label_name], probs = self._classify(env, n)
            if self._probs_name:
                out[self._probs_name] = probs
        return out

    def _classify(self, env: dict[str, Any], n: int) -> tuple[list, DictionaryColumn]:
        """(predicted labels, class probabilities) from the probability blob in ``env``."""
        probs = env[self._probs_blob]
        if type(probs) is np.ndarray:
            p = probs
        elif probs.dtype is torch.float32 and probs.is_cpu and not probs.requires_grad:
            p = probs.numpy()  # float32 .tolist() gives the same python floats as float64's
        else:
            p = probs.detach().cpu().double().numpy()
        p = p.reshape(n, -1)
        labels = self.class_labels
        if p.shape[1] != len(labels):
            raise InvalidModelError(
                f"classifier has {len(labels)} labels but its probability blob "
                f"{self._probs_blob!r} has {p.shape[1]} values"
            )
        return list(map(labels.__getitem__, p.argmax(axis=1).tolist())), DictionaryColumn(labels, p)

    # --- the common case in few steps ------------------------------------------------------
    def predict_batch(self, batch):
        """See :meth:`CompiledModel.predict_batch`. Plain examples (float32 numpy arrays of the
        declared shapes, finite; uint8 pixel arrays for images; as a list of dicts or as
        columns) with an inference plan ready for them skip the generic feature encoding and
        decoding: same outputs, about half the Python work of a batch-1 call."""
        if self._plan is not None:
            columns = isinstance(batch, ArrayBatchProvider)
            if columns or type(batch) is list:
                out = self._predict_plain(batch, columns)
                if out is not None:
                    return out
        return super().predict_batch(batch)

    def _plain_io(self):
        """``(inputs, labels_only)`` when every input is a required image or multi-array of
        rank 1 or 3 that the network takes as it is (rank-5 mode): ``inputs`` = [Feature],
        ``labels_only``: a classifier's output names (in the description's order) when they are
        its label and maybe its probabilities, else None; False when inputs are not plain."""
        if self._plain is None:
            ok = not self.nd and all(not f.optional and (f.kind == "imageType" or (
                f.kind == "multiArrayType" and len(f.shape) in (1, 3))) for f in self._inputs)
            names = [f.name for f in self.spec.description.output]
            labels_only = (self.is_classifier and self._label_name in names
                           and set(names) <= {self._label_name, self._probs_name})
            self._plain = (list(self._inputs), tuple(names) if labels_only else None) if ok else False
        return self._plain

    def _predict_plain(self, batch, columns: bool):
        """Outputs for ``batch`` through a ready plan, or None (the generic path then runs, and
        converts values or says what is wrong with which example)."""
        io = self._plain or self._plain_io()
        if not io or not self.use_plan or self.low_precision:
            return None
        if not columns and not all([type(ex) is dict for ex in batch]):
            return None
        n, blobs = len(batch), {}
        for f in io[0]:
            name, shape = f.name, f.shape
            if columns:
                a = batch.columns.get(name)
                if type(a) is not np.ndarray:
                    return None
            else:
                try:
                    a = [ex[name] for ex in batch]
                except KeyError:
                    return None
            if f.kind == "imageType":  # uint8 pixels at a size the model takes; no NaN possible
                a = pixel_batch(f.fd, a) if columns else plain_pixels(f.fd, a)
                if a is None:
                    return None
                blobs[name] = a
                continue
            steps = 1
            if columns:
                if a.dtype != np.float32:
                    return None
                if a.shape[1:] != shape:
                    steps = f.sequence and sequence_steps(a.shape[1:], shape)
                    if not steps:
                        return None
                a = np.ascontiguousarray(a)
            else:
                first = a[0]
                if type(first) is not np.ndarray:
                    return None
                if first.shape != shape:
                    steps = f.sequence and sequence_steps(first.shape, shape)
                a = plain_arrays(a, first.shape) if steps else None
            if a is None or not np.isfinite(a).all():
                return None
            if name in self._token_inputs:
                self._check_ids({name: a})
            if steps > 1:  # (B, Seq, C, 1, 1), as layout() does
                blobs[name] = a.reshape(n, steps, -1, 1, 1)
            else:
                blobs[name] = a if len(shape) == 3 else a.reshape(n, -1, 1, 1)  # as layout() does
        env = self._plan.run(blobs, n, build=False)
        if env is None:
            return None
        names = io[1]
        if names is None:
            return decode_outputs(self._described()[1], self.from_blobs(env, n), n, columns)
        labels, probs = self._classify(env, n)
        if columns:
            got = {self._label_name: labels, self._probs_name: probs}
            return ArrayBatchProvider._of({k: got[k] for k in names}, n)
        if len(names) == 1:
            return [{names[0]: lab} for lab in labels]
        first, second = names
        if first == self._label_name:
            return [{first: lab, second: p} for lab, p in zip(labels, probs.tolist())]
        return [{first: p, second: lab} for lab, p in zip(labels, probs.tolist())]

    def _check_ids(self, feeds: dict[str, Any]) -> None:
        """Token ids an embedding layer reads must be whole numbers inside its vocabulary."""
        for name, (vocab, layer) in self._token_inputs.items():
            v = feeds.get(name)
            for i, t in enumerate(v if type(v) is list else [v]):
                if t is None:
                    continue
                t = torch.as_tensor(t)
                if t.numel() and (bool((t != t.floor()).any()) or float(t.min()) < 0 or float(t.max()) >= vocab):
                    raise InvalidInputError(
                        f"feature {name!r} holds token ids outside 0..{vocab - 1} or not whole numbers "
                        f"(min {float(t.min()):g}, max {float(t.max()):g}); layer {layer!r} looks them "
                        f"up in a vocabulary of {vocab}: map unknown tokens to an id it has")

    def forward(self, feeds: dict[str, Any], n: int) -> dict[str, Any]:
        if self._token_inputs:
            self._check_ids(feeds)
        for v in feeds.values():
            if type(v) is list and v and isinstance(v[0], torch.Tensor):
                return self._forward_each(feeds, n)  # mixed flexible shapes
        blobs = self.layout(feeds)  # the plan applies the preprocessing itself
        plan = self._plan if self._plan is not None and self.use_plan else self.inference_plan()
        env = plan.run(blobs, n) if plan is not None and not torch.is_grad_enabled() else None
        if env is None and self.device.type == "cuda" and torch.is_inference_mode_enabled():
            graphs = self._graphs or self.cuda_graphs()
            env = graphs.run(blobs, n) if graphs is not None else None
        if env is None:
            env = self.run_blobs(self.preprocess(blobs), n)
        return self.from_blobs(env, n)

    def forward_ready(self, feeds: dict[str, Any], n: int) -> Optional[dict[str, Any]]:
        """The outputs when an inference plan session is ready for these inputs, else None. No
        torch op runs, so no autograd/inference-mode set-up is needed around it."""
        plan = self._plan
        if plan is None or not self.use_plan or self.low_precision:
            return None
        for v in feeds.values():
            if type(v) is list:
                return None
        if self._token_inputs:
            self._check_ids(feeds)
        env = plan.run(self.layout(feeds), n, build=False)
        return None if env is None else self.from_blobs(env, n)

    #: predict through runtime.plan (onnxruntime) on the CPU, runtime.cuda_graphs on cuda;
    #: False: always the eager Network
    use_plan = True

    def _pad_lengths(self, feeds: dict[str, Any]) -> Optional[list[int]]:
        """Each example's length when these inputs are sequences in :data:`PAD_MIN_LENGTHS` or
        more lengths and every layer works step by step (:func:`stepwise`), else None."""
        if self.nd:
            return None
        if self._stepwise is None:
            self._stepwise = stepwise(self.net.steps, self.nn_spec.layers)
        if not self._stepwise:
            return None
        lengths = example_lengths(feeds, {f.name for f in self._inputs if f.sequence})
        return lengths if lengths is not None and len(set(lengths)) >= PAD_MIN_LENGTHS else None

    def _forward_padded(self, feeds: dict[str, Any], lengths: list[int], n: int) -> list[dict]:
        """Per example, its outputs: the sequences padded at the end to the longest, one pass of
        the eager Network with the rows' lengths (recurrent layers stop each row at its last
        step, torch's fused LSTM where the cell state is not an output), each row's sequence
        blobs cut back to its length."""
        blobs = self.preprocess(self.layout(padded_feeds(feeds, range(n), lengths)))
        outputs = {f.name for f in self.spec.description.output} | {getattr(self, "_probs_blob", None)}
        with sequence_lengths(torch.tensor(lengths), unread_blobs(self.net.steps, outputs)):
            env = self.run_blobs(blobs, n)
        keep = {name for name, _, _ in self._outputs_cache or self._output_plan()}
        if self.is_classifier:
            keep.add(self._probs_blob)
        if all(env[k].dim() < 5 for k in keep):  # no sequence outputs: decoded at once
            out = self.from_blobs({k: env[k] for k in keep}, n)
            return [_row(out, j) for j in range(n)]
        parts = []
        for i, length in enumerate(lengths):
            row = {}
            for k in keep:
                v = env[k][i:i + 1]
                if v.dim() == 5:  # (1, Seq, C, H, W): this row's steps; a sequence of one is none
                    v = v[:, :length] if length > 1 else v[:, 0]
                row[k] = v
            parts.append(_row(self.from_blobs(row, 1), 0))
        return parts

    def inference_plan(self):
        """The :class:`runtime.plan.InferencePlan` predictions use, or None (eager Network).

        Only on the CPU without low-precision autocast; training always uses :attr:`net`.
        """
        if not self.use_plan or self.device.type != "cpu" or self.low_precision:
            return None
        if self._plan is None:
            with self._plan_lock:
                if self._plan is None:
                    from .plan import InferencePlan

                    if not InferencePlan.available():
                        self.use_plan = False
                        return None
                    self._plan = InferencePlan(
                        self._preprocessed_env, self._plan_outputs(), list(self.net.params.values()),
                        sequences=frozenset(f.name for f in self._inputs if f.sequence),
                        recurrent=any(s.kind in RECURRENT_LAYER_KINDS for s in self.net.steps))
        return self._plan

    def cuda_graphs(self):
        """The :class:`runtime.cuda_graphs.CudaGraphPlan` predictions on cuda use (float16
        autocast included: captured under it), or None (the eager Network: other devices,
        custom layers, whose Python would run only at capture)."""
        if not self.use_plan or self.device.type != "cuda" or any(
                s.kind == "custom" for s in self.net.steps):
            return None
        if self._graphs is None:
            from .cuda_graphs import CudaGraphPlan

            self._graphs = CudaGraphPlan(self._preprocessed_env, self._plan_outputs())
        return self._graphs

    def _plan_outputs(self) -> list[str]:
        """The blobs a plan hands back: the non-classifier outputs and the probability blob."""
        wanted = [f.name for f in self.spec.description.output
                  if not (self.is_classifier and f.name in (self._label_name, self._probs_name))]
        if self.is_classifier and self._probs_blob not in wanted:
            wanted.append(self._probs_blob)
        return wanted

    def _preprocessed_env(self, blobs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Preprocessing + the Network, traced together so no torch op runs beside the plan."""
        return self._batched_env(self.preprocess(blobs))

    def _batched_env(self, blobs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The Network over batched blobs in one traceable call (ND models: vmap)."""
        return torch.func.vmap(self.net)(blobs) if self.nd else self.net(blobs)

    def run_blobs(self, blobs: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
        """Run the network on batched input blobs; every returned blob has a leading batch axis.

        Rank-5 layers see the whole batch; ND layers see one example at its declared shape
        (``torch.func.vmap`` over the batch, or a loop when an op cannot be vmapped).
        """
        if not self.nd:
            return self.net(blobs)
        if n == 1:
            env = self.net({k: v[0] for k, v in blobs.items()})
            return {k: v.unsqueeze(0) for k, v in env.items()}
        try:
            return torch.func.vmap(self.net)(blobs)
        except Exception:  # noqa: BLE001 - an op without a batching rule: loop instead
            parts = [self.net({k: v[i] for k, v in blobs.items()}) for i in range(n)]
            return {k: torch.stack([p[k] for p in parts]) for k in parts[0]}

    def _forward_each(self, feeds: dict[str, Any], n: int) -> dict[str, Any]:
        """Examples in mixed shapes (flexible sizes, sequences of different lengths): sequences
        in :data:`PAD_MIN_LENGTHS` or more lengths run padded to one length in one pass of the
        Network (:meth:`_forward_padded`); otherwise the examples of each shape run as one batch
        (through the plan where it serves). Outputs come back in the examples' order."""
        lengths = self._pad_lengths(feeds)
        if lengths is not None:
            parts = self._forward_padded(feeds, lengths, n)
        else:
            parts = [None] * n
            for members in shape_groups(feeds, range(n)):
                out = self.forward(gather_feeds(feeds, members), len(members))
                for j, i in enumerate(members):
                    parts[i] = _row(out, j)
        merged: dict[str, Any] = {}
        for k in parts[0]:
            vals = [p[k] for p in parts]
            same = len({tuple(getattr(v, "shape", ())) for v in vals}) == 1
            if isinstance(vals[0], torch.Tensor) and same:
                merged[k] = torch.cat(vals)
            elif isinstance(vals[0], np.ndarray) and same:
                merged[k] = np.concatenate(vals)
            else:
                merged[k] = [v[0] for v in vals]
        return merged


#: layers that pass token ids on unchanged (an embedding's input made from a model input)
_ID_PASSING = frozenset({"expandDims", "squeeze", "reshapeStatic", "rankPreservingReshape",
                         "flattenTo2D", "reshape", "flatten"})


def _token_inputs(nn_spec, inputs: list[str]) -> dict[str, tuple[int, str]]:
    """Model inputs an embedding / embeddingND layer reads (through reshapes):
    name -> (vocabulary size, layer name), the smallest vocabulary when several read one."""
    producer = {o: layer for layer in nn_spec.layers for o in layer.output}
    found: dict[str, tuple[int, str]] = {}
    for layer in nn_spec.layers:
        kind = layer.WhichOneof("layer")
        if kind not in ("embedding", "embeddingND") or not layer.input:
            continue
        vocab = int(layer.embedding.inputDim if kind == "embedding" else layer.embeddingND.vocabSize)
        blob = layer.input[0]
        while blob in producer and producer[blob].WhichOneof("layer") in _ID_PASSING:
            blob = producer[blob].input[0]
        if blob in inputs and (blob not in found or vocab < found[blob][0]):
            found[blob] = (vocab, layer.name)
    return found
