"""k-nearest-neighbors classifier models (``kNearestNeighborsClassifier``) and their updater.

Prediction semantics (documented, deterministic):

* Distance: squared Euclidean, exact. Candidates come from one batched matmul,
  ``||s||^2 - 2 q.S^T`` (on the CPU an onnxruntime ``Gemm``, elsewhere torch), selected through
  group minima; the best
  ``k + REFINE_EXTRA`` are re-scored directly as ``sum((q - s)^2)`` (float32 differences summed in
  float64 where the device has it), so exact matches get 0. A float32 error bound of the expansion
  proves per query that no other sample can be nearer; queries where it cannot (near-ties, large
  common offsets) are redone with more candidates, then by an exact scan. The result equals the
  exact ranking, whatever the data.
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

import threading
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from mlpersonal.errors import InvalidInputError, InvalidModelError
from mlpersonal.proto import Model_pb2

from .batch import ArrayBatchProvider, DictionaryColumn
from .features import array_shape, feature_kind
from .model import CompiledModel, register_model_kind
from .plan import ort_session
from .updating import Updater

#: candidates re-scored exactly beyond the k nearest (more are taken where the bound needs them)
REFINE_EXTRA = 2
#: distance-matrix elements per chunk of queries: the chunk stays in cache for the candidate search
CHUNK_ELEMENTS = 1 << 22
#: fewer query rows than this per matmul wastes it; large indexes may then use up to
MIN_CHUNK_ROWS = 64
MAX_CHUNK_ELEMENTS = 1 << 24
#: the index is padded to a multiple of GROUP samples (a power of two) for the grouped search
GROUP = 32
#: torch's CPU topk(m) is several times faster per row on rows of at least this many * m values
TOPK_FAST = 64
_EPS32 = 2.0 ** -24
_WORKSPACE = threading.local()


def _workspace(numel: int, device: torch.device, slot: str = "dist") -> torch.Tensor:
    """A per-thread float32 scratch buffer of at least ``numel`` elements (reused across calls, so
    the distance matrix does not page-fault fresh memory on every prediction)."""
    buf = getattr(_WORKSPACE, slot, None)
    if buf is None or buf.numel() < numel or buf.device != device:
        with torch.inference_mode(False):  # a normal tensor: usable in and out of inference mode
            buf = torch.empty(numel, dtype=torch.float32, device=device)
            setattr(_WORKSPACE, slot, buf)
    return buf


#: products of at least this many multiply-adds per chunk go to onnxruntime's Gemm on the CPU
#: (below it torch's is as fast or faster: one query against 10,000 samples, 86 vs 101 us)
GEMM_MIN_MACS = 1 << 22
_GEMM_LOCK = threading.Lock()
_GEMM: dict = {}


def _cpu_gemm():
    """An onnxruntime session computing ``sq - 2 q S^T`` (one ``Gemm``; q, S and sq are inputs,
    so no copy of any index is kept), or None without onnxruntime. On the CPU its MLAS kernels
    run this product ~1.6x faster than torch's sgemm here (10,000 x 128 samples, 256 queries:
    2.1 vs 3.4 ms); any float32 summation order is covered by the error bound of the search."""
    threads = max(1, torch.get_num_threads())
    sess = _GEMM.get(threads)
    if sess is None:
        with _GEMM_LOCK:
            sess = _GEMM.get(threads)
            if sess is None:
                try:
                    import onnxruntime  # noqa: F401
                    from onnx import TensorProto, helper
                except ImportError:
                    sess = False
                else:
                    f = TensorProto.FLOAT
                    graph = helper.make_graph(
                        [helper.make_node("Gemm", ["q", "S", "sq"], ["d"], alpha=-2.0, beta=1.0, transB=1)],
                        "knn_distances",
                        [helper.make_tensor_value_info("q", f, ["b", "dims"]),
                         helper.make_tensor_value_info("S", f, ["n", "dims"]),
                         helper.make_tensor_value_info("sq", f, ["n"])],
                        [helper.make_tensor_value_info("d", f, ["b", "n"])])
                    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
                    # its workers must not spin after the product: torch's threads search next
                    sess = ort_session(model.SerializeToString(), threads, spinning=False)
                _GEMM[threads] = sess
    return sess or None


def _grouped_topk(approx: torch.Tensor, m: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``topk(m, largest=False)`` of each row, found through group minima; None when the rows are
    too short for it to pay off.

    Column ``c`` belongs to group ``c % G`` (``G = width / group``). Halving the row with
    elementwise minima gives every group's minimum in a few cheap, vectorized passes; the m
    smallest values lie in the m groups with the smallest minima (each group ahead of a value's
    own group holds a smaller value), so only ``m * group`` values per row go through a second
    ``topk``. Both selections keep at least ``TOPK_FAST * m`` values per row: torch's CPU topk
    takes a much faster path there than on shorter rows.
    """
    b, width = approx.shape
    group = GROUP
    while group > 1 and width // group < TOPK_FAST * m:
        group //= 2
    if group < 4:
        return None
    g = width // group
    half = width // 2
    mins = _workspace(b * half, approx.device, "fold")[:b * half].view(b, half)
    torch.minimum(approx[:, :half], approx[:, half:], out=mins)
    while half > g:
        half //= 2
        torch.minimum(mins[:, :half], mins[:, half:2 * half], out=mins[:, :half])
    sel = mins[:, :g].topk(m, dim=1, largest=False, sorted=False).indices
    cols = (sel.unsqueeze(2) + torch.arange(0, width, g, device=approx.device)).reshape(b, -1)
    vals = _workspace(b * TOPK_FAST * m, approx.device, "cand")[:b * TOPK_FAST * m].view(b, -1)
    vals[:, m * group:] = float("inf")  # padding for topk's fast path
    torch.gather(approx, 1, cols, out=vals[:, :m * group])
    vals, pos = vals.topk(m, dim=1, largest=False, sorted=False)
    return vals, cols.gather(1, pos)


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
            finite = np.isfinite(arr).all(axis=1)
            if not finite.all():
                raise InvalidModelError(
                    f"kNN model: sample {int(np.argmin(finite))} contains NaN or Inf values; the "
                    "model file is corrupt (re-export it, or remove that sample and its label)"
                )
        else:
            arr = np.zeros((0, self.dims), np.float32)
        self.classes: list = []
        self._class_ids: dict = {}
        self._set_index(torch.from_numpy(arr).to(self.device))
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

    def _set_index(self, samples: torch.Tensor) -> None:
        """Store ``samples`` (n x dims) padded with zero rows to a multiple of GROUP; the padding's
        squared norms are +inf, so its expanded distances are +inf and it is never a neighbor."""
        n = samples.shape[0]
        pad = -n % GROUP
        self._n = n
        self._samples = torch.cat([samples, samples.new_zeros((pad, self.dims))]).contiguous()
        sq = (samples * samples).sum(1)
        self._sq = torch.cat([sq, sq.new_full((pad,), float("inf"))])
        self._sq_max = float(sq.max()) * (1 + 4 * self.dims * _EPS32) if n else 0.0

    @property
    def num_samples(self) -> int:
        return self._n

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
        self._set_index(torch.cat([self._samples[:self._n], new]))
        ids = torch.tensor(self._ids_for(labels), dtype=torch.int64, device=self.device)
        self._label_ids = torch.cat([self._label_ids, ids])

    def set_number_of_neighbors(self, k: int) -> None:
        self.k = int(k)
        self.spec.kNearestNeighborsClassifier.numberOfNeighbors.defaultValue = self.k

    # --- search ------------------------------------------------------------------------------
    def kneighbors(self, queries: torch.Tensor, k: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(squared distances, sample indices)``, each ``(B, min(k, N))``, nearest first."""
        k = min(self.k if k is None else int(k), self.num_samples)
        q = queries.reshape(queries.shape[0], -1).to(device=self.device, dtype=torch.float32).contiguous()
        if k == 0:
            empty = torch.zeros((q.shape[0], 0), device=self.device)
            return empty.to(self.refine_dtype), empty.to(torch.int64)
        n = self._samples.shape[0]  # padded
        rows = max(1, CHUNK_ELEMENTS // n)
        if rows < MIN_CHUNK_ROWS:  # small chunks waste the matmul; allow up to MAX_CHUNK_ELEMENTS
            rows = max(1, min(MIN_CHUNK_ROWS, MAX_CHUNK_ELEMENTS // n))
        chunks = -(-q.shape[0] // rows)
        rows = -(-q.shape[0] // chunks)  # equal chunks: a small last one would waste the matmul
        big = rows * n * self.dims >= GEMM_MIN_MACS
        gemm = _cpu_gemm() if self.device.type == "cpu" and big else None
        if gemm is None:
            buf = _workspace(rows * n, self.device)
            st, sq = self._samples.t(), self._sq
        else:
            feed = {"S": self._samples.numpy(), "sq": self._sq.numpy()}
        dists, idxs = [], []
        for start in range(0, q.shape[0], rows):
            qc = q[start:start + rows]
            if gemm is None:
                approx = torch.addmm(sq, qc, st, beta=1.0, alpha=-2.0, out=buf[:qc.shape[0] * n].view(-1, n))
            else:
                feed["q"] = qc.numpy()
                approx = torch.from_numpy(gemm.run(None, feed)[0])
            d, i = self._search(qc, approx, k)
            dists.append(d)
            idxs.append(i)
        return (torch.cat(dists), torch.cat(idxs)) if len(dists) > 1 else (dists[0], idxs[0])

    def _search(self, q: torch.Tensor, approx: torch.Tensor, k: int):
        """The exact k nearest of each query, given its expanded distances ``||s||^2 - 2 q.s``.

        The best ``k + REFINE_EXTRA`` candidates by ``approx`` are re-scored exactly. They provably
        hold the k nearest when the k-th exact distance is below the smallest exact distance any
        other sample can have: ``||q||^2`` + the largest candidate ``approx`` - the float32 error
        bound of the expansion. Rows where that fails (near-ties, duplicates) are redone with more
        candidates, and then over all samples.
        """
        n = self._n
        d, i, ok = self._candidates(q, approx, k, min(n, k + REFINE_EXTRA))
        if not bool(ok.all()):
            bad = (~ok).nonzero().flatten()
            d2, i2, ok2 = self._candidates(q[bad], approx[bad], k, min(n, 8 * (k + REFINE_EXTRA) + 56),
                                           grouped=False)
            d[bad], i[bad] = d2, i2
            if not bool(ok2.all()):
                worst = bad[~ok2]
                d[worst], i[worst] = self._exact_rows(q[worst], k)
        return d, i

    def _candidates(self, q: torch.Tensor, approx: torch.Tensor, k: int, m: int, grouped: bool = True):
        """Exact distances/indices of the k nearest among the best ``m`` by ``approx``, and
        whether they are provably the k nearest overall."""
        found = _grouped_topk(approx, m) if grouped else None
        if found is not None:
            vals, cand = found
        else:
            vals, cand = approx[:, :self._n].topk(m, dim=1, largest=False, sorted=False)
        d, i = self._refine(q, cand.sort(dim=1).values)
        d, i = d[:, :k], i[:, :k]
        if m == self._n:
            return d, i, torch.ones(d.shape[0], dtype=torch.bool, device=d.device)
        qq = q.double().square().sum(1) if self.refine_dtype == torch.float64 else q.square().sum(1)
        lower = qq + vals.amax(1).to(qq.dtype) - self._approx_error(qq)
        return d, i, d[:, -1] * (1 + 16 * _EPS32) < lower * (1 - 16 * _EPS32)

    def _approx_error(self, qq: torch.Tensor) -> torch.Tensor:
        """Bound on |float32 ``||s||^2 - 2 q.s`` - exact| over all samples, per query (Higham's
        dot-product bound with Cauchy-Schwarz: ``(2D + 4) u (max||s||^2 + 2 ||q|| max||s||)``)."""
        s2 = self._sq_max
        return (2 * self.dims + 4) * _EPS32 * (s2 + 2 * qq.sqrt() * s2 ** 0.5)

    def _exact_rows(self, q: torch.Tensor, k: int):
        """Exact k nearest of each query over all samples, equal distances by lower index (the
        fallback for rows whose candidates could not be proven: ties, heavy cancellation)."""
        block = max(1, (1 << 22) // max(1, q.shape[0] * self.dims))
        best_d = q.new_empty((q.shape[0], 0), dtype=self.refine_dtype)
        best_i = torch.empty((q.shape[0], 0), dtype=torch.int64, device=q.device)
        for s in range(0, self._n, block):
            chunk = self._samples[s:min(s + block, self._n)]
            d = (chunk.unsqueeze(0) - q.unsqueeze(1)).square_().sum(-1, dtype=self.refine_dtype)
            idx = torch.arange(s, s + chunk.shape[0], device=q.device).expand(q.shape[0], -1)
            # earlier (lower-index) neighbors come first, so a stable sort keeps them ahead on ties
            d, order = torch.cat([best_d, d], 1).sort(dim=1, stable=True)
            best_d, best_i = d[:, :k], torch.cat([best_i, idx], 1).gather(1, order[:, :k])
        return best_d, best_i

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

    def predict_batch(self, batch):
        """Batched prediction; a batch of plain numeric arrays skips per-example encoding."""
        q = self._fast_queries(batch)
        if q is None or self.num_samples == 0:
            return super().predict_batch(batch)
        with torch.inference_mode():
            pred, probs = self.vote(torch.from_numpy(q).to(self.device))
        classes, lname, pname = self.classes, self.label_name, self.probs_name
        labels = [classes[j] for j in pred.tolist()]
        probs = DictionaryColumn(classes, probs.cpu().numpy()) if pname else None
        if isinstance(batch, ArrayBatchProvider):
            return ArrayBatchProvider({lname: labels, pname: probs} if pname else {lname: labels})
        if not pname:
            return [{lname: lab} for lab in labels]
        return [{lname: lab, pname: p} for lab, p in zip(labels, probs.tolist())]

    def _fast_queries(self, batch) -> Optional[np.ndarray]:
        """``(B, dims)`` float32 when every example is a finite array of the right size, else None
        (the generic encoder then reports what is wrong with which example)."""
        if isinstance(batch, ArrayBatchProvider):
            col = batch.columns.get(self.input_name)
            if not (isinstance(col, np.ndarray) and col.dtype.kind == "f" and col.size):
                return None
            q = np.ascontiguousarray(col, dtype=np.float32)
            if not q.flags.writeable:
                q = q.copy()
        elif isinstance(batch, (list, tuple)) and batch:
            try:
                vals = [ex[self.input_name] for ex in batch]
                if not all(isinstance(v, np.ndarray) and v.dtype.kind == "f" for v in vals):
                    return None
                q = np.asarray(vals, dtype=np.float32)
            except (KeyError, TypeError, ValueError):
                return None
            if q.ndim < 2:
                return None
        else:
            return None
        if q[0].size != self.dims or not np.isfinite(q).all():
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
            out[self.probs_name] = DictionaryColumn(classes, probs.cpu().numpy())
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
