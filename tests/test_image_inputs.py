"""Image features (PIL image, path, HxW / HxWx3 uint8 arrays, float [0, 1] arrays) in grayscale,
RGB and BGR models with scaler preprocessing, against a numpy reference of the same
preprocessing; and clear InvalidInputError for bad multi-array values."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

import mlpersonal

logging.getLogger("coremltools").setLevel(logging.ERROR)
pytest.importorskip("coremltools")
from coremltools.models import datatypes  # noqa: E402
from coremltools.models.neural_network import NeuralNetworkBuilder  # noqa: E402

H, W = 5, 7
SCALE = 1 / 255.0
BIAS = {"red": -0.5, "green": 0.25, "blue": -1.0, "gray": -0.2}
LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601-2, what an RGB -> gray conversion uses


def image_model(color: str):
    """An identity network over an image input with channelScale + biases preprocessing."""
    c = 1 if color == "grayscale" else 3
    b = NeuralNetworkBuilder([("image", datatypes.Array(c, H, W))], [("out", None)])
    b.add_activation("id", "LINEAR", "image", "out", params=[1.0, 0.0])
    b.set_pre_processing_parameters(
        image_input_names=["image"], is_bgr=color == "bgr", image_scale=SCALE,
        red_bias=BIAS["red"], green_bias=BIAS["green"], blue_bias=BIAS["blue"],
        gray_bias=BIAS["gray"])
    spec = b.spec
    assert spec.description.input[0].type.WhichOneof("Type") == "imageType"
    return mlpersonal.load(spec, compute_units="cpu_only")  # the plan's short path is the cpu's


def reference(rgb: np.ndarray, color: str) -> np.ndarray:
    """(H, W, 3) pixel values 0..255 -> the network input the model should see."""
    rgb = rgb.astype(np.float64)
    if color == "grayscale":
        return (rgb @ LUMA * SCALE + BIAS["gray"])[None]
    r, g, b = (rgb[..., i] * SCALE for i in range(3))
    planes = [r + BIAS["red"], g + BIAS["green"], b + BIAS["blue"]]
    return np.stack(planes if color == "rgb" else planes[::-1])


def rgb_pixels(seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(H, W, 3), dtype=np.uint8)


# rounding to 8-bit pixels (float inputs, RGB -> gray) may move a value by half a step
TOL = 0.5 * SCALE + 1e-5


@pytest.mark.parametrize("color", ["grayscale", "rgb", "bgr"])
@pytest.mark.parametrize("form", ["pil", "path", "array_hwc_uint8", "array_float01"])
def test_color_image_forms(color, form, tmp_path):
    model = image_model(color)
    px = rgb_pixels()
    if form == "pil":
        value = Image.fromarray(px)
    elif form == "path":
        value = tmp_path / "im.png"
        Image.fromarray(px).save(value)
        value = str(value)
    elif form == "array_hwc_uint8":
        value = px
    else:
        value = px.astype(np.float32) / 255.0
    got = model.predict({"image": value})["out"]
    want = reference(px, color)
    assert got.shape == want.shape
    exact = color != "grayscale"
    np.testing.assert_allclose(got, want, atol=1e-5 if exact else TOL, rtol=0)


@pytest.mark.parametrize("color", ["grayscale", "rgb", "bgr"])
def test_gray_hw_uint8_array(color):
    model = image_model(color)
    gray = np.random.default_rng(1).integers(0, 256, size=(H, W), dtype=np.uint8)
    got = model.predict({"image": gray})["out"]
    want = reference(np.repeat(gray[..., None], 3, axis=2), color)  # gray -> R = G = B
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("color", ["grayscale", "rgb", "bgr"])
def test_pil_grayscale_and_wrong_size_images_are_converted(color):
    model = image_model(color)
    solid = np.zeros((3 * H, 2 * W, 3), np.uint8) + np.array([200, 40, 90], np.uint8)
    got = model.predict({"image": Image.fromarray(solid).convert("RGB")})["out"]
    np.testing.assert_allclose(got, reference(solid[:H, :W], color), atol=TOL, rtol=0)


def test_batch_of_mixed_image_forms_equals_single_predictions(tmp_path):
    model = image_model("bgr")
    pxs = [rgb_pixels(s) for s in range(4)]
    path = tmp_path / "b.png"
    Image.fromarray(pxs[1]).save(path)
    batch = [{"image": Image.fromarray(pxs[0])}, {"image": path}, {"image": pxs[2]},
             {"image": pxs[3].astype(np.float64) / 255}]
    outs = model.predict_batch(batch)
    for px, out in zip(pxs, outs):
        np.testing.assert_allclose(out["out"], reference(px, "bgr"), atol=TOL, rtol=0)


@pytest.mark.parametrize("bad", ["missing.png", np.full((H, W), 2.0), np.zeros((H, W, 2), np.uint8)])
def test_bad_image_values_raise_invalid_input(bad, tmp_path):
    model = image_model("rgb")
    value = str(tmp_path / bad) if isinstance(bad, str) else bad
    with pytest.raises(mlpersonal.InvalidInputError):
        model.predict({"image": value})


def _array_model():
    b = NeuralNetworkBuilder([("x", datatypes.Array(3, 2, 2))], [("out", None)])
    b.add_activation("relu", "RELU", "x", "out")
    return mlpersonal.load(b.spec)


@pytest.mark.parametrize("bad", [np.zeros((3, 2, 3)), np.zeros((2, 2)), np.full((3, 2, 2), np.nan),
                                 np.array([[["a"]]])])
def test_bad_multiarray_raises_invalid_input(bad):
    model = _array_model()
    with pytest.raises(mlpersonal.InvalidInputError, match="'x'"):
        model.predict({"x": bad})


def test_missing_feature_raises_invalid_input():
    with pytest.raises(mlpersonal.InvalidInputError, match="missing input feature 'x'"):
        _array_model().predict({"y": np.zeros((3, 2, 2))})


@pytest.mark.parametrize("color", ["grayscale", "rgb", "bgr"])
def test_image_columns_equal_per_example_encoding(color):
    """A (B, H, W[, 3]) uint8 column (ArrayBatchProvider) is encoded at once, as each example is."""
    model = image_model(color)
    pxs = np.stack([rgb_pixels(s) for s in range(5)])
    gray = pxs[..., 0]
    for col in ((gray if color == "grayscale" else pxs), pxs, gray):  # fast path, then converted
        out = model.predict_batch(mlpersonal.ArrayBatchProvider({"image": col}))
        want = model.predict_batch([{"image": v} for v in col])
        np.testing.assert_array_equal(out.column("out"), np.stack([w["out"] for w in want]))
    rgb = np.repeat(gray[..., None], 3, axis=3) if color == "grayscale" else pxs
    out = model.predict_batch(mlpersonal.ArrayBatchProvider({"image": rgb if color != "grayscale" else gray}))
    for got, px in zip(out.column("out"), rgb):
        np.testing.assert_allclose(got, reference(px, color), atol=1e-5, rtol=0)


@pytest.mark.parametrize("color", ["grayscale", "rgb", "bgr"])
def test_plain_pixel_batches_take_the_short_path(color, monkeypatch):
    """uint8 pixel arrays at the model's size skip the generic encoder once the inference plan
    is ready (as dicts and as columns); outputs equal the preprocessing reference."""
    import runtime.model as model_mod

    model = image_model(color)
    pxs = np.stack([rgb_pixels(s) for s in range(4)])
    values = pxs[..., 0] if color == "grayscale" else pxs
    model.predict_batch([{"image": v} for v in values])  # builds the plan
    monkeypatch.setattr(model_mod, "encode_inputs", lambda *a, **k: 1 / 0)
    got = model.predict_batch([{"image": v} for v in values])
    cols = model.predict_batch(mlpersonal.ArrayBatchProvider({"image": values}))
    monkeypatch.undo()
    for px, out, col in zip(pxs, got, cols.column("out")):
        rgb = np.repeat(px[..., :1], 3, axis=2) if color == "grayscale" else px
        np.testing.assert_allclose(out["out"], reference(rgb, color), atol=1e-5, rtol=0)
        np.testing.assert_array_equal(col, out["out"])
    # another size or a float image goes the generic way (resized / converted), same answers
    floats = [v.astype(np.float32) / 255 for v in values]
    np.testing.assert_allclose(np.stack([o["out"] for o in model.predict_batch([{"image": v} for v in floats])]),
                               np.stack([o["out"] for o in got]), atol=TOL)
