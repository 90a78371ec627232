"""Reliability of on-device updates: hostile training data and concurrency.

Complements the UpdateTask tests (runtime/update.py): data the task must refuse before the first
optimizer step (Inf, wrong dtypes, NaN targets, ...), a source file that is never modified, and
threads: predictions while a task trains, two tasks on one model, prompt cancel.
Skipped where runtime.update is not present.
"""

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from coremltools.models import datatypes
from coremltools.models.neural_network import NeuralNetworkBuilder, SgdParams

import mlpersonal as mp

import runtime

if not (Path(runtime.__file__).parent / "update.py").exists():  # not another checkout's copy
    pytest.skip("runtime.update (UpdateTask) is not in this checkout", allow_module_level=True)

LABELS = ["a", "b", "c"]


def _classifier(batch=4, epochs=3, lr=0.1):
    rng = np.random.default_rng(0)
    b = NeuralNetworkBuilder([("x", datatypes.Array(5))], [("probs", datatypes.Array(3))],
                             mode="classifier")
    b.add_inner_product("fc1", rng.normal(size=(8, 5)).astype(np.float32), np.zeros(8, np.float32),
                        5, 8, True, "x", "h")
    b.add_activation("relu", "RELU", "h", "hr")
    b.add_inner_product("fc2", rng.normal(size=(3, 8)).astype(np.float32), np.zeros(3, np.float32),
                        8, 3, True, "hr", "logits")
    b.add_softmax("sm", "logits", "probs")
    b.set_class_labels(LABELS, predicted_feature_name="label")
    b.make_updatable(["fc1", "fc2"])
    b.set_categorical_cross_entropy_loss("loss", input="probs")
    b.set_sgd_optimizer(SgdParams(lr=lr, batch=batch, momentum=0.0))
    b.set_epochs(epochs)
    b.spec.neuralNetworkClassifier.updateParams.seed.defaultValue = 7
    return b.spec


def _data(n=24, seed=1):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=5).astype(np.float32), "label": LABELS[i % 3]} for i in range(n)]


def _run(model, data, **kw):
    task = mp.UpdateTask(model, data, **kw)
    task.resume()
    return task, task.wait(60)


def _weights(model):
    return [np.asarray(l.innerProduct.weights.floatValue)
            for l in model.spec.neuralNetworkClassifier.layers if l.WhichOneof("layer") == "innerProduct"]


# --- 4. training data ----------------------------------------------------------------------------
@pytest.mark.parametrize("mutate, needle", [
    (lambda d: d[4]["x"].__setitem__(2, np.inf), r"example 4: feature 'x' contains NaN or Inf"),
    (lambda d: d[6]["x"].__setitem__(0, -np.inf), r"example 6: feature 'x' contains NaN or Inf"),
    (lambda d: d[3].update(x=np.array(["1", "2", "3", "4", "5"])), r"example 3: feature 'x' must be numeric"),
    (lambda d: d[2].update(x=np.zeros((5, 2), np.float32)), r"example 2: feature 'x' has shape \(5, 2\)"),
    (lambda d: d[7].update(label=3.5), r"example 7"),
    (lambda d: d[9].pop("x"), r"example 9: missing input feature 'x'"),
])
def test_bad_examples_refused_before_first_step(mutate, needle):
    data = _data()
    mutate(data)
    steps = []
    task, ctx = _run(mp.load(_classifier()), data, progress_handlers={"mini_batch_end": steps.append})
    assert task.state == "failed" and ctx.model is None and steps == []
    assert isinstance(ctx.error, mp.InvalidInputError)
    with pytest.raises(mp.InvalidInputError, match=needle):
        raise ctx.error


def test_mini_batch_larger_than_data_trains_one_partial_batch():
    """Core ML keeps the last partial mini-batch: 5 examples with miniBatchSize 8 -> one step."""
    steps = []
    task, ctx = _run(mp.load(_classifier(batch=8, epochs=2)), _data(5),
                     progress_handlers={"mini_batch_end": lambda c: steps.append(dict(c.metrics))})
    assert task.state == "completed"
    assert [(s["epoch_index"], s["mini_batch_index"]) for s in steps] == [(0, 0), (1, 0)]


def test_source_file_is_never_modified(tmp_path):
    src = tmp_path / "m.mlmodel"
    mp.save(_classifier(), src)
    before = src.read_bytes()
    task, ctx = _run(src, _data())
    assert task.state == "completed"
    ctx.model.save(tmp_path / "out.mlmodel")
    assert src.read_bytes() == before
    assert any(not np.array_equal(a, b) for a, b in zip(_weights(ctx.model), _weights(mp.load(src))))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.mlmodel", "out.mlmodel"]


# --- 5. concurrency ----------------------------------------------------------------------------
def test_predictions_from_threads_during_training_are_unchanged():
    model = mp.load(_classifier(epochs=30))
    feats = [{"x": ex["x"]} for ex in _data(6, seed=3)]
    before = model.predict_batch(feats)
    errors, results = [], []
    def mini_batch_end(ctx):  # hold training once until the predictors are all running
        deadline = time.monotonic() + 10
        while len(results) < 4 and time.monotonic() < deadline:
            time.sleep(0.001)

    task = mp.UpdateTask(model, _data(48), progress_handlers={"mini_batch_end": mini_batch_end})
    task.resume()

    def predict_loop():
        try:
            while task.state in ("ready", "running"):
                results.append(model.predict_batch(feats))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=predict_loop) for _ in range(4)]
    for t in threads:
        t.start()
    ctx = task.wait(120)
    for t in threads:
        t.join()
    assert errors == [] and ctx.error is None and len(results) >= 4
    assert all(r == before for r in results)  # the task trains a private copy
    assert model.predict_batch(feats) == before
    assert ctx.model.predict_batch(feats) != before


def test_two_tasks_on_one_model_do_not_interfere():
    model = mp.load(_classifier())
    alone = _run(model, _data())[1].model
    t1 = mp.UpdateTask(model, _data(), parameters={"shuffle": True})
    t2 = mp.UpdateTask(model, _data(seed=9))
    t1.resume()
    t2.resume()
    c1, c2 = t1.wait(60), t2.wait(60)
    assert c1.error is None and c2.error is None
    # seeded (seed 7 in the model): the concurrent run equals the run alone
    for a, b in zip(_weights(c1.model), _weights(alone)):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(_weights(c2.model), _weights(alone)))
    ref2 = _run(model, _data(seed=9))[1].model
    for a, b in zip(_weights(c2.model), _weights(ref2)):
        np.testing.assert_array_equal(a, b)


def test_cancel_from_another_thread_is_prompt():
    """After cancel() returns, at most the mini-batch already in progress completes."""
    at_cancel, steps = [], []
    started = threading.Event()

    def on_mb(ctx):
        steps.append(ctx.metrics["mini_batch_index"])
        started.set()

    task = mp.UpdateTask(mp.load(_classifier(batch=1, epochs=500)), _data(48),
                         progress_handlers={"mini_batch_end": on_mb})
    task.resume()
    assert started.wait(30)
    at_cancel.append(len(steps))
    task.cancel()
    ctx = task.wait(30)
    assert task.state == "cancelled" and ctx.model is not None
    assert len(steps) - at_cancel[0] <= 1
    assert len(steps) < 500 * 48
