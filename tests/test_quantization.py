"""quantize_weights (k-means, selection, updatable layers) and compare_models."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import mlpersonal as mp
from mlpersonal import codecs
from mlpersonal.errors import InvalidInputError, MLPersonalError
from mlpersonal.proto import NeuralNetwork_pb2
from mlpersonal.quantization import kmeans_1d

ct = pytest.importorskip("coremltools")
from coremltools.models import datatypes  # noqa: E402
from coremltools.models.neural_network import NeuralNetworkBuilder, SgdParams  # noqa: E402
from coremltools.models.neural_network import quantization_utils as qu  # noqa: E402

LABELS = ["a", "b", "c"]


def mixed_spec(seed=0, updatable=True):
    """Grayscale image -> conv 'features' (frozen) -> relu -> flatten -> fc 'head' (updatable)."""
    rng = np.random.default_rng(seed)
    b = NeuralNetworkBuilder([("image", datatypes.Array(1, 8, 8))], [("probs", None)],
                             mode="classifier")
    b.add_convolution("features", kernel_channels=1, output_channels=4, height=3, width=3,
                      stride_height=1, stride_width=1, border_mode="same", groups=1,
                      W=rng.normal(size=(3, 3, 1, 4)).astype(np.float32) * 0.1,
                      b=rng.normal(size=4).astype(np.float32) * 0.1, has_bias=True,
                      input_name="image", output_name="c")
    b.add_activation("relu", "RELU", "c", "r")
    b.add_flatten("flat", 0, "r", "f")
    b.add_inner_product("head", W=rng.normal(size=(3, 256)).astype(np.float32) * 0.3,
                        b=np.zeros(3, np.float32), input_channels=256, output_channels=3,
                        has_bias=True, input_name="f", output_name="logits")
    b.add_softmax("softmax", "logits", "probs")
    b.set_class_labels(LABELS, predicted_feature_name="label", prediction_blob="probs")
    b.set_pre_processing_parameters(image_input_names=["image"], is_bgr=False,
                                    image_scale=1 / 255.0)
    if updatable:
        b.make_updatable(["head"])
        b.set_categorical_cross_entropy_loss(name="loss", input="probs")
        b.set_sgd_optimizer(SgdParams(lr=0.01, batch=4))
        b.set_epochs(2)
    return b.spec


def layer(spec, name):
    return next(l for l in spec.neuralNetworkClassifier.layers if l.name == name)


def ct_dequant(wp, shape):
    w = NeuralNetwork_pb2.WeightParams()
    w.CopyFrom(wp)
    if len(w.rawValue):
        qu._dequantize_wp(w, shape, 0)
    elif len(w.float16Value):
        return np.frombuffer(w.float16Value, "<f2").astype(np.float32).reshape(shape)
    return np.asarray(w.floatValue, np.float32).reshape(shape)


def torch_probs(spec, images):
    conv = layer(spec, "features").convolution
    fc = layer(spec, "head").innerProduct
    x = torch.from_numpy(images.astype(np.float32)[:, None] / 255.0)
    y = F.relu(F.conv2d(x, torch.from_numpy(ct_dequant(conv.weights, (4, 1, 3, 3))),
                        torch.from_numpy(ct_dequant(conv.bias, (4,))), padding=1))
    y = F.linear(y.reshape(len(x), -1), torch.from_numpy(ct_dequant(fc.weights, (3, 256))),
                 torch.from_numpy(ct_dequant(fc.bias, (3,))))
    return torch.softmax(y, 1).numpy()


def images(n, seed=1):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 8, 8)).astype(np.uint8)


def test_kmeans_1d_matches_sklearn_and_beats_linear(rng):
    from sklearn.cluster import KMeans

    w = rng.normal(size=5000)
    lut, idx = kmeans_1d(w, 16)
    ours = np.sum((w - lut[idx]) ** 2)
    km = KMeans(16, n_init=4, random_state=0).fit(w.reshape(-1, 1))
    assert ours <= km.inertia_ * 1.001
    assert np.all(np.abs(w - lut[idx]) <= np.abs(w[:, None] - lut[None]).min(1) + 1e-12)
    # 4-bit k-means LUT vs 4-bit linear, both as stored in a spec and decoded
    spec = mixed_spec(updatable=False)
    wp = layer(spec, "head").innerProduct.weights
    wp.ClearField("floatValue")
    g = rng.normal(size=768).astype(np.float32)
    wp.floatValue.extend(g)
    errs = {}
    for mode in ("kmeans", "linear", "linear_lut"):
        q = mp.quantize_weights(spec, 4, mode, layers=["head"], per_channel=False)
        dec = ct_dequant(layer(q, "head").innerProduct.weights, (768,))  # per layer
        errs[mode] = float(np.mean((dec - g) ** 2))
    assert errs["kmeans"] < 0.7 * errs["linear"], errs
    assert errs["linear"] == pytest.approx(errs["linear_lut"], rel=1e-5)


@pytest.mark.parametrize("nbits,mode", [(4, "kmeans"), (2, "kmeans"), (8, "linear"),
                                        (3, "linear_symmetric"), (16, "linear")])
def test_mixed_model_quantizes_frozen_layers_only_and_predicts(nbits, mode):
    spec = mixed_spec()
    before = copy.deepcopy(spec)
    with pytest.warns(UserWarning, match="head"):
        q, report = mp.quantize_weights(spec, nbits, mode, return_report=True)
    assert spec == before  # input untouched
    assert [(r[0], r[1]) for r in report.quantized] == (
        [("features", "weights"), ("features", "bias")] if nbits == 16
        else [("features", "weights")])
    assert [r[:2] for r in report.skipped] == [("head", "weights"), ("head", "bias")] \
        if nbits == 16 else [("head", "weights")]
    head = layer(q, "head").innerProduct
    assert head.weights == layer(before, "head").innerProduct.weights  # float, updatable
    assert head.weights.isUpdatable and layer(q, "head").isUpdatable
    assert codecs.storage_of(layer(q, "features").convolution.weights) == (
        "fp16" if nbits == 16 else f"{nbits}-bit {'lut' if mode == 'kmeans' else 'linear'}")
    m = mp.load(q)
    assert m.is_updatable
    imgs = images(6)
    out = m.predict_batch([{"image": im} for im in imgs])
    want = torch_probs(q, imgs)
    got = np.array([[o["probs"][k] for k in LABELS] for o in out])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert [o["label"] for o in out] == [LABELS[i] for i in want.argmax(1)]
    # only the float head trains; writing it back keeps the frozen layer quantized
    params = m.net.named_updatable()
    assert sorted(params) == ["head.bias", "head.weights"]
    with torch.no_grad():
        params["head.weights"].add_(1.0)
    m.net.write_back()
    again = mp.load(m.spec.SerializeToString())
    assert codecs.storage_of(layer(again.spec, "features").convolution.weights) == \
        codecs.storage_of(layer(q, "features").convolution.weights)
    np.testing.assert_allclose(
        np.asarray(layer(again.spec, "head").innerProduct.weights.floatValue),
        np.asarray(layer(before, "head").innerProduct.weights.floatValue) + 1.0, rtol=1e-6)


def test_updatable_refused_when_not_skipping():
    with pytest.raises(InvalidInputError, match="'head' is updatable"):
        mp.quantize_weights(mixed_spec(), 4, "linear", skip_updatable=False)


def test_layer_selection_and_bias_option():
    spec = mixed_spec(updatable=False)
    q = mp.quantize_weights(spec, 8, "linear", layers=["head"], quantize_bias=True)
    assert codecs.storage_of(layer(q, "features").convolution.weights) == "float32"
    assert codecs.storage_of(layer(q, "head").innerProduct.weights) == "8-bit linear"
    assert codecs.storage_of(layer(q, "head").innerProduct.bias) == "8-bit linear"
    q = mp.quantize_weights(spec, 2, "kmeans", layers=lambda l: l.name == "features")
    assert codecs.storage_of(layer(q, "features").convolution.weights) == "2-bit lut"
    assert codecs.storage_of(layer(q, "head").innerProduct.weights) == "float32"
    with pytest.raises(InvalidInputError, match="nope"):
        mp.quantize_weights(spec, 8, layers=["nope"])


@pytest.mark.parametrize("kw,match", [
    (dict(nbits=0), "nbits"), (dict(nbits=12), "nbits"), (dict(nbits=4, mode="zip"), "mode"),
    (dict(nbits=4, mode="custom_lut"), "lut_function"),
    (dict(nbits=4, mode="custom_lut", lut_function=lambda n, w: (np.zeros(3), w * 0)), "table"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(MLPersonalError, match=match):
        mp.quantize_weights(mixed_spec(updatable=False), **kw)


def test_quantize_from_path_and_file_roundtrip(tmp_path):
    path = tmp_path / "m.mlmodel"
    mp.save(mixed_spec(updatable=False), path)
    q = mp.quantize_weights(str(path), 4, "kmeans")
    mp.save(q, tmp_path / "q.mlmodel")
    a = mp.load(q).predict({"image": images(1)[0]})
    b = mp.load(str(tmp_path / "q.mlmodel")).predict({"image": images(1)[0]})
    assert a == b
    assert (tmp_path / "q.mlmodel").stat().st_size < path.stat().st_size


def test_compare_models_numbers_match_an_independent_computation(tmp_path):
    full = mixed_spec(updatable=False)
    q = mp.quantize_weights(full, 2, "linear")
    imgs = images(20, seed=3)
    rep = mp.compare_models(full, q, [{"image": im} for im in imgs])
    pf, pq = torch_probs(full, imgs), torch_probs(q, imgs)
    assert rep.num_samples == 20
    assert rep.top1_agreement == pytest.approx(np.mean(pf.argmax(1) == pq.argmax(1)))
    d = pf - pq
    o = rep.outputs["probs"]
    assert o.max_abs_diff == pytest.approx(np.abs(d).max(), abs=1e-5)
    assert o.mean_abs_diff == pytest.approx(np.abs(d).mean(), abs=1e-5)
    assert o.snr_db == pytest.approx(10 * math.log10((pf ** 2).sum() / (d ** 2).sum()), abs=0.05)
    assert rep.snr_db == o.snr_db and rep.max_abs_diff == o.max_abs_diff
    # the same images as a folder give the same report
    for i, im in enumerate(imgs):
        Image.fromarray(im, mode="L").save(tmp_path / f"{i:02d}.png")
    rep2 = mp.compare_models(full, q, tmp_path)
    assert rep2.top1_agreement == rep.top1_agreement
    assert rep2.outputs["probs"].max_abs_diff == pytest.approx(o.max_abs_diff, abs=1e-6)
    assert "agreement" in str(rep2)
    same = mp.compare_models(full, full, [{"image": imgs[0]}])
    assert same.top1_agreement == 1.0 and same.max_abs_diff == 0 and same.snr_db == math.inf
    with pytest.raises(InvalidInputError):
        mp.compare_models(full, q, tmp_path / "missing")


def test_cli_quantize_and_compare(tmp_path, capsys):
    from mlpersonal.cli import main

    src, dst = tmp_path / "m.mlmodel", tmp_path / "q.mlmodel"
    mp.save(mixed_spec(updatable=False), src)
    imgs = images(5)
    np.savez(tmp_path / "s.npz", image=imgs)
    assert main(["quantize", str(src), str(dst), "--nbits", "4", "--mode", "kmeans"]) == 0
    out = capsys.readouterr().out
    assert "4-bit lut" in out and "bytes" in out
    assert codecs.storage_of(layer(mp.load_spec(dst), "features").convolution.weights) \
        == "4-bit lut"
    assert main(["compare", str(src), str(dst), str(tmp_path / "s.npz")]) == 0
    out = capsys.readouterr().out
    want = mp.compare_models(str(src), str(dst), [{"image": im} for im in imgs])
    assert f"{100 * want.top1_agreement:.2f} %" in out and "SNR" in out
