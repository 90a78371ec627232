"""compute_units -> torch device; low-precision autocast on GPUs (GPU tests skip without one)."""

import warnings

import numpy as np
import pytest
import torch

import coremltools as ct
from coremltools.models import datatypes
from coremltools.models.neural_network import NeuralNetworkBuilder

import mlpersonal as mp
from mlpersonal.errors import MLPersonalError
from runtime.device import normalize_compute_units, select_device

HAS_GPU = torch.cuda.is_available() or (
    getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available())
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="no CUDA or Metal device on this machine")


def small_spec(rng):
    b = NeuralNetworkBuilder([("x", datatypes.Array(3, 16, 16))], [("y", datatypes.Array(4))])
    w = rng.normal(size=(3, 3, 3, 8)).astype(np.float32)
    b.add_convolution("conv", 3, 8, 3, 3, 1, 1, "same", 1, w, np.zeros(8, np.float32), True,
                      input_name="x", output_name="c")
    b.add_activation("relu", "RELU", "c", "r")
    b.add_pooling("gap", 1, 1, 1, 1, "AVERAGE", "VALID", "r", "p", is_global=True)
    b.add_inner_product("fc", rng.normal(size=(4, 8)).astype(np.float32), None, 8, 4, False, "p", "y")
    return b.spec


def reference(spec, x):
    """The same network in plain torch (float64), from the spec's weights."""
    layers = spec.neuralNetwork.layers
    w = torch.tensor(np.asarray(layers[0].convolution.weights.floatValue, np.float64).reshape(8, 3, 3, 3))
    fc = torch.tensor(np.asarray(layers[3].innerProduct.weights.floatValue, np.float64).reshape(4, 8))
    h = torch.relu(torch.nn.functional.conv2d(torch.tensor(x, dtype=torch.float64)[None], w, padding=1))
    return (h.mean(dim=(2, 3)) @ fc.T)[0].numpy()


@pytest.mark.parametrize("name,expected", [
    ("cpu_only", "cpu_only"), ("CPU_ONLY", "cpu_only"), ("cpuOnly", "cpu_only"),
    ("cpu_and_gpu", "cpu_and_gpu"), ("CPU_AND_GPU", "cpu_and_gpu"), ("cpuAndGPU", "cpu_and_gpu"),
    ("all", "all"), ("ALL", "all"), ("ComputeUnit.ALL", "all"),
    ("CPU_AND_NE", "cpu_and_ne"), ("cpuAndNeuralEngine", "cpu_and_ne"),
    (ct.ComputeUnit.CPU_ONLY, "cpu_only"), (ct.ComputeUnit.CPU_AND_GPU, "cpu_and_gpu"),
    (ct.ComputeUnit.ALL, "all"), (ct.ComputeUnit.CPU_AND_NE, "cpu_and_ne"),
])
def test_compute_unit_spellings(name, expected):
    assert normalize_compute_units(name) == expected


def test_unknown_compute_units_are_refused(rng):
    with pytest.raises(MLPersonalError, match="cpu_only, cpu_and_gpu"):
        mp.load(small_spec(rng), compute_units="gpu_only")


def test_cpu_only_runs_on_cpu(rng):
    spec = small_spec(rng)
    m = mp.load(spec, compute_units="cpu_only")
    assert m.device == torch.device("cpu") and not m.low_precision
    x = rng.normal(size=(3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(m.predict({"x": x})["y"], reference(spec, x), atol=1e-5)
    assert m.net.params is not None and all(p.device.type == "cpu" for p in m.net.parameters())


@pytest.mark.skipif(HAS_GPU, reason="checks the fallback when no GPU is present")
def test_gpu_request_falls_back_to_cpu_with_a_note(rng):
    with pytest.warns(RuntimeWarning, match="no CUDA or Metal device"):
        m = mp.load(small_spec(rng), compute_units="cpu_and_gpu")
    assert m.device.type == "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "all" includes the cpu: no note
        assert select_device("all").type == "cpu"


def test_cpu_and_ne_runs_on_cpu_with_a_note():
    with pytest.warns(RuntimeWarning, match="Neural Engine"):
        assert select_device("CPU_AND_NE").type == "cpu"


def test_low_precision_is_a_no_op_on_cpu(rng):
    spec = small_spec(rng)
    x = rng.normal(size=(3, 16, 16)).astype(np.float32)
    full = mp.load(spec, compute_units="cpu_only")
    low = mp.load(spec, compute_units="cpu_only", allow_low_precision_accumulation_on_gpu=True)
    assert low.allow_low_precision_accumulation_on_gpu and not low.low_precision
    np.testing.assert_array_equal(low.predict({"x": x})["y"], full.predict({"x": x})["y"])
    assert low.copy().allow_low_precision_accumulation_on_gpu


@needs_gpu
def test_gpu_matches_cpu(rng, monkeypatch):
    """float32 on the GPU: cuDNN's TF32 default (~1e-3 off here) is off while the model runs,
    and the process's own setting is back afterwards."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    spec = small_spec(rng)
    m = mp.load(spec, compute_units="cpu_and_gpu")
    assert m.device.type in ("cuda", "mps") and not m.low_precision
    xs = [rng.normal(size=(3, 16, 16)).astype(np.float32) for _ in range(8)]
    got = np.stack([o["y"] for o in m.predict_batch([{"x": x} for x in xs])])
    np.testing.assert_allclose(got, np.stack([reference(spec, x) for x in xs]), atol=1e-5)
    assert torch.backends.cudnn.allow_tf32


@needs_gpu
def test_low_precision_on_gpu_uses_fp16_autocast(rng):
    spec = small_spec(rng)
    m = mp.load(spec, compute_units="all", allow_low_precision_accumulation_on_gpu=True)
    assert m.low_precision
    with m.precision():
        a = torch.ones(4, 4, device=m.device)
        assert (a @ a).dtype == torch.float16
    xs = [rng.normal(size=(3, 16, 16)).astype(np.float32) for _ in range(8)]
    got = np.stack([o["y"] for o in m.predict_batch([{"x": x} for x in xs])])
    ref = np.stack([reference(spec, x) for x in xs])
    assert got.dtype == np.float64  # the declared DOUBLE (not autocast's float16)
    np.testing.assert_allclose(got, ref, atol=5e-2, rtol=1e-2)


def test_cpu_models_never_capture_cuda_graphs(rng):
    m = mp.load(small_spec(rng), compute_units="cpu_only")
    m.predict({"x": rng.normal(size=(3, 16, 16)).astype(np.float32)})
    assert m.cuda_graphs() is None and m._graphs is None


def _lstm_classifier():
    from test_recurrent import _classifier, _complete

    torch.manual_seed(3)
    return _complete(_classifier(torch.nn.LSTM(5, 7), torch.nn.Linear(7, 3), ["a", "b", "c"]).spec)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@needs_cuda
@pytest.mark.parametrize("kind", ["cnn", "lstm"])
def test_cuda_predictions_replay_captured_graphs_like_the_eager_network(rng, kind):
    """One CUDA graph per input signature (batch size, sequence length); outputs equal the eager
    network's on new inputs of every signature."""
    spec = small_spec(rng) if kind == "cnn" else _lstm_classifier()
    m, eager = mp.load(spec, compute_units="cpu_and_gpu"), mp.load(spec, compute_units="cpu_and_gpu")
    eager.use_plan = False
    shapes = [(3, 16, 16)] if kind == "cnn" else [(6, 5), (9, 5)]
    for shape in shapes:
        for batch in (1, 4, 1):
            x = rng.normal(size=(batch, *shape)).astype(np.float32)
            got = m.predict_batch(mp.ArrayBatchProvider({"x": x}))
            want = eager.predict_batch(mp.ArrayBatchProvider({"x": x}))
            for name in want.columns:
                g, w = got.column(name), want.column(name)
                if isinstance(w, list):  # class labels
                    assert g == w
                    continue
                if hasattr(w, "values"):  # class probabilities
                    g, w = g.values, w.values
                np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)
    graphs = m.cuda_graphs()
    assert graphs.last_fallback_reason is None and len(graphs._graphs) == 2 * len(shapes)
    assert eager._graphs is None


@needs_cuda
def test_low_precision_predictions_replay_graphs_captured_under_autocast(rng):
    spec = small_spec(rng)
    m = mp.load(spec, compute_units="all", allow_low_precision_accumulation_on_gpu=True)
    eager = mp.load(spec, compute_units="all", allow_low_precision_accumulation_on_gpu=True)
    eager.use_plan = False
    x = rng.normal(size=(8, 3, 16, 16)).astype(np.float32)
    for _ in range(2):
        got = m.predict_batch(mp.ArrayBatchProvider({"x": x})).column("y")
    np.testing.assert_array_equal(got, eager.predict_batch(mp.ArrayBatchProvider({"x": x})).column("y"))
    np.testing.assert_allclose(got, np.stack([reference(spec, e) for e in x]), atol=5e-2, rtol=1e-2)
    assert len(m.cuda_graphs()._graphs) == 1 and m.cuda_graphs().last_fallback_reason is None


@needs_cuda
def test_a_failed_capture_runs_eagerly_with_the_reason(rng, monkeypatch):
    def refuse(*a, **k):
        raise RuntimeError("capture refused")

    monkeypatch.setattr(torch.cuda, "graph", refuse)
    spec = small_spec(rng)
    m = mp.load(spec, compute_units="cpu_and_gpu")
    xs = [rng.normal(size=(3, 16, 16)).astype(np.float32) for _ in range(3)]
    got = np.stack([o["y"] for o in m.predict_batch([{"x": x} for x in xs])])
    np.testing.assert_allclose(got, np.stack([reference(spec, x) for x in xs]), atol=1e-5)
    assert "capture refused" in m.cuda_graphs().last_fallback_reason and not m._graphs._graphs


@needs_cuda
def test_threads_sharing_a_cuda_model_get_their_own_outputs(rng):
    from concurrent.futures import ThreadPoolExecutor

    spec = small_spec(rng)
    m = mp.load(spec, compute_units="cpu_and_gpu")
    xs = [rng.normal(size=(4, 3, 16, 16)).astype(np.float32) for _ in range(16)]
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda x: m.predict_batch(mp.ArrayBatchProvider({"x": x})).column("y"), xs))
    for x, out in zip(xs, outs):
        np.testing.assert_allclose(out, np.stack([reference(spec, e) for e in x]), atol=1e-5)
