"""Models converted by coremltools' own ``ct.convert(..., convert_to="neuralnetwork")`` run in our
runtime and match the torch module they came from (the oracle)."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mlpersonal

ct = pytest.importorskip("coremltools")


class ResidualCat(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(12 * 4 * 4, 5)

    def forward(self, x):
        y = torch.relu(self.bn(self.c1(x)))
        z = self.c2(y) + y
        w = torch.cat([z, self.c3(z)], 1)
        w = F.avg_pool2d(F.max_pool2d(w, 2), 2)
        return torch.softmax(self.fc(w.flatten(1)), 1)


class Mixed(nn.Module):
    """Grouped/strided conv, assorted activations, global pooling, log-softmax."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, stride=2, groups=2)
        self.up = nn.ConvTranspose2d(6, 3, 3, stride=2, padding=1, output_padding=1)
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        y = torch.tanh(F.elu(F.leaky_relu(self.conv(x), 0.1)))
        y = torch.sigmoid(self.up(y))
        y = F.interpolate(y, scale_factor=2, mode="nearest")
        y = F.adaptive_avg_pool2d(y, 1).flatten(1)
        return F.log_softmax(self.fc(y), dim=1)


class Seq(nn.Module):
    """Rank-3 input: linear on the last axis, layer norm, GELU, transpose, mean."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.ln = nn.LayerNorm(8)

    def forward(self, x):
        y = F.gelu(self.ln(self.fc(x)))
        return y.transpose(1, 2).mean(-1)


class TensorOps(nn.Module):
    """Element-wise math, chunk/stack, flip, minimum, argmax, permute + reshape, broadcasting."""

    def __init__(self):
        super().__init__()
        self.register_buffer("c", torch.randn(4, 4))

    def forward(self, x):
        a, b = torch.chunk(x, 2, dim=1)
        y = torch.stack([a, b], 0).sum(0) * torch.sigmoid(x[:, :2])
        z = torch.minimum(x, x.flip(-1)) + torch.erf(x) + torch.sin(x) - x.square()
        z = z + torch.sqrt(x.abs() + 1) / (x.exp() + 1) + self.c - x * self.c[0]
        w = torch.cat([y.permute(0, 2, 1).reshape(1, -1), z.reshape(1, -1)], 1)
        return w + x.argmax(-1).float().sum()


def _models():
    mlp = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 4), nn.Softmax(-1))
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(4 * 13 * 13, 3), nn.Softmax(1))
    bn_mlp = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.Hardtanh(), nn.Linear(16, 4))
    return {
        "mlp": (mlp, (1, 10)),
        "cnn": (cnn, (1, 1, 28, 28)),
        "residual_cat_bn": (ResidualCat(), (1, 3, 16, 16)),
        "mixed_activations_deconv": (Mixed(), (1, 4, 9, 9)),
        "batchnorm1d_mlp": (bn_mlp, (1, 10)),
        "rank3_layernorm": (Seq(), (1, 5, 6)),
        "tensor_ops": (TensorOps(), (1, 4, 4)),
    }


def _convert(module, shape):
    logging.disable(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, torch.randn(shape))
        ml = ct.convert(traced, convert_to="neuralnetwork", inputs=[ct.TensorType(shape=shape)])
    logging.disable(logging.NOTSET)
    return ml.get_spec()


@pytest.mark.parametrize("name", list(_models()))
def test_ct_converted_model_matches_torch(name):
    torch.manual_seed(0)
    module, shape = _models()[name]
    for m in module.modules():  # non-trivial batchnorm statistics
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    module.eval()
    spec = _convert(module, shape)
    model = mlpersonal.load(spec)
    in_name = spec.description.input[0].name
    out_name = spec.description.output[0].name
    xs = torch.randn(5, *shape)
    with torch.no_grad():
        ref = [module(x).numpy() for x in xs]
    batch = model.predict_batch([{in_name: x.numpy()} for x in xs])
    for r, got in zip(ref, batch):
        assert got[out_name].shape == r.shape
        np.testing.assert_allclose(got[out_name], r, atol=1e-4, rtol=0)
    one = model.predict({in_name: xs[0].numpy()})[out_name]
    np.testing.assert_allclose(one, batch[0][out_name], atol=1e-6, rtol=0)


def test_ct_converted_image_classifier_input():
    """A ct.ImageType (BGR, scale + bias) input: pixels are preprocessed, then the CNN runs."""
    from PIL import Image

    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                           nn.Flatten(), nn.Linear(4, 3)).eval()
    scale, bias = 1 / 127.5, [-1.0, -0.5, 0.25]
    logging.disable(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, torch.randn(1, 3, 6, 8))
        ml = ct.convert(traced, convert_to="neuralnetwork",
                        inputs=[ct.ImageType(name="image", shape=(1, 3, 6, 8), scale=scale,
                                             bias=bias, color_layout=ct.colorlayout.BGR)])
    logging.disable(logging.NOTSET)
    spec = ml.get_spec()
    model = mlpersonal.load(spec)
    out_name = spec.description.output[0].name
    rng = np.random.default_rng(0)
    rgbs = [rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8) for _ in range(3)]
    got = model.predict_batch([{"image": Image.fromarray(px)} for px in rgbs])
    for px, g in zip(rgbs, got):
        bgr = torch.tensor(px[..., ::-1].copy(), dtype=torch.float32).permute(2, 0, 1)
        x = bgr * scale + torch.tensor(bias).reshape(3, 1, 1)
        with torch.no_grad():
            want = module(x[None]).numpy()
        np.testing.assert_allclose(g[out_name].reshape(want.shape), want, atol=1e-4, rtol=0)
