"""Flexible shapes: a fully convolutional style-transfer-like net at every allowed size vs torch."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import mlpersonal as mp
from mlpersonal.errors import ConversionError, InvalidInputError

from coremltools.models import datatypes
from coremltools.models.neural_network import NeuralNetworkBuilder, flexible_shape_utils as fsu

from exporters.flexible import (is_flexible, set_enumerated_image_sizes, set_enumerated_shapes,
                                set_image_size_range, set_shape_range)

W0, H0 = 64, 48          # default size
BIG = (192, 144)         # second enumerated size (width, height)


class Stylizer(nn.Module):
    """conv -> relu -> strided conv -> relu -> deconv (x2 upsample) -> relu -> conv."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(8, 8, 4, stride=2, padding=1)
        self.c2 = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.down(x))
        x = torch.relu(self.up(x))
        return self.c2(x)


class WithLinear(Stylizer):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * H0 * W0, 10)

    def forward(self, x):
        return self.fc(super().forward(x).flatten(1))


class WithView(Stylizer):
    def forward(self, x):
        return super().forward(x).view(1, 3 * H0 * W0)


class GlobalPoolHead(Stylizer):
    def __init__(self):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.pool(super().forward(x)).flatten(1))


def _np(t):
    return t.detach().numpy()


def build_spec(net, image=True, with_fc=False):
    """The network's spec, written with coremltools' NeuralNetworkBuilder from its weights."""
    out = [("out", datatypes.Array(10))] if with_fc else [("out", datatypes.Array(3, H0, W0))]
    b = NeuralNetworkBuilder([("x", datatypes.Array(3, H0, W0))], out)

    def conv(name, m, inp, outp, stride=1, deconv=False):
        w = _np(m.weight).transpose(2, 3, 0, 1) if deconv else _np(m.weight).transpose(2, 3, 1, 0)
        cin, cout = (m.in_channels, m.out_channels)
        b.add_convolution(name, cin, cout, m.kernel_size[0], m.kernel_size[1], stride, stride,
                          "valid", 1, w, _np(m.bias), True, is_deconv=deconv, input_name=inp,
                          output_name=outp, padding_top=1, padding_bottom=1, padding_left=1,
                          padding_right=1)

    conv("c1", net.c1, "x", "a1")
    b.add_activation("r1", "RELU", "a1", "b1")
    conv("down", net.down, "b1", "a2", stride=2)
    b.add_activation("r2", "RELU", "a2", "b2")
    conv("up", net.up, "b2", "a3", stride=2, deconv=True)
    b.add_activation("r3", "RELU", "a3", "b3")
    conv("c2", net.c2, "b3", "out" if not with_fc else "s")
    if with_fc:
        b.add_flatten("flat", 0, "s", "f")
        b.add_inner_product("fc", _np(net.fc.weight), _np(net.fc.bias), 3 * H0 * W0, 10, True,
                            "f", "out")
    if image:
        b.set_pre_processing_parameters(image_input_names=["x"], image_scale=1 / 255.0)
    return b.spec


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return Stylizer().eval()


@pytest.fixture(scope="module")
def base_spec(net):
    return build_spec(net)


def _img(rng, w, h):
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _ref_img(net, img):
    x = torch.from_numpy(img.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        return net(x)[0].numpy()


# --- the spec fields match coremltools' flexible_shape_utils ---------------------------------
def _ct_enumerated(spec):
    s = copy.deepcopy(spec)
    fsu.add_enumerated_image_sizes(s, "x", sizes=[fsu.NeuralNetworkImageSize(height=H0, width=W0),
                                                  fsu.NeuralNetworkImageSize(height=BIG[1], width=BIG[0])])
    return s


def _ct_range(spec):
    s = copy.deepcopy(spec)
    r = fsu.NeuralNetworkImageSizeRange()
    r.add_height_range((32, 160))
    r.add_width_range((32, -1))
    fsu.update_image_size_range(s, "x", size_range=r)
    return s


def _ours_enumerated(spec):
    s = copy.deepcopy(spec)
    set_enumerated_image_sizes(s, "x", [(W0, H0), BIG])
    return s


def _ours_range(spec):
    s = copy.deepcopy(spec)
    set_image_size_range(s, "x", width_range=(32, -1), height_range=(32, 160))
    return s


def test_image_fields_match_flexible_shape_utils(base_spec):
    for ours, theirs in ((_ours_enumerated(base_spec), _ct_enumerated(base_spec)),
                         (_ours_range(base_spec), _ct_range(base_spec))):
        assert ours.description.input[0] == theirs.description.input[0]
        assert ours.specificationVersion == theirs.specificationVersion >= 3
    # enumerated sizes not listing the default: coremltools appends it last, and so do we
    s1, s2 = copy.deepcopy(base_spec), copy.deepcopy(base_spec)
    fsu.add_enumerated_image_sizes(s1, "x", sizes=[fsu.NeuralNetworkImageSize(BIG[1], BIG[0])])
    set_enumerated_image_sizes(s2, "x", [BIG])
    assert s1.description.input[0] == s2.description.input[0]
    # outputs follow: the multi-array output's shape is cleared, as ct.convert leaves it
    assert list(_ours_enumerated(base_spec).description.output[0].type.multiArrayType.shape) == []


def test_multiarray_fields_match_flexible_shape_utils(net):
    spec = build_spec(net, image=False)
    s1, s2 = copy.deepcopy(spec), copy.deepcopy(spec)
    fsu.add_enumerated_multiarray_shapes(s1, "x", [fsu.NeuralNetworkMultiArrayShape(3, BIG[1], BIG[0])])
    set_enumerated_shapes(s2, "x", [(3, BIG[1], BIG[0])])
    assert s1.description.input[0] == s2.description.input[0]
    assert s1.specificationVersion == s2.specificationVersion
    r1, r2 = copy.deepcopy(spec), copy.deepcopy(spec)
    fsu.update_multiarray_shape_range(r1, "x", fsu.NeuralNetworkMultiArrayShapeRange(
        {"C": (3, 3), "H": (16, -1), "W": (16, 256)}))
    set_shape_range(r2, "x", [3, (16, -1), (16, 256)])
    assert r1.description.input[0] == r2.description.input[0]
    assert r1.specificationVersion == r2.specificationVersion
    # ND (EXACT_ARRAY_MAPPING) specs get the ND variants' fields and version 4
    nd1 = copy.deepcopy(spec)
    nd1.neuralNetwork.arrayInputShapeMapping = 1
    nd2 = copy.deepcopy(nd1)
    fsu.add_multiarray_ndshape_enumeration(nd1, "x", [(3, BIG[1], BIG[0])])
    set_enumerated_shapes(nd2, "x", [(3, BIG[1], BIG[0])])
    assert nd1.description.input[0] == nd2.description.input[0]
    assert nd1.specificationVersion == nd2.specificationVersion == 4
    nd3, nd4 = copy.deepcopy(spec), copy.deepcopy(spec)
    nd3.neuralNetwork.arrayInputShapeMapping = nd4.neuralNetwork.arrayInputShapeMapping = 1
    fsu.set_multiarray_ndshape_range(nd3, "x", [3, 16, 16], [3, -1, 256])
    set_shape_range(nd4, "x", [3, (16, -1), (16, 256)])
    assert nd3.description.input[0] == nd4.description.input[0]


def test_bad_flexibility_requests_are_refused(base_spec, net):
    s = copy.deepcopy(base_spec)
    with pytest.raises(ConversionError, match="outside"):
        set_image_size_range(s, "x", width_range=(100, 200), height_range=(32, 64))
    with pytest.raises(ConversionError, match="not a multiArrayType"):
        set_shape_range(s, "x", [3, 3, 3])
    with pytest.raises(ConversionError, match="no feature named"):
        set_enumerated_image_sizes(s, "image", [BIG])
    arr = build_spec(net, image=False)
    with pytest.raises(ConversionError, match="3 positive dimensions"):
        set_enumerated_shapes(arr, "x", [(3, 10)])


# --- the runtime runs every allowed size with one loaded model --------------------------------
@pytest.mark.parametrize("make", [_ct_enumerated, _ours_enumerated, _ct_range, _ours_range],
                         ids=["ct-enumerated", "ours-enumerated", "ct-range", "ours-range"])
def test_runs_each_allowed_size_like_torch(make, base_spec, net, rng):
    m = mp.load(make(base_spec))
    sizes = [(W0, H0), BIG] + ([(96, 160), (320, 32)] if "range" in make.__name__ else [])
    for w, h in sizes:
        img = _img(rng, w, h)
        out = m.predict({"x": img})["out"]
        ref = _ref_img(net, img)
        assert out.shape == ref.shape == (3, h, w)
        np.testing.assert_allclose(out, ref, atol=1e-5)


def test_mixed_sizes_in_one_batch(base_spec, net, rng):
    m = mp.load(_ours_enumerated(base_spec))
    imgs = [_img(rng, W0, H0), _img(rng, *BIG), _img(rng, W0, H0)]
    outs = m.predict_batch([{"x": i} for i in imgs])
    declared = {65600: np.float64, 65568: np.float32}[m.spec.description.output[0].type.multiArrayType.dataType]
    for img, o in zip(imgs, outs):
        np.testing.assert_allclose(o["out"], _ref_img(net, img), atol=1e-5)
        assert o["out"].dtype == declared  # per-example outputs of mixed sizes too


def test_image_of_disallowed_size_is_resized_to_default(base_spec, net, rng):
    m = mp.load(_ours_enumerated(base_spec))
    img = _img(rng, 100, 100)
    out = m.predict({"x": img})["out"]
    resized = np.asarray(Image.fromarray(img).resize((W0, H0), Image.BILINEAR))
    assert out.shape == (3, H0, W0)
    np.testing.assert_allclose(out, _ref_img(net, resized), atol=1e-5)


@pytest.mark.parametrize("kind", ["enumerated", "range"])
def test_multiarray_allowed_shapes_run_and_others_are_refused(kind, net, rng):
    spec = build_spec(net, image=False)
    if kind == "enumerated":
        set_enumerated_shapes(spec, "x", [(3, BIG[1], BIG[0])])
        ok, bad = [(3, H0, W0), (3, BIG[1], BIG[0])], (3, 100, 100)
        allowed = ["(3, 48, 64)", "(3, 144, 192)"]
    else:
        set_shape_range(spec, "x", [3, (16, -1), (16, 256)])
        ok, bad = [(3, H0, W0), (3, 400, 32)], (3, 32, 300)
        allowed = ["(16, -1)", "(16, 256)"]
    m = mp.load(spec)
    for shape in ok:
        x = rng.normal(size=shape).astype(np.float32)
        with torch.no_grad():
            ref = net(torch.from_numpy(x)[None])[0].numpy()
        np.testing.assert_allclose(m.predict({"x": x})["out"], ref, atol=1e-5)
    with pytest.raises(InvalidInputError) as e:
        m.predict({"x": rng.normal(size=bad).astype(np.float32)})
    msg = str(e.value)
    assert str(bad) in msg and all(a in msg for a in allowed)


# --- is_flexible ---------------------------------------------------------------------------
def test_is_flexible_modules(net):
    r = is_flexible(net)
    assert r and r.flexible_dims == ("H", "W") and r.reason == ""
    assert is_flexible(net, input_shape=(3, H0, W0))
    lin = is_flexible(WithLinear())
    assert not lin and lin.flexible_dims == () and "'fc' (Linear) fixes the input size" in lin.reason
    assert not is_flexible(WithLinear(), input_shape=(3, H0, W0))
    view = is_flexible(WithView().eval(), input_shape=(3, H0, W0))
    assert not view and "twice the input size" in view.reason
    assert is_flexible(GlobalPoolHead(), input_shape=(3, H0, W0))


def test_is_flexible_specs(net, base_spec):
    assert is_flexible(base_spec).flexible_dims == ("H", "W")
    torch.manual_seed(0)
    fc_spec = build_spec(WithLinear(), image=True, with_fc=True)
    r = is_flexible(fc_spec)
    assert not r and "'flat' (flatten) fixes the input size" in r.reason
    with pytest.raises(ConversionError):
        is_flexible("model.mlmodel")
    assert mp.is_flexible is is_flexible


def test_image_outputs_follow_scaled_by_their_default_size(base_spec):
    s = copy.deepcopy(base_spec)
    out = s.description.output[0]
    out.type.imageType.width, out.type.imageType.height = 2 * W0, 2 * H0  # a x2 "super-resolution"
    out.type.imageType.colorSpace = 20  # RGB
    e = copy.deepcopy(s)
    set_enumerated_image_sizes(e, "x", [BIG])
    got = [(z.width, z.height) for z in e.description.output[0].type.imageType.enumeratedSizes.sizes]
    assert got == [(2 * BIG[0], 2 * BIG[1]), (2 * W0, 2 * H0)]
    set_image_size_range(s, "x", width_range=(32, -1), height_range=(32, 160))
    r = s.description.output[0].type.imageType.imageSizeRange
    assert (r.widthRange.lowerBound, r.widthRange.upperBound) == (64, -1)
    assert (r.heightRange.lowerBound, r.heightRange.upperBound) == (64, 320)


# --- on-device update on images of several allowed sizes -------------------------------------
def test_update_task_trains_on_images_of_mixed_sizes_like_torch(rng):
    """A flexible-size classifier (conv -> relu -> global average pool -> fc -> softmax, conv
    and fc updatable) trains on photos of two allowed sizes in one task: each example runs at its
    own size and each mini-batch's loss is the mean of its examples' (torch, example by example)."""
    from coremltools.models.neural_network import SgdParams

    torch.manual_seed(5)
    conv, fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 3)
    labels = ["cat", "dog", "owl"]
    b = NeuralNetworkBuilder([("x", datatypes.Array(3, 12, 16))], [("probs", None)], mode="classifier")
    b.add_convolution("conv", 3, 4, 3, 3, 1, 1, "same", 1, _np(conv.weight).transpose(2, 3, 1, 0),
                      _np(conv.bias), True, input_name="x", output_name="c")
    b.add_activation("relu", "RELU", "c", "r")
    b.add_pooling("gap", 0, 0, 1, 1, "AVERAGE", "VALID", "r", "g", is_global=True)
    b.add_flatten("flat", 0, "g", "f")
    b.add_inner_product("fc", _np(fc.weight), _np(fc.bias), 4, 3, True, "f", "logits")
    b.add_softmax("softmax", "logits", "probs")
    b.set_class_labels(labels, predicted_feature_name="label", prediction_blob="probs")
    b.set_pre_processing_parameters(image_input_names=["x"], image_scale=1 / 255.0)
    b.make_updatable(["conv", "fc"])
    b.set_categorical_cross_entropy_loss("loss", "probs")
    b.set_sgd_optimizer(SgdParams(lr=0.2, batch=3, momentum=0.9))
    b.set_epochs(2)
    spec = b.spec
    set_enumerated_image_sizes(spec, "x", [(16, 12), (20, 24)])
    imgs = [_img(rng, *((16, 12) if i % 2 else (20, 24))) for i in range(6)]
    ys = [0, 1, 2, 2, 1, 0]
    data = [{"x": im, "label": labels[y]} for im, y in zip(imgs, ys)]
    trained = mp.load(spec).update(data, parameters={"shuffle": False})

    xs = [torch.from_numpy(im.astype(np.float32) / 255.0).permute(2, 0, 1)[None] for im in imgs]
    params = list(conv.parameters()) + list(fc.parameters())
    opt = torch.optim.SGD(params, lr=0.2, momentum=0.9)
    for _ in range(2):
        for s in range(0, 6, 3):
            logits = torch.cat([fc(torch.relu(conv(x)).mean((2, 3))) for x in xs[s:s + 3]])
            loss = nn.functional.cross_entropy(logits, torch.tensor(ys[s:s + 3]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    layers = {l.name: l for l in trained.spec.neuralNetworkClassifier.layers}
    np.testing.assert_allclose(np.asarray(layers["fc"].innerProduct.weights.floatValue).reshape(3, 4),
                               _np(fc.weight), atol=1e-5)
    np.testing.assert_allclose(np.asarray(layers["conv"].convolution.weights.floatValue).reshape(4, 3, 3, 3),
                               _np(conv.weight), atol=1e-5)  # Core ML stores [Cout, Cin, kH, kW]
