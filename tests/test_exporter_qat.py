"""convert() stores QAT layers with their learned n-bit weights: runtime output == QAT module."""

import numpy as np
import pytest
import torch
from torch import nn

import mlpersonal as mp
from mlpersonal import codecs
from mlpersonal.errors import ConversionError
from trainers import freeze, prepare_qat


class Sticker(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(8 * 3 * 3, 4)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def _train(net, steps=20):
    g = torch.Generator().manual_seed(0)
    x, t = torch.rand(32, 1, 12, 12, generator=g), torch.randint(0, 4, (32,), generator=g)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    net.train()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), t).backward()
        opt.step()
    net.eval()


def _layers(spec):
    return {l.name: l for l in spec.neuralNetworkClassifier.layers}


@pytest.mark.parametrize("nbits,mode", [(8, "linear"), (4, "linear"), (3, "palettize")])
def test_convert_exports_qat_weights_exactly(nbits, mode):
    torch.manual_seed(0)
    net = Sticker()
    prepare_qat(net.features, nbits, mode)
    _train(net)
    freeze(net.features)
    spec = mp.convert(net, [mp.TensorType("x", (1, 12, 12))],
                      classifier=mp.ClassifierConfig(labels=list("abcd")), respect_trainable=True,
                      update=mp.UpdateConfig(optimizer=mp.Adam(learning_rate=1e-3, mini_batch_size=4)))
    layers = _layers(spec)
    for path in ("features.0", "features.3"):
        assert codecs.storage_of(layers[path].convolution.weights) != "float32"
        assert not layers[path].isUpdatable
    assert layers["head"].isUpdatable and codecs.storage_of(layers["head"].innerProduct.weights) == "float32"

    x = torch.rand(16, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = torch.softmax(net(x), 1).numpy()
    out = mp.load(spec, compute_units="cpu_only").predict_batch([{"x": a.numpy()} for a in x])
    got = np.array([[o["labelProbs"][c] for c in "abcd"] for o in out])
    np.testing.assert_allclose(got, ref, atol=1e-5)

    # without QAT the same float master weights give other outputs: the stored weights are the n-bit ones
    w = net.features[0].parametrizations.weight.original.detach().numpy()
    decoded = codecs.decode(layers["features.0"].convolution.weights, w.size, channels=w.shape[0]).reshape(w.shape)
    with torch.no_grad():
        np.testing.assert_array_equal(decoded, net.features[0].weight.numpy())
    assert not np.array_equal(decoded, w)


def test_qat_layer_cannot_be_updatable():
    net = Sticker()
    prepare_qat(net, 8, modules=["head"])
    with pytest.raises(ConversionError, match="float32|updatable"):
        mp.convert(net, [mp.TensorType("x", (1, 12, 12))],
                   classifier=mp.ClassifierConfig(labels=list("abcd")), respect_trainable=True)
