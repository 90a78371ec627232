"""Batches held as columns: Core ML's ``MLArrayBatchProvider(dictionary:)`` for Python.

``predict_batch`` takes either a list of feature dicts (one per example) or an
:class:`ArrayBatchProvider` whose columns hold every example of a feature at once, e.g. one
``(B, 1, 28, 28)`` float32 array. Given a provider it answers with a provider: arrays stay
``(B, ...)`` arrays, a classifier's labels a list and its probabilities a
:class:`DictionaryColumn` (one ``(B, classes)`` matrix). Nothing is split into per-example
dicts unless asked (``features(i)``, iteration, :meth:`ArrayBatchProvider.to_list`), which is
most of the per-call Python work of a large batch of small examples.
"""

from __future__ import annotations

from itertools import repeat
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from mlpersonal.errors import InvalidInputError

__all__ = ["ArrayBatchProvider", "DictionaryColumn"]


class DictionaryColumn(Sequence):
    """Per-example dictionaries with the same keys, stored as one ``(count, len(keys))`` matrix
    (a classifier's class probabilities). ``column[i]`` is example ``i``'s ``{key: value}`` dict;
    :attr:`values` the matrix, in the order of :attr:`keys`."""

    __slots__ = ("keys", "values")

    def __init__(self, keys: Sequence, values: np.ndarray):
        values = np.asarray(values)
        if values.ndim != 2 or values.shape[1] != len(keys):
            raise ValueError(f"values must be (count, {len(keys)}), got {values.shape}")
        self.keys, self.values = list(keys), values

    def __len__(self) -> int:
        return self.values.shape[0]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return DictionaryColumn(self.keys, self.values[i])
        return dict(zip(self.keys, self.values[i].tolist()))

    def __iter__(self) -> Iterator[dict]:
        return iter(self.tolist())

    def tolist(self) -> list[dict]:
        """Every example's dict (Python floats, as :meth:`numpy.ndarray.tolist` gives them)."""
        return list(map(dict, map(zip, repeat(self.keys), self.values.tolist())))

    def __repr__(self) -> str:
        return f"DictionaryColumn(keys={self.keys!r}, values={self.values.shape})"


def _count(name: str, column: Any) -> int:
    if isinstance(column, (np.ndarray, torch.Tensor)):
        if column.ndim == 0:
            raise InvalidInputError(
                f"column {name!r} is a scalar; give one value per example (axis 0 = examples)")
        return int(column.shape[0])
    if isinstance(column, (str, bytes, dict)) or not isinstance(column, Sequence):
        raise InvalidInputError(
            f"column {name!r} must be an array with the examples along axis 0 or a list of "
            f"per-example values, got {type(column).__name__}")
    return len(column)


class ArrayBatchProvider(Sequence):
    """A batch as ``{feature name: column}``; a column is a numpy array or torch tensor with the
    examples along axis 0, or a list with one value per example. All columns have one length.

    >>> batch = ArrayBatchProvider({"image": images})        # images: (64, 1, 28, 28) float32
    >>> out = model.predict_batch(batch)
    >>> out.column("classLabel"), out.column("classLabel_probs").values  # list, (64, 10) array
    >>> out[0]                                                # example 0 as a feature dict
    """

    __slots__ = ("columns", "count")

    def __init__(self, columns: Mapping[str, Any]):
        if not isinstance(columns, Mapping) or not columns:
            raise InvalidInputError("ArrayBatchProvider needs a non-empty dict {feature name: column}")
        counts = {name: _count(name, col) for name, col in columns.items()}
        if len(set(counts.values())) > 1:
            raise InvalidInputError(f"columns hold different numbers of examples: {counts}")
        self.columns: dict[str, Any] = dict(columns)
        self.count: int = next(iter(counts.values()))

    @classmethod
    def _of(cls, columns: dict[str, Any], count: int) -> "ArrayBatchProvider":
        """A provider over columns the runtime built (known to hold ``count`` examples)."""
        self = object.__new__(cls)
        self.columns, self.count = columns, count
        return self

    @classmethod
    def from_examples(cls, examples: Sequence[Mapping[str, Any]]) -> "ArrayBatchProvider":
        """Columns from per-example feature dicts (lists; values are not stacked)."""
        examples = list(examples)
        if not examples:
            raise InvalidInputError("no examples")
        names = list(examples[0])
        for i, ex in enumerate(examples):
            if not isinstance(ex, Mapping) or list(ex) != names:
                raise InvalidInputError(f"example {i} does not have the features {names}")
        return cls({k: [ex[k] for ex in examples] for k in names})

    @property
    def feature_names(self) -> list[str]:
        return list(self.columns)

    def column(self, name: str) -> Any:
        """The column as stored: an array, a list, or a :class:`DictionaryColumn`."""
        try:
            return self.columns[name]
        except KeyError:
            raise KeyError(f"no feature {name!r}; the batch has {list(self.columns)}") from None

    def features(self, index: int) -> dict[str, Any]:
        """Example ``index`` as ``{feature name: value}`` (array rows are views)."""
        if not -self.count <= index < self.count:
            raise IndexError(f"example {index} out of range for a batch of {self.count}")
        return {k: col[index] for k, col in self.columns.items()}

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index):
        if isinstance(index, slice):
            return ArrayBatchProvider({k: col[index] for k, col in self.columns.items()})
        return self.features(index)

    def __iter__(self) -> Iterator[dict]:
        return iter(self.to_list())

    def to_list(self) -> list[dict]:
        """Every example as a feature dict, as ``predict_batch`` on a list returns them."""
        cols = [(k, col.tolist() if isinstance(col, DictionaryColumn) else col)
                for k, col in self.columns.items()]
        return [{k: col[i] for k, col in cols} for i in range(self.count)]

    def __repr__(self) -> str:
        def desc(c):
            if isinstance(c, (np.ndarray, torch.Tensor)):
                return f"{type(c).__name__}{tuple(c.shape)}"
            return repr(c) if isinstance(c, DictionaryColumn) else f"list[{len(c)}]"
        cols = ", ".join(f"{k!r}: {desc(c)}" for k, c in self.columns.items())
        return f"ArrayBatchProvider({{{cols}}})"
