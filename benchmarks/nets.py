"""Benchmark networks as torch modules, and their Core ML specs built with NeuralNetworkBuilder.

``to_spec(module, input_shape, labels)`` walks the (small, known) module structure below and emits
the equivalent layers with coremltools' builder; it is a benchmark helper, not an exporter.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from examples.sticker_classifier.model import StickerNet  # noqa: E402


class Residual(nn.Module):
    """relu(body(x) + shortcut(x)); ``shortcut`` is identity when None."""

    def __init__(self, body: nn.Sequential, shortcut: nn.Module | None = None):
        super().__init__()
        self.body, self.shortcut = body, shortcut

    def forward(self, x):
        s = x if self.shortcut is None else self.shortcut(x)
        return torch.relu(self.body(x) + s)


def sticker_cnn() -> nn.Module:
    """The example's StickerNet (3x[conv3x3 pad1 + ReLU + maxpool2] 1->16->32->64, FC 576->128,
    ReLU, FC 128->10) as one flat Sequential, softmax appended."""
    net = StickerNet(10)
    return nn.Sequential(*net.features, *net.embedding, net.classifier, nn.Softmax(dim=1))


def mnist_cnn() -> nn.Module:
    """The TensorFlow-tutorial MNIST CNN: conv5x5 32 + pool, conv5x5 64 + pool, FC 1024, FC 10."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(3136, 1024), nn.ReLU(), nn.Linear(1024, 10), nn.Softmax(dim=1),
    )


def _cbr(cin, cout, stride=1, relu=True):
    mods = [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)]
    return mods + ([nn.ReLU()] if relu else [])


def _block(cin, cout, stride=1):
    body = nn.Sequential(*_cbr(cin, cout, stride), *_cbr(cout, cout, relu=False))
    short = None
    if stride != 1 or cin != cout:
        short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
    return Residual(body, short)


def small_resnet() -> nn.Module:
    """3x32x32 -> conv-bn-relu 16 -> blocks 16, 32/2, 64/2 -> global avg pool -> FC 10, softmax."""
    net = nn.Sequential(
        *_cbr(3, 16), _block(16, 16), _block(16, 32, 2), _block(32, 64, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10), nn.Softmax(dim=1),
    )
    g = torch.Generator().manual_seed(1)
    for m in net.modules():  # non-trivial batchnorm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return net


class _Tokens(nn.Module):
    """A small transformer classifier over (16 tokens, 64 features): positions, two encoder layers
    (4 heads, feed-forward 128, GELU, pre-norm), mean over tokens, FC 64->10, softmax. Its spec
    comes from mlpersonal's exporter (ND layers), not from the classic-layer helper below."""

    exported = True

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, 16, 64) * 0.1)
        layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return torch.softmax(self.head(self.encoder(x + self.pos).mean(1)), dim=1)


def token_transformer() -> nn.Module:
    return _Tokens()


NETS = {"sticker_cnn": (sticker_cnn, (1, 28, 28)), "mnist_cnn": (mnist_cnn, (1, 28, 28)),
        "small_resnet": (small_resnet, (3, 32, 32)), "transformer": (token_transformer, (16, 64))}


def _np(t):
    return t.detach().numpy().astype(np.float32)


class _Emitter:
    def __init__(self, builder):
        self.b = builder
        self.n = 0

    def name(self, kind):
        self.n += 1
        return f"{kind}_{self.n}"

    def seq(self, mods, x: str) -> str:
        for m in mods:
            x = self.module(m, x)
        return x

    def module(self, m, x: str) -> str:
        b = self.b
        if isinstance(m, nn.Sequential):
            return self.seq(m, x)
        if isinstance(m, Residual):
            y = self.seq(m.body, x)
            s = x if m.shortcut is None else self.module(m.shortcut, x)
            out = self.name("add")
            b.add_elementwise(out, [y, s], out, "ADD")
            r = self.name("relu")
            b.add_activation(r, "RELU", out, r)
            return r
        out = self.name(type(m).__name__.lower())
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            w = _np(m.weight).transpose(2, 3, 1, 0)  # builder wants (H, W, Cin, Cout)
            bias = _np(m.bias) if m.bias is not None else None
            p = m.padding
            b.add_convolution(out, m.in_channels, m.out_channels, kh, kw, m.stride[0], m.stride[1],
                              "valid", 1, w, bias, bias is not None, input_name=x, output_name=out,
                              padding_top=p[0], padding_bottom=p[0], padding_left=p[1],
                              padding_right=p[1])
        elif isinstance(m, nn.BatchNorm2d):
            b.add_batchnorm(out, m.num_features, _np(m.weight), _np(m.bias), _np(m.running_mean),
                            _np(m.running_var), x, out, epsilon=m.eps)
        elif isinstance(m, nn.ReLU):
            b.add_activation(out, "RELU", x, out)
        elif isinstance(m, nn.MaxPool2d):
            b.add_pooling(out, m.kernel_size, m.kernel_size, m.stride, m.stride, "MAX", "VALID", x, out)
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            b.add_pooling(out, 0, 0, 1, 1, "AVERAGE", "VALID", x, out, is_global=True)
        elif isinstance(m, nn.Flatten):
            b.add_flatten(out, 0, x, out)
        elif isinstance(m, nn.Linear):
            b.add_inner_product(out, _np(m.weight), _np(m.bias), m.in_features, m.out_features,
                                True, x, out)
        elif isinstance(m, nn.Softmax):
            b.add_softmax(out, x, out)
        else:
            raise TypeError(f"no builder mapping for {type(m).__name__}")
        return out


def to_spec(module: nn.Module, input_shape, labels=None, input_name: str = "x"):
    """A NeuralNetworkClassifier spec (labels) or NeuralNetwork spec equivalent to ``module``."""
    from coremltools.models import datatypes
    from coremltools.models.neural_network import NeuralNetworkBuilder

    module.eval()
    if getattr(module, "exported", False):
        import mlpersonal as mp

        config = mp.ClassifierConfig(list(labels), predicted_feature_name="label", probabilities_name="probs")
        return mp.convert(module, [mp.TensorType(input_name, tuple(input_shape))], classifier=config), "probs"
    # the builder needs the final blob name up front: emit into a scratch builder first
    feats = [(input_name, datatypes.Array(*input_shape))]
    scratch = NeuralNetworkBuilder(feats, [("out", None)])
    last = _Emitter(scratch).module(module, input_name)
    mode = "classifier" if labels is not None else None
    b = NeuralNetworkBuilder(feats, [(last, None)], mode=mode)
    assert _Emitter(b).module(module, input_name) == last
    if labels is not None:
        b.set_class_labels(list(labels), predicted_feature_name="label", prediction_blob=last)
    return b.spec, last
