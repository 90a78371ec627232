"""Issue 8 parts 4 and 5: bad training data is refused before the first step (naming the example
and the feature), a loss turning NaN fails the task without writing, and concurrency: predictions
from other threads during an update, two tasks on one model, prompt cancel."""

import copy
import os
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from coremltools.models import datatypes
from coremltools.models.neural_network import NeuralNetworkBuilder, SgdParams

import mlpersonal as mp
from exporters.knn import knn_classifier
from update_models import LABELS, layer_weights

from test_pipeline import SIDE, apple_style_pipeline, drawings, embedding_spec, knn_spec
from test_update_cache import Head, data_set, head_spec


# --- models -------------------------------------------------------------------------------------
def classifier_spec(batch=4, lr=0.1, epochs=2, batches=None):
    """x (4 values) -> fc (updatable) -> softmax over LABELS, SGD."""
    g = torch.Generator().manual_seed(0)
    W, bias = torch.randn(5, 4, generator=g) * 0.5, torch.randn(5, generator=g) * 0.1
    b = NeuralNetworkBuilder([("x", datatypes.Array(4))], [("probs", datatypes.Array(5))], mode="classifier")
    b.add_inner_product("fc", W.numpy(), bias.numpy(), 4, 5, True, "x", "logits")
    b.add_softmax("softmax", "logits", "probs")
    b.set_class_labels(LABELS, predicted_feature_name="label")
    b.make_updatable(["fc"])
    b.set_categorical_cross_entropy_loss("lossLayer", input="probs")
    p = SgdParams(lr=lr, batch=batch)
    if batches:
        p.set_batch(batch, batches)
    b.set_sgd_optimizer(p)
    b.set_epochs(epochs)
    return b.spec, W, bias


def regressor_spec(lr=0.01, batch=4):
    b = NeuralNetworkBuilder([("x", datatypes.Array(3))], [("y", datatypes.Array(2))], mode="regressor")
    b.spec.description.predictedFeatureName = "y"  # Core ML: a regressor names its prediction
    b.add_inner_product("fc", np.full((2, 3), 0.1, np.float32), np.zeros(2, np.float32), 3, 2, True, "x", "y")
    b.make_updatable(["fc"])
    b.set_mean_squared_error_loss("lossLayer", input_feature=("y", datatypes.Array(2)))
    b.set_sgd_optimizer(SgdParams(lr=lr, batch=batch))
    b.set_epochs(1)
    return b.spec


def cls_data(n=12, seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=4).astype(np.float32), "label": LABELS[i % 5]} for i in range(n)]


def reg_data(n=12, seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=3), "y_true": rng.normal(size=2)} for _ in range(n)]


def _set(i, key, value):
    def f(d):
        d[i][key] = value
    return f


def _run(model, data, **kw):
    events = []
    handlers = {e: (lambda c, e=e: events.append(e)) for e in ("training_began", "mini_batch_end")}
    task = mp.UpdateTask(model, data, progress_handlers=handlers, **kw)
    task.resume()
    return task, task.wait(), events


# --- part 4: training data ------------------------------------------------------------------------
NAN = np.array([0.0, np.nan, 1.0, 2.0], np.float32)
INF = np.array([0.0, 1.0, np.inf, 2.0])


@pytest.mark.parametrize("mutate, needle", [
    (_set(3, "x", NAN), r"example 3: feature 'x' contains NaN or Inf"),
    (_set(7, "x", INF), r"example 7: feature 'x' contains NaN or Inf"),
    (_set(2, "x", np.ones(5, np.float32)), r"example 2: feature 'x' has shape \(5,\)"),
    (_set(4, "x", np.ones((2, 2, 2))), r"example 4: feature 'x' has shape \(2, 2, 2\)"),
    (_set(1, "x", np.array(["a", "b", "c", "d"])), r"example 1: feature 'x' must be numeric"),
    (_set(5, "x", {"a": 1}), r"example 5: feature 'x' must be numeric"),
    (_set(6, "label", "triangle"), r"example 6: unknown class label 'triangle' for 'label'"),
    (_set(8, "label", 3), r"example 8: unknown class label 3 for 'label'"),
    (_set(9, "label", None), r"example 9: unknown class label None for 'label'"),
    (lambda d: d[10].pop("x"), r"example 10: missing input feature 'x'"),
    (lambda d: d[11].pop("label"), r"example 11 has no target 'label'"),
    (lambda d: d.__setitem__(2, ("x", 1)), r"example 2 must be a dict"),
    (lambda d: d.clear(), r"training_data is empty"),
])
def test_nn_classifier_refuses_bad_data_before_the_first_step(mutate, needle):
    spec, _, _ = classifier_spec()
    data = cls_data()
    mutate(data)
    task, ctx, events = _run(mp.load(spec), data)
    assert task.state == "failed" and isinstance(ctx.error, mp.InvalidInputError), ctx.error
    assert events == [] and ctx.model is None
    with pytest.raises(mp.InvalidInputError, match=needle):
        raise ctx.error


@pytest.mark.parametrize("mutate, needle", [
    (_set(2, "y_true", np.array([np.nan, 1.0])), r"example 2: target 'y_true' contains NaN or Inf"),
    (_set(3, "y_true", np.array([1.0, -np.inf])), r"example 3: target 'y_true' contains NaN or Inf"),
    (_set(4, "y_true", np.ones(3)), r"example 4: target 'y_true' has shape \(3,\)"),
    (_set(5, "y_true", "big"), r"example 5: target 'y_true' is not numeric"),
    (_set(6, "x", np.array([1.0, np.nan, 0.0])), r"example 6: feature 'x' contains NaN or Inf"),
])
def test_nn_regressor_refuses_bad_targets(mutate, needle):
    data = reg_data()
    mutate(data)
    task, ctx, events = _run(mp.load(regressor_spec()), data)
    assert task.state == "failed" and events == [] and ctx.model is None
    with pytest.raises(mp.InvalidInputError, match=needle):
        raise ctx.error


def test_bad_image_is_refused_with_index_and_feature():
    _, _, data = data_set(12)
    data[9] = dict(data[9], image=np.full((3, 10, 10), np.inf, np.float32))
    task, ctx, events = _run(mp.load(head_spec(Head())), data)
    assert task.state == "failed" and events == []
    assert "example 9" in str(ctx.error) and "'image'" in str(ctx.error)


def test_mini_batch_larger_than_the_data_is_one_partial_batch():
    """Core ML allows it (the batch size is a model parameter, not a data requirement): each
    epoch is one step on all the examples, as torch.optim on the whole (smaller) batch."""
    spec, W, bias = classifier_spec(batch=8, lr=0.1, epochs=3)
    data = cls_data(3)
    task, ctx, events = _run(mp.load(spec), data, parameters={"shuffle": False})
    assert task.state == "completed" and events.count("mini_batch_end") == 3
    w, b = torch.nn.Parameter(W.clone()), torch.nn.Parameter(bias.clone())
    opt = torch.optim.SGD([w, b], lr=0.1)
    X = torch.from_numpy(np.stack([d["x"] for d in data]))
    y = torch.tensor([LABELS.index(d["label"]) for d in data])
    for _ in range(3):
        loss = F.cross_entropy(F.linear(X, w, b), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    np.testing.assert_allclose(layer_weights(ctx.model.spec, "fc")["weights"], w.detach().numpy().ravel(),
                               rtol=1e-5, atol=1e-7)


def test_loss_becoming_nan_fails_without_writing(tmp_path):
    rng = np.random.default_rng(0)
    data = [{"x": rng.normal(size=3) * 1e3, "y_true": rng.normal(size=2)} for _ in range(40)]
    src, out = tmp_path / "r.mlmodel", tmp_path / "trained.mlmodel"
    mp.save(regressor_spec(lr=1.0), src)
    before = src.read_bytes()
    model = mp.load(src)
    spec_before = copy.deepcopy(model.spec)

    def save_if_trained(ctx):  # what an app does: save the updated model when there is one
        if ctx.model is not None:
            ctx.model.save(out)

    losses = []
    task = mp.UpdateTask(model, data, completion_handler=save_if_trained,
                         progress_handlers={"mini_batch_end": lambda c: losses.append(c.metrics["loss"])})
    task.resume()
    ctx = task.wait()
    assert task.state == "failed" and isinstance(ctx.error, mp.TrainingError)
    assert "loss became" in str(ctx.error) and "Nothing was written" in str(ctx.error)
    assert 1 <= len(losses) < 10 and all(np.isfinite(losses))  # failed mid-training
    assert not out.exists() and src.read_bytes() == before and os.listdir(tmp_path) == ["r.mlmodel"]
    assert model.spec == spec_before


def test_knn_refuses_bad_data():
    rng = np.random.default_rng(0)
    spec = knn_classifier(4, number_of_neighbors=3, samples=rng.normal(size=(6, 4)).astype(np.float32),
                          labels=["a", "b"] * 3)
    good = [{"features": rng.normal(size=4), "label": "c"} for _ in range(5)]
    model = mp.load(spec)
    name = model.input_names[0]
    good = [{name: d["features"], model.label_name: d["label"]} for d in good]
    cases = [
        (lambda d: d[2].__setitem__(name, np.array([0, np.nan, 0, 0])), rf"example 2: '{name}' contains NaN"),
        (lambda d: d[3].__setitem__(name, np.ones(5)), rf"example 3: '{name}' has 5 values"),
        (lambda d: d[1].__setitem__(name, "abcd"), rf"example 1: '{name}' must be a numeric array"),
        (lambda d: d[4].__setitem__(model.label_name, 3), r"example 4: label 3 .*must be a str"),
        (lambda d: d[0].pop(model.label_name), rf"example 0 has no '{model.label_name}'"),
        (lambda d: d.clear(), r"training_data is empty"),
    ]
    for mutate, needle in cases:
        data = [dict(d) for d in good]
        mutate(data)
        task, ctx, events = _run(model, data)
        assert task.state == "failed" and events == [] and ctx.model is None, needle
        with pytest.raises(mp.InvalidInputError, match=needle):
            raise ctx.error
    assert model.num_samples == 6


def test_pipeline_refuses_bad_data_with_the_global_index():
    r = np.random.default_rng(1)
    weights = (r.normal(size=(16, SIDE * SIDE)).astype(np.float32) * 0.2, r.normal(size=16).astype(np.float32) * 0.1,
               r.normal(size=(6, 16)).astype(np.float32) * 0.3)
    model = mp.load(apple_style_pipeline(embedding_spec(weights), knn_spec()))
    imgs = drawings(r, 300)
    data = [{"drawing": im, "label": "ab"[i % 2]} for i, im in enumerate(imgs)]
    bad = np.full((SIDE, SIDE), 0.5, np.float32)
    bad[1, 1] = np.nan
    for mutate, needle in [
        (lambda d: d[290].__setitem__("drawing", bad), r"example 290: image 'drawing' contains NaN"),
        (lambda d: d[5].__setitem__("drawing", np.zeros((2, 3, 4, 5), np.uint8)), r"example 5: image 'drawing' must be"),
        (lambda d: d.clear(), r"training_data is empty"),
    ]:
        copy_ = list(data)
        mutate(copy_)
        task, ctx, events = _run(model, copy_)
        assert task.state == "failed" and events == [], needle
        with pytest.raises(mp.InvalidInputError, match=needle):
            raise ctx.error


# --- part 5: concurrency --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def head():
    m = Head()
    X, y, data = data_set(96)
    spec = head_spec(m, "sgd", epochs=4)
    return spec, data


def test_predictions_from_threads_during_an_update_stay_exact(head):
    spec, data = head
    model = mp.load(spec)
    queries = [[{"image": d["image"]} for d in data[i:i + 5]] for i in range(0, 40, 5)]
    before = [model.predict_batch(q) for q in queries]
    stop, errors, counts = threading.Event(), [], [0] * 4

    def predictor(k):
        try:
            while not stop.is_set():
                j = counts[k] % len(queries)
                if model.predict_batch(queries[j]) != before[j]:
                    errors.append((k, j))
                counts[k] += 1
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=predictor, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    try:
        solo = mp.load(spec).update(data, parameters={"shuffle": False})
        task = mp.UpdateTask(model, data, parameters={"shuffle": False})
        task.resume()
        ctx = task.wait(60)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert task.state == "completed" and errors == [] and min(counts) >= 1, (errors, counts)
    assert ctx.model.spec == solo.spec  # training with predictions alongside = training alone
    assert [model.predict_batch(q) for q in queries] == before


def test_two_tasks_on_one_model_do_not_interfere(head):
    spec, data = head
    model = mp.load(spec)
    solo_a = mp.load(spec).update(data, parameters={"seed": 1})
    solo_b = mp.load(spec).update(data[:50], parameters={"learning_rate": 0.01, "seed": 2})
    snaps = []
    a = mp.UpdateTask(model, data, parameters={"seed": 1},
                      progress_handlers={"epoch_end": lambda c: snaps.append(c.model)})
    b = mp.UpdateTask(model, data[:50], parameters={"learning_rate": 0.01, "seed": 2})
    a.resume()
    b.resume()
    ca, cb = a.wait(60), b.wait(60)
    assert a.state == b.state == "completed"
    assert ca.model.spec == solo_a.spec and cb.model.spec == solo_b.spec
    assert model.spec == spec and len(snaps) == 4


def test_snapshot_from_another_thread_never_disturbs_training(head):
    """ctx.model read from the main thread while the task steps: the task's result is unchanged."""
    spec, data = head
    solo = mp.load(spec).update(data, parameters={"seed": 4})
    first_step, first_snapshot = threading.Event(), threading.Event()

    def mini_batch_end(ctx):  # training pauses once, until the main thread has a snapshot going
        if not first_step.is_set():
            first_step.set()
            first_snapshot.wait(10)

    task = mp.UpdateTask(mp.load(spec), data, parameters={"seed": 4},
                         progress_handlers={"mini_batch_end": mini_batch_end})
    task.resume()
    assert first_step.wait(10)
    snaps, deadline = 0, time.monotonic() + 20
    while (task.state == "running" or snaps == 0) and time.monotonic() < deadline:
        ctx = task.context
        if ctx is not None and ctx.event == "mini_batch_end":
            ctx.model  # noqa: B018  (builds a snapshot in this thread while the task steps)
            snaps += 1
            first_snapshot.set()
    assert task.wait().model.spec == solo.spec and snaps >= 1


def test_cancel_is_prompt(head):
    """cancel() from another thread: at most the mini-batch in flight completes (< 1 mini-batch)."""
    spec, data = head
    ends, after = [], []
    started = threading.Event()

    def on_mb(ctx):
        ends.append(time.perf_counter())
        if len(ends) == 3:
            started.set()

    task = mp.UpdateTask(mp.load(spec), data, parameters={"mini_batch_size": 8},
                         progress_handlers={"mini_batch_end": on_mb})
    task.resume()
    assert started.wait(30)
    t = time.perf_counter()
    task.cancel()
    ctx = task.wait(30)
    done = time.perf_counter()
    after = [e for e in ends if e > t]
    assert task.state == "cancelled" and ctx.model is not None
    assert len(after) <= 1, f"{len(after)} mini-batches ended after cancel()"
    per_batch = np.median(np.diff(ends[:3])) if len(ends) >= 3 else None
    assert len(ends) < 4 * 12  # far from the 4 epochs of 12 mini-batches
    print(f"cancel: {len(after)} mini-batch(es) after cancel(), stopped in {1e3 * (done - t):.2f} ms "
          f"(a mini-batch takes ~{1e3 * per_batch:.2f} ms)")


def test_cancel_during_prepare_is_honoured():
    spec, _, _ = classifier_spec()
    seen = []
    task = mp.UpdateTask(mp.load(spec), cls_data(), progress_handlers={
        "training_began": seen.append, "mini_batch_end": seen.append})
    task._cancel.set()  # as if cancel() landed while the task was preparing
    task.resume()
    ctx = task.wait(10)
    assert task.state == "cancelled" and seen == [] and ctx.model is not None
