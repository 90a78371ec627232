"""The text-classifier example: a transformer over token ids, exported in ND mode, whose head
personalizes to one user's words."""

from __future__ import annotations

import json

import numpy as np
import pytest

import mlpersonal as mp
from examples.text_classifier.demo import INTENTS, LENGTH, USER, phrases, run


@pytest.mark.parametrize("seed", [0, 1])
def test_head_personalization_learns_the_users_words_and_keeps_the_population(tmp_path, seed):
    r = run(tmp_path, seed=seed)
    # before: the user's slang is noise to the base model; after: 88-93 % over seeds 0-3
    assert r["before"]["population"] >= 0.95 and r["before"]["user"] <= 0.6
    assert r["after"]["user"] >= max(0.8, r["before"]["user"] + 0.25)
    assert r["after"]["population"] >= 0.95
    assert json.loads((tmp_path / "results.json").read_text()) == r
    base = mp.load(tmp_path / "phrases.mlmodel")
    personal = mp.load(tmp_path / "phrases-personal.mlmodel")
    nn_spec = personal.spec.neuralNetworkClassifier
    assert nn_spec.arrayInputShapeMapping == 1  # EXACT_ARRAY_MAPPING
    fd = personal.spec.description.input[0]
    assert fd.type.multiArrayType.dataType == fd.type.multiArrayType.INT32
    assert [l.name for l in nn_spec.layers if l.isUpdatable] == ["head"]
    ids, _ = phrases(USER, 2, 99)
    assert ids.shape[1] == LENGTH
    labels = [o["label"] for o in personal.predict_batch([{"ids": row} for row in ids])]
    assert set(labels) <= set(INTENTS)
    w0, w1 = (np.asarray(next(l for l in m.spec.neuralNetworkClassifier.layers if l.name == "head")
                         .innerProduct.weights.floatValue) for m in (base, personal))
    assert np.abs(w1 - w0).max() > 1e-3
