"""The sticker demo's pipeline at a tiny scale: train (QAT) -> export both models -> personalize."""

import json

import numpy as np
import pytest
import torch

import mlpersonal as mp
from examples.sticker_classifier import demo
from examples.sticker_classifier.train import TrainOptions
from mlpersonal import codecs


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    torch.set_num_threads(1)
    cfg = demo.DemoConfig(
        train=TrainOptions(epochs=4, per_class=100, val_per_class=10, classes=6, qat_bits=4,
                           qat_embedding=True, progress=False),
        new=("anchor", "crown"), shots=5, replay=2, knn_seed=3, knn_k=1, head_epochs=15,
        queries_new=15, queries_old=5, progress=False)
    out = tmp_path_factory.mktemp("demo")
    return cfg, out, demo.run(cfg, out)


def test_exported_models_load_and_are_updatable(results):
    cfg, out, res = results
    clf = mp.load(res["paths"]["classifier"])
    assert clf.is_updatable and list(clf.spec.neuralNetworkClassifier.stringClassLabels.vector) == \
        cfg.base + list(cfg.new)
    layers = {l.name: l for l in clf.spec.neuralNetworkClassifier.layers}
    assert [n for n, l in layers.items() if l.isUpdatable] == ["classifier"]
    assert codecs.storage_of(layers["features.conv2"].convolution.weights).startswith("4-bit")
    assert codecs.storage_of(layers["embedding.fc"].innerProduct.weights).startswith("4-bit")
    assert codecs.storage_of(layers["classifier"].innerProduct.weights) == "float32"
    pipe = mp.load(res["paths"]["knn_pipeline"])
    assert pipe.is_updatable and pipe.spec.WhichOneof("Type") == "pipelineClassifier"
    knn = pipe.spec.pipelineClassifier.pipeline.models[1].kNearestNeighborsClassifier
    assert len(knn.nearestNeighborsIndex.floatSamples) == len(cfg.base) * cfg.knn_seed
    for name in ("classifier", "knn_pipeline"):
        r = res["models"][name]
        assert r["bytes"] < r["float_bytes"]  # 4-bit features take less room than float32


def test_quantized_and_float_exports_predict_alike(results):
    _, _, res = results
    from examples.sticker_classifier.data import make_dataset

    x, _ = make_dataset(["heart", "star", "anchor"], 4, seed=5)
    q = mp.load(res["paths"]["classifier"]).predict_batch([{"image": im} for im in x])
    f = mp.load(res["paths"]["classifier_float"]).predict_batch([{"image": im} for im in x])
    for a, b in zip(q, f):
        assert a["label"] == b["label"]
        assert max(abs(a["labelProbs"][k] - b["labelProbs"][k]) for k in a["labelProbs"]) < 1e-4


def test_personalization_learns_new_stickers_and_keeps_old(results):
    cfg, out, res = results
    head, knn = res["models"]["classifier"], res["models"]["knn_pipeline"]
    assert head["new_after"] > head["new_before"] + 0.3
    assert head["new_after"] >= 0.7
    assert head["old_after"] >= head["old_before"] - 0.1
    assert knn["new_before"] == 0.0 and knn["new_after"] >= 0.6  # tiny base model: weak embedding
    assert knn["old_after"] >= knn["old_before"] - 0.1
    # the loss curve came from the UpdateTask events: one epoch mean per epoch, decreasing
    assert len(head["epoch_losses"]) == cfg.head_epochs
    per_epoch = -(-head["examples"] // cfg.head_batch)
    assert len(head["mini_batch_losses"]) == cfg.head_epochs * per_epoch
    np.testing.assert_allclose(head["epoch_losses"][0], np.mean(head["mini_batch_losses"][:per_epoch]))
    assert head["epoch_losses"][-1] < head["epoch_losses"][0]
    # the personalized files reload and name the new stickers
    from examples.sticker_classifier.data import make_dataset

    x, y = make_dataset(list(cfg.new), 10, seed=99)
    ux, uy = demo.user_drawings(cfg)
    for name in ("classifier", "knn_pipeline"):
        m = mp.load(res["paths"][name + "_personal"])
        got = [o["label"] for o in m.predict_batch([{"image": im} for im in x])]
        assert np.mean(np.array(got) == np.array(y)) >= 0.6 and set(got) & set(cfg.new) == set(cfg.new)
        if name == "knn_pipeline":  # k=1: every drawing the user made is its own nearest neighbour
            assert [o["label"] for o in m.predict_batch([{"image": im} for im in ux])] == uy
    assert json.loads((out / "results.json").read_text())["models"]["knn_pipeline"]["new_after"] == knn["new_after"]


def test_figure_and_table(results):
    cfg, out, res = results
    from PIL import Image

    im = Image.open(res["figure"])
    assert im.format == "PNG" and im.size[0] > 600 and im.size[1] > 400
    text = demo.table(res, cfg)
    assert "classifier" in text and "knn_pipeline" in text
    assert f"{100 * res['models']['knn_pipeline']['new_after']:.1f}%" in text


def test_cached_checkpoint_is_reused(results):
    cfg, out, _ = results
    model, labels, metrics = demo.base_model(cfg, out)
    assert metrics["cached"] and labels == cfg.base
