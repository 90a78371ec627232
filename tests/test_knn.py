"""kNN classifiers: predictions vs scikit-learn, coremltools-built specs, updates, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from coremltools.models.nearest_neighbors import KNearestNeighborsClassifierBuilder
from sklearn.neighbors import KNeighborsClassifier

import mlpersonal as mp
from exporters.knn import knn_classifier

from _drive import drive, drive_local

SK_WEIGHTS = {"uniform": "uniform", "inverse_distance": "distance"}


def _data(rng, n, d, n_classes, int_labels):
    x = rng.normal(size=(n, d)).astype(np.float32)
    ids = rng.integers(0, n_classes, n)
    labels = [int(v) * 7 - 3 for v in ids] if int_labels else [f"class_{v}" for v in ids]
    return x, labels


def _vote_tied(sk, queries, k, weights):
    """Queries whose top vote total is shared by several labels (scikit-learn's neighbors)."""
    dist, ind = sk.kneighbors(queries, k)
    y = np.asarray(sk._y)
    tied, nearest_tied = [], []
    for row_d, row_i in zip(dist, ind):
        if weights == "distance" and (row_d == 0).any():
            w = (row_d == 0).astype(float)
        else:
            w = 1.0 / row_d if weights == "distance" else np.ones_like(row_d)
        totals = np.bincount(y[row_i], weights=w, minlength=len(sk.classes_))
        best = np.flatnonzero(np.isclose(totals, totals.max(), rtol=1e-12, atol=0))
        tied.append(len(best) > 1)
        # documented rule: the label of the nearest neighbor among the tied labels
        nearest_tied.append(sk.classes_[next(y[j] for j in row_i if y[j] in best)])
    return np.array(tied), nearest_tied


@pytest.mark.parametrize("n, d", [(40, 3), (400, 16), (1200, 32), (5000, 24)])
@pytest.mark.parametrize("weighting", ["uniform", "inverse_distance"])
@pytest.mark.parametrize("int_labels", [False, True])
def test_matches_sklearn(rng, n, d, weighting, int_labels):
    x, labels = _data(rng, n, d, 4, int_labels)
    queries = rng.normal(size=(100, d)).astype(np.float32)
    queries[:5] = x[:5]  # exact matches: distance 0
    q64 = queries.astype(np.float64)
    w = SK_WEIGHTS[weighting]
    for k in (1, 3, 5):
        spec = knn_classifier(d, number_of_neighbors=k, weighting=weighting, samples=x, labels=labels,
                              default_label=0 if int_labels else "none")
        out = mp.load(spec).predict_batch([{"features": q} for q in queries])
        sk = KNeighborsClassifier(k, algorithm="brute", weights=w).fit(x.astype(np.float64), labels)
        expected, proba = sk.predict(q64), sk.predict_proba(q64)
        tied, nearest_tied = _vote_tied(sk, q64, k, w)
        ours = [o["label"] for o in out]
        disagreements = sum(1 for o, e, t in zip(ours, expected, tied) if not t and o != e)
        assert disagreements == 0, (k, disagreements)
        # vote ties follow the documented rule instead of scikit-learn's "smallest label"
        assert [o for o, t in zip(ours, tied) if t] == [nt for nt, t in zip(nearest_tied, tied) if t]
        assert all(isinstance(o, int if int_labels else str) for o in ours)
        for o, row in zip(out, proba):
            probs = o["labelProbs"]
            assert set(probs) == set(sk.classes_.tolist())
            # scikit-learn's expanded distances put exact matches ~1e-8 away instead of at 0
            np.testing.assert_allclose([probs[c] for c in sk.classes_.tolist()], row, atol=1e-6)


def test_duplicate_samples_tie_by_lower_index(rng):
    x = rng.normal(size=(30, 4)).astype(np.float32)
    dup = np.repeat(x[:1], 25, axis=0)  # 25 identical samples, more than k + REFINE_EXTRA
    samples = np.concatenate([x[1:], dup])
    labels = [f"a{i}" for i in range(29)] + [f"dup{i}" for i in range(25)]
    model = mp.load(knn_classifier(4, number_of_neighbors=3, samples=samples, labels=labels))
    dist, idx = model.kneighbors(__import__("torch").from_numpy(x[:1]))
    assert idx.tolist() == [[29, 30, 31]] and dist.tolist() == [[0.0, 0.0, 0.0]]
    assert model.predict({"features": x[0]})["label"] == "dup0"  # 1-1-1 tie -> nearest


def _oracle_neighbors(x, q, k):
    """Exact k nearest in float64, equal distances by lower index."""
    d = ((q[:, None, :].astype(np.float64) - x[None].astype(np.float64)) ** 2).sum(-1)
    order = np.lexsort((np.broadcast_to(np.arange(len(x)), d.shape), d), axis=1)
    return d, order[:, :k]


@pytest.mark.parametrize("gemm", ["torch", "onnxruntime"])
@pytest.mark.parametrize("case", ["offset", "integer_ties", "clusters"])
def test_search_is_exact_where_the_expansion_is_not(rng, case, gemm, monkeypatch):
    """Large indexes (grouped candidate search) on data built to defeat the float32 expansion
    ``||s||^2 - 2 q.s``: a large common offset (cancellation), integer grids (many exact ties),
    tight clusters (near-ties). The result must equal the exact float64 ranking, whichever
    library computes the product."""
    import torch

    import runtime.knn

    monkeypatch.setattr(runtime.knn, "GEMM_MIN_MACS", 0 if gemm == "onnxruntime" else 1 << 62)
    if gemm == "onnxruntime":
        assert runtime.knn._cpu_gemm() is not None

    n, d = 6000, 8
    if case == "offset":
        x = (1000.0 + rng.normal(scale=0.01, size=(n, d))).astype(np.float32)
        q = (1000.0 + rng.normal(scale=0.01, size=(64, d))).astype(np.float32)
    elif case == "integer_ties":
        x = rng.integers(0, 3, size=(n, d)).astype(np.float32)
        q = rng.integers(0, 3, size=(64, d)).astype(np.float32)
    else:
        centers = rng.normal(scale=10, size=(5, d))
        x = (centers[rng.integers(0, 5, n)] + rng.normal(scale=1e-3, size=(n, d))).astype(np.float32)
        q = (centers[rng.integers(0, 5, 64)] + rng.normal(scale=1e-3, size=(64, d))).astype(np.float32)
    for k in (1, 3, 7):
        model = mp.load(knn_classifier(d, number_of_neighbors=k, samples=x, labels=["a"] * n))
        dist, idx = model.kneighbors(torch.from_numpy(q))
        exact, expected = _oracle_neighbors(x, q, k)
        dist, idx = dist.cpu(), idx.cpu()
        np.testing.assert_allclose(dist.numpy(), np.take_along_axis(exact, expected, 1), rtol=1e-6, atol=1e-9)
        # integer distances are computed exactly (ties included); elsewhere no two distances lie
        # within the refinement's 1e-7 relative error, so the order is the exact one
        assert (idx.numpy() == expected).all()


def test_grouped_topk_equals_topk(rng):
    import torch

    from runtime.knn import _grouped_topk

    for width, m in ((10016, 5), (4096, 3), (32768, 12), (20000, 1)):
        a = torch.from_numpy(rng.normal(size=(37, width)).astype(np.float32))
        a[:, ::97] = a[:, :1]  # repeated values
        found = _grouped_topk(a, m)
        assert found is not None
        vals, cols = found
        ref = a.topk(m, dim=1, largest=False).values
        assert torch.equal(vals.sort(1).values, ref.sort(1).values)
        assert torch.equal(a.gather(1, cols), vals)
        assert all(len(set(r)) == m for r in cols.tolist())
    assert _grouped_topk(torch.zeros(4, 256), 5) is None  # too short to pay off


def test_fewer_samples_than_k(rng):
    x = rng.normal(size=(2, 3)).astype(np.float32)
    m = mp.load(knn_classifier(3, number_of_neighbors=5, samples=x, labels=["a", "b"]))
    q = x[0] + 0.01
    out = m.predict({"features": q})
    sk = KNeighborsClassifier(2, algorithm="brute").fit(x.astype(np.float64), ["a", "b"])
    assert out["labelProbs"] == dict(zip(sk.classes_, sk.predict_proba(q[None].astype(np.float64))[0]))
    assert out["label"] == "a"  # 1-1 tie: the nearest neighbor's label


# --- the exporter vs coremltools' builder -------------------------------------------------------
@pytest.mark.parametrize("kwargs, ct_kwargs", [
    (dict(), dict(number_of_neighbors=3)),
    (dict(weighting="inverse_distance", index="kd_tree", leaf_size=12, number_of_neighbors=5),
     dict(weighting_scheme="inverse_distance", index_type="kd_tree", leaf_size=12, number_of_neighbors=5)),
])
@pytest.mark.parametrize("default", ["unknown", -1])
def test_exporter_matches_coremltools_builder(rng, kwargs, ct_kwargs, default):
    x = rng.normal(size=(6, 8)).astype(np.float32)
    labels = [f"l{i % 2}" for i in range(6)] if isinstance(default, str) else [i % 2 for i in range(6)]
    ours = knn_classifier(8, default_label=default, k_range=(1, 1000), samples=x, labels=labels, **kwargs)
    b = KNearestNeighborsClassifierBuilder("features", "label", 8, default, **ct_kwargs)
    b.add_samples(x.tolist(), labels)
    theirs = b.spec
    assert ours.specificationVersion == theirs.specificationVersion == 4
    assert ours.isUpdatable == theirs.isUpdatable
    assert ours.kNearestNeighborsClassifier == theirs.kNearestNeighborsClassifier
    assert ours.description == theirs.description


def test_exporter_k_set_and_errors():
    spec = knn_classifier(4, number_of_neighbors=3, k_set={1, 3, 7})
    p = spec.kNearestNeighborsClassifier.numberOfNeighbors
    assert list(p.set.values) == [1, 3, 7] and p.defaultValue == 3
    with pytest.raises(mp.ConversionError, match="outside k_range"):
        knn_classifier(4, number_of_neighbors=20, k_range=(1, 10))
    with pytest.raises(mp.ConversionError, match="not in k_set"):
        knn_classifier(4, number_of_neighbors=2, k_set={1, 3})
    with pytest.raises(mp.ConversionError, match="must be an int"):
        knn_classifier(2, default_label=0, samples=[[0, 0]], labels=["a"])
    with pytest.raises(mp.ConversionError, match=r"shape \(N, 2\)"):
        knn_classifier(2, samples=[[0, 0, 0]], labels=["a"])
    with pytest.raises(mp.ConversionError, match="weighting"):
        knn_classifier(2, weighting="gaussian")


# --- coremltools-built specs: load, predict, personalize, save/reload ------------------------------
def _builder_spec(default, index="linear", samples=None, labels=None):
    b = KNearestNeighborsClassifierBuilder("emb", "cls", 5, default, number_of_neighbors=3,
                                           weighting_scheme="inverse_distance", index_type=index)
    if samples is not None:
        b.add_samples(samples.tolist(), labels)
    return b.spec


@pytest.mark.parametrize("default, index", [("none", "linear"), ("none", "kd_tree"), (-1, "linear"), (-1, "kd_tree")])
@pytest.mark.parametrize("start_with_samples", [False, True])
def test_coremltools_specs_personalize_save_reload(tmp_path, rng, default, index, start_with_samples):
    int_labels = isinstance(default, int)
    x0, l0 = _data(rng, 12, 5, 3, int_labels)
    spec = _builder_spec(default, index, x0 if start_with_samples else None, l0 if start_with_samples else None)
    path = tmp_path / "knn.mlmodel"
    mp.save(spec, path)
    model = mp.load(path)
    q = rng.normal(size=(20, 5)).astype(np.float32)
    if not start_with_samples:
        out = model.predict({"emb": q[0]})
        assert out == {"cls": default, "clsProbs": {}}

    x1, l1 = _data(rng, 30, 5, 4, int_labels)
    l1[-1] = 1234 if int_labels else "brand_new"  # a label the model has never seen
    updated = drive(model, [{"emb": a, "cls": b} for a, b in zip(x1, l1)], parameters={"number_of_neighbors": 5})
    assert updated.is_updatable and updated.spec.isUpdatable
    assert updated.spec.kNearestNeighborsClassifier.numberOfNeighbors.defaultValue == 5
    assert model.num_samples == (12 if start_with_samples else 0)  # the original is untouched

    all_x = np.concatenate([x0, x1]) if start_with_samples else x1
    all_l = (l0 + l1) if start_with_samples else l1
    sk = KNeighborsClassifier(5, algorithm="brute", weights="distance").fit(all_x.astype(np.float64), all_l)
    got = [o["cls"] for o in updated.predict_batch([{"emb": v} for v in q])]
    assert got == sk.predict(q.astype(np.float64)).tolist()
    assert updated.predict({"emb": x1[-1]})["cls"] == l1[-1]

    out_path = tmp_path / "personal.mlmodel"
    updated.save(out_path)
    again = mp.load(out_path)
    assert again.spec == updated.spec
    assert again.is_updatable
    assert again.predict_batch([{"emb": v} for v in q]) == updated.predict_batch([{"emb": v} for v in q])
    labels_field = "int64ClassLabels" if int_labels else "stringClassLabels"
    assert list(getattr(again.spec.kNearestNeighborsClassifier, labels_field).vector) == all_l
    assert again.spec.kNearestNeighborsClassifier.nearestNeighborsIndex.WhichOneof("IndexType") == (
        "singleKdTreeIndex" if index == "kd_tree" else "linearIndex")


def test_update_is_incremental_and_matches_fresh_load(rng):
    x, labels = _data(rng, 50, 6, 3, False)
    model = mp.load(knn_classifier(6, samples=x[:20], labels=labels[:20]))
    up = drive_local(model, [{"features": a, "label": b} for a, b in zip(x[20:], labels[20:])])
    fresh = mp.load(knn_classifier(6, samples=x, labels=labels))
    assert up.spec == fresh.spec
    q = [{"features": v} for v in rng.normal(size=(30, 6)).astype(np.float32)]
    assert up.predict_batch(q) == fresh.predict_batch(q)
    assert np.array_equal(up._sq.cpu().numpy(), fresh._sq.cpu().numpy())


# --- bad input: clear errors, nothing written -----------------------------------------------------
@pytest.mark.parametrize("bad, needle", [
    ({"features": np.zeros(5), "label": "a"}, "example 1: 'features' has 5 values"),
    ({"features": np.zeros(4), "label": 3}, "example 1: label 3 .* must be a str"),
    ({"features": np.array([0, np.nan, 0, 0]), "label": "a"}, "example 1: 'features' contains NaN"),
    ({"label": "a"}, "example 1 has no 'features'"),
])
def test_bad_examples(tmp_path, bad, needle):
    path = tmp_path / "k.mlmodel"
    mp.save(knn_classifier(4), path)
    before = path.read_bytes()
    model = mp.load(path)
    with pytest.raises(mp.InvalidInputError, match=needle):
        drive_local(model, [{"features": np.ones(4), "label": "a"}, bad])
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["k.mlmodel"]
    assert model.num_samples == 0


def test_int_label_model_refuses_strings_and_bools():
    model = mp.load(knn_classifier(2, default_label=0))
    for lab in ("1", True, 1.5):
        with pytest.raises(mp.InvalidInputError, match="must be an int"):
            drive_local(model, [{"features": [0.0, 1.0], "label": lab}])
    ok = drive_local(model, [{"features": [0.0, 1.0], "label": np.int64(4)}])
    assert ok.predict({"features": [0, 1]})["label"] == 4


@pytest.mark.parametrize("k", [0, 11, 2.5])
def test_k_outside_range(k):
    model = mp.load(knn_classifier(2, k_range=(1, 10)))
    with pytest.raises(mp.UpdateParameterError):
        drive_local(model, [{"features": [0.0, 1.0], "label": "a"}], parameters={"number_of_neighbors": k})


def test_k_outside_set():
    model = mp.load(knn_classifier(2, number_of_neighbors=3, k_set={1, 3, 5}))
    with pytest.raises(mp.UpdateParameterError, match="allowed values"):
        drive_local(model, [{"features": [0.0, 1.0], "label": "a"}], parameters={"number_of_neighbors": 4})
    up = drive_local(model, [{"features": [0.0, 1.0], "label": "a"}], parameters={"numberOfNeighbors": 5})
    assert up.k == 5


def test_wrong_query_size():
    model = mp.load(knn_classifier(3, samples=[[0, 0, 0]], labels=["a"]))
    with pytest.raises(mp.InvalidInputError):
        model.predict({"features": np.zeros(4)})


def test_inconsistent_specs_refused():
    spec = knn_classifier(2, samples=[[0, 0], [1, 1]], labels=["a", "b"])
    spec.kNearestNeighborsClassifier.stringClassLabels.vector.append("c")
    with pytest.raises(mp.InvalidModelError, match="3 labels"):
        mp.load(spec)
    spec = knn_classifier(2, samples=[[0, 0]], labels=["a"])
    spec.kNearestNeighborsClassifier.nearestNeighborsIndex.floatSamples[0].vector.append(3.0)
    with pytest.raises(mp.InvalidModelError, match="sample 0 has 3 values"):
        mp.load(spec)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_sample_refused_at_load(rng, bad):
    x = rng.normal(size=(20, 4)).astype(np.float32)
    spec = knn_classifier(4, number_of_neighbors=3, samples=x, labels=["a"] * 20)
    spec.kNearestNeighborsClassifier.nearestNeighborsIndex.floatSamples[7].vector[2] = bad
    with pytest.raises(mp.InvalidModelError, match=r"sample 7 contains NaN or Inf"):
        mp.load(spec)


def test_not_updatable_refused():
    model = mp.load(knn_classifier(2, is_updatable=False))
    with pytest.raises(mp.InvalidModelError, match="not updatable"):
        model.make_updater()
