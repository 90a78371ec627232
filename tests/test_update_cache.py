"""Frozen-prefix cache of the neural-network updater: exact against the uncached path and
torch.optim, kept out of layers that must not be cached, and off beyond its memory budget.

Switch: ``MLPERSONAL_UPDATE_CACHE_BYTES=0`` turns the cache off (the uncached path is the oracle).
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from coremltools.models import datatypes
from coremltools.models.neural_network import AdamParams, NeuralNetworkBuilder, SgdParams
from coremltools.proto import NeuralNetwork_pb2

import mlpersonal as mp
from mlpersonal.update_params import resolve
from runtime.custom import unregister_custom_layer
from update_models import LABELS, layer_weights


class Head(torch.nn.Module):
    """conv -> relu -> maxpool -> conv -> relu -> flatten (frozen) -> fc -> relu -> fc (updatable)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv1 = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(4, 6, 3)
        self.fc1 = torch.nn.Linear(6 * 3 * 3, 12)
        self.fc2 = torch.nn.Linear(12, 5)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def features(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        return torch.flatten(F.relu(self.conv2(x)), 1)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(self.features(x))))


def _np(t):
    return t.detach().numpy().astype(np.float32)


def head_spec(m: Head, optimizer="adam", *, custom=None, stats_bn=False, batch=8, epochs=3, batches=None):
    b = NeuralNetworkBuilder([("image", datatypes.Array(3, 10, 10))], [("probs", datatypes.Array(5))],
                             mode="classifier")
    b.add_convolution("conv1", 3, 4, 3, 3, 1, 1, "same", 1, _np(m.conv1.weight).transpose(2, 3, 1, 0),
                      _np(m.conv1.bias), True, input_name="image", output_name="c1")
    x = "c1"
    if custom:  # a numpy-only custom layer multiplying by its "scale" parameter
        p = NeuralNetwork_pb2.CustomLayerParams()
        p.className = custom
        p.parameters["scale"].doubleValue = 1.0
        b.add_custom("custom", ["c1"], ["c1s"], custom_proto_spec=p)
        x = "c1s"
    b.add_activation("relu1", "RELU", x, "r1")
    b.add_pooling("pool", 2, 2, 2, 2, "MAX", "VALID", "r1", "p1")
    b.add_convolution("conv2", 4, 6, 3, 3, 1, 1, "valid", 1, _np(m.conv2.weight).transpose(2, 3, 1, 0),
                      _np(m.conv2.bias), True, input_name="p1", output_name="c2")
    x = "c2"
    if stats_bn:  # statistics from the input itself: must stay out of the cache
        bn = b.add_batchnorm("bn", 6, np.ones(6, np.float32), np.zeros(6, np.float32),
                             np.zeros(6, np.float32), np.ones(6, np.float32), input_name="c2",
                             output_name="c2n")  # the builder refuses batch statistics: set them here
        bn.batchnorm.computeMeanVar = True
        bn.batchnorm.ClearField("mean")
        bn.batchnorm.ClearField("variance")
        x = "c2n"
    b.add_activation("relu2", "RELU", x, "r2")
    b.add_flatten("flatten", 0, "r2", "f")
    b.add_inner_product("fc1", _np(m.fc1.weight), _np(m.fc1.bias), 54, 12, True, "f", "h")
    b.add_activation("relu3", "RELU", "h", "hr")
    b.add_inner_product("fc2", _np(m.fc2.weight), _np(m.fc2.bias), 12, 5, True, "hr", "logits")
    b.add_softmax("softmax", "logits", "probs")
    b.set_class_labels(LABELS, predicted_feature_name="label")
    b.make_updatable(["fc1", "fc2"])
    b.set_categorical_cross_entropy_loss("lossLayer", input="probs")
    p = SgdParams(lr=0.05, batch=batch, momentum=0.9) if optimizer == "sgd" else AdamParams(lr=0.01, batch=batch)
    if batches:
        p.set_batch(batch, batches)
    b.set_sgd_optimizer(p) if optimizer == "sgd" else b.set_adam_optimizer(p)
    b.set_epochs(epochs)
    b.set_shuffle(seed=3)
    return b.spec


def data_set(n=40):
    g = torch.Generator().manual_seed(5)
    X = torch.rand(n, 3, 10, 10, generator=g)
    y = torch.randint(0, 5, (n,), generator=g)
    return X, y, [{"image": X[i].numpy(), "label": LABELS[int(y[i])]} for i in range(n)]


def prepared(spec, data, **overrides):
    up = mp.load(spec).make_updater()
    up.prepare(data, resolve(up.parameters(), overrides))
    return up


def trained(spec, data, monkeypatch, cache: bool, **overrides):
    if not cache:
        monkeypatch.setenv("MLPERSONAL_UPDATE_CACHE_BYTES", "0")
    else:
        monkeypatch.delenv("MLPERSONAL_UPDATE_CACHE_BYTES", raising=False)
    losses = []
    model = mp.load(spec).update(data, parameters=overrides or None, progress_handlers={
        "mini_batch_end": lambda c: losses.append(c.metrics["loss"])})
    return model, losses


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_cached_head_training_equals_uncached_and_torch(optimizer, monkeypatch):
    m = Head()
    X, y, data = data_set()
    spec = head_spec(m, optimizer)
    up = prepared(spec, data)
    assert up.cache_info is not None and up.cache_info["blobs"] == ["f"]
    assert [s.name for s in up.plan] == ["fc1", "relu3", "fc2"]  # only the trained part per batch
    assert up.cache_info["bytes"] == 40 * 54 * 4

    cached, l_c = trained(spec, data, monkeypatch, True)
    plain, l_p = trained(spec, data, monkeypatch, False)
    assert len(l_c) == 15
    np.testing.assert_allclose(l_c, l_p, rtol=1e-6)
    ref = copy.deepcopy(m)
    params = [ref.fc1.weight, ref.fc1.bias, ref.fc2.weight, ref.fc2.bias]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9) if optimizer == "sgd" else torch.optim.Adam(params, lr=0.01)
    for e in range(3):
        order = torch.randperm(40, generator=torch.Generator().manual_seed(3 + e))
        for s in range(0, 40, 8):
            idx = order[s:s + 8]
            loss = F.cross_entropy(ref(X[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    for name in ("fc1", "fc2"):
        for field, t in (("weights", getattr(ref, name).weight), ("bias", getattr(ref, name).bias)):
            a = layer_weights(cached.spec, name)[field]
            b = layer_weights(plain.spec, name)[field]
            assert _rel(a, b) <= 1e-6, (name, field, _rel(a, b))
            np.testing.assert_allclose(a, _np(t).ravel(), rtol=1e-5, atol=1e-6)
    nn_old, nn_new = spec.neuralNetworkClassifier, cached.spec.neuralNetworkClassifier
    assert [l for l in nn_old.layers if not l.isUpdatable] == [l for l in nn_new.layers if not l.isUpdatable]


def test_mini_batch_size_change_and_partial_batches_with_cache(monkeypatch):
    """Batches of 7 (a partial last one), changed to 40 from a handler: still the uncached result."""
    m = Head()
    _, _, data = data_set()
    spec = head_spec(m, "sgd", batch=8, batches=[8, 7, 40])
    results = []
    for cache in (True, False):
        def on_epoch(ctx):
            ctx.task.resume(parameters={"mini_batch_size": 40})
        if not cache:
            monkeypatch.setenv("MLPERSONAL_UPDATE_CACHE_BYTES", "0")
        model = mp.load(spec).update(data, parameters={"mini_batch_size": 7},
                                     progress_handlers={"epoch_end": on_epoch})
        results.append(layer_weights(model.spec, "fc1")["weights"])
    assert _rel(results[0], results[1]) <= 1e-6


def test_batchnorm_with_input_statistics_is_not_cached(monkeypatch):
    m = Head()
    _, _, data = data_set()
    spec = head_spec(m, "adam", stats_bn=True)
    up = prepared(spec, data)
    assert up.cache_info["blobs"] == ["c2"]  # the boundary stops before the batchnorm
    assert [s.name for s in up.plan][:2] == ["bn", "relu2"]
    a, _ = trained(spec, data, monkeypatch, True)
    b, _ = trained(spec, data, monkeypatch, False)
    assert _rel(layer_weights(a.spec, "fc2")["weights"], layer_weights(b.spec, "fc2")["weights"]) <= 1e-6


def test_numpy_only_custom_layer_in_the_prefix_is_cached(monkeypatch):
    calls = []

    class ScaleNp:
        def __init__(self, parameters):
            self.scale = float(parameters["scale"])

        def evaluate(self, inputs):
            calls.append(inputs[0].shape[0])
            return [inputs[0] * self.scale]

    mp.register_custom_layer("TestScaleNp", ScaleNp)
    try:
        m = Head()
        _, _, data = data_set()
        spec = head_spec(m, "sgd", custom="TestScaleNp")
        a, _ = trained(spec, data, monkeypatch, True)
        assert sum(calls) == 2 + 2 + 40  # the 2-example dry run (twice), then once over the data
        calls.clear()
        b, _ = trained(spec, data, monkeypatch, False)
        assert sum(calls) > 40 * 3  # the uncached path runs it every epoch
        ref = mp.load(head_spec(m, "sgd"))  # scale 1: the same network without the custom layer
        c = ref.update(data)
        for x in (a, b):
            assert _rel(layer_weights(x.spec, "fc1")["weights"], layer_weights(c.spec, "fc1")["weights"]) <= 1e-6
    finally:
        unregister_custom_layer("TestScaleNp")


def test_over_the_memory_budget_recomputes(monkeypatch):
    m = Head()
    _, _, data = data_set()
    spec = head_spec(m, "adam")
    monkeypatch.setenv("MLPERSONAL_UPDATE_CACHE_BYTES", str(40 * 54 * 4 - 1))
    up = prepared(spec, data)
    assert up.cache_info is None and up.plan[0].name == "conv1"
    monkeypatch.setenv("MLPERSONAL_UPDATE_CACHE_BYTES", str(40 * 54 * 4))
    assert prepared(spec, data).cache_info is not None


def test_first_layer_updatable_means_no_cache():
    from update_models import CNN, dataset, updatable_cnn_spec
    X, y, _ = dataset()
    data = [{"image": X[i].numpy(), "label": LABELS[int(y[i])]} for i in range(len(X))]
    up = prepared(updatable_cnn_spec(CNN(), "ce", "sgd"), data)
    assert up.cache_info is None


def test_nd_model_per_example_cache(monkeypatch):
    """EXACT_ARRAY_MAPPING (one example at a time): a frozen ND prefix (matmul, constant add,
    transpose) is cached per example, and training equals the uncached path and torch."""
    g = torch.Generator().manual_seed(2)
    W0 = torch.randn(6, 4, generator=g)
    const = torch.randn(6, generator=g)
    W, bias = torch.randn(3, 6, generator=g) * 0.5, torch.randn(3, generator=g) * 0.1
    b = NeuralNetworkBuilder([("x", datatypes.Array(4))], [("p", datatypes.Array(3))],
                             mode="classifier", disable_rank5_shape_mapping=True)
    b.add_inner_product("frozen", W0.numpy(), None, 4, 6, False, "x", "h0")
    b.add_load_constant_nd("k", "kc", const.numpy(), (6,))
    b.add_add_broadcastable("plus", ["h0", "kc"], "h1")
    b.add_activation("tanh", "TANH", "h1", "h2")
    b.add_inner_product("fc", W.numpy(), bias.numpy(), 6, 3, True, "h2", "z")
    b.add_softmax("sm", "z", "p")
    b.set_class_labels([10, 20, 30], predicted_feature_name="cls")
    b.make_updatable(["fc"])
    b.set_categorical_cross_entropy_loss("lossLayer", input="p")
    b.set_sgd_optimizer(SgdParams(lr=0.1, batch=4, momentum=0.5))
    b.set_epochs(2)
    X = torch.randn(10, 4, generator=g)
    y = torch.randint(0, 3, (10,), generator=g)
    data = [{"x": X[i].numpy(), "cls": [10, 20, 30][int(y[i])]} for i in range(10)]
    up = prepared(b.spec, data)
    assert up.cache_info is not None and up.cache_info["blobs"] == ["h2"] and up.cached is not None
    assert up._vmap  # the cached boundary blobs of a mini-batch run in one vmapped pass
    a, _ = trained(b.spec, data, monkeypatch, True, shuffle=False)
    c, _ = trained(b.spec, data, monkeypatch, False, shuffle=False)
    w = torch.nn.Parameter(W.clone())
    bb = torch.nn.Parameter(bias.clone())
    opt = torch.optim.SGD([w, bb], lr=0.1, momentum=0.5)
    for _ in range(2):
        for s in range(0, 10, 4):
            h = torch.tanh(X[s:s + 4] @ W0.T + const)
            loss = F.cross_entropy(F.linear(h, w, bb), y[s:s + 4])
            opt.zero_grad()
            loss.backward()
            opt.step()
    got, plain = layer_weights(a.spec, "fc"), layer_weights(c.spec, "fc")
    assert _rel(got["weights"], plain["weights"]) <= 1e-6
    np.testing.assert_allclose(got["weights"], w.detach().numpy().ravel(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["bias"], bb.detach().numpy().ravel(), rtol=1e-5, atol=1e-6)
