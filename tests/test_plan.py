"""runtime.plan: the onnxruntime inference plan equals the eager Network, falls back, is thread-safe.

Specs are built with coremltools' NeuralNetworkBuilder; the oracle is the same model predicting
with the plan off (the eager torch Network) and, for the classifier, a torch reference module.
"""

import logging
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("onnxruntime")
from coremltools.models import datatypes  # noqa: E402
from coremltools.models.neural_network import NeuralNetworkBuilder, flexible_shape_utils  # noqa: E402

import mlpersonal as mp  # noqa: E402
from mlpersonal.errors import InvalidInputError  # noqa: E402
from runtime.model import compile_spec  # noqa: E402

LABELS = ["a", "b", "c", "d"]


def _w(rng, *shape):
    return (rng.standard_normal(shape) * 0.3).astype(np.float32)


def classifier_spec(rng):
    """conv3x3(pad 1)+relu+maxpool -> flatten -> fc 4*4*4 -> 4 -> softmax; and its torch twin."""
    wc, bc, wf, bf = _w(rng, 4, 1, 3, 3), _w(rng, 4), _w(rng, 4, 64), _w(rng, 4)
    b = NeuralNetworkBuilder([("x", datatypes.Array(1, 8, 8))], [("probs", None)], mode="classifier")
    b.add_convolution("conv", 1, 4, 3, 3, 1, 1, "same", 1, wc.transpose(2, 3, 1, 0), bc, True,
                      input_name="x", output_name="c")
    b.add_activation("relu", "RELU", "c", "r")
    b.add_pooling("pool", 2, 2, 2, 2, "MAX", "VALID", "r", "p")
    b.add_flatten("flat", 0, "p", "f")
    b.add_inner_product("fc", wf, bf, 64, 4, True, "f", "logits")
    b.add_softmax("softmax", "logits", "probs")
    b.set_class_labels(LABELS, predicted_feature_name="label", prediction_blob="probs")

    def ref(x):
        y = F.max_pool2d(F.relu(F.conv2d(x, torch.from_numpy(wc), torch.from_numpy(bc), padding=1)), 2)
        return torch.softmax(F.linear(y.flatten(1), torch.from_numpy(wf), torch.from_numpy(bf)), 1)

    return b.spec, ref


def two_output_spec(rng, flexible=False):
    """x (3, 6, 6) -> conv -> relu -> [global avg pool -> fc -> "score"] and ["feat" = relu map]."""
    b = NeuralNetworkBuilder([("x", datatypes.Array(3, 6, 6))], [("score", None), ("feat", None)])
    b.add_convolution("conv", 3, 5, 3, 3, 1, 1, "same", 1, _w(rng, 3, 3, 3, 5), _w(rng, 5), True,
                      input_name="x", output_name="c")
    b.add_batchnorm("bn", 5, _w(rng, 5) + 1, _w(rng, 5), _w(rng, 5), np.abs(_w(rng, 5)) + 0.5, "c", "n")
    b.add_activation("relu", "RELU", "n", "feat")
    b.add_pooling("gap", 0, 0, 1, 1, "AVERAGE", "VALID", "feat", "g", is_global=True)
    b.add_inner_product("fc", _w(rng, 2, 5), _w(rng, 2), 5, 2, True, "g", "score")
    spec = b.spec
    if flexible:
        flexible_shape_utils.add_enumerated_multiarray_shapes(
            spec, "x", shapes=[flexible_shape_utils.NeuralNetworkMultiArrayShape(3, 6, 6),
                               flexible_shape_utils.NeuralNetworkMultiArrayShape(3, 9, 7)])
    return spec


def models(spec):
    planned = compile_spec(spec, "cpu_only")
    eager = compile_spec(spec, "cpu_only")
    eager.use_plan = False
    return planned, eager


def assert_same(outs, refs, tol=1e-5):
    assert len(outs) == len(refs)
    for o, r in zip(outs, refs):
        assert o.keys() == r.keys()
        for k in o:
            if isinstance(o[k], dict):
                assert o[k].keys() == r[k].keys()
                assert max(abs(o[k][c] - r[k][c]) for c in o[k]) <= tol
            elif isinstance(o[k], np.ndarray):
                assert o[k].shape == r[k].shape
                assert np.abs(o[k] - r[k]).max() <= tol
            else:
                assert o[k] == r[k]


def test_classifier_plan_matches_eager_and_torch(rng):
    spec, ref = classifier_spec(rng)
    planned, eager = models(spec)
    for n in (1, 7, 64):
        x = rng.standard_normal((n, 1, 8, 8)).astype(np.float32)
        feeds = [{"x": a} for a in x]
        first = planned.predict_batch(feeds)  # builds + verifies the plan
        outs = planned.predict_batch(feeds)
        assert outs == first  # the first call's outputs come from the plan too
        assert_same(outs, eager.predict_batch(feeds))
        probs = ref(torch.from_numpy(x)).numpy()
        got = np.array([[o["probs"][c] for c in LABELS] for o in outs])
        assert np.abs(got - probs).max() <= 1e-5
        assert [o["label"] for o in outs] == [LABELS[i] for i in probs.argmax(1)]
    plan = planned.inference_plan()
    assert plan.last_fallback_reason is None and len(plan._sessions) == 1  # one dynamic-batch session
    assert not plan.eager_batches and not plan._engine_trials  # a CNN never times the eager Network
    assert planned.predict({"x": x[0]})["label"] == outs[0]["label"]


def test_multiple_outputs_and_flexible_shapes(rng):
    planned, eager = models(two_output_spec(rng, flexible=True))
    for shape in ((3, 6, 6), (3, 9, 7)):
        for n in (1, 7, 64):
            feeds = [{"x": a} for a in rng.standard_normal((n, *shape)).astype(np.float32)]
            outs = planned.predict_batch(feeds)
            outs = planned.predict_batch(feeds)
            assert outs[0]["feat"].shape == (5, *shape[1:])
            assert_same(outs, eager.predict_batch(feeds))
    plan = planned.inference_plan()
    assert plan.last_fallback_reason is None and len(plan._sessions) == 2  # one per shape


def test_nd_model(rng):
    b = NeuralNetworkBuilder([("x", datatypes.Array(6))], [("y", None)],
                             disable_rank5_shape_mapping=True)
    b.add_inner_product("fc", _w(rng, 4, 6), _w(rng, 4), 6, 4, True, "x", "h")
    b.add_activation("tanh", "TANH", "h", "y")
    planned, eager = models(b.spec)
    for n in (1, 7):
        feeds = [{"x": a} for a in rng.standard_normal((n, 6)).astype(np.float32)]
        planned.predict_batch(feeds)
        assert_same(planned.predict_batch(feeds), eager.predict_batch(feeds))
    assert planned.inference_plan().last_fallback_reason is None  # vmap traced into the plan


class NumpyOnlySwish:
    """A custom layer with only a numpy evaluate: cannot be traced."""

    def __init__(self, parameters):
        self.beta = float(parameters.get("beta", 1.0))

    def evaluate(self, inputs):
        x = inputs[0]
        return [x / (1 + np.exp(-self.beta * x))]


def test_untraceable_custom_layer_falls_back(rng, caplog):
    from coremltools.proto import NeuralNetwork_pb2

    mp.register_custom_layer("PlanTestSwish", NumpyOnlySwish)
    b = NeuralNetworkBuilder([("x", datatypes.Array(5))], [("y", None)])
    w, bias = _w(rng, 5, 5), _w(rng, 5)
    b.add_inner_product("fc", w, bias, 5, 5, True, "x", "h")
    params = NeuralNetwork_pb2.CustomLayerParams()
    params.className = "PlanTestSwish"
    params.parameters["beta"].doubleValue = 1.5
    b.add_custom("swish", ["h"], ["y"], custom_proto_spec=params)
    planned, eager = models(b.spec)
    x = rng.standard_normal((7, 5)).astype(np.float32)
    feeds = [{"x": a} for a in x]
    with caplog.at_level(logging.DEBUG, logger="runtime.plan"):
        first = planned.predict_batch(feeds)
    assert planned.inference_plan().last_fallback_reason is not None
    assert any("running eagerly" in r.getMessage() for r in caplog.records)
    h = x @ w.T + bias
    expect = h / (1 + np.exp(-1.5 * h))
    for outs in (first, planned.predict_batch(feeds), planned.predict_batch(feeds[:1])):
        got = np.stack([o["y"].reshape(-1) for o in outs])
        assert np.abs(got - expect[:len(outs)]).max() <= 1e-5
    fresh = models(b.spec)[0]  # a first call as small as the probe, on a fresh plan that fails
    assert np.abs(fresh.predict({"x": x[1]})["y"].reshape(-1) - expect[1]).max() <= 1e-5
    assert fresh.inference_plan().last_fallback_reason is not None


def test_weights_changed_in_place_use_eager_then_rebuild(rng):
    spec = two_output_spec(rng)
    for layer in spec.neuralNetwork.layers:
        if layer.name == "fc":
            layer.isUpdatable = True
    planned, eager = models(spec)
    feeds = [{"x": a} for a in rng.standard_normal((3, 3, 6, 6)).astype(np.float32)]
    planned.predict_batch(feeds)
    with torch.no_grad():
        for p in planned.net.params.values():
            p.add_(0.25)
    eager.net.load_state_dict(planned.net.state_dict())
    for _ in range(3):  # stale -> eager, then rebuilt with the new weights
        assert_same(planned.predict_batch(feeds), eager.predict_batch(feeds))
    plan = planned.inference_plan()
    assert plan._sessions and plan.last_fallback_reason is None
    assert all(type(e).__name__ == "_Signature" for e in plan._sessions.values())  # none failed
    assert all(p.requires_grad for p in planned.net.params.values())  # still trainable


def test_concurrent_predictions(rng):
    spec, _ = classifier_spec(rng)
    planned, eager = models(spec)
    batches = [[{"x": a} for a in rng.standard_normal((n, 1, 8, 8)).astype(np.float32)]
               for n in (1, 3, 8, 5)]
    expected = [eager.predict_batch(b) for b in batches]
    errors = []

    def worker(i):
        try:
            for _ in range(15):
                assert_same(planned.predict_batch(batches[i]), expected[i])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert len(planned.inference_plan()._sessions) == 1


def test_fast_path_keeps_input_errors(rng):
    spec, _ = classifier_spec(rng)
    planned, _ = models(spec)
    x = rng.standard_normal((4, 1, 8, 8)).astype(np.float32)
    x[2, 0, 3, 3] = np.nan
    with pytest.raises(InvalidInputError, match="example 2: feature 'x' contains NaN or Inf"):
        planned.predict_batch([{"x": a} for a in x])
    with pytest.raises(InvalidInputError, match="feature 'x' has shape"):
        planned.predict({"x": np.zeros((1, 8, 9), np.float32)})
    # float64 and list inputs take the general path and give the same answer
    a = x[0].astype(np.float64)
    assert_same([planned.predict({"x": a})], [planned.predict({"x": a.astype(np.float32)})])


def test_batched_encoding_reports_the_failing_example(rng):
    spec, _ = classifier_spec(rng)
    planned, eager = models(spec)
    x = rng.standard_normal((4, 1, 8, 8)).astype(np.float32)
    with pytest.raises(InvalidInputError, match=r"example 1: missing input feature 'x'"):
        planned.predict_batch([{"x": x[0]}, {"y": x[1]}])
    with pytest.raises(InvalidInputError, match="example 1 must be a dict of features, got list"):
        planned.predict_batch([{"x": x[0]}, [x[1]]])
    bad = [{"x": x[0]}, {"x": x[1].astype(np.float64)}, {"x": x[2].copy()}, {"x": x[3]}]
    bad[2]["x"][0, 1, 1] = np.inf  # a general-path example beside fast ones: first bad one named
    with pytest.raises(InvalidInputError, match="example 2: feature 'x' contains NaN or Inf"):
        planned.predict_batch(bad)
    from runtime.features import encode_inputs

    big = np.full((3, 1, 8, 8), 3e38, np.float32)  # finite, though its float32 sum overflows
    got = encode_inputs(spec.description.input, [{"x": a} for a in big], planned.device)["x"]
    np.testing.assert_array_equal(got.numpy(), big)


def test_small_batches_choose_between_one_and_all_threads(rng, monkeypatch):
    """Small models keep a single-threaded session beside the main one; each batch size up to
    SMALL_BATCH_MAX is timed on both once and then always runs on the faster one. Both give the
    eager Network's outputs, whichever wins."""
    import runtime.plan as plan_mod

    spec, ref = classifier_spec(rng)
    planned, eager = models(spec)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = rng.standard_normal((plan_mod.SMALL_BATCH_MAX + 1, 1, 8, 8)).astype(np.float32)
        planned.predict_batch([{"x": a} for a in x])  # builds the plan (both sessions verified)
        entry = next(iter(planned.inference_plan()._sessions.values()))
        assert entry.small is not None and entry.sess is not entry.small
        calls = []
        for name in ("sess", "small"):
            real = getattr(entry, name)

            class Counting:
                def __init__(self, real=real, name=name):
                    self.real, self.name = real, name

                def run(self, *a):
                    calls.append(self.name)
                    return self.real.run(*a)

            monkeypatch.setattr(entry, name, Counting())
        runs = plan_mod.CALIBRATION_WARMUP + plan_mod.CALIBRATION_RUNS
        for n in (1, 3, plan_mod.SMALL_BATCH_MAX + 1):
            feeds = [{"x": a} for a in x[:n]]
            calls.clear()
            outs = [planned.predict_batch(feeds) for _ in range(2 * runs + 2)]
            if n <= plan_mod.SMALL_BATCH_MAX:  # calibration alternates, then one session is kept
                assert calls[:2 * runs] == ["sess", "small"] * runs
                kept = "small" if entry.use_small[n] else "sess"
                assert calls[2 * runs:] == [kept, kept]
            else:  # large batches: always the main session, no timing
                assert calls == ["sess"] * (2 * runs + 2) and n not in entry.use_small
            first = outs[0]
            assert_same(first, eager.predict_batch(feeds))
            for other in outs[1:]:
                assert_same(other, first, tol=0)
            probs = ref(torch.from_numpy(x[:n])).numpy()
            assert np.abs(np.array([[o["probs"][c] for c in LABELS] for o in first]) - probs).max() <= 1e-5
    finally:
        torch.set_num_threads(threads)


def test_one_thread_builds_no_second_session(rng):
    spec, _ = classifier_spec(rng)
    planned, _ = models(spec)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        planned.predict_batch([{"x": a} for a in rng.standard_normal((2, 1, 8, 8)).astype(np.float32)])
        assert next(iter(planned.inference_plan()._sessions.values())).small is None
    finally:
        torch.set_num_threads(threads)


def _vector_regressor(rng):
    """x (6,) -> fc 6->3 -> relu -> fc 3->2 ("y"); and its numpy twin."""
    w1, b1, w2, b2 = _w(rng, 3, 6), _w(rng, 3), _w(rng, 2, 3), _w(rng, 2)
    b = NeuralNetworkBuilder([("x", datatypes.Array(6))], [("y", None)], mode="regressor")
    b.spec.description.predictedFeatureName = "y"  # Core ML: a regressor names its prediction
    b.add_inner_product("fc1", w1, b1, 6, 3, True, "x", "h")
    b.add_activation("relu", "RELU", "h", "r")
    b.add_inner_product("fc2", w2, b2, 3, 2, True, "r", "y")
    return b.spec, lambda x: np.maximum(x @ w1.T + b1, 0) @ w2.T + b2


@pytest.mark.parametrize("outputs", ["label+probs", "probs+label", "label"])
def test_plain_examples_take_the_short_path_with_the_same_outputs(rng, monkeypatch, outputs):
    """Float32 arrays of the declared shape skip the generic encoder once the plan is ready; the
    outputs (and their key order) equal the eager Network's and the torch reference's."""
    import runtime.model as model_mod

    spec, ref = classifier_spec(rng)
    outs = spec.description.output
    if outputs == "probs+label":
        first, second = outs[0].__deepcopy__(), outs[1].__deepcopy__()
        del outs[:]
        outs.extend([second, first] if first.name == "label" else [first, second])
    elif outputs == "label":
        keep = [o.__deepcopy__() for o in outs if o.name == "label"]
        del outs[:]
        outs.extend(keep)
        spec.description.predictedProbabilitiesName = ""
    planned, eager = models(spec)
    x = rng.standard_normal((5, 1, 8, 8)).astype(np.float32)
    feeds = [{"x": a} for a in x]
    planned.predict_batch(feeds)  # builds the plan through the generic path

    def no_generic(*a, **k):
        raise AssertionError("the generic encoder ran")

    monkeypatch.setattr(model_mod, "encode_inputs", no_generic)
    for n in (1, 5):
        got = planned.predict_batch(feeds[:n])
        cols = planned.predict_batch(mp.ArrayBatchProvider({"x": x[:n]}))
        assert list(cols.columns) == [o.name for o in outs] and cols.to_list() == got
        monkeypatch.undo()
        want = eager.predict_batch(feeds[:n])
        monkeypatch.setattr(model_mod, "encode_inputs", no_generic)
        assert [list(o) for o in got] == [list(o) for o in want] == [[o.name for o in outs]] * n
        assert_same(got, want)
        probs = ref(torch.from_numpy(x[:n])).numpy()
        assert [o["label"] for o in got] == [LABELS[i] for i in probs.argmax(1)]
        if "probs" in got[0]:
            assert np.abs(np.array([[o["probs"][c] for c in LABELS] for o in got]) - probs).max() <= 1e-5
    monkeypatch.undo()
    # anything not plain goes the generic way: float64, a list, a missing feature, NaN
    for bad in ({"x": x[0].astype(np.float64)}, {"x": x[0].tolist()}):
        assert_same(planned.predict_batch([bad]), eager.predict_batch([{"x": x[0]}]))
    with pytest.raises(InvalidInputError, match="missing input feature 'x'"):
        planned.predict_batch([{"y": x[0]}])
    nan = x[:2].copy()
    nan[1, 0, 0, 0] = np.nan
    with pytest.raises(InvalidInputError, match="example 1: feature 'x' contains NaN"):
        planned.predict_batch([{"x": a} for a in nan])


def test_vector_inputs_take_the_short_path(rng, monkeypatch):
    import runtime.model as model_mod

    spec, ref = _vector_regressor(rng)
    planned, eager = models(spec)
    x = rng.standard_normal((7, 6)).astype(np.float32)
    feeds = [{"x": a} for a in x]
    planned.predict_batch(feeds)
    monkeypatch.setattr(model_mod, "encode_inputs", lambda *a, **k: 1 / 0)
    got = planned.predict_batch(feeds)
    monkeypatch.undo()
    assert_same(got, eager.predict_batch(feeds))
    np.testing.assert_allclose(np.stack([o["y"].reshape(-1) for o in got]), ref(x), atol=1e-5)


def test_simplify_rewrites_the_batch_size_only_at_axis_0():
    """A Reshape to (1, B, C) computed from Shape(x)[0] keeps its computation (0 at position 1
    would copy the input's axis 1); one to (B, C) becomes the constant (0, C)."""
    import io

    import onnx
    import onnxruntime as ort

    from runtime.plan import simplify

    class Net(torch.nn.Module):
        def forward(self, x):  # x: (B, C, 1, 1)
            seq = x.reshape(1, x.shape[0], 5)  # as a recurrent layer does (C is known)
            return seq.reshape(x.shape[0], -1) * 2.0

    buf = io.BytesIO()
    torch.onnx.export(Net(), (torch.zeros(2, 5, 1, 1),), buf, dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}}, opset_version=17)
    model = simplify(buf.getvalue())
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    for b in (1, 3, 5, 7):
        x = np.arange(b * 5, dtype=np.float32).reshape(b, 5, 1, 1)
        np.testing.assert_array_equal(sess.run(None, {"x": x})[0], x.reshape(b, 5) * 2)
    shapes = [n for n in onnx.load_from_string(model).graph.node if n.op_type == "Reshape"]
    assert len(shapes) == 2


def test_keras_style_channel_last_flatten_and_reshape_run_in_the_plan(rng):
    """Keras-converted CNNs flatten channel-last (flatten mode 1) and may reshape channel-last:
    traced with non-negative axes they run in the plan (a negative Transpose perm, which
    onnxruntime refuses, sent every such model to the eager Network); torch is the oracle."""
    wc, bc, wf, bf = _w(rng, 4, 2, 3, 3), _w(rng, 4), _w(rng, 3, 64), _w(rng, 3)
    b = NeuralNetworkBuilder([("x", datatypes.Array(2, 4, 4))], [("y", None), ("z", None)])
    b.add_convolution("conv", 2, 4, 3, 3, 1, 1, "same", 1, wc.transpose(2, 3, 1, 0), bc, True,
                      input_name="x", output_name="c")
    b.add_flatten("flat", 1, "c", "f")  # CHANNEL_LAST: (H, W, C) order
    b.add_inner_product("fc", wf, bf, 64, 3, True, "f", "y")
    b.add_reshape("reshape", "c", "z", (8, 2, 4), 1)  # CHANNEL_LAST reshape of (4, 4, 4)
    planned, eager = models(b.spec)
    x = rng.standard_normal((5, 2, 4, 4)).astype(np.float32)
    feeds = [{"x": a} for a in x]
    outs = planned.predict_batch(feeds)
    assert planned.inference_plan().last_fallback_reason is None
    assert_same(outs, eager.predict_batch(feeds))
    c = F.conv2d(torch.from_numpy(x), torch.from_numpy(wc), torch.from_numpy(bc), padding=1)
    hwc = c.permute(0, 2, 3, 1)
    y = F.linear(hwc.flatten(1), torch.from_numpy(wf), torch.from_numpy(bf))
    z = hwc.reshape(5, 2, 4, 8).permute(0, 3, 1, 2)  # Core ML: target (C, H, W) = (8, 2, 4), in H, W, C order
    np.testing.assert_allclose(np.stack([o["y"].reshape(-1) for o in outs]), y.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.stack([o["z"] for o in outs]), z.numpy(), atol=1e-5)


def test_nd_transpose_and_static_reshape_run_in_the_plan_at_any_batch_size(rng):
    """TensorFlow-converted models flatten with transpose -> reshapeStatic (ND layers, run
    under torch.func.vmap): the trace holds the batch size as a constant and reshape of a
    transposed tensor becomes aten::_unsafe_view; the plan exports it and frees the batch axis."""
    w, bias = _w(rng, 3, 24), _w(rng, 3)
    b = NeuralNetworkBuilder([("x", datatypes.Array(2, 3, 4))], [("y", None)],
                             disable_rank5_shape_mapping=True)
    b.add_transpose("t", [0, 2, 1], "x", "xt")
    b.add_reshape_static("r", "xt", "flat", [1, 24])
    b.add_inner_product("fc", w, bias, 24, 3, True, "flat", "y")
    planned, eager = models(b.spec)
    for n in (1, 3, 8):
        x = rng.standard_normal((n, 2, 3, 4)).astype(np.float32)
        feeds = [{"x": a} for a in x]
        outs = planned.predict_batch(feeds)
        assert planned.inference_plan().last_fallback_reason is None
        assert_same(outs, eager.predict_batch(feeds))
        ref = x.transpose(0, 1, 3, 2).reshape(n, 24) @ w.T + bias
        np.testing.assert_allclose(np.stack([o["y"].reshape(-1) for o in outs]), ref, atol=1e-5)
    assert len(planned.inference_plan()._sessions) == 1  # one dynamic-batch session


def test_blob_names_the_tracer_uses_itself_still_plan(rng):
    """Models converted through onnx-coreml name blobs "0", "1", ...: the plan traces under
    names of its own and renames the graph's inputs/outputs back, moving a clashing value."""
    w, bias = _w(rng, 4, 6), _w(rng, 4)
    b = NeuralNetworkBuilder([("0", datatypes.Array(6))], [("1", None)])
    b.add_inner_product("fc", w, bias, 6, 4, True, "0", "h")
    b.add_activation("relu", "RELU", "h", "1")
    planned, eager = models(b.spec)
    x = rng.standard_normal((4, 6)).astype(np.float32)
    feeds = [{"0": a} for a in x]
    outs = planned.predict_batch(feeds)
    assert planned.inference_plan().last_fallback_reason is None
    assert_same(outs, eager.predict_batch(feeds))
    np.testing.assert_allclose(np.stack([o["1"].reshape(-1) for o in outs]),
                               np.maximum(x @ w.T + bias, 0), atol=1e-5)


def test_rename_moves_a_clashing_value_out_of_the_way():
    import onnx
    from onnx import TensorProto, helper

    from runtime.plan import _rename

    g = helper.make_graph(
        [helper.make_node("Relu", ["input_0"], ["0"]), helper.make_node("Neg", ["0"], ["output_0"])],
        "g", [helper.make_tensor_value_info("input_0", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("output_0", TensorProto.FLOAT, [2])])
    _rename(g, {"input_0": "0", "output_0": "y"})
    assert [list(n.input) for n in g.node] == [["0"], ["0__0"]]
    assert [list(n.output) for n in g.node] == [["0__0"], ["y"]]
    onnx.checker.check_graph(g)


def test_a_failing_export_prints_nothing(capfd):
    """torch.onnx always logs the TorchScript graph of a failing export to stdout (its
    setup_onnx_logging tests a function object for truth); the plan's export keeps it quiet."""
    import io

    from runtime.plan import _quiet_exporter

    class Net(torch.nn.Module):
        def forward(self, x):
            return torch.fft.fft(x).real  # no ONNX symbolic in the TorchScript exporter

    with pytest.raises(Exception), _quiet_exporter():
        torch.onnx.export(Net(), (torch.zeros(2, 4),), io.BytesIO(), dynamo=False, opset_version=17)
    out, _ = capfd.readouterr()
    assert "graph" not in out
