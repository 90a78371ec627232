"""QAT: fake-quantized training, and exported specs that predict exactly what the module does."""

import numpy as np
import pytest
import torch
from torch import nn

import mlpersonal as mp
from mlpersonal import codecs
from mlpersonal.errors import ConversionError, TrainingError
from exporters.quantized import apply_qat_weights, quantized_weight_params
from trainers.qat import prepare_qat, qat_layers, recluster

ct = pytest.importorskip("coremltools")
from coremltools.models import datatypes  # noqa: E402
from coremltools.models.neural_network import NeuralNetworkBuilder  # noqa: E402


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.fc1 = nn.Linear(6 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 5)

    def forward(self, x):
        y = torch.max_pool2d(torch.relu(self.conv(x)), 2)
        return self.fc2(torch.relu(self.fc1(y.flatten(1))))


def float_weight(m):
    p = getattr(m, "parametrizations", None)
    return (p.weight.original if p is not None else m.weight).detach().numpy()


def build(net):
    """The spec of ``net`` with its *float* weights, layers named by module path."""
    b = NeuralNetworkBuilder([("x", datatypes.Array(2, 8, 8))], [("y", None)])
    w = float_weight(net.conv)
    b.add_convolution("conv", kernel_channels=2, output_channels=6, height=3, width=3,
                      stride_height=1, stride_width=1, border_mode="same", groups=1,
                      W=w.transpose(2, 3, 1, 0), b=net.conv.bias.detach().numpy(),
                      has_bias=True, input_name="x", output_name="c")
    b.add_activation("relu0", "RELU", "c", "r0")
    b.add_pooling("pool", 2, 2, 2, 2, "MAX", padding_type="VALID", input_name="r0",
                  output_name="p")
    b.add_flatten("flat", 0, "p", "f")
    b.add_inner_product("fc1", W=float_weight(net.fc1), b=net.fc1.bias.detach().numpy(),
                        input_channels=96, output_channels=32, has_bias=True,
                        input_name="f", output_name="h")
    b.add_activation("relu1", "RELU", "h", "r1")
    b.add_inner_product("fc2", W=float_weight(net.fc2), b=net.fc2.bias.detach().numpy(),
                        input_channels=32, output_channels=5, has_bias=True,
                        input_name="r1", output_name="y")
    return b.spec


def train_a_little(net, steps=15):
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, 8, 8, generator=g)
    t = torch.randint(0, 5, (64,), generator=g)
    net.train()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), t).backward()
        opt.step()
    net.eval()


@pytest.mark.parametrize("mode", ["linear", "palettize"])
@pytest.mark.parametrize("nbits", [2, 4, 8])
def test_exported_spec_equals_qat_module(mode, nbits):
    net = Net()
    prepare_qat(net, nbits, mode)
    lut0 = net.fc1.parametrizations.weight[0].lut.detach().clone() if mode == "palettize" else None
    w0 = float_weight(net.fc1).copy()
    train_a_little(net)
    assert not np.allclose(w0, float_weight(net.fc1))  # the float master weights trained
    if lut0 is not None:  # and the table was learned
        assert not torch.allclose(lut0, net.fc1.parametrizations.weight[0].lut)
    # eval weights hold at most 2**nbits distinct values per channel (per layer for palettize)
    wq = net.fc1.weight.detach()
    rows = wq if mode == "linear" else wq.reshape(1, -1)
    assert max(len(torch.unique(r)) for r in rows) <= 2 ** nbits
    spec = apply_qat_weights(build(net), net)
    for name in ("conv", "fc1", "fc2"):
        lay = next(l for l in spec.neuralNetwork.layers if l.name == name)
        wp = getattr(lay, lay.WhichOneof("layer")).weights
        assert codecs.storage_of(wp) == f"{nbits}-bit {'linear' if mode == 'linear' else 'lut'}"
    x = torch.randn(8, 2, 8, 8)
    with torch.no_grad():
        want = net(x).numpy()
    got = np.stack([o["y"].reshape(-1) for o in mp.load(spec).predict_batch(
        [{"x": xi.numpy()} for xi in x])])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # not a re-quantization of the float weights: the float spec differs from the QAT one
    float_out = np.stack([o["y"].reshape(-1) for o in mp.load(build(net)).predict_batch(
        [{"x": xi.numpy()} for xi in x])])
    assert np.abs(float_out - want).max() > 1e-4


def test_options_per_layer_linear_per_channel_lut_recluster_and_selection():
    net = Net()
    prepare_qat(net, 3, "linear", per_channel=False, modules=["fc1"])
    assert list(qat_layers(net)) == ["fc1"]
    wp, bias = quantized_weight_params(net.fc1)
    assert len(wp.quantization.linearQuantization.scale) == 1
    np.testing.assert_array_equal(bias, net.fc1.bias.detach().numpy())
    np.testing.assert_array_equal(codecs.decode(wp, 32 * 96, channels=32).reshape(32, 96),
                                  net.eval().fc1.weight.detach().numpy())
    net2 = Net()
    prepare_qat(net2, 2, "palettize", per_channel=True, modules=lambda n, m: n == "conv",
                recluster_every=5)
    train_a_little(net2, steps=10)
    wp, _ = quantized_weight_params(net2.conv)
    assert len(wp.quantization.lookupTableQuantization.floatValue) == 6 * 4
    np.testing.assert_array_equal(codecs.decode(wp, 6 * 18, channels=6).reshape(6, 2, 3, 3),
                                  net2.conv.weight.detach().numpy())
    recluster(net2)
    spec = apply_qat_weights(build(net2), net2)
    x = torch.randn(3, 2, 8, 8)
    with torch.no_grad():
        want = net2(x).numpy()
    got = np.stack([o["y"].reshape(-1) for o in mp.load(spec).predict_batch(
        [{"x": xi.numpy()} for xi in x])])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_errors():
    with pytest.raises(TrainingError):
        prepare_qat(Net(), 9)
    with pytest.raises(TrainingError, match="nope"):
        prepare_qat(Net(), 4, modules=["nope"])
    net = prepare_qat(Net(), 4)
    with pytest.raises(TrainingError, match="already"):
        prepare_qat(net, 4)
    with pytest.raises(ConversionError, match="fc1"):
        apply_qat_weights(build(net), net, names={"fc1": "missing"})
    spec = build(net)
    next(l for l in spec.neuralNetwork.layers if l.name == "fc2").isUpdatable = True
    with pytest.raises(ConversionError, match="updatable"):
        apply_qat_weights(spec, net)
    with pytest.raises(ConversionError):
        apply_qat_weights(build(Net()), Net())
