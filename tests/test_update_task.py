"""UpdateTask: events, metrics, cancel/resume from handlers, writing, bad input, several model shapes."""

import copy
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from coremltools.models import datatypes
from coremltools.models.neural_network import AdamParams, NeuralNetworkBuilder, SgdParams

import mlpersonal as mp
from mlpersonal.update_params import resolve
from update_models import CNN, LABELS, dataset, layer_weights, torch_train, updatable_cnn_spec

SGD_KW = dict(lr=0.05, batch=8, epochs=2, momentum=0.9)


@pytest.fixture(scope="module")
def cnn():
    m = CNN()
    X, y, Y = dataset()
    spec = updatable_cnn_spec(m, "ce", "sgd", **SGD_KW)
    data = [{"image": X[i].numpy(), "label": LABELS[int(y[i])]} for i in range(len(X))]
    return m, spec, data, X, y


def _run(model, data, **kw):
    task = mp.UpdateTask(model, data, **kw)
    assert task.state == "ready"
    task.resume()
    return task, task.wait()


def test_events_metrics_and_completion(cnn):
    m, spec, data, X, y = cnn
    seen, done = [], []
    handlers = {e: (lambda ctx: seen.append((ctx.event, dict(ctx.metrics))))
                for e in ("training_began", "mini_batch_end", "epoch_end")}
    task, ctx = _run(mp.load(spec), data, parameters={"shuffle": False}, progress_handlers=handlers,
                     completion_handler=lambda c: done.append((c.event, c.task.state)))
    assert task.state == "completed" and ctx.event == "completed" and ctx.error is None
    assert done == [("completed", "completed")]
    # 20 examples, mini-batches of 8 -> 8, 8, 4 (last partial batch kept), 2 epochs
    assert [e for e, _ in seen] == ["training_began"] + (["mini_batch_end"] * 3 + ["epoch_end"]) * 2
    assert seen[0][1] == {"loss": None, "epoch_index": 0, "mini_batch_index": 0}
    mbs = [mt for e, mt in seen if e == "mini_batch_end"]
    assert [(mt["epoch_index"], mt["mini_batch_index"]) for mt in mbs] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    ref_losses = torch_train(copy.deepcopy(m), X, y, "ce", "sgd", **SGD_KW)
    np.testing.assert_allclose([mt["loss"] for mt in mbs], ref_losses, rtol=1e-5)
    ends = [mt for e, mt in seen if e == "epoch_end"]
    assert [(mt["epoch_index"], mt["mini_batch_index"]) for mt in ends] == [(0, 2), (1, 2)]
    assert ends[0]["loss"] == pytest.approx(np.mean(ref_losses[:3]), rel=1e-5)
    assert ctx.metrics == ends[-1] and ctx.parameters["learning_rate"] == 0.05


def test_cancel_from_a_handler(cnn):
    _, spec, data, _, _ = cnn
    seen = []

    def on_mb(ctx):
        seen.append(ctx.metrics["mini_batch_index"])
        if ctx.metrics["mini_batch_index"] == 1:
            ctx.task.cancel()

    task, ctx = _run(mp.load(spec), data, progress_handlers={"mini_batch_end": on_mb,
                                                             "epoch_end": lambda c: seen.append("epoch")})
    assert task.state == "cancelled" and ctx.event == "cancelled" and ctx.error is None
    assert seen == [0, 1]  # stopped right after the mini-batch that asked
    assert ctx.model is not None  # the model as trained so far
    assert not np.array_equal(layer_weights(ctx.model.spec, "fc")["weights"], layer_weights(spec, "fc")["weights"])


def test_cancel_before_start():
    task = mp.UpdateTask("never-loaded.mlmodel", [{}])
    task.cancel()
    assert task.state == "cancelled"
    with pytest.raises(mp.MLPersonalError, match="cannot resume"):
        task.resume()


def test_resume_with_parameters_from_a_handler(cnn):
    m, spec, data, X, y = cnn
    rejected = []

    def on_epoch(ctx):
        if ctx.metrics["epoch_index"] == 0:
            try:
                ctx.task.resume(parameters={"learning_rate": 5.0})  # outside [0, 1]
            except mp.UpdateParameterError as e:
                rejected.append(str(e))
            ctx.task.resume(parameters={"learning_rate": 0.0})

    task, ctx = _run(mp.load(spec), data, parameters={"shuffle": False},
                     progress_handlers={"epoch_end": on_epoch})
    assert task.state == "completed" and ctx.parameters["learning_rate"] == 0.0
    assert rejected and "outside the range" in rejected[0]
    # lr 0 in epoch 2 (momentum * buffer * 0 = 0): weights equal torch after 1 epoch
    ref = copy.deepcopy(m)
    torch_train(ref, X, y, "ce", "sgd", **{**SGD_KW, "epochs": 1})
    np.testing.assert_allclose(layer_weights(ctx.model.spec, "fc")["weights"],
                               ref.fc.weight.detach().numpy().ravel(), rtol=1e-5, atol=1e-7)


def test_resume_epochs_from_training_began(cnn):
    _, spec, data, _, _ = cnn
    ends = []
    task, ctx = _run(mp.load(spec), data, progress_handlers={
        "training_began": lambda c: c.task.resume(parameters={"epochs": 1}),
        "epoch_end": lambda c: ends.append(c.metrics["epoch_index"])})
    assert ends == [0] and task.state == "completed"


def test_out_of_range_override_fails_before_training(cnn):
    _, spec, data, _, _ = cnn
    called = []
    task, ctx = _run(mp.load(spec), data, parameters={"mini_batch_size": 5},
                     progress_handlers={"training_began": called.append})
    assert task.state == "failed" and isinstance(ctx.error, mp.UpdateParameterError)
    assert "not allowed" in str(ctx.error) and ctx.model is None and called == []
    with pytest.raises(mp.UpdateParameterError, match="unknown update parameter"):
        mp.load(spec).update(data, parameters={"learn_rate": 0.1})


def test_save_is_updatable_and_reloads_identically(cnn, tmp_path):
    _, spec, data, X, _ = cnn
    src = tmp_path / "m.mlmodel"
    mp.save(spec, src)
    before = src.read_bytes()
    trained = mp.load(src).update(data, parameters={"epochs": 1})
    assert src.read_bytes() == before  # the original file is never touched
    out = trained.save(tmp_path / "trained.mlmodel")
    again = mp.load(out)
    assert again.is_updatable and again.spec.neuralNetworkClassifier.updateParams == spec.neuralNetworkClassifier.updateParams
    assert list(again.spec.description.trainingInput) == list(spec.description.trainingInput)
    feats = [{"image": X[i].numpy()} for i in range(6)]
    assert again.predict_batch(feats) == trained.predict_batch(feats)
    # and it trains again
    assert again.update(data, parameters={"epochs": 1}).is_updatable


def test_original_predictions_stay_valid_while_training(cnn):
    _, spec, data, X, _ = cnn
    original = mp.load(spec)
    feats = [{"image": X[i].numpy()} for i in range(4)]
    before = original.predict_batch(feats)
    gate, go = threading.Event(), threading.Event()

    def on_mb(ctx):
        gate.set()
        go.wait(5)

    task = mp.UpdateTask(original, data, progress_handlers={"mini_batch_end": on_mb})
    task.resume()
    assert gate.wait(10) and task.state == "running"
    during = original.predict_batch(feats)  # training is mid-way in the other thread
    go.set()
    ctx = task.wait()
    assert during == before and original.predict_batch(feats) == before
    assert ctx.model.predict_batch(feats) != before


# --- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize("mutate, error, needle", [
    (lambda d: d[3].update(label="triangle"), mp.InvalidInputError, r"example 3: unknown class label 'triangle'"),
    (lambda d: d[2].update(image=np.zeros((1, 9, 10), np.float32)), mp.InvalidInputError, r"example 2.*shape"),
    (lambda d: d[5]["image"].__setitem__((0, 0, 0), np.nan), mp.InvalidInputError, r"example 5.*NaN"),
    (lambda d: d[1].pop("label"), mp.InvalidInputError, r"example 1 has no target 'label'"),
    (lambda d: d.clear(), mp.InvalidInputError, "empty"),
])
def test_bad_training_data_fails_before_the_first_step(cnn, mutate, error, needle):
    _, spec, data, _, _ = cnn
    data = [{k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in ex.items()} for ex in data]
    mutate(data)
    steps = []
    task, ctx = _run(mp.load(spec), data, progress_handlers={"mini_batch_end": steps.append})
    assert task.state == "failed" and isinstance(ctx.error, error) and ctx.model is None
    assert steps == []
    with pytest.raises(error, match=needle):
        raise ctx.error


def test_not_updatable_model():
    b = NeuralNetworkBuilder([("x", datatypes.Array(2))], [("y", datatypes.Array(1))])
    b.add_inner_product("fc", np.ones((1, 2), np.float32), None, 2, 1, False, "x", "y")
    task, ctx = _run(mp.load(b.spec), [{"x": np.ones(2), "y_true": np.ones(1)}])
    assert task.state == "failed" and isinstance(ctx.error, mp.InvalidModelError)
    assert "not updatable" in str(ctx.error)
    with pytest.raises(mp.InvalidModelError):
        mp.load(b.spec).update([{"x": np.ones(2)}])


def _linear_regressor(optimizer="sgd", lr=0.01, epochs=1, batch=4):
    b = NeuralNetworkBuilder([("x", datatypes.Array(3))], [("y", datatypes.Array(2))], mode="regressor")
    b.spec.description.predictedFeatureName = "y"  # Core ML: a regressor names its prediction
    b.add_inner_product("fc", np.full((2, 3), 0.1, np.float32), np.zeros(2, np.float32), 3, 2, True, "x", "y")
    b.make_updatable(["fc"])
    b.set_mean_squared_error_loss("lossLayer", input_feature=("y", datatypes.Array(2)))
    if optimizer == "sgd":
        b.set_sgd_optimizer(SgdParams(lr=lr, batch=batch))
    else:
        b.set_adam_optimizer(AdamParams(lr=lr, batch=batch))
    b.set_epochs(epochs)
    return b.spec


def test_loss_turning_nan_mid_training_fails_and_writes_nothing(tmp_path):
    rng = np.random.default_rng(0)
    data = [{"x": rng.normal(size=3) * 1e3, "y_true": rng.normal(size=2)} for _ in range(40)]
    src = tmp_path / "r.mlmodel"
    mp.save(_linear_regressor(lr=1.0, epochs=1, batch=4), src)
    before = src.read_bytes()
    steps = []
    task, ctx = _run(src, data, progress_handlers={"mini_batch_end": lambda c: steps.append(c.metrics["loss"])})
    assert task.state == "failed" and isinstance(ctx.error, mp.TrainingError)
    assert "loss became" in str(ctx.error) and ctx.model is None
    assert len(steps) >= 1 and all(np.isfinite(steps))  # it failed mid-training, at a later step
    assert src.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["r.mlmodel"]


def test_mse_target_of_wrong_size():
    data = [{"x": np.ones(3), "y_true": np.ones(3)}]
    with pytest.raises(mp.InvalidInputError, match=r"example 0: target 'y_true' has shape \(3,\)"):
        mp.load(_linear_regressor()).update(data)


def test_handler_exception_fails_the_task(cnn):
    _, spec, data, _, _ = cnn

    def boom(ctx):
        raise KeyError("oops")

    task, ctx = _run(mp.load(spec), data, progress_handlers={"epoch_end": boom})
    assert task.state == "failed" and isinstance(ctx.error, mp.TrainingError) and "oops" in str(ctx.error)


def test_bad_task_arguments():
    with pytest.raises(mp.MLPersonalError, match="unknown progress event"):
        mp.UpdateTask("x.mlmodel", [], progress_handlers={"batch_end": print})
    task = mp.UpdateTask("x.mlmodel", [])
    with pytest.raises(mp.MLPersonalError, match="resume"):
        task.wait()


# --- models made updatable by coremltools' builders ----------------------------------------------
def test_builder_classifier_ce_sgd_trains(tmp_path):
    import random

    random.seed(0)  # the spec stores no seed: the task draws its shuffle seed from `random`
    g = torch.Generator().manual_seed(3)
    y = torch.arange(20) % 5
    X = torch.rand(20, 1, 10, 10, generator=g) * 0.2
    for i in range(20):  # class k: a bright band at rows 2k, 2k+1
        X[i, 0, 2 * int(y[i]):2 * int(y[i]) + 2, :] += 1.0
    data = [{"image": X[i].numpy(), "label": LABELS[int(y[i])]} for i in range(20)]
    m = mp.load(updatable_cnn_spec(CNN(seed=1), "ce", "sgd", **SGD_KW))
    ends = []
    trained = m.update(data, parameters={"epochs": 10},
                       progress_handlers={"epoch_end": lambda c: ends.append(c.metrics["loss"])})
    assert len(ends) == 10 and ends[-1] < 0.2 * ends[0]
    again = mp.load(trained.save(tmp_path / "c.mlmodel"))
    feats = [{"image": ex["image"]} for ex in data]
    assert again.predict_batch(feats) == trained.predict_batch(feats)
    acc = np.mean([p["label"] == ex["label"] for p, ex in zip(trained.predict_batch(feats), data)])
    assert acc >= 0.9


def test_builder_regressor_mse_adam_trains(tmp_path):
    rng = np.random.default_rng(0)
    W = rng.normal(size=(2, 3))
    xs = rng.normal(size=(64, 3))
    data = [{"x": x, "y_true": W @ x} for x in xs]
    ends = []
    trained = mp.load(_linear_regressor("adam", lr=0.05, epochs=20, batch=8)).update(
        data, progress_handlers={"epoch_end": lambda c: ends.append(c.metrics["loss"])})
    assert len(ends) == 20 and ends[-1] < 0.05 * ends[0]
    again = mp.load(trained.save(tmp_path / "r.mlmodel"))
    a, b = again.predict_batch(data[:5]), trained.predict_batch(data[:5])
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u["y"], v["y"])


def test_several_inputs_embedding_concat_match_torch(tmp_path):
    """Two inputs, a frozen embedding and a concat before two updatable layers (as published
    updatable regressors have); checked against the same training in torch with Adam."""
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(5, 3, generator=g)  # vocab 5 -> 3
    W1, b1 = torch.randn(8, 7, generator=g) * 0.3, torch.randn(8, generator=g) * 0.1
    W2, b2 = torch.randn(1, 8, generator=g) * 0.3, torch.zeros(1)
    b = NeuralNetworkBuilder([("features", datatypes.Array(4)), ("category", datatypes.Array(1))],
                             [("price", datatypes.Array(1))], mode="regressor")
    b.spec.description.predictedFeatureName = "price"
    b.add_embedding("emb", emb.t().numpy(), None, 5, 3, False, "category", "e")
    b.add_elementwise("cat", ["features", "e"], "h0", "CONCAT")
    b.add_inner_product("fc1", W1.numpy(), b1.numpy(), 7, 8, True, "h0", "h1")
    b.add_activation("relu", "RELU", "h1", "h2")
    b.add_inner_product("fc2", W2.numpy(), b2.numpy(), 8, 1, True, "h2", "price")
    b.make_updatable(["fc1", "fc2"])
    b.set_mean_squared_error_loss("lossLayer", input_feature=("price", datatypes.Array(1)))
    b.set_adam_optimizer(AdamParams(lr=0.01, batch=10))
    b.set_epochs(3)
    feats = torch.randn(30, 4, generator=g)
    cats = torch.randint(0, 5, (30,), generator=g)
    target = (feats.sum(1, keepdim=True) + cats[:, None].float()) * 0.5
    data = [{"features": feats[i].numpy(), "category": np.array([cats[i]], np.float32),
             "price_true": target[i].numpy()} for i in range(30)]
    losses = []
    trained = mp.load(b.spec).update(data, parameters={"shuffle": False},
                                     progress_handlers={"epoch_end": lambda c: losses.append(c.metrics["loss"])})
    assert losses[-1] < losses[0]
    # torch oracle
    p = [torch.nn.Parameter(t.clone()) for t in (W1, b1, W2, b2)]
    opt = torch.optim.Adam(p, lr=0.01)
    for _ in range(3):
        for s in range(0, 30, 10):
            h = torch.cat([feats[s:s + 10], emb[cats[s:s + 10]]], 1)
            out = F.linear(F.relu(F.linear(h, p[0], p[1])), p[2], p[3])
            loss = F.mse_loss(out, target[s:s + 10])
            opt.zero_grad()
            loss.backward()
            opt.step()
    for name, w, bias in (("fc1", p[0], p[1]), ("fc2", p[2], p[3])):
        got = layer_weights(trained.spec, name)
        np.testing.assert_allclose(got["weights"], w.detach().numpy().ravel(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(got["bias"], bias.detach().numpy().ravel(), rtol=1e-5, atol=1e-7)
    again = mp.load(trained.save(tmp_path / "multi.mlmodel"))
    q = [{"features": d["features"], "category": d["category"]} for d in data[:4]]
    assert [float(r["price"][0]) for r in again.predict_batch(q)] == [float(r["price"][0]) for r in trained.predict_batch(q)]


@pytest.mark.parametrize("leading_one,vmap", [(True, True), (False, True), (False, False)])
def test_nd_model_matches_torch(leading_one, vmap, monkeypatch):
    """EXACT_ARRAY_MAPPING models: batched (leading 1) and example-by-example (no batch axis);
    the examples of a mini-batch run in one vmapped pass, or one by one where vmap fails."""
    if not vmap:
        def refuse(*a, **k):
            raise RuntimeError("vmap is not available here")
        monkeypatch.setattr(torch.func, "vmap", refuse)
    g = torch.Generator().manual_seed(1)
    W, bias = torch.randn(3, 4, generator=g), torch.randn(3, generator=g)
    shape = (1, 4) if leading_one else (4,)
    b = NeuralNetworkBuilder([("x", datatypes.Array(*shape))], [("p", datatypes.Array(3))],
                             mode="classifier", disable_rank5_shape_mapping=True)
    b.add_inner_product("fc", W.numpy(), bias.numpy(), 4, 3, True, "x", "z")
    b.add_softmax("sm", "z", "p")
    b.set_class_labels([10, 20, 30], predicted_feature_name="cls")
    b.make_updatable(["fc"])
    b.set_categorical_cross_entropy_loss("lossLayer", input="p")
    b.set_sgd_optimizer(SgdParams(lr=0.1, batch=4, momentum=0.5))
    b.set_epochs(1)
    X = torch.randn(10, 4, generator=g)
    y = torch.randint(0, 3, (10,), generator=g)
    data = [{"x": X[i].reshape(shape).numpy(), "cls": [10, 20, 30][int(y[i])]} for i in range(10)]
    trained = mp.load(b.spec).update(data, parameters={"shuffle": False})
    up = mp.load(b.spec).make_updater()
    up.prepare(data, resolve(up.parameters(), {}))
    assert up._vmap == vmap  # the per-example losses of a mini-batch in one pass, or a loop
    w = torch.nn.Parameter(W.clone())
    bb = torch.nn.Parameter(bias.clone())
    opt = torch.optim.SGD([w, bb], lr=0.1, momentum=0.5)
    for s in range(0, 10, 4):
        loss = F.cross_entropy(F.linear(X[s:s + 4], w, bb), y[s:s + 4])
        opt.zero_grad()
        loss.backward()
        opt.step()
    got = layer_weights(trained.spec, "fc")
    np.testing.assert_allclose(got["weights"], w.detach().numpy().ravel(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got["bias"], bb.detach().numpy(), rtol=1e-5, atol=1e-7)


def test_context_model_is_a_snapshot(cnn):
    m, spec, data, X, y = cnn
    snaps = []
    task, ctx = _run(mp.load(spec), iter(data), parameters={"shuffle": False},  # any iterable
                     progress_handlers={"epoch_end": lambda c: snaps.append(c.model)})
    assert len(snaps) == 2 and snaps[0] is not ctx.model
    ref = copy.deepcopy(m)
    torch_train(ref, X, y, "ce", "sgd", **{**SGD_KW, "epochs": 1})
    np.testing.assert_allclose(layer_weights(snaps[0].spec, "fc")["weights"],
                               ref.fc.weight.detach().numpy().ravel(), rtol=1e-5, atol=1e-7)
    feats = [{"image": X[i].numpy()} for i in range(3)]
    assert snaps[0].predict_batch(feats) != ctx.model.predict_batch(feats)
    assert snaps[1].predict_batch(feats) == ctx.model.predict_batch(feats)


def test_run_trains_in_the_calling_thread_like_resume(cnn):
    """run() = resume() + wait() without a thread: handlers run here, the same weights result."""
    _, spec, data, _, _ = cnn
    threads = []
    handlers = {"mini_batch_end": lambda c: threads.append(threading.current_thread())}
    task = mp.UpdateTask(mp.load(spec), data, parameters={"shuffle": False}, progress_handlers=handlers)
    ctx = task.run()
    assert task.state == "completed" and ctx.error is None and ctx.model is not None
    assert set(threads) == {threading.current_thread()}
    with pytest.raises(mp.MLPersonalError, match="cannot run a task that is completed"):
        task.run()
    assert task.wait() is ctx  # wait() on a finished run() returns at once
    _, other = _run(mp.load(spec), data, parameters={"shuffle": False})
    for name in ("conv1", "fc"):
        np.testing.assert_array_equal(layer_weights(ctx.model.spec, name)["weights"],
                                      layer_weights(other.model.spec, name)["weights"])


def test_run_cancelled_from_a_handler_and_wait_from_a_handler_refused(cnn):
    _, spec, data, _, _ = cnn
    errors = []

    def on_mb(ctx):
        try:
            ctx.task.wait()
        except mp.MLPersonalError as e:
            errors.append(str(e))
        ctx.task.cancel()

    task = mp.UpdateTask(mp.load(spec), data, progress_handlers={"mini_batch_end": on_mb})
    ctx = task.run()
    assert task.state == "cancelled" and ctx.event == "cancelled"
    assert errors and "would never return" in errors[0]


def _os_threads() -> int:
    import os

    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/task"), reason="needs /proc (Linux)")
def test_resume_releases_the_callers_idle_openmp_workers(cnn):
    """resume() lets the caller's idle OpenMP workers exit (libgomp stops spin-waiting once its
    threads outnumber the cores, which made background training ~1.8x slower); the caller's next
    parallel op starts them again and the task trains as usual."""
    from runtime.native import loaded_function

    if loaded_function("omp_pause_resource_all") is None:
        pytest.skip("needs torch's OpenMP runtime")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _check_release(cnn)
    finally:
        torch.set_num_threads(threads)


def _check_release(cnn):
    import time

    from runtime.update import _release_openmp_pool

    big = torch.randn(1 << 22)

    def spin_up():  # a parallel op in this thread: its OpenMP team (workers) exists afterwards
        torch.relu(big)
        time.sleep(0.05)
        return _os_threads()

    with_team = spin_up()
    _release_openmp_pool()
    deadline = time.monotonic() + 2
    while _os_threads() >= with_team and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _os_threads() < with_team
    assert spin_up() == with_team  # started again on demand

    _, spec, data, _, _ = cnn
    spin_up()
    task, ctx = _run(mp.load(spec), data)
    assert ctx.error is None and task.state == "completed"
