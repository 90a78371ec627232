"""The README's Quickstart runs as written, on files made here (a small exported sticker
classifier and drawings of the sticker example): the documented calls exist, and what they give
equals what the same calls give outside the snippet (oracle: model.update on the same data, the
model's own predict_batch)."""

import re
from pathlib import Path

import numpy as np
from PIL import Image

import mlpersonal as mp
from examples.sticker_classifier.data import make_dataset
from test_personalize_cli import NEW, nn_classifier

README = Path(__file__).resolve().parents[1] / "README.md"


def _quickstart() -> str:
    text = README.read_text()
    section = text[text.index("## Quickstart"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_quickstart_runs_and_personalizes_like_model_update(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    nn_classifier(tmp_path / "stickers.mlmodel")
    x, y = make_dataset(NEW, 2, seed=21)
    names = {("anchor", 0): "anchor1.png", ("anchor", 1): "anchor2.png", ("crown", 0): "crown1.png"}
    seen: dict = {}
    for im, label in zip(x, y):
        k = (label, seen.get(label, 0))
        seen[label] = k[1] + 1
        if k in names:
            Image.fromarray(im).save(tmp_path / names[k])
    Image.fromarray(x[-1]).save(tmp_path / "drawing.png")
    env = {"drawings": list(x), "pixels": x}
    exec(compile(_quickstart(), str(README), "exec"), env)  # noqa: S102 - the project's own README

    printed = capsys.readouterr().out
    assert "started" in printed and "done: " in printed
    model, labels = env["model"], ["heart", "star"] + NEW
    assert env["ctx"].error is None and env["ctx"].event in ("completed", "cancelled")
    saved = mp.load(tmp_path / "stickers-personal.mlmodel", compute_units="cpu_only")
    assert saved.spec == env["ctx"].model.spec
    # the synchronous form in the snippet equals model.update outside it
    again = mp.load(tmp_path / "stickers.mlmodel", compute_units="cpu_only").update(
        env["data"], parameters={"epochs": 20})
    assert again.spec == env["personal"].spec
    assert [o["label"] for o in env["outs"]] == env["out"].column("label")
    assert set(env["out"].column("label")) <= set(labels)
    probs = env["out"].column("labelProbs").values
    assert probs.shape == (len(x), len(labels))
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(probs, np.array([[o["labelProbs"][k] for k in labels]
                                                for o in model.predict_batch([{"image": im} for im in x])]),
                               atol=1e-6)
