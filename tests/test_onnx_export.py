"""exporters.to_onnx: onnxruntime on the exported file equals the torch module."""

import numpy as np
import pytest
import torch
import torch.nn as nn

import mlpersonal as mp
from exporters.onnx_export import to_onnx

ort = pytest.importorskip("onnxruntime")


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_cnn_matches_torch_with_dynamic_batch(tmp_path):
    m = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Flatten(), nn.Linear(8 * 14 * 14, 10))
    m[1].running_mean.uniform_(-1, 1)
    m[1].running_var.uniform_(0.5, 2)
    m.train()
    path = to_onnx(m, [mp.ImageType("image", (1, 28, 28), color="grayscale", scale=1 / 255)],
                   tmp_path / "m.onnx")
    assert m.training  # the caller's mode is restored
    sess = _session(path)
    assert [i.name for i in sess.get_inputs()] == ["image"]
    m.eval()
    for n in (1, 5):
        x = torch.rand(n, 1, 28, 28)
        (got,) = sess.run(None, {"image": x.numpy()})
        with torch.no_grad():
            ref = m(x).numpy()
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= 1e-5


def test_two_inputs_two_outputs(tmp_path):
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(6, 3)

        def forward(self, x, y):
            s = self.a(x) + self.b(y)
            return s, torch.tanh(s)

    m = Two().eval()
    path = to_onnx(m, [mp.TensorType("x", (4,)), mp.TensorType("y", (6,))], tmp_path / "two.onnx",
                   output_names=["s", "t"])
    sess = _session(path)
    assert [i.name for i in sess.get_inputs()] == ["x", "y"]
    assert [o.name for o in sess.get_outputs()] == ["s", "t"]
    x, y = torch.randn(3, 4), torch.randn(3, 6)
    got = sess.run(None, {"x": x.numpy(), "y": y.numpy()})
    with torch.no_grad():
        ref = m(x, y)
    for g, r in zip(got, ref):
        assert np.abs(g - r.numpy()).max() <= 1e-5


def test_bad_inputs_raise():
    with pytest.raises(mp.ConversionError):
        to_onnx(nn.Linear(2, 2), [], "x.onnx")
