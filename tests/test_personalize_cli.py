"""`mlpersonal personalize`: folders of PNG drawings -> an updated model file, as an app would."""

import numpy as np
import pytest
import torch
from coremltools.models import datatypes
from coremltools.models.nearest_neighbors import KNearestNeighborsClassifierBuilder
from coremltools.models.neural_network import NeuralNetworkBuilder
from PIL import Image
from sklearn.neighbors import KNeighborsClassifier
from torch import nn

import mlpersonal as mp
from examples.sticker_classifier.data import make_dataset
from mlpersonal.cli import main
from trainers import freeze, mark_updatable

NEW = ["anchor", "crown", "glasses"]


def write_folder(root, images, labels):
    for i, (im, y) in enumerate(zip(images, labels)):
        (root / y).mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(root / y / f"{i}.png")
    return root


@pytest.fixture
def drawings(tmp_path):
    x, y = make_dataset(NEW, 4, seed=11)
    ex, ey = make_dataset(NEW, 6, seed=12)
    return (write_folder(tmp_path / "data", x, y), x, y, write_folder(tmp_path / "eval", ex, ey), ex, ey)


def nn_classifier(path):
    """A small exported classifier: frozen random features, updatable head for 2 base + 3 new labels."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 5, padding=2), nn.ReLU(), nn.MaxPool2d(4), nn.Flatten(),
                        nn.Linear(8 * 7 * 7, 32), nn.ReLU(), nn.Linear(32, 5))
    freeze(net)
    mark_updatable(net[6])
    spec = mp.convert(net, [mp.ImageType("image", (1, 28, 28), color="grayscale", scale=1 / 255.0)],
                      classifier=mp.ClassifierConfig(["heart", "star"] + NEW), respect_trainable=True,
                      update=mp.UpdateConfig(optimizer=mp.Adam(learning_rate=0.05, mini_batch_size=4),
                                             epochs=30, epochs_range=(1, 100), seed=3))
    mp.save(spec, path)
    return path


def test_personalize_nn_classifier_from_png_folders(tmp_path, drawings, capsys):
    data, x, y, ev, ex, ey = drawings
    model = nn_classifier(tmp_path / "stickers.mlmodel")
    out = tmp_path / "mine.mlmodel"
    rc = main(["personalize", str(model), "--data", str(data), "--out", str(out), "--epochs", "40",
               "--eval", str(ev), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    mine = mp.load(out)
    assert mine.is_updatable
    # the CLI ran exactly the update an app runs on the same drawings and overrides
    order = sorted(range(len(y)), key=lambda i: (y[i], f"{i}.png"))  # the folder reading order
    ref = mp.load(model, compute_units="cpu_only").update(  # the CLI's default compute units
        [{"image": x[i], "label": y[i]} for i in order], parameters={"epochs": 40})
    assert mine.spec == ref.spec
    got = [o["label"] for o in mine.predict_batch([{"image": im} for im in x])]
    acc = np.mean(np.array(got) == np.array(y))
    assert acc >= 0.9  # it learned the new labels
    before = np.mean(np.array([o["label"] for o in mp.load(model).predict_batch(
        [{"image": im} for im in x])]) == np.array(y))
    assert f"top-1 on --data: {100 * before:.1f}% -> {100 * acc:.1f}%" in text
    ev_acc = np.mean(np.array([o["label"] for o in mine.predict_batch([{"image": im} for im in ex])]) == np.array(ey))
    assert f"-> {100 * ev_acc:.1f}%" in text.split("top-1 on --eval:")[1]


# --- Apple's sample layout: NeuralNetworkBuilder embedding + empty updatable kNN, raw protos ----
EMB = 12


def embedding_spec(w1, b1, w2):
    b = NeuralNetworkBuilder([("drawing", datatypes.Array(1, 28, 28))], [("embedding", datatypes.Array(EMB))])
    b.add_flatten("flat", 0, "drawing", "flat")
    b.add_inner_product("fc1", w1, b1, 28 * 28, 32, True, "flat", "hidden")
    b.add_activation("relu", "RELU", "hidden", "hidden_relu")
    b.add_inner_product("fc2", w2, None, 32, EMB, False, "hidden_relu", "embedding")
    b.set_pre_processing_parameters(image_input_names=["drawing"], image_scale=1 / 255.0)
    return b.spec


def apple_pipeline(emb, knn):
    """The raw-proto pipelineClassifier of Apple's drawing sample (shared with test_pipeline)."""
    from test_pipeline import apple_style_pipeline

    return apple_style_pipeline(emb, knn)


def test_personalize_apple_style_knn_pipeline(tmp_path, drawings, capsys):
    data, x, y, ev, ex, ey = drawings
    r = np.random.default_rng(0)
    w1 = r.normal(size=(32, 28 * 28)).astype(np.float32) * 0.05
    b1 = r.normal(size=32).astype(np.float32) * 0.1
    w2 = r.normal(size=(EMB, 32)).astype(np.float32) * 0.3
    knn = KNearestNeighborsClassifierBuilder(input_name="embedding", output_name="label", number_of_dimensions=EMB,
                                             default_class_label="defaultLabel", number_of_neighbors=3,
                                             weighting_scheme="inverse_distance", index_type="linear").spec
    model = tmp_path / "UpdatableDrawingClassifier.mlmodel"
    mp.save(apple_pipeline(embedding_spec(w1, b1, w2), knn), model)
    out = tmp_path / "personal.mlmodel"
    assert main(["personalize", str(model), "--data", str(data), "--out", str(out),
                 "--eval", str(ev), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "training input 'drawing', target 'label'" in text
    assert "top-1 on --data: 0.0% ->" in text  # an empty kNN answers its default label

    def emb(images):  # torch oracle of the embedding network
        t = torch.from_numpy(np.stack(images).astype(np.float32) / 255.0).reshape(len(images), -1)
        return (torch.relu(t @ torch.from_numpy(w1).T + torch.from_numpy(b1)) @ torch.from_numpy(w2).T).numpy()

    mine = mp.load(out)
    stage = mine.spec.pipelineClassifier.pipeline.models[1].kNearestNeighborsClassifier
    # the folder order (label folders sorted, files sorted) decides the stored order
    order = sorted(range(len(y)), key=lambda i: (y[i], f"{i}.png"))
    assert list(stage.stringClassLabels.vector) == [y[i] for i in order]
    np.testing.assert_allclose(np.array([s.vector for s in stage.nearestNeighborsIndex.floatSamples]),
                               emb([x[i] for i in order]), rtol=1e-5, atol=1e-5)
    sk = KNeighborsClassifier(3, algorithm="brute", weights="distance").fit(emb(list(x)), list(y))
    got = [o["label"] for o in mine.predict_batch([{"drawing": im} for im in ex])]
    assert got == sk.predict(emb(list(ex))).tolist()
    assert set(got) <= set(NEW)
    assert f"-> {100 * np.mean(np.array(got) == np.array(ey)):.1f}%" in text.split("top-1 on --eval:")[1]


def test_bad_folders_and_models_give_clear_errors(tmp_path, drawings, capsys):
    data = drawings[0]
    model = nn_classifier(tmp_path / "m.mlmodel")
    out = tmp_path / "o.mlmodel"
    assert main(["personalize", str(model), "--data", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "not a folder" in capsys.readouterr().err
    (tmp_path / "flat").mkdir()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "flat" / "x.png")
    assert main(["personalize", str(model), "--data", str(tmp_path / "flat"), "--out", str(out)]) == 2
    assert "no subfolders" in capsys.readouterr().err
    (data / "empty").mkdir()
    assert main(["personalize", str(model), "--data", str(data), "--out", str(out)]) == 2
    assert "holds no image files" in capsys.readouterr().err
    (data / "empty").rmdir()
    assert main(["personalize", str(model), "--data", str(data), "--out", str(out), "--epochs", "500"]) == 2
    assert "epochs" in capsys.readouterr().err  # outside the allowed range stored in the model
    frozen = tmp_path / "frozen.mlmodel"
    spec = mp.load_spec(model)
    spec.isUpdatable = False
    mp.save(spec, frozen)
    assert main(["personalize", str(frozen), "--data", str(data), "--out", str(out)]) == 2
    assert "not updatable" in capsys.readouterr().err
    assert not out.exists()  # nothing written on any failure


def test_help_shows_an_example(capsys):
    with pytest.raises(SystemExit):
        main(["personalize", "--help"])
    assert "mlpersonal personalize stickers.mlmodel --data" in capsys.readouterr().out


# --- multi-array inputs: .npy folders (a sequence model) ----------------------------------------
def test_personalize_sequence_model_from_npy_folders(tmp_path, capsys):
    """An exported LSTM activity classifier personalizes on DIR/<activity>/*.npy windows; the CLI
    runs the very update the API runs on the same arrays (order of the folders)."""
    from examples import personalize
    from examples.activity_classifier import demo

    torch.manual_seed(0)
    x, y = demo.windows(demo.POPULATION, 30, seed=0)
    net = demo.ActivityNet(hidden=8)
    personalize.train(net, x, y, epochs=3, lr=0.01)
    spec = mp.convert(net, [mp.TensorType("motion", (demo.STEPS, demo.AXES))],
                      classifier=mp.ClassifierConfig(labels=demo.ACTIVITIES), respect_trainable=True,
                      update=mp.UpdateConfig(optimizer=mp.Adam(learning_rate=0.02, mini_batch_size=6),
                                             epochs=5, shuffle=True, seed=1))
    model = mp.save(spec, tmp_path / "activity.mlmodel")
    ux, uy = demo.windows(demo.USER, 4, seed=1)
    for i, (w, k) in enumerate(zip(ux, uy)):
        folder = tmp_path / "data" / demo.ACTIVITIES[k]
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / f"{i}.npy", w[: 40 + i] if k == 0 else w)  # walks of other lengths
    out = tmp_path / "mine.mlmodel"
    assert main(["personalize", str(model), "--data", str(tmp_path / "data"), "--out", str(out),
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "12 arrays of 3 labels" in text
    order = sorted(range(len(uy)), key=lambda i: (demo.ACTIVITIES[uy[i]], f"{i}.npy"))
    data = [{"motion": ux[i][: 40 + i] if uy[i] == 0 else ux[i], "label": demo.ACTIVITIES[uy[i]]}
            for i in order]
    ref = mp.load(model, compute_units="cpu_only").update(data)  # the CLI's default units
    assert mp.load(out).spec == ref.spec
    hits = [mp.load(out).predict({"motion": d["motion"]})["label"] == d["label"] for d in data]
    assert f"-> {100 * np.mean(hits):.1f}%" in text
    assert main(["inspect", str(out)]) == 0  # the training input takes sequences too, and says so
    training = capsys.readouterr().out.split("training inputs:")[1]
    assert "motion: multiArray float32 (3,), or a sequence (Seq, 1, 3)" in training


def test_personalize_a_text_model_from_token_id_folders(tmp_path, capsys):
    """The ND text example's model (INT32 token ids) personalizes on DIR/<intent>/*.npy int
    arrays; the CLI runs the very update the API runs on the same arrays."""
    from examples.text_classifier import demo

    torch.manual_seed(0)
    net = demo.PhraseNet().eval()
    for p in net.parameters():
        p.requires_grad_(False)
    net.head.requires_grad_(True)
    spec = mp.convert(net, [mp.TensorType("ids", (demo.LENGTH,), dtype="int32")],
                      classifier=mp.ClassifierConfig(labels=demo.INTENTS), respect_trainable=True,
                      update=mp.UpdateConfig(optimizer=mp.Adam(learning_rate=0.02, mini_batch_size=4),
                                             epochs=5, shuffle=False))
    model = mp.save(spec, tmp_path / "phrases.mlmodel")
    ids, y = demo.phrases(demo.USER, 3, seed=1)
    for i, (row, k) in enumerate(zip(ids, y)):
        folder = tmp_path / "data" / demo.INTENTS[k]
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / f"{i}.npy", row)
    out = tmp_path / "mine.mlmodel"
    assert main(["personalize", str(model), "--data", str(tmp_path / "data"), "--out", str(out),
                 "--no-progress"]) == 0
    assert "12 arrays of 4 labels" in capsys.readouterr().out
    order = sorted(range(len(y)), key=lambda i: (demo.INTENTS[y[i]], f"{i}.npy"))
    ref = mp.load(model, compute_units="cpu_only").update(
        [{"ids": ids[i], "label": demo.INTENTS[y[i]]} for i in order])
    assert mp.load(out).spec == ref.spec


def test_npy_folders_refuse_pickles_and_other_files(tmp_path, capsys):
    from examples.activity_classifier import demo

    spec = mp.convert(demo.ActivityNet(hidden=4).eval(), [mp.TensorType("motion", (demo.STEPS, demo.AXES))],
                      classifier=mp.ClassifierConfig(labels=demo.ACTIVITIES), respect_trainable=True,
                      update=mp.UpdateConfig(optimizer=mp.SGD(learning_rate=0.01, mini_batch_size=2)))
    model = mp.save(spec, tmp_path / "a.mlmodel")
    out = tmp_path / "o.mlmodel"
    (tmp_path / "pngs" / "walk").mkdir(parents=True)
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "pngs" / "walk" / "0.png")
    assert main(["personalize", str(model), "--data", str(tmp_path / "pngs"), "--out", str(out)]) == 2
    assert "holds no arrays (.npy)" in capsys.readouterr().err
    (tmp_path / "pickled" / "walk").mkdir(parents=True)
    np.save(tmp_path / "pickled" / "walk" / "0.npy", np.array([{"not": "numbers"}], dtype=object))
    assert main(["personalize", str(model), "--data", str(tmp_path / "pickled"), "--out", str(out)]) == 2
    assert "not a numeric .npy array" in capsys.readouterr().err
    assert not out.exists()
