"""Custom layers and custom models: registry-only lookup, predictions and gradients vs torch."""

import sys

import numpy as np
import pytest
import torch
from torch import nn

import mlpersonal as mp
from mlpersonal.errors import ConversionError, CustomLayerError
from mlpersonal.proto import Model_pb2

from coremltools.models import datatypes
from coremltools.models.neural_network import NeuralNetworkBuilder, SgdParams

from exporters.custom_layers import add_custom_layer, custom_layer_params
from runtime.custom import (CUSTOM_LAYERS, CUSTOM_MODELS, unregister_custom_layer,
                            unregister_custom_model)
from runtime.features import encode_inputs

CLASS = "ScaledSwish"


# --- the reference torch module: conv (updatable) -> custom activation -> flatten -> fc -------
class ScaledSwishTorch(nn.Module):
    """A new activation: alpha_c * x * sigmoid(beta * x), alpha per channel."""

    def __init__(self, channels, beta):
        super().__init__()
        self.alpha = nn.Parameter(torch.linspace(0.5, 1.5, channels), requires_grad=False)
        self.beta = beta

    def forward(self, x):
        return self.alpha.reshape(-1, 1, 1) * x * torch.sigmoid(self.beta * x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.act = ScaledSwishTorch(4, beta=1.5)
        self.fc = nn.Linear(4 * 5 * 6, 3)

    def forward(self, x):
        return torch.softmax(self.fc(self.act(self.conv(x)).flatten(1)), dim=1)


def description(net):
    """What a custom conversion function would return for net.act."""
    return {"className": CLASS, "description": "alpha_c * x * sigmoid(beta * x)",
            "parameters": {"beta": net.act.beta, "channels": 4, "per_channel": True, "note": "hi"},
            "weights": [net.act.alpha.detach().numpy()]}


def build_spec(net):
    b = NeuralNetworkBuilder([("x", datatypes.Array(2, 5, 6))], [("probs", datatypes.Array(3))])
    w = net.conv.weight.detach().numpy().transpose(2, 3, 1, 0)
    b.add_convolution("conv", 2, 4, 3, 3, 1, 1, "valid", 1, w, net.conv.bias.detach().numpy(), True,
                      input_name="x", output_name="c", padding_top=1, padding_bottom=1,
                      padding_left=1, padding_right=1)
    add_custom_layer(b, "act", ["c"], ["a"], description(net))
    b.add_flatten("flat", 0, "a", "f")
    b.add_inner_product("fc", net.fc.weight.detach().numpy(), net.fc.bias.detach().numpy(), 120, 3,
                        True, "f", "logits")
    b.add_softmax("softmax", "logits", "probs")
    b.make_updatable(["conv", "fc"])
    b.set_categorical_cross_entropy_loss("loss", "probs")
    b.set_sgd_optimizer(SgdParams(lr=0.01, batch=4))
    b.set_epochs(1)
    return b.spec


class SwishNumpy:
    """Core ML's MLCustomLayer protocol, numpy only (no forward)."""

    def __init__(self, parameters):
        self.beta = float(parameters["beta"])
        self.parameters = parameters

    def set_weight_data(self, weights):
        self.alpha = weights[0].reshape(-1, 1, 1)

    def output_shapes(self, input_shapes):
        return list(input_shapes)

    def evaluate(self, inputs):
        x = inputs[0]
        return [self.alpha * x / (1.0 + np.exp(-self.beta * x))]


class SwishTorch(SwishNumpy):
    def forward(self, x):
        a = torch.as_tensor(self.alpha, device=x.device)
        return a * x * torch.sigmoid(self.beta * x)


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Net().eval()


@pytest.fixture(autouse=True)
def _clean_registry():
    yield
    unregister_custom_layer(CLASS)
    unregister_custom_model("Affine")


def _examples(rng, n=4):
    return [{"x": rng.normal(size=(2, 5, 6)).astype(np.float32), "label": int(i % 3)}
            for i in range(n)]


def test_description_becomes_custom_layer_params(net):
    p = custom_layer_params(description(net))
    assert p.className == CLASS and p.description.startswith("alpha_c")
    assert p.parameters["beta"].WhichOneof("value") == "doubleValue"
    assert p.parameters["channels"].intValue == 4
    assert p.parameters["per_channel"].WhichOneof("value") == "boolValue"
    assert p.parameters["note"].stringValue == "hi"
    np.testing.assert_array_equal(np.asarray(p.weights[0].floatValue, np.float32),
                                  net.act.alpha.detach().numpy())
    with pytest.raises(ConversionError, match="className"):
        custom_layer_params({"description": "no class"})
    with pytest.raises(ConversionError, match="parameter 'bad'"):
        custom_layer_params({"className": "X", "parameters": {"bad": [1, 2]}})
    with pytest.raises(ConversionError, match="unknown keys"):
        custom_layer_params({"className": "X", "shape": 3})


def test_unknown_class_fails_at_load_naming_it(net):
    spec = build_spec(net)
    assert spec.specificationVersion >= 4  # updatable (builder also bumps for custom layers)
    with pytest.raises(CustomLayerError) as e:
        mp.load(spec)
    msg = str(e.value)
    assert CLASS in msg and f"register_custom_layer({CLASS!r}" in msg


def test_class_name_is_never_imported(tmp_path, net, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "evilmod.py").write_text(f"open({str(marker)!r}, 'w').write('x')\nclass Evil: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("evilmod", "evilmod.Evil", "builtins.eval", "__import__('evilmod')"):
        spec = build_spec(net)
        spec.neuralNetwork.layers[1].custom.className = name
        with pytest.raises(CustomLayerError, match="no registered implementation"):
            mp.load(spec)
    assert not marker.exists() and "evilmod" not in sys.modules


def test_numpy_evaluate_predicts_like_torch(net, rng):
    spec = build_spec(net)
    mp.register_custom_layer(CLASS, SwishNumpy)
    m = mp.load(spec)
    ex = _examples(rng)
    out = m.predict_batch(ex)
    with torch.no_grad():
        ref = net(torch.from_numpy(np.stack([e["x"] for e in ex]))).numpy()
    got = np.stack([o["probs"] for o in out])
    np.testing.assert_allclose(got, ref, atol=1e-6)
    layer = m.net.steps[1]
    assert layer.kind == "custom"


def _grads_through_runtime(m, examples):
    feeds = encode_inputs(m.spec.description.input, examples, m.device)
    with m.precision():  # float32 on a GPU too
        env = m.net(m.to_blobs(feeds))
        probs = env["probs"].reshape(len(examples), -1)
        target = torch.tensor([e["label"] for e in examples], device=m.device)
        loss = torch.nn.functional.nll_loss(torch.log(probs), target)
        params = m.net.named_updatable()
        grads = torch.autograd.grad(loss, [params["conv.weights"], params["fc.weights"]])
    return loss, [g.cpu() for g in grads]


def test_torch_forward_passes_gradients_to_updatable_conv(net, rng):
    spec = build_spec(net)
    mp.register_custom_layer(CLASS, SwishTorch)
    m = mp.load(spec)
    ex = _examples(rng)
    out = m.predict_batch(ex)
    x = torch.from_numpy(np.stack([e["x"] for e in ex]))
    ref = net(x)
    np.testing.assert_allclose(np.stack([o["probs"] for o in out]), ref.detach().numpy(), atol=1e-6)

    loss, (g_conv, g_fc) = _grads_through_runtime(m, ex)
    ref_loss = nn.functional.nll_loss(torch.log(ref), torch.tensor([e["label"] for e in ex]))
    ref_conv, ref_fc = torch.autograd.grad(ref_loss, [net.conv.weight, net.fc.weight])
    assert abs(loss.item() - ref_loss.item()) < 1e-5
    assert g_conv.abs().sum() > 0
    np.testing.assert_allclose(g_conv.numpy(), ref_conv.numpy(), atol=1e-6)
    np.testing.assert_allclose(g_fc.numpy(), ref_fc.numpy(), atol=1e-6)


def test_evaluate_only_layer_refuses_gradients_through_it(net, rng):
    mp.register_custom_layer(CLASS, SwishNumpy)
    m = mp.load(build_spec(net))
    with pytest.raises(CustomLayerError, match="forward"):
        _grads_through_runtime(m, _examples(rng))


def test_bad_implementations_are_reported(net, rng):
    with pytest.raises(CustomLayerError, match="evaluate"):
        mp.register_custom_layer(CLASS, object())

    class WrongShape(SwishNumpy):
        def evaluate(self, inputs):
            return [inputs[0][..., :2]]

    mp.register_custom_layer(CLASS, WrongShape)
    m = mp.load(build_spec(net))
    with pytest.raises(CustomLayerError, match="output_shapes promised"):
        m.predict(_examples(rng, 1)[0])

    class Broken(SwishNumpy):
        def __init__(self, parameters):
            raise KeyError("gamma")

    mp.register_custom_layer(CLASS, Broken)
    with pytest.raises(CustomLayerError, match="failed to initialize"):
        mp.load(build_spec(net))


def test_saved_custom_model_file_roundtrips(tmp_path, net, rng):
    mp.register_custom_layer(CLASS, SwishTorch)
    m = mp.load(build_spec(net))
    path = tmp_path / "swish.mlmodel"
    m.save(path)
    ex = _examples(rng, 2)
    a = m.predict_batch(ex)
    b = mp.load(path).predict_batch(ex)
    np.testing.assert_array_equal(a[0]["probs"], b[0]["probs"])


# --- custom models -----------------------------------------------------------------------------
def custom_model_spec(class_name="Affine"):
    spec = Model_pb2.Model()
    spec.specificationVersion = 3  # coremltools' _MINIMUM_CUSTOM_MODEL_SPEC_VERSION
    for name, fd_list in (("x", spec.description.input), ("y", spec.description.output)):
        fd = fd_list.add()
        fd.name = name
        fd.type.multiArrayType.shape.extend([3])
        fd.type.multiArrayType.dataType = Model_pb2.FeatureTypes__pb2.ArrayFeatureType.FLOAT32
    n = spec.description.output.add()
    n.name = "norm"
    n.type.doubleType.SetInParent()
    lab = spec.description.output.add()
    lab.name = "sign"
    lab.type.stringType.SetInParent()
    cm = spec.customModel
    cm.className = class_name
    cm.description = "y = scale * x + shift"
    cm.parameters["scale"].doubleValue = 2.0
    cm.parameters["shift"].intValue = -1
    cm.parameters["tag"].bytesValue = b"\x00\x01"
    return spec


class Affine:
    batch_calls = 0

    def __init__(self, description, parameters):
        self.inputs = [f.name for f in description.input]
        self.scale, self.shift = parameters["scale"], parameters["shift"]
        assert parameters["tag"] == b"\x00\x01"

    def predict(self, features):
        y = self.scale * features["x"] + self.shift
        return {"y": y, "norm": float(np.linalg.norm(y)), "sign": "pos" if y.sum() > 0 else "neg"}


class AffineBatch(Affine):
    def predict_batch(self, batch):
        type(self).batch_calls += 1
        return [self.predict(f) for f in batch]


def test_custom_model_unknown_class_fails_at_load():
    with pytest.raises(CustomLayerError, match=r"register_custom_model\('Affine'"):
        mp.load(custom_model_spec())


def test_custom_model_predicts_and_batches(rng):
    mp.register_custom_model("Affine", Affine)
    m = mp.load(custom_model_spec())
    xs = [rng.normal(size=3).astype(np.float32) for _ in range(5)]
    outs = m.predict_batch([{"x": x} for x in xs])
    for x, o in zip(xs, outs):
        np.testing.assert_allclose(o["y"], 2 * x - 1, atol=1e-6)
        assert o["norm"] == pytest.approx(float(np.linalg.norm(2 * x - 1)), rel=1e-6)
        assert o["sign"] == ("pos" if (2 * x - 1).sum() > 0 else "neg")
    assert m.predict({"x": xs[0]})["sign"] == outs[0]["sign"]

    mp.register_custom_model("Affine", AffineBatch)
    mb = mp.load(custom_model_spec())
    AffineBatch.batch_calls = 0
    outs_b = mb.predict_batch([{"x": x} for x in xs])
    assert AffineBatch.batch_calls == 1
    np.testing.assert_array_equal(np.stack([o["y"] for o in outs_b]), np.stack([o["y"] for o in outs]))


def test_custom_model_as_pipeline_stage_forward(rng):
    """A pipeline calls stage.forward(feeds, n) on batched user-layout values."""
    mp.register_custom_model("Affine", AffineBatch)
    m = mp.load(custom_model_spec())
    xs = np.stack([rng.normal(size=3).astype(np.float32) for _ in range(4)])
    feeds = encode_inputs(m.spec.description.input, [{"x": x} for x in xs], m.device)
    out = m.forward(feeds, 4)
    assert isinstance(out["y"], torch.Tensor) and tuple(out["y"].shape) == (4, 3)
    np.testing.assert_allclose(out["y"].cpu().numpy(), 2 * xs - 1, atol=1e-6)
    assert tuple(out["norm"].shape) == (4,) and out["sign"] == [
        "pos" if r.sum() > 0 else "neg" for r in 2 * xs - 1]


def test_custom_model_missing_output_is_reported():
    class Bad(Affine):
        def predict(self, features):
            return {"y": features["x"]}

    mp.register_custom_model("Affine", Bad)
    m = mp.load(custom_model_spec())
    with pytest.raises(CustomLayerError, match="lacks output 'norm'"):
        m.predict({"x": np.zeros(3, np.float32)})


def test_registries_hold_only_registered_names():
    mp.register_custom_layer(CLASS, SwishTorch)
    assert CUSTOM_LAYERS[CLASS] is SwishTorch and "Affine" not in CUSTOM_MODELS
