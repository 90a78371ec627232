"""Pipelines: Apple's drawing-classifier layout (embedding NN + updatable kNN), linked models."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from coremltools.models import datatypes
from coremltools.models.nearest_neighbors import KNearestNeighborsClassifierBuilder
from coremltools.models.neural_network import NeuralNetworkBuilder
from sklearn.neighbors import KNeighborsClassifier

import mlpersonal as mp
from exporters.pipelines import linked_model, pipeline
from mlpersonal.proto import Model_pb2

from _drive import drive, drive_local

SIDE, HID, EMB = 8, 16, 6


@pytest.fixture(scope="module")
def weights():
    r = np.random.default_rng(1)
    return (r.normal(size=(HID, SIDE * SIDE)).astype(np.float32) * 0.2,
            r.normal(size=HID).astype(np.float32) * 0.1,
            r.normal(size=(EMB, HID)).astype(np.float32) * 0.3)


def embedding_spec(weights):
    """A frozen drawing-embedding network (grayscale image -> 'embedding'), NeuralNetworkBuilder-made."""
    w1, b1, w2 = weights
    b = NeuralNetworkBuilder([("drawing", datatypes.Array(1, SIDE, SIDE))], [("embedding", datatypes.Array(EMB))])
    b.add_flatten("flat", 0, "drawing", "flat")
    b.add_inner_product("fc1", w1, b1, SIDE * SIDE, HID, True, "flat", "hidden")
    b.add_activation("relu", "RELU", "hidden", "hidden_relu")
    b.add_inner_product("fc2", w2, None, HID, EMB, False, "hidden_relu", "embedding")
    b.set_pre_processing_parameters(image_input_names=["drawing"], image_scale=1 / 255.0)
    return b.spec


def torch_embedding(weights, images):
    """Oracle: the same network in plain torch."""
    w1, b1, w2 = (torch.from_numpy(w) for w in weights)
    x = torch.from_numpy(np.stack(images).astype(np.float32) / 255.0).reshape(len(images), -1)
    return (torch.relu(x @ w1.T + b1) @ w2.T).numpy()


def knn_spec(k=3):
    b = KNearestNeighborsClassifierBuilder(input_name="embedding", output_name="label", number_of_dimensions=EMB,
                                           default_class_label="defaultLabel", number_of_neighbors=k,
                                           weighting_scheme="inverse_distance", index_type="linear")
    return b.spec


def apple_style_pipeline(emb, knn):
    """Assembled from raw protos like Apple's updatable drawing-classifier sample."""
    p = Model_pb2.Model()
    p.specificationVersion = 4
    p.isUpdatable = True
    p.description.input.extend(emb.description.input[:])
    p.description.output.extend(knn.description.output[:])
    p.description.predictedFeatureName = knn.description.predictedFeatureName
    p.description.predictedProbabilitiesName = knn.description.predictedProbabilitiesName
    p.description.trainingInput.extend([emb.description.input[0]])
    p.description.trainingInput[0].shortDescription = "Example sketch"
    p.description.trainingInput.extend([knn.description.trainingInput[1]])
    p.description.trainingInput[1].shortDescription = "Associated true label of example sketch"
    p.pipelineClassifier.pipeline.models.add().CopyFrom(emb)
    p.pipelineClassifier.pipeline.models.add().CopyFrom(knn)
    # Core ML wants the kNN to declare its input as the embedding's output is declared
    p.pipelineClassifier.pipeline.models[1].description.input[0].type.CopyFrom(emb.description.output[0].type)
    return p


def drawings(rng, n):
    return [rng.integers(0, 256, (SIDE, SIDE)).astype(np.uint8) for _ in range(n)]


def test_apple_style_pipeline_loads_personalizes_saves(tmp_path, rng, weights):
    path = tmp_path / "drawing_classifier.mlmodel"
    mp.save(apple_style_pipeline(embedding_spec(weights), knn_spec()), path)
    model = mp.load(path)
    assert model.is_updatable and model.input_names == ["drawing"]
    imgs = drawings(rng, 40)
    assert model.predict({"drawing": imgs[0]}) == {"label": "defaultLabel", "labelProbs": {}}

    train, labels = imgs[:25], [f"sticker{i % 5}" for i in range(25)]
    updated = drive(model, [{"drawing": a, "label": b} for a, b in zip(train, labels)])
    assert updated.is_updatable
    knn_stage = updated.spec.pipelineClassifier.pipeline.models[1].kNearestNeighborsClassifier
    assert list(knn_stage.stringClassLabels.vector) == labels
    np.testing.assert_allclose(
        np.array([s.vector for s in knn_stage.nearestNeighborsIndex.floatSamples]),
        torch_embedding(weights, train), rtol=1e-5, atol=1e-6)

    sk = KNeighborsClassifier(3, algorithm="brute", weights="distance").fit(
        torch_embedding(weights, train).astype(np.float64), labels)
    test = imgs[25:]
    got = updated.predict_batch([{"drawing": a} for a in test])
    assert [g["label"] for g in got] == sk.predict(torch_embedding(weights, test).astype(np.float64)).tolist()
    assert model.predict({"drawing": test[0]})["label"] == "defaultLabel"  # original untouched

    out = tmp_path / "personal.mlmodel"
    updated.save(out)
    again = mp.load(out)
    assert again.spec == updated.spec and again.is_updatable
    assert again.predict_batch([{"drawing": a} for a in test]) == got

    # a second personalization appends to the first
    more = drive(again, [{"drawing": imgs[30], "label": "new"}])
    assert more.predict({"drawing": imgs[30]})["label"] == "new"
    assert len(more.spec.pipelineClassifier.pipeline.models[1].kNearestNeighborsClassifier
               .nearestNeighborsIndex.floatSamples) == 26


def test_exporter_matches_apple_layout(weights):
    emb, knn = embedding_spec(weights), knn_spec()
    ours = pipeline([emb, knn], names=["embedding", "knn"])
    ref = apple_style_pipeline(emb, knn)
    assert ours.WhichOneof("Type") == "pipelineClassifier"
    assert ours.isUpdatable and ours.specificationVersion == 4
    for field in ("input", "output", "trainingInput"):
        a = [(f.name, f.type) for f in getattr(ours.description, field)]
        b = [(f.name, f.type) for f in getattr(ref.description, field)]
        assert a == b, field
    assert ours.description.predictedFeatureName == "label"
    assert ours.description.predictedProbabilitiesName == "labelProbs"
    assert list(ours.pipelineClassifier.pipeline.models) == list(ref.pipelineClassifier.pipeline.models)
    assert list(ours.pipelineClassifier.pipeline.names) == ["embedding", "knn"]


def test_exporter_kinds_and_errors(weights):
    emb = embedding_spec(weights)
    plain = pipeline([emb])
    assert plain.WhichOneof("Type") == "pipeline" and not plain.isUpdatable
    assert len(plain.description.trainingInput) == 0
    knn = knn_spec()
    with pytest.raises(mp.ConversionError, match="only the last stage"):
        pipeline([knn, emb])
    with pytest.raises(mp.ConversionError, match="unique"):
        pipeline([emb, knn], names=["a", "a"])
    with pytest.raises(mp.ConversionError, match="frozen"):
        pipeline([emb, knn], linked={1: "knn.mlmodel"})


def test_pipeline_regressor_kind():
    b = NeuralNetworkBuilder([("x", datatypes.Array(3))], [("y", datatypes.Array(1))], mode="regressor")
    b.spec.description.predictedFeatureName = "y"
    b.add_inner_product("fc", np.ones((1, 3), np.float32), None, 3, 1, False, "x", "y")
    spec = pipeline([b.spec])
    assert spec.WhichOneof("Type") == "pipelineRegressor"
    assert mp.load(spec).predict({"x": np.array([1.0, 2.0, 3.0])})["y"].tolist() == [6.0]


def test_a_stage_of_an_unsupported_kind_is_named_with_what_to_do():
    """Create ML's tabular regressors put a featureVectorizer before the model: the refusal
    names the stage and says how to get on (prepare the features in code, feed the network)."""
    from coremltools.models.pipeline import PipelineRegressor

    b = NeuralNetworkBuilder([("features", datatypes.Array(2))], [("y", datatypes.Array(1))],
                             mode="regressor")
    b.spec.description.predictedFeatureName = "y"
    b.add_inner_product("fc", np.ones((1, 2), np.float32), None, 2, 1, False, "features", "y")
    pipe = PipelineRegressor([("a", datatypes.Double()), ("b", datatypes.Double())], "y")
    vec = Model_pb2.Model()
    vec.specificationVersion = 1
    for name in ("a", "b"):
        vec.description.input.add().CopyFrom(pipe.spec.description.input[0])
        vec.description.input[-1].name = name
        vec.featureVectorizer.inputList.add(inputColumn=name, inputDimensions=1)
    vec.description.output.add().CopyFrom(b.spec.description.input[0])
    pipe.add_model(vec)
    pipe.add_model(b.spec)
    pipe.spec.description.output[0].type.CopyFrom(b.spec.description.output[0].type)
    with pytest.raises(mp.UnsupportedLayerError,
                       match=r"^pipelineRegressor stage 0 \('stage0'\): model kind 'featureVectorizer' "
                             r"is not supported .*do it in your own code and feed the next stage"):
        mp.load(pipe.spec)
    assert mp.load(b.spec).predict({"features": np.array([1.0, 2.0])})["y"].tolist() == [3.0]


def test_exporter_aligns_element_types_and_refuses_other_mismatches(weights):
    """exporters.pipeline: a kNN input declared float32, fed double by the embedding stage, is
    declared double (the same data; Core ML wants one type); a shape mismatch is an error."""
    emb, knn = embedding_spec(weights), knn_spec()
    assert emb.description.output[0].type != knn.description.input[0].type
    spec = pipeline([emb, knn], names=["embedding", "knn"])
    stages = spec.pipelineClassifier.pipeline.models
    assert stages[1].description.input[0].type == stages[0].description.output[0].type
    mp.load(spec)
    emb.description.output[0].type.multiArrayType.shape[0] = EMB + 1
    with pytest.raises(mp.ConversionError, match=r"stage 'knn' reads 'embedding' declared unlike "
                                                 r"the earlier stage that gives it \(shape"):
        pipeline([emb, knn_spec()], names=["embedding", "knn"])


def test_stage_wiring_errors(weights):
    spec = apple_style_pipeline(embedding_spec(weights), knn_spec())
    spec.pipelineClassifier.pipeline.models[1].description.input[0].name = "nope"
    with pytest.raises(mp.InvalidModelError, match="reads 'nope'"):
        mp.load(spec)


def test_bad_training_examples_write_nothing(tmp_path, rng, weights):
    path = tmp_path / "p.mlmodel"
    mp.save(apple_style_pipeline(embedding_spec(weights), knn_spec()), path)
    before = path.read_bytes()
    model = mp.load(path)
    img = drawings(rng, 1)[0]
    with pytest.raises(mp.InvalidInputError, match="example 1: label 7 .* must be a str"):
        drive_local(model, [{"drawing": img, "label": "a"}, {"drawing": img, "label": 7}])
    with pytest.raises(mp.InvalidInputError, match="example 1: missing input feature 'drawing'"):
        drive_local(model, [{"drawing": img, "label": "a"}, {"label": "b"}])
    with pytest.raises(mp.UpdateParameterError):
        drive_local(model, [{"drawing": img, "label": "a"}], parameters={"number_of_neighbors": 5000})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["p.mlmodel"]


# --- linked models ------------------------------------------------------------------------------
def _linked_pair(folder, weights, search="."):
    emb = embedding_spec(weights)
    shared = (folder / search) if search != "." else folder
    shared.mkdir(parents=True, exist_ok=True)
    mp.save(emb, shared / "DrawingEmbedding.mlmodel")
    paths = []
    for name in ("a", "b"):
        spec = pipeline([emb, knn_spec()], names=["embedding", "knn"],
                        linked={"embedding": ("DrawingEmbedding.mlmodel", search)})
        paths.append(mp.save(spec, folder / f"classifier_{name}.mlmodel"))
    return paths


@pytest.mark.parametrize("search", [".", "shared/models"])
def test_two_pipelines_share_one_linked_embedding(tmp_path, rng, weights, search):
    pa, pb = _linked_pair(tmp_path, weights, search)
    stage = mp.load_spec(pa).pipelineClassifier.pipeline.models[0]
    assert stage.WhichOneof("Type") == "linkedModel" and not stage.isUpdatable
    assert stage.description.input[0].name == "drawing" and stage.description.output[0].name == "embedding"
    shared = (tmp_path / search / "DrawingEmbedding.mlmodel")
    shared_bytes = shared.read_bytes()

    a, b = mp.load(pa), mp.load(pb)
    imgs = drawings(rng, 12)
    la = drive(a, [{"drawing": x, "label": f"a{i % 2}"} for i, x in enumerate(imgs[:6])])
    lb = drive(b, [{"drawing": x, "label": f"b{i % 3}"} for i, x in enumerate(imgs[:6])])
    la.save(pa)
    lb.save(pb)
    assert shared.read_bytes() == shared_bytes  # the shared file is never written
    ra, rb = mp.load(pa), mp.load(pb)
    assert ra.spec.pipelineClassifier.pipeline.models[0].WhichOneof("Type") == "linkedModel"
    emb = torch_embedding(weights, imgs)
    for model, labels in ((ra, [f"a{i % 2}" for i in range(6)]), (rb, [f"b{i % 3}" for i in range(6)])):
        sk = KNeighborsClassifier(3, algorithm="brute", weights="distance").fit(emb[:6].astype(np.float64), labels)
        got = [o["label"] for o in model.predict_batch([{"drawing": x} for x in imgs[6:]])]
        assert got == sk.predict(emb[6:].astype(np.float64)).tolist()


def _set_link(path, name=None, search=None):
    spec = mp.load_spec(path)
    f = spec.pipelineClassifier.pipeline.models[0].linkedModel.linkedModelFile
    if name is not None:
        f.linkedModelFileName.defaultValue = name
    if search is not None:
        f.linkedModelSearchPath.defaultValue = search
    mp.save(spec, path)


def test_linked_escape_attempts_refused(tmp_path, weights):
    inner = tmp_path / "app"
    inner.mkdir()
    pa, _ = _linked_pair(inner, weights)
    outside = tmp_path / "outside.mlmodel"
    mp.save(embedding_spec(weights), outside)
    cases = [
        dict(name="../outside.mlmodel"),
        dict(name=str(outside)),
        dict(name="sub/DrawingEmbedding.mlmodel"),
        dict(name=".."),
        dict(search=".."),
        dict(search=str(tmp_path)),
        dict(search="./sub/../.."),
        dict(search=".:../"),
    ]
    for case in cases:
        _, _ = _linked_pair(inner, weights)  # reset the link
        _set_link(pa, **case)
        with pytest.raises(mp.LinkedModelError, match="plain file name|is absolute|escapes"):
            mp.load(pa)
    # a symlink inside the folder that points outside it
    _linked_pair(inner, weights)
    os.symlink(outside, inner / "evil.mlmodel")
    _set_link(pa, name="evil.mlmodel")
    with pytest.raises(mp.LinkedModelError, match="outside its search folder"):
        mp.load(pa)
    # a symlinked search folder pointing outside
    (tmp_path / "elsewhere").mkdir()
    mp.save(embedding_spec(weights), tmp_path / "elsewhere" / "DrawingEmbedding.mlmodel")
    os.symlink(tmp_path / "elsewhere", inner / "linkdir")
    _set_link(pa, name="DrawingEmbedding.mlmodel", search="linkdir")
    with pytest.raises(mp.LinkedModelError, match="escapes"):
        mp.load(pa)


def test_linked_missing_and_unresolvable(tmp_path, weights):
    pa, _ = _linked_pair(tmp_path, weights)
    os.remove(tmp_path / "DrawingEmbedding.mlmodel")
    with pytest.raises(mp.LinkedModelError, match="not found"):
        mp.load(pa)
    with pytest.raises(mp.LinkedModelError, match="not loaded from a file"):
        mp.load(mp.load_spec(pa))
    (tmp_path / "DrawingEmbedding.mlmodel").write_bytes(b"\x00garbage")
    with pytest.raises(mp.LinkedModelError):
        mp.load(pa)


def test_linked_mlmodelc_name_finds_mlmodel(tmp_path, rng, weights):
    pa, _ = _linked_pair(tmp_path, weights)
    _set_link(pa, name="DrawingEmbedding.mlmodelc")
    model = mp.load(pa)
    img = drawings(rng, 1)[0]
    inner = model.stages[0].inner
    np.testing.assert_allclose(inner.predict({"drawing": img})["embedding"],
                               torch_embedding(weights, [img])[0], rtol=1e-5, atol=1e-6)


def test_linked_model_helper_refuses_paths(weights):
    with pytest.raises(mp.ConversionError):
        linked_model(embedding_spec(weights), "../x.mlmodel")
    with pytest.raises(mp.ConversionError):
        linked_model(embedding_spec(weights), "x.mlmodel", search_path="/abs")


# --- NN head stage (needs the NN updater from runtime.update) -------------------------------------
def _nn_updater_available():
    from runtime.model import CompiledModel
    from runtime.neural_network import NeuralNetworkModel
    return NeuralNetworkModel.make_updater is not CompiledModel.make_updater


@pytest.mark.skipif(not _nn_updater_available(), reason="NN updater (runtime/update.py) not on this branch yet")
def test_pipeline_with_updatable_nn_head(rng, weights):
    from coremltools.models.neural_network import SgdParams

    classes = ["x", "y", "z"]
    b = NeuralNetworkBuilder([("embedding", datatypes.Array(EMB))], [("labelProbs", datatypes.Array(3))],
                             mode="classifier")
    b.set_class_labels(classes, predicted_feature_name="label", prediction_blob="labelProbs")
    b.add_inner_product("head", rng.normal(size=(3, EMB)).astype(np.float32) * 0.1, np.zeros(3, np.float32),
                        EMB, 3, True, "embedding", "logits")
    b.add_softmax("probs", "logits", "labelProbs")
    b.make_updatable(["head"])
    b.set_categorical_cross_entropy_loss("loss", input="labelProbs")
    b.set_sgd_optimizer(SgdParams(lr=0.5, batch=8))
    b.set_epochs(3)
    head = b.spec
    head.specificationVersion = 4
    pipe = mp.load(pipeline([embedding_spec(weights), head], names=["embedding", "head"]))
    imgs = drawings(rng, 8)
    labels = [classes[i % 3] for i in range(8)]
    via_pipeline = drive_local(pipe, [{"drawing": a, "label": b} for a, b in zip(imgs, labels)],
                               parameters={"shuffle": False} if "shuffle" in pipe.make_updater().parameters() else None)
    # oracle: the head trained directly on embeddings computed in plain torch
    emb = torch_embedding(weights, imgs)
    direct = drive_local(mp.load(head), [{"embedding": e, "label": b} for e, b in zip(emb, labels)],
                         parameters={"shuffle": False} if "shuffle" in mp.load(head).make_updater().parameters() else None)
    w_pipe = np.array(via_pipeline.spec.pipelineClassifier.pipeline.models[1].neuralNetworkClassifier.layers[0]
                      .innerProduct.weights.floatValue)
    w_direct = np.array(direct.spec.neuralNetworkClassifier.layers[0].innerProduct.weights.floatValue)
    assert not np.allclose(w_direct, np.array(head.neuralNetworkClassifier.layers[0].innerProduct.weights.floatValue))
    np.testing.assert_allclose(w_pipe, w_direct, rtol=1e-4, atol=1e-6)


def test_public_names_resolve_to_functions():
    import exporters.pipelines  # noqa: F401  (the submodule is also an attribute of `exporters`)

    assert mp.pipeline is pipeline and mp.knn_classifier.__name__ == "knn_classifier"


# --- sequences through a pipeline: an LSTM embedding -> an updatable kNN -------------------------
class _MotionEmbedding(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = torch.nn.LSTM(3, 12, batch_first=True)

    def forward(self, x):
        return self.lstm(x)[0][:, -1]


def test_lstm_embedding_knn_pipeline_takes_sequences_of_any_length():
    """Apple's drawing-sample layout for motion: a frozen LSTM embedding (exported) feeding an
    empty updatable kNN. The pipeline's input takes sequences as its LSTM stage does, recordings
    of different lengths included, for prediction and for the update; scikit-learn's 1-NN on
    torch's embeddings is the oracle."""
    torch.manual_seed(3)
    net = _MotionEmbedding().eval()
    emb = mp.convert(net, [mp.TensorType("motion", (20, 3))], outputs=["embedding"])
    knn = mp.knn_classifier(12, number_of_neighbors=1, input_name="embedding", output_name="label",
                            default_label="unknown")
    model = mp.load(pipeline([emb, knn], names=["embedding", "knn"]))
    rng = np.random.default_rng(4)
    train = [rng.normal(size=(15 + i % 7, 3)).astype(np.float32) for i in range(12)]
    labels = ["wave", "shake", "tap"] * 4
    personal = model.update([{"motion": x, "label": y} for x, y in zip(train, labels)])
    queries = [rng.normal(size=(10 + i, 3)).astype(np.float32) for i in range(8)]

    @torch.no_grad()
    def embed(xs):
        return np.stack([net(torch.from_numpy(x)[None])[0].numpy() for x in xs])

    oracle = KNeighborsClassifier(n_neighbors=1).fit(embed(train), labels)
    got = [o["label"] for o in personal.predict_batch([{"motion": q} for q in queries])]
    assert got == oracle.predict(embed(queries)).tolist()
    same = [rng.normal(size=(20, 3)).astype(np.float32) for _ in range(3)]  # one length: batched
    cols = personal.predict_batch(mp.ArrayBatchProvider({"motion": np.stack(same)})).column("label")
    assert list(cols) == oracle.predict(embed(same)).tolist()
