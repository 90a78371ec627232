"""The mlpersonal command line: inspect and predict on exported and coremltools-built models."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import mlpersonal as mp
from exporters.converter import ClassifierConfig, convert
from mlpersonal.cli import COMMANDS, main

ct = pytest.importorskip("coremltools")
ROOT = Path(__file__).resolve().parents[1]
LABELS = ["heart", "star", "sun", "house"]


@pytest.fixture
def sticker(tmp_path):
    torch.manual_seed(3)
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                      nn.Linear(4 * 7 * 7, 4)).eval()
    spec = convert(m, [mp.ImageType("image", (1, 14, 14), color="grayscale", scale=1 / 255.0)],
                   classifier=ClassifierConfig(labels=LABELS), metadata={"author": "Ada"})
    path = tmp_path / "sticker.mlmodel"
    mp.save(spec, path)
    return path


def test_inspect_lists_io_metadata_and_layers(sticker, capsys):
    assert main(["inspect", str(sticker)]) == 0
    out = capsys.readouterr().out
    assert "model: neuralNetworkClassifier" in out
    assert "image: image 14x14 grayscale" in out
    assert "multiArray" not in out
    assert "labelProbs: dictionary(string -> double)" in out and "label: string" in out
    assert "author: Ada" in out
    assert "class labels (4): heart, star, sun, house" in out
    lines = {line.split()[0]: line for line in out.splitlines()[out.splitlines().index(
        next(x for x in out.splitlines() if x.startswith("layers"))) + 1:]}
    assert list(lines) == ["0", "1", "2", "3", "4", "softmax"]
    assert "convolution" in lines["0"] and "image[1, 14, 14] -> 0[4, 14, 14]" in lines["0"]
    assert lines["0"].split()[-2:] == [str(4 * 9 + 4), "float32"]
    assert "2[4, 7, 7] -> 3[196, 1, 1]" in lines["3"] and "flatten" in lines["3"]
    assert lines["4"].split()[-2:] == [str(196 * 4 + 4), "float32"]


def test_predict_prints_runtime_label(sticker, tmp_path, capsys):
    pixels = np.random.default_rng(2).integers(0, 256, (14, 14)).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    expected = mp.load(sticker).predict({"image": pixels})
    assert main(["predict", str(sticker), "--input", f"image={tmp_path / 'x.png'}", "--top", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert f"label: {expected['label']}" in out
    top = sorted(expected["labelProbs"].items(), key=lambda kv: -kv[1])[:2]
    i = out.index("labelProbs:")
    assert out[i + 1:i + 3] == [f"  {k}: {p:.6f}" for k, p in top]


def test_predict_npy_and_errors(tmp_path, capsys):
    m = nn.Sequential(nn.Linear(3, 2)).eval()
    spec = convert(m, [mp.TensorType("x", (3,))], regressor="y")
    path = tmp_path / "r.mlmodel"
    mp.save(spec, path)
    x = np.array([1.0, -2.0, 0.5], np.float32)
    np.save(tmp_path / "x.npy", x)
    assert main(["predict", str(path), "-i", f"x={tmp_path / 'x.npy'}"]) == 0
    out = capsys.readouterr().out
    with torch.no_grad():
        ref = m(torch.from_numpy(x)).numpy()
    got = np.array([float(v) for v in out.split("[", 2)[2].split("]")[0].split(",")])
    assert np.abs(got - ref).max() < 1e-4
    assert main(["predict", str(path), "-i", "z=1"]) == 2
    assert "no input 'z'" in capsys.readouterr().err
    assert main(["predict", str(path)]) == 2
    assert main(["inspect", str(tmp_path / "missing.mlmodel")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_inspect_updatable_builder_model(tmp_path, capsys):
    from coremltools.models import datatypes
    from coremltools.models.neural_network import AdamParams, NeuralNetworkBuilder

    b = NeuralNetworkBuilder([("x", datatypes.Array(3))], [("probs", datatypes.Array(2))],
                             mode="classifier")
    b.add_inner_product("fc", np.ones((2, 3), np.float32), np.zeros(2, np.float32), 3, 2, True, "x", "z")
    b.add_softmax("sm", "z", "probs")
    b.set_class_labels(["a", "b"])
    b.make_updatable(["fc"])
    b.set_categorical_cross_entropy_loss("loss", "probs")
    b.set_adam_optimizer(AdamParams(lr=0.01, batch=4))
    b.set_epochs(3, [1, 3, 5])
    path = tmp_path / "u.mlmodel"
    mp.save(b.spec, path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "updatable: yes" in out
    fc = next(line for line in out.splitlines() if line.strip().startswith("fc "))
    assert fc.rstrip().endswith("updatable") and " 8 " in fc
    assert "epochs = 3  set [1, 3, 5]" in out
    assert "learning_rate = 0.01  range" in out and "mini_batch_size = 4" in out
    assert "loss: loss (categoricalCrossEntropyLossLayer)" in out and "optimizer: adamOptimizer" in out


def test_inspect_and_predict_a_sequence_model(tmp_path, capsys):
    """An exported LSTM classifier: inspect says its input takes sequences; predict takes a
    (Seq, C) .npy, and --batch a (B, Seq, C) one, matching the torch module."""

    from examples.activity_classifier.demo import ActivityNet

    torch.manual_seed(0)
    net = ActivityNet(8, axes=4, classes=2).eval()
    path = tmp_path / "act.mlmodel"
    mp.save(convert(net, [mp.TensorType("motion", (12, 4))], classifier=ClassifierConfig(["sit", "run"])), path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "motion: multiArray float32 (4,), or a sequence (Seq, 1, 4)" in out
    assert "uniDirectionalLSTM" in out
    xs = np.random.default_rng(0).standard_normal((3, 7, 4)).astype(np.float32)
    np.save(tmp_path / "one.npy", xs[0])
    np.save(tmp_path / "many.npy", xs)
    with torch.no_grad():
        want = ["sit", "run"][int(net(torch.from_numpy(xs[:1])).argmax())]
        many = [["sit", "run"][int(i)] for i in net(torch.from_numpy(xs)).argmax(1)]
    assert main(["predict", str(path), "-i", f"motion={tmp_path / 'one.npy'}"]) == 0
    assert f"label: {want}" in capsys.readouterr().out
    assert main(["predict", str(path), "-i", f"motion={tmp_path / 'many.npy'}", "--batch"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[1] for line in lines] == many


def test_inspect_and_predict_a_sequence_pipeline(tmp_path, capsys):
    """LSTM embedding -> kNN: the pipeline's input takes sequences as its first stage does."""
    from examples.activity_classifier.demo import ActivityNet
    from exporters.pipelines import pipeline

    torch.manual_seed(1)
    net = ActivityNet(8, axes=4, classes=2)
    spec = convert(_LastStep(net.lstm).eval(), [mp.TensorType("motion", (12, 4))], outputs=["embedding"])
    rng = np.random.default_rng(2)
    samples = rng.standard_normal((4, 8)).astype(np.float32)
    knn = mp.knn_classifier(8, number_of_neighbors=1, samples=samples, labels=["a", "b", "a", "b"],
                            input_name="embedding", output_name="label")
    path = mp.save(pipeline([spec, knn], names=["embedding", "knn"]), tmp_path / "p.mlmodel")
    assert main(["inspect", str(path)]) == 0
    top = capsys.readouterr().out.split("sub-models")[0]  # the pipeline's own inputs
    assert "motion: multiArray float32 (4,), or a sequence (Seq, 1, 4)" in top
    x = rng.standard_normal((9, 4)).astype(np.float32)
    np.save(tmp_path / "one.npy", x)
    with torch.no_grad():
        e = net.lstm(torch.from_numpy(x)[None])[0][0, -1].numpy()
    want = ["a", "b", "a", "b"][int(np.argmin(((samples - e) ** 2).sum(1)))]
    assert main(["predict", str(path), "-i", f"motion={tmp_path / 'one.npy'}"]) == 0
    assert f"label: {want}" in capsys.readouterr().out


class _LastStep(torch.nn.Module):
    def __init__(self, lstm):
        super().__init__()
        self.lstm = lstm

    def forward(self, x):
        return self.lstm(x)[0][:, -1]


def test_inspect_pipeline_with_knn(tmp_path, capsys):
    from coremltools.models import datatypes
    from coremltools.models.nearest_neighbors import KNearestNeighborsClassifierBuilder
    from coremltools.models.pipeline import PipelineClassifier

    emb = convert(nn.Sequential(nn.Linear(4, 3)).eval(), [mp.TensorType("x", (4,))], outputs=["features"])
    knn = KNearestNeighborsClassifierBuilder("features", "classLabel", number_of_dimensions=3,
                                             default_class_label="none", number_of_neighbors=3)
    knn.add_samples(np.eye(3, dtype=np.float32), ["a", "b", "c"])
    pipe = PipelineClassifier([("x", datatypes.Array(4))], ["a", "b", "c"])
    pipe.add_model(emb)
    pipe.add_model(knn.spec)
    pipe.set_training_input([("x", datatypes.Array(4)), ("classLabel", datatypes.String())])
    for fd in (pipe.spec.description.input[0], pipe.spec.description.trainingInput[0]):
        fd.type.CopyFrom(emb.description.input[0].type)  # Core ML: the stage's own input type
    pipe.spec.isUpdatable, pipe.spec.specificationVersion = True, 4  # its kNN stage is
    del pipe.spec.description.output[1:]  # the kNN gives the label only
    pipe.spec.description.predictedProbabilitiesName = ""
    mp.load(pipe.spec)  # a model Core ML accepts
    path = tmp_path / "p.mlmodel"
    mp.save(pipe.spec, path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "model: pipelineClassifier" in out and "sub-models (2):" in out
    assert "  model: neuralNetwork" in out and "model: kNearestNeighborsClassifier" in out
    assert "k-NN: 3 dimensions, 3 samples, 3 labels, k=3" in out
    assert "number_of_neighbors = 3" in out


def test_python_dash_m_and_help_examples(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    top = capsys.readouterr().out
    for name in COMMANDS:
        assert name in top
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert f"Example:\n  mlpersonal {name} " in capsys.readouterr().out
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "mlpersonal", "inspect", "--help"], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and "Example:" in r.stdout and "mlpersonal inspect" in r.stdout


def test_predict_batch_prints_one_line_per_example(sticker, tmp_path, capsys):
    pixels = np.random.default_rng(5).integers(0, 256, (6, 14, 14)).astype(np.uint8)
    np.save(tmp_path / "b.npy", pixels)
    model = mp.load(sticker)
    want = [model.predict({"image": p}) for p in pixels]
    assert main(["predict", str(sticker), "-i", f"image={tmp_path / 'b.npy'}", "--batch"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6
    for i, (line, w) in enumerate(zip(lines, want)):
        assert line == f"{i}: {w['label']}  p={w['labelProbs'][w['label']]:.6f}"
    np.save(tmp_path / "s.npy", np.float32(3))
    assert main(["predict", str(sticker), "-i", f"image={tmp_path / 's.npy'}", "--batch"]) == 2
    assert "examples along axis 0" in capsys.readouterr().err


def test_predict_batch_regressor(tmp_path, capsys):
    m = nn.Sequential(nn.Linear(3, 2)).eval()
    path = tmp_path / "r.mlmodel"
    mp.save(convert(m, [mp.TensorType("x", (3,))], regressor="y"), path)
    x = np.random.default_rng(1).normal(size=(4, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    assert main(["predict", str(path), "-i", f"x={tmp_path / 'x.npy'}", "--batch"]) == 0
    lines = capsys.readouterr().out.splitlines()
    with torch.no_grad():
        ref = m(torch.from_numpy(x)).numpy()
    assert [line.split(":")[0] for line in lines] == ["0", "1", "2", "3"]
    for line, r in zip(lines, ref):
        got = np.array([float(v) for v in line.split("[", 2)[2].split("]")[0].split(",")])
        assert np.abs(got - r).max() < 1e-4


def test_inspect_keeps_long_metadata_on_one_short_line():
    """Some converters store whole JSON documents in the metadata: inspect shows their start."""
    from coremltools.models import datatypes
    from coremltools.models.neural_network import NeuralNetworkBuilder

    from mlpersonal.cli import inspect_lines

    b = NeuralNetworkBuilder([("x", datatypes.Array(2))], [("y", None)])
    b.add_activation("relu", "RELU", "x", "y")
    doc = '{"table": [\n' + ", ".join(str(i) for i in range(5000)) + "]}"
    b.spec.description.metadata.userDefined["json"] = doc
    line = next(l for l in inspect_lines(b.spec) if l.startswith("  json: "))
    assert line.startswith('  json: {"table": [ 0, 1, 2,') and line.endswith(f"... ({len(doc)} characters)")
    assert len(line) < 220


def test_inspect_shows_per_example_shapes_of_an_nd_network(tmp_path, capsys):
    """ND (EXACT_ARRAY_MAPPING) layers see one example: inspect runs them so (it once ran them
    on a batch axis they do not expect and printed (4, 4) for a (5, 4, 4) reshape)."""
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x)[0]

    torch.manual_seed(4)
    path = tmp_path / "attn.mlmodel"
    mp.save(convert(Attn().eval(), [mp.TensorType("x", (5, 16))], outputs=["y"]), path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "attn.q_split[5, 4, 4]" in out and "attn.scores[4, 5, 5]" in out and "y[5, 16]" in out
