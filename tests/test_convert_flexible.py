"""convert(...) with flexible input declarations: the spec accepts every allowed size, matches
torch at each, and refuses what is not allowed; networks that fix their size are refused."""

import numpy as np
import pytest
import torch
from torch import nn

import mlpersonal as mp


def _fcn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1)).eval()


def _check(spec, module, name, shapes):
    m = mp.load(spec)
    for c, h, w in shapes:
        x = torch.rand(2, c, h, w)
        got = np.stack([o["output"] for o in m.predict_batch([{name: a.numpy()} for a in x])])
        want = module(x).detach().numpy()
        np.testing.assert_allclose(got.reshape(want.shape), want, atol=1e-5)


def test_tensor_enumerated_and_range():
    net = _fcn()
    spec = mp.convert(net, [mp.TensorType("x", (3, 16, 16), enumerated_shapes=[(3, 32, 24)])])
    _check(spec, net, "x", [(3, 16, 16), (3, 32, 24)])
    with pytest.raises(mp.InvalidInputError, match="accepts"):
        mp.load(spec).predict({"x": np.zeros((3, 20, 20), np.float32)})
    spec = mp.convert(net, [mp.TensorType("x", (3, 16, 16), shape_range=[(3, 3), (8, 64), (8, -1)])])
    _check(spec, net, "x", [(3, 8, 8), (3, 40, 100)])
    with pytest.raises(mp.InvalidInputError):
        mp.load(spec).predict({"x": np.zeros((3, 4, 16), np.float32)})


def test_image_enumerated_sizes_keep_allowed_size():
    net = _fcn()
    spec = mp.convert(net, [mp.ImageType("image", (3, 48, 64), scale=1 / 255.0,
                                         enumerated_sizes=[(192, 144)])])
    it = spec.description.input[0].type.imageType
    assert {(s.width, s.height) for s in it.enumeratedSizes.sizes} == {(64, 48), (192, 144)}
    img = (np.random.default_rng(0).random((144, 192, 3)) * 255).astype(np.uint8)
    out = mp.load(spec).predict({"image": img})["output"]
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255.0
    np.testing.assert_allclose(out.reshape(1, 3, 144, 192), net(x).detach().numpy(), atol=1e-5)


def test_not_fully_convolutional_is_refused():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 6 * 6, 3)).eval()
    with pytest.raises(mp.ConversionError, match="not fully convolutional"):
        mp.convert(net, [mp.TensorType("x", (1, 8, 8), enumerated_shapes=[(1, 16, 16)])])
