"""ArrayBatchProvider: columnar batches in and out of predict_batch and UpdateTask.

Oracles: torch reference modules (classifier probabilities), scikit-learn (kNN), the eager
Network, and the list-of-dicts path, whose own oracles are in test_plan/test_knn/test_pipeline.
"""

import copy

import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier

import mlpersonal as mp
from exporters.knn import knn_classifier
from mlpersonal.errors import InvalidInputError
from runtime import ArrayBatchProvider, DictionaryColumn
from test_pipeline import apple_style_pipeline, drawings, embedding_spec, knn_spec, torch_embedding, weights  # noqa: F401
from test_plan import LABELS, assert_same, classifier_spec, models, two_output_spec
from update_models import CNN, dataset, torch_train, updatable_cnn_spec
from update_models import LABELS as CNN_LABELS


@pytest.mark.parametrize("as_tensor", [False, True])
def test_classifier_columns_match_torch_and_the_list_path(rng, as_tensor):
    spec, ref = classifier_spec(rng)
    planned, eager = models(spec)
    for n in (1, 7, 64):
        x = rng.standard_normal((n, 1, 8, 8)).astype(np.float32)
        batch = ArrayBatchProvider({"x": torch.from_numpy(x) if as_tensor else x})
        for model in (planned, eager):
            out = model.predict_batch(batch)
            assert isinstance(out, ArrayBatchProvider) and len(out) == n
            probs = ref(torch.from_numpy(x)).numpy()
            col = out.column("probs")
            assert isinstance(col, DictionaryColumn) and col.keys == LABELS
            assert col.values.shape == (n, len(LABELS))
            assert np.abs(col.values - probs).max() <= 1e-5
            assert out.column("label") == [LABELS[i] for i in probs.argmax(1)]
            as_list = model.predict_batch([{"x": a} for a in x])
            assert out.to_list() == as_list and list(out) == as_list
            assert out[n - 1] == as_list[-1] and out.features(0) == as_list[0]
            assert out[1:3].to_list() == as_list[1:3]
    assert planned.inference_plan().last_fallback_reason is None


def test_array_outputs_and_flexible_shapes(rng):
    planned, eager = models(two_output_spec(rng, flexible=True))
    for shape in ((3, 6, 6), (3, 9, 7)):
        x = rng.standard_normal((5, *shape)).astype(np.float32)
        out = planned.predict_batch(ArrayBatchProvider({"x": x}))
        feat = out.column("feat")
        assert isinstance(feat, np.ndarray) and feat.shape == (5, 5, *shape[1:])
        ref = eager.predict_batch([{"x": a} for a in x])
        assert_same(out.to_list(), ref)
        np.testing.assert_allclose(feat, np.stack([r["feat"] for r in ref]), atol=1e-5)


def test_input_columns_convert_like_examples(rng):
    spec, _ = classifier_spec(rng)
    planned, _ = models(spec)
    x = rng.standard_normal((4, 1, 8, 8))
    want = planned.predict_batch([{"x": a.astype(np.float32)} for a in x])
    # float64, a non-contiguous view, a read-only array, a list of arrays: same answers
    for col in (x, np.asfortranarray(x), x.astype(np.float32)[:, :, ::1, :], list(x)):
        if isinstance(col, np.ndarray):
            col = col.copy() if not col.flags.writeable else col
        assert_same(planned.predict_batch(ArrayBatchProvider({"x": col})).to_list(), want)
    ro = x.astype(np.float32)
    ro.setflags(write=False)
    assert_same(planned.predict_batch(ArrayBatchProvider({"x": ro})).to_list(), want)
    # a flat (4, 64) column is reshaped per example, as a flat example array is
    flat = x.astype(np.float32).reshape(4, 64)
    assert_same(planned.predict_batch(ArrayBatchProvider({"x": flat})).to_list(), want)


def test_bad_columns_say_what_is_wrong(rng):
    spec, _ = classifier_spec(rng)
    planned, _ = models(spec)
    x = rng.standard_normal((4, 1, 8, 8)).astype(np.float32)
    with pytest.raises(InvalidInputError, match="no column 'x'"):
        planned.predict_batch(ArrayBatchProvider({"y": x}))
    with pytest.raises(InvalidInputError, match="different numbers of examples"):
        ArrayBatchProvider({"x": x, "extra": [1, 2, 3]})
    with pytest.raises(InvalidInputError, match="non-empty dict"):
        ArrayBatchProvider({})
    with pytest.raises(InvalidInputError, match="scalar"):
        ArrayBatchProvider({"x": np.array(1.0, np.float32)})
    with pytest.raises(InvalidInputError, match="array with the examples along axis 0"):
        ArrayBatchProvider({"x": "abc"})
    bad = x.copy()
    bad[2, 0, 4, 4] = np.nan
    with pytest.raises(InvalidInputError, match="example 2: feature 'x' contains NaN or Inf"):
        planned.predict_batch(ArrayBatchProvider({"x": bad}))
    with pytest.raises(InvalidInputError, match="example 0: feature 'x' has shape"):
        planned.predict_batch(ArrayBatchProvider({"x": np.zeros((4, 1, 8, 9), np.float32)}))
    with pytest.raises(InvalidInputError, match="must be numeric"):
        planned.predict_batch(ArrayBatchProvider({"x": np.array([["a"]] * 4)}))
    with pytest.raises(InvalidInputError, match="ArrayBatchProvider"):
        planned.predict_batch({"x": x})


@pytest.mark.parametrize("k", [1, 5])
def test_knn_columns_match_sklearn(rng, k):
    x = rng.normal(size=(300, 8)).astype(np.float32)
    labels = [f"c{v}" for v in rng.integers(0, 4, 300)]
    q = rng.normal(size=(50, 8)).astype(np.float32)
    model = mp.load(knn_classifier(8, number_of_neighbors=k, samples=x, labels=labels,
                                   default_label="none"))
    out = model.predict_batch(ArrayBatchProvider({"features": q}))
    sk = KNeighborsClassifier(k, algorithm="brute").fit(x.astype(np.float64), labels)
    proba = sk.predict_proba(q.astype(np.float64))
    probs = out.column("labelProbs")
    assert isinstance(probs, DictionaryColumn)
    order = [probs.keys.index(c) for c in sk.classes_]
    np.testing.assert_allclose(probs.values[:, order], proba, atol=1e-6)
    label_col = out.column("label")
    certain = proba.max(1) > 0.5  # no vote ties: the label is scikit-learn's
    assert [lab for lab, c in zip(label_col, certain) if c] == list(sk.predict(q.astype(np.float64))[certain])
    assert out.to_list() == model.predict_batch([{"features": v} for v in q])
    # the same through the generic path (a float64 list column)
    assert model.predict_batch(ArrayBatchProvider({"features": list(q.astype(np.float64))})).to_list() \
        == out.to_list()


def test_pipeline_columns(rng, weights):  # noqa: F811
    emb = embedding_spec(weights)
    pipe = mp.load(apple_style_pipeline(emb, knn_spec()))
    train = drawings(rng, 12)
    labs = ["a", "b", "c"] * 4
    updated = pipe.update(ArrayBatchProvider({"drawing": train, "label": labs}),
                          parameters={"numberOfNeighbors": 1})
    queries = drawings(rng, 6)
    out = updated.predict_batch(ArrayBatchProvider({"drawing": np.stack(queries)}))
    assert out.to_list() == updated.predict_batch([{"drawing": d} for d in queries])
    # oracle: nearest training embedding (torch) gives the label
    e_train, e_q = torch_embedding(weights, train), torch_embedding(weights, queries)
    nearest = ((e_q[:, None] - e_train[None]) ** 2).sum(-1).argmin(1)
    assert out.column("label") == [labs[i] for i in nearest]


def test_update_task_takes_a_provider():
    m = CNN()
    X, y, _ = dataset()
    kw = dict(lr=0.05, batch=8, epochs=2, momentum=0.9)
    spec = updatable_cnn_spec(m, "ce", "sgd", **kw)
    batch = ArrayBatchProvider({"image": X.numpy(), "label": [CNN_LABELS[int(v)] for v in y]})
    losses = []
    task = mp.UpdateTask(mp.load(spec), batch, parameters={"shuffle": False},
                         progress_handlers={"mini_batch_end": lambda c: losses.append(c.metrics["loss"])})
    task.resume()
    ctx = task.wait()
    assert ctx.error is None
    np.testing.assert_allclose(losses, torch_train(copy.deepcopy(m), X, y, "ce", "sgd", **kw), rtol=1e-5)


def test_dictionary_column():
    vals = np.array([[0.25, 0.75], [1.0, 0.0], [0.5, 0.5]], np.float32)
    col = DictionaryColumn(["x", 7], vals)
    assert len(col) == 3 and col[1] == {"x": 1.0, 7: 0.0}
    assert col.tolist() == [{"x": 0.25, 7: 0.75}, {"x": 1.0, 7: 0.0}, {"x": 0.5, 7: 0.5}]
    assert list(col) == col.tolist() and col[1:].tolist() == col.tolist()[1:]
    with pytest.raises(ValueError, match=r"\(count, 2\)"):
        DictionaryColumn(["x", 7], vals[:, :1])


def test_empty_batches(rng):
    spec, _ = classifier_spec(rng)
    planned, _ = models(spec)
    assert planned.predict_batch([]) == []
    out = planned.predict_batch(ArrayBatchProvider({"x": np.zeros((0, 1, 8, 8), np.float32)}))
    assert len(out) == 0 and out.to_list() == [] and set(out.columns) == {"label", "probs"}
    knn = mp.load(knn_classifier(2, number_of_neighbors=1, samples=np.eye(2, dtype=np.float32),
                                 labels=["a", "b"], default_label="none"))
    assert knn.predict_batch([]) == [] and len(knn.predict_batch(ArrayBatchProvider({"features": []}))) == 0


def test_complex_values_are_refused(rng):
    spec, _ = classifier_spec(rng)
    planned, _ = models(spec)
    z = np.zeros((2, 1, 8, 8), np.complex64)
    with pytest.raises(InvalidInputError, match=r"must be numeric \(real\), got dtype complex64"):
        planned.predict_batch(ArrayBatchProvider({"x": z}))
    with pytest.raises(InvalidInputError, match=r"example 0: feature 'x' must be numeric \(real\)"):
        planned.predict_batch([{"x": a} for a in z])


def test_from_examples_round_trips(rng):
    spec, _ = classifier_spec(rng)
    planned, _ = models(spec)
    x = rng.standard_normal((3, 1, 8, 8)).astype(np.float32)
    examples = [{"x": a} for a in x]
    batch = ArrayBatchProvider.from_examples(examples)
    assert batch.feature_names == ["x"] and len(batch) == 3 and isinstance(batch.column("x"), list)
    assert planned.predict_batch(batch).to_list() == planned.predict_batch(examples)
    with pytest.raises(InvalidInputError, match="example 1 does not have the features"):
        ArrayBatchProvider.from_examples([{"x": x[0]}, {"y": x[1]}])
    with pytest.raises(KeyError, match="no feature 'y'"):
        batch.column("y")
    with pytest.raises(IndexError):
        batch.features(3)


def test_multiarray_outputs_come_back_as_their_declared_type():
    """Core ML hands out MLMultiArrays of the declared data type: DOUBLE -> float64, FLOAT32 ->
    float32, FLOAT16 -> float16 (spec 7); values are the network's float32 results."""
    from coremltools.models import datatypes
    from coremltools.models.neural_network import NeuralNetworkBuilder
    from coremltools.proto import FeatureTypes_pb2 as ft

    b = NeuralNetworkBuilder([("x", datatypes.Array(3))],
                             [("y64", datatypes.Array(3)), ("y32", datatypes.Array(3)), ("y16", datatypes.Array(3))])
    for name in ("y64", "y32", "y16"):
        b.add_activation(name, "SIGMOID", "x", name)
    out = {o.name: o for o in b.spec.description.output}
    out["y32"].type.multiArrayType.dataType = ft.ArrayFeatureType.FLOAT32
    out["y16"].type.multiArrayType.dataType = ft.ArrayFeatureType.FLOAT16
    b.spec.specificationVersion = 7
    model = mp.load(b.spec, compute_units="cpu_only")
    x = np.array([[-1.0, 0.5, 3.0], [0.0, 2.0, -4.0]], np.float32)
    want = torch.sigmoid(torch.from_numpy(x)).numpy()
    one = model.predict({"x": x[0]})
    cols = model.predict_batch(mp.ArrayBatchProvider({"x": x}))
    for name, dtype in (("y64", np.float64), ("y32", np.float32), ("y16", np.float16)):
        assert one[name].dtype == dtype and cols.column(name).dtype == dtype
        tol = 1e-3 if dtype == np.float16 else 1e-5  # onnxruntime's sigmoid vs torch's: 1e-6
        np.testing.assert_allclose(cols.column(name), want, rtol=tol)
        np.testing.assert_allclose(one[name], want[0], rtol=tol)
