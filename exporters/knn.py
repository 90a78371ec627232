"""Updatable k-nearest-neighbors classifier specs (Core ML's ``kNearestNeighborsClassifier``).

Writes the same fields as coremltools' ``KNearestNeighborsClassifierBuilder`` (spec v4, squared
Euclidean distance, one label per stored sample, default label, input/label training inputs), with
the number of neighbors' allowed range or set, the weighting and the index chosen in one call.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

import numpy as np

from mlpersonal.errors import ConversionError
from mlpersonal.proto import FeatureTypes_pb2, Model_pb2

#: Core ML 3 (iOS 13): the first version with updatable models and kNN classifiers.
KNN_SPECIFICATION_VERSION = 4
WEIGHTINGS = ("uniform", "inverse_distance")
INDEXES = ("linear", "kd_tree")

Label = Union[str, int]


def _is_int_label(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def knn_classifier(
    number_of_dimensions: int,
    number_of_neighbors: int = 3,
    k_range: Optional[tuple[int, int]] = (1, 10),
    k_set: Optional[Iterable[int]] = None,
    weighting: str = "uniform",
    index: str = "linear",
    leaf_size: int = 30,
    default_label: Label = "unknown",
    samples: Optional[Sequence] = None,
    labels: Optional[Sequence[Label]] = None,
    input_name: str = "features",
    output_name: str = "label",
    probabilities_name: Optional[str] = None,
    is_updatable: bool = True,
) -> Model_pb2.Model:
    """An (updatable) kNN classifier spec.

    ``default_label``'s type picks the label type: a ``str`` gives string labels, an ``int`` int64
    labels. ``k_set`` (allowed values of k) replaces ``k_range`` when given. ``samples`` (N x
    ``number_of_dimensions``) with ``labels`` (N) are stored as the initial index. The
    probabilities output is named ``probabilities_name`` (default ``output_name + "Probs"``, like
    coremltools). Raises :class:`ConversionError` for inconsistent arguments.
    """
    d = int(number_of_dimensions)
    if d <= 0 or d != number_of_dimensions:
        raise ConversionError(f"number_of_dimensions must be a positive integer, got {number_of_dimensions!r}")
    if weighting not in WEIGHTINGS:
        raise ConversionError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if index not in INDEXES:
        raise ConversionError(f"index must be one of {INDEXES}, got {index!r}")
    if index == "kd_tree" and (not isinstance(leaf_size, (int, np.integer)) or leaf_size <= 0):
        raise ConversionError(f"leaf_size must be a positive integer, got {leaf_size!r}")
    if isinstance(default_label, str):
        int_labels = False
    elif _is_int_label(default_label):
        int_labels = True
    else:
        raise ConversionError(
            f"default_label must be a str (string labels) or an int (int64 labels), got "
            f"{type(default_label).__name__}"
        )
    probabilities_name = probabilities_name or output_name + "Probs"
    if len({input_name, output_name, probabilities_name}) != 3:
        raise ConversionError("input_name, output_name and probabilities_name must differ")

    spec = Model_pb2.Model()
    spec.specificationVersion = KNN_SPECIFICATION_VERSION
    spec.isUpdatable = bool(is_updatable)
    knn = spec.kNearestNeighborsClassifier
    _set_k(knn.numberOfNeighbors, number_of_neighbors, k_range, k_set)
    idx = knn.nearestNeighborsIndex
    idx.numberOfDimensions = d
    if index == "kd_tree":
        idx.singleKdTreeIndex.leafSize = int(leaf_size)
    else:
        idx.linearIndex.SetInParent()
    idx.squaredEuclideanDistance.SetInParent()
    if weighting == "inverse_distance":
        knn.inverseDistanceWeighting.SetInParent()
    else:
        knn.uniformWeighting.SetInParent()
    if int_labels:
        knn.int64ClassLabels.SetInParent()
        knn.defaultInt64Label = int(default_label)
    else:
        knn.stringClassLabels.SetInParent()
        knn.defaultStringLabel = default_label

    desc = spec.description
    for feats in (desc.input, desc.trainingInput):
        f = feats.add()
        f.name = input_name
        f.type.multiArrayType.dataType = FeatureTypes_pb2.ArrayFeatureType.FLOAT32
        f.type.multiArrayType.shape.append(d)
    label_out = desc.output.add()
    label_out.name = output_name
    probs_out = desc.output.add()
    probs_out.name = probabilities_name
    label_train = desc.trainingInput.add()
    label_train.name = output_name
    if int_labels:
        label_out.type.int64Type.SetInParent()
        label_train.type.int64Type.SetInParent()
        probs_out.type.dictionaryType.int64KeyType.SetInParent()
    else:
        label_out.type.stringType.SetInParent()
        label_train.type.stringType.SetInParent()
        probs_out.type.dictionaryType.stringKeyType.SetInParent()
    desc.predictedFeatureName = output_name
    desc.predictedProbabilitiesName = probabilities_name

    if samples is not None or labels is not None:
        add_samples(spec, samples if samples is not None else [], labels if labels is not None else [])
    return spec


def _set_k(param, k, k_range, k_set) -> None:
    if not _is_int_label(k) or k <= 0:
        raise ConversionError(f"number_of_neighbors must be a positive integer, got {k!r}")
    param.defaultValue = int(k)
    if k_set is not None:
        values = sorted({int(v) for v in k_set})
        if not values or values[0] <= 0:
            raise ConversionError(f"k_set must hold positive integers, got {k_set!r}")
        if k not in values:
            raise ConversionError(f"number_of_neighbors={k} is not in k_set {values}")
        param.set.values.extend(values)
        return
    if k_range is None:
        raise ConversionError("give the allowed values of k: k_range=(min, max) or k_set={...}")
    lo, hi = (int(v) for v in k_range)
    if lo <= 0 or hi < lo:
        raise ConversionError(f"k_range must be (min, max) with 0 < min <= max, got {k_range!r}")
    if not lo <= k <= hi:
        raise ConversionError(f"number_of_neighbors={k} is outside k_range {k_range}")
    param.range.minValue = lo
    param.range.maxValue = hi


def add_samples(spec: Model_pb2.Model, samples, labels: Sequence[Label]) -> Model_pb2.Model:
    """Append ``samples`` (N x D) with their ``labels`` to a kNN spec (in place; returned)."""
    knn = spec.kNearestNeighborsClassifier
    d = knn.nearestNeighborsIndex.numberOfDimensions
    arr = np.asarray(samples, dtype=np.float32)
    if arr.size == 0:
        arr = arr.reshape(0, d)
    if arr.ndim != 2 or arr.shape[1] != d:
        raise ConversionError(f"samples must have shape (N, {d}), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ConversionError("samples contain NaN or Inf")
    labels = list(labels)
    if len(labels) != arr.shape[0]:
        raise ConversionError(f"{arr.shape[0]} samples but {len(labels)} labels; give one label per sample")
    int_labels = knn.WhichOneof("ClassLabels") == "int64ClassLabels"
    for i, lab in enumerate(labels):
        ok = _is_int_label(lab) if int_labels else isinstance(lab, str)
        if not ok:
            raise ConversionError(
                f"label {i} ({lab!r}) must be {'an int' if int_labels else 'a str'} like the "
                "default label"
            )
    idx = knn.nearestNeighborsIndex
    for row in arr:
        idx.floatSamples.add().vector.extend(row.tolist())
    if int_labels:
        knn.int64ClassLabels.vector.extend(int(v) for v in labels)
    else:
        knn.stringClassLabels.vector.extend(labels)
    return spec
