"""k-nearest-neighbors classifier models (``kNearestNeighborsClassifier``) and their updater.

Prediction semantics (documented, deterministic):

* Distance: squared Euclidean. Candidates come from one batched matmul,
  ``||s||^2 - 2 q.S^T``, then the best ``k + REFINE_EXTRA`` candidates are re-scored directly as
  ``sum((q - s)^2)`` (float32 differences summed in float64 where the device has it), so the
  ordering does not suffer from the expansion's cancellation error and exact matches get 0.
* Neighbors: the ``k`` smallest distances; equal distances are ordered by the lower sample index.
  With fewer than ``k`` stored samples, all of them are used.
* Votes: ``uniform`` gives each neighbor 1; ``inverse_distance`` gives ``1 / d`` with ``d`` the
  Euclidean distance (the square root of the squared distance; the same as scikit-learn's
  ``weights="distance"``, which coremltools maps to ``inverseDistanceWeighting``). When some
  neighbors are at distance exactly 0 (an exact match), only those vote, with weight 1 each.
* Label: the largest vote total; among equal totals, the label of the nearest neighbor holding
  one of the tied labels. Probabilities: vote totals divided by their sum, one entry per label
  stored in the model (0 for labels without votes).
* Empty model: the default label (``defaultStringLabel`` / ``defaultInt64Label``) and an empty
  probabilities dictionary.
* ``singleKdTreeIndex`` specs run the same exact linear scan (a kd-tree only changes speed).

Updating appends the training examples (new labels allowed) and can set ``number_of_neighbors``
within the range/set the model allows; the result stays updatable.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from mlpersonal.errors import InvalidInputError, InvalidModelError
from mlpersonal.proto import Model_pb2

from .features import array_shape, feature_kind
from .model import CompiledModel, register_model_kind
from .updating import Updater

#: candidates re-scored exactly beyond the k nearest
REFINE_EXTRA = 8
#: distance-matrix elements computed per chunk of queries (bounds memory for large indexes)
CHUNK_ELEMENTS = 1 << 23


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


@register_model_kind("kNearestNeighborsClassifier")
class KNNModel(CompiledModel):
    """A kNN classifier: samples kept as one contiguous float32 tensor with cached squared norms."""

    def __init__(self, spec, device, **kw):
        super().__init__(spec, device, **kw)
        knn = spec.kNearestNeighborsClassifier
        idx = knn.nearestNeighborsIndex
        self.dims = int(idx.numberOfDimensions)
        if self.dims <= 0:
            raise InvalidModelError("kNN model: nearestNeighborsIndex.numberOfDimensions must be > 0")
        dist = idx.WhichOneof("DistanceFunction")
        if dist not in (None, "squaredEuclideanDistance"):
            raise InvalidModelError(f"kNN model: unsupported distance function {dist!r}")
        if knn.numberOfNeighbors.defaultValue <= 0:
            raise InvalidModelError("kNN model: numberOfNeighbors.defaultValue must be a positive integer")
        self.k = int(knn.numberOfNeighbors.defaultValue)
        self.inverse_distance = knn.WhichOneof("WeightingScheme") == "inverseDistanceWeighting"
        which = knn.WhichOneof("ClassLabels")
        default = knn.WhichOneof("DefaultClassLabel")
        if which is None and default is None:
            raise InvalidModelError("kNN model has neither class labels nor a default label")
        if which is not None and default is not None and (which == "int64ClassLabels") != (default == "defaultInt64Label"):
            raise InvalidModelError("kNN model: the class labels and the default label have different types")
        self.int_labels = (which == "int64ClassLabels") if which is not None else default == "defaultInt64Label"
        self.default_label = (knn.defaultInt64Label if self.int_labels else knn.defaultStringLabel) \
            if default is not None else None

        d = spec.description
        if len(d.input) != 1:
            raise InvalidModelError(f"kNN model must have exactly one input, found {len(d.input)}")
        self.input_name = d.input[0].name
        self.label_name = d.predictedFeatureName or (d.output[0].name if d.output else "label")
        self.probs_name = d.predictedProbabilitiesName or next(
            (f.name for f in d.output if f.name != self.label_name
             and f.type.WhichOneof("Type") == "dictionaryType"), "")
        self.refine_dtype = torch.float32 if device.type == "mps" else torch.float64
        self._load_index()

    # --- the index -------------------------------------------------------------------------
    def _load_index(self) -> None:
        knn = self.spec.kNearestNeighborsClassifier
        samples = knn.nearestNeighborsIndex.floatSamples
        labels = list(knn.int64ClassLabels.vector if self.int_labels else knn.stringClassLabels.vector)
        if len(samples) != len(labels):
            raise InvalidModelError(
                f"kNN model has {len(samples)} samples but {len(labels)} labels; it needs one per sample"
            )
        if samples:
            arr = np.array([s.vector for s in samples], dtype=np.float32)
            if arr.ndim != 2 or arr.shape[1] != self.dims:
                bad = next(i for i, s in enumerate(samples) if len(s.vector) != self.dims)
                raise InvalidModelError(
                    f"kNN model: sample {bad} has {len(samples[bad].vector)} values, expected {self.dims}"
                )
        else:
            arr = np.zeros((0, self.dims), np.float32)
        self.classes: list = []
        self._class_ids: dict = {}
        self._samples = torch.from_numpy(arr).to(self.device).contiguous()
        self._sq = (self._samples * self._samples).sum(1)
        self._label_ids = torch.tensor(self._ids_for(labels), dtype=torch.int64, device=self.device)

    def _ids_for(self, labels: Sequence) -> list[int]:
        out = []
        for lab in labels:
            i = self._class_ids.get(lab)
            if i is None:
                i = self._class_ids[lab] = len(self.classes)
                self.classes.append(lab)
            out.append(i)
        return out

    @property
    def num_samples(self) -> int:
        return int(self._samples.shape[0])

    def add_samples(self, samples: np.ndarray, labels: Sequence) -> None:
        """Append validated ``samples`` (n x dims float32) and ``labels`` to the spec and the index."""
        knn = self.spec.kNearestNeighborsClassifier
        store = knn.nearestNeighborsIndex.floatSamples
        for row in samples:
            store.add().vector.extend(row.tolist())
        if self.int_labels:
            knn.int64ClassLabels.vector.extend(int(v) for v in labels)
        else:
            knn.stringClassLabels.vector.extend(labels)
        new = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32)).to(self.device)
        self._samples = torch.cat([self._samples, new]).contiguous()
        self._sq = torch.cat([self._sq, (new * new).sum(1)])
        ids = torch.tensor(self._ids_for(labels), dtype=torch.int64, device=self.device)
        self._label_ids = torch.cat([self._label_ids, ids])

    def set_number_of_neighbors(self, k: int) -> None:
        self.k = int(k)
        self.spec.kNearestNeighborsClassifier.numberOfNeighbors.defaultValue = self.k

    # --- search ------------------------------------------------------------------------------
    def kneighbors(self, queries: torch.Tensor, k: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(squared distances, sample indices)``, each ``(B, min(k, N))``, nearest first."""
        k = min(self.k if k is None else int(k), self.num_samples)
        q = queries.reshape(queries.shape[0], -1).to(device=self.device, dtype=torch.float32)
        if k == 0:
            empty = torch.zeros((q.shape[0], 0), device=self.device)
            return empty.to(self.refine_dtype), empty.to(torch.int64)
        n = self.num_samples
        m = min(n, k + REFINE_EXTRA)
        rows = max(1, CHUNK_ELEMENTS // n)
        dists, idxs = [], []
        st = self._samples.t()
        for start in range(0, q.shape[0], rows):
            qc = q[start:start + rows]
            approx = torch.addmm(self._sq, qc, st, beta=1.0, alpha=-2.0)  # ||s||^2 - 2 q.s
            cand = approx.topk(m, dim=1, largest=False, sorted=False).indices
            d, i = self._refine(qc, cand.sort(dim=1).values)
            if m < n:
                # equal distances may reach past the candidates: redo those rows over all samples
                tie = d[:, k - 1] == d[:, m - 1]
                if bool(tie.any()):
                    d, i = d[:, :k].clone(), i[:, :k].clone()
                    for r in tie.nonzero().flatten().tolist():
                        d[r], i[r] = self._exact_row(qc[r], k)
            dists.append(d[:, :k])
            idxs.append(i[:, :k])
        return torch.cat(dists), torch.cat(idxs)

    def _exact_row(self, q: torch.Tensor, k: int, block: int = 8192):
        """Exact k nearest of one query over all samples (rare: ties past the candidates)."""
        d = torch.cat([(self._samples[s:s + block] - q).square_().sum(1, dtype=self.refine_dtype)
                       for s in range(0, self.num_samples, block)])
        d, order = d.sort(stable=True)
        return d[:k], order[:k]

    def _refine(self, q: torch.Tensor, cand: torch.Tensor):
        """Exact distances to candidate indices (ascending index order), sorted stably."""
        g = self._samples[cand]  # (b, m, D) float32; differences need no expansion, so
        g.sub_(q.unsqueeze(1))  # float32 terms summed in float64 give ~1e-7 relative error
        d = g.square_().sum(-1, dtype=self.refine_dtype)
        d, order = d.sort(dim=1, stable=True)
        return d, cand.gather(1, order)

    # --- prediction ----------------------------------------------------------------------------
    def vote(self, queries: torch.Tensor, k: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(predicted class ids (B,), probabilities (B, classes))`` for a query batch."""
        d, i = self.kneighbors(queries, k)
        lab = self._label_ids[i]
        if self.inverse_distance:
            zero = d == 0
            w = torch.where(zero.any(1, keepdim=True), zero.to(d.dtype), 1.0 / d.sqrt())
        else:
            w = torch.ones_like(d)
        votes = torch.zeros((d.shape[0], len(self.classes)), dtype=d.dtype, device=d.device)
        votes.scatter_add_(1, lab, w)
        best = votes == votes.max(dim=1, keepdim=True).values
        first = best.gather(1, lab).to(torch.int8).argmax(dim=1, keepdim=True)  # nearest tied
        pred = lab.gather(1, first).squeeze(1)
        return pred, votes / votes.sum(1, keepdim=True)

    def predict_batch(self, batch: Sequence[dict]) -> list[dict]:
        """Batched prediction; a batch of plain numeric arrays skips per-example encoding."""
        q = self._fast_queries(batch)
        if q is None:
            return super().predict_batch(batch)
        with torch.inference_mode():
            out = self.forward({self.input_name: torch.from_numpy(q).to(self.device)}, len(batch))
        names = [n for n in (self.label_name, self.probs_name) if n]
        return [dict(zip(names, vals)) for vals in zip(*(out[n] for n in names))]

    def _fast_queries(self, batch) -> Optional[np.ndarray]:
        """``(B, dims)`` float32 when every example is a finite array of the right size, else None
        (the generic encoder then reports what is wrong with which example)."""
        if not isinstance(batch, (list, tuple)) or not batch:
            return None
        try:
            vals = [ex[self.input_name] for ex in batch]
            if not all(isinstance(v, np.ndarray) and v.dtype.kind == "f" for v in vals):
                return None
            q = np.asarray(vals, dtype=np.float32)
        except (KeyError, TypeError, ValueError):
            return None
        if q.ndim < 2 or q[0].size != self.dims or not np.isfinite(q).all():
            return None
        return q.reshape(len(batch), self.dims)

    def forward(self, feeds: dict[str, Any], n: int) -> dict[str, Any]:
        x = feeds[self.input_name]
        if isinstance(x, list):
            x = torch.stack([t.reshape(-1) for t in x])
        q = x.reshape(n, -1)
        if q.shape[1] != self.dims:
            raise InvalidInputError(
                f"kNN input {self.input_name!r} has {q.shape[1]} values per example, the index "
                f"has {self.dims} dimensions"
            )
        out: dict[str, Any] = {}
        if self.num_samples == 0:
            if self.default_label is None:
                raise InvalidModelError("kNN model is empty and has no default label")
            out[self.label_name] = [self.default_label] * n
            if self.probs_name:
                out[self.probs_name] = [{} for _ in range(n)]
            return out
        pred, probs = self.vote(q)
        classes = self.classes
        out[self.label_name] = [classes[j] for j in pred.tolist()]
        if self.probs_name:
            out[self.probs_name] = [dict(zip(classes, row)) for row in probs.cpu().tolist()]
        return out

    # --- copies and updates --------------------------------------------------------------------
    def copy(self) -> "KNNModel":
        """An independent model (the index tensors are shared: they are never changed in place)."""
        spec = Model_pb2.Model()
        spec.CopyFrom(self.spec)
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.spec = spec
        new.classes = list(self.classes)
        new._class_ids = dict(self._class_ids)
        return new

    def make_updater(self) -> "KNNUpdater":
        return KNNUpdater(self)


class KNNUpdater(Updater):
    """Appends training examples to a private copy of the model (one epoch, one mini-batch)."""

    def __init__(self, model: KNNModel):
        super().__init__(model)
        self.model = model.copy()
        self._pending: Optional[tuple[np.ndarray, list]] = None

    def prepare(self, training_data: list[dict], values: dict[str, Any]) -> None:
        m = self.model
        if isinstance(training_data, dict) or not isinstance(training_data, (list, tuple)):
            raise InvalidInputError("training_data must be a list of dicts {input: array, label: label}")
        if not training_data:
            raise InvalidInputError("training_data is empty: give at least one example")
        fd = m.spec.description.input[0]
        arrays, labels = [], []
        for i, ex in enumerate(training_data):
            if not isinstance(ex, dict):
                raise InvalidInputError(f"example {i} must be a dict, got {type(ex).__name__}")
            for key in (m.input_name, m.label_name):
                if key not in ex:
                    raise InvalidInputError(f"example {i} has no {key!r} (it needs {m.input_name!r} and {m.label_name!r})")
            arrays.append(_embedding(ex[m.input_name], i, m.input_name, m.dims, fd))
            lab = ex[m.label_name]
            if m.int_labels:
                if not _is_int(lab):
                    raise InvalidInputError(
                        f"example {i}: label {lab!r} ({type(lab).__name__}) must be an int; this model has int64 labels"
                    )
                lab = int(lab)
            elif not isinstance(lab, str):
                raise InvalidInputError(
                    f"example {i}: label {lab!r} ({type(lab).__name__}) must be a str; this model has string labels"
                )
            labels.append(lab)
        samples = np.stack(arrays) if arrays else np.zeros((0, m.dims), np.float32)
        self._pending = (samples, labels)
        if "number_of_neighbors" in values:
            m.set_number_of_neighbors(values["number_of_neighbors"])

    def mini_batches(self, epoch: int, values: dict[str, Any]) -> Iterator[float]:
        if self._pending is None:
            raise InvalidInputError("prepare() must run before training")
        if epoch == 0:
            samples, labels = self._pending
            self.model.add_samples(samples, labels)
        yield 0.0  # appending has no loss

    def result(self) -> KNNModel:
        return self.model


def _embedding(value, i: int, name: str, dims: int, fd) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        arr = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise InvalidInputError(f"example {i}: {name!r} must be a numeric array of {dims} values") from None
    if arr.size != dims:
        shape = array_shape(fd) if feature_kind(fd) == "multiArrayType" else (dims,)
        raise InvalidInputError(
            f"example {i}: {name!r} has {arr.size} values (shape {arr.shape}); the model's index "
            f"has {dims} dimensions (input shape {shape})"
        )
    if not np.isfinite(arr).all():
        raise InvalidInputError(f"example {i}: {name!r} contains NaN or Inf values")
    return arr.reshape(dims)
