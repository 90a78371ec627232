"""Phrase classifier: a small transformer over token ids, exported in ND mode and personalized to
how one user talks.

1. Synthetic phrases (no downloads): four intents (weather, timer, music, call), each said with
   the population's key words among filler words, 2-7 tokens, right-padded with id 0 to 12.
2. Train ``nn.Embedding -> nn.TransformerEncoder (2 layers, padding mask) -> masked mean ->
   nn.Linear`` in torch and export it with ``respect_trainable`` (the head updatable; Core ML
   backpropagates through no encoder layer): ``mp.TensorType("ids", (12,), dtype="int32")``
   makes the export an EXACT_ARRAY_MAPPING (Core ML 3) network.
3. One user says things their own way (slang the population never used): the base model
   guesses. Ten labelled phrases per intent (plus sixteen stored population phrases per intent,
   so it does not forget everyone else) personalize the head on "device" (``UpdateTask.run``);
   accuracy on fresh phrases of this user, and of the population, before and after.

    python examples/text_classifier/demo.py [--out out/text_demo]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import mlpersonal as mp  # noqa: E402
from examples import personalize as shared  # noqa: E402

INTENTS = ["weather", "timer", "music", "call"]
LENGTH = 12
#: key words of each intent: the population's, and one user's own
POPULATION = {"weather": ["weather", "rain", "sunny", "forecast", "cold"],
              "timer": ["timer", "minutes", "alarm", "remind", "wake"],
              "music": ["play", "song", "music", "album", "radio"],
              "call": ["call", "phone", "dial", "ring", "contact"]}
USER = {"weather": ["brolly", "drizzle"], "timer": ["egg", "snooze"],
        "music": ["tunes", "jam"], "call": ["bell", "holler"]}
FILLER = ["please", "can", "you", "the", "me", "now", "for", "a", "my", "what", "is", "today",
          "hey", "set", "some", "to", "tomorrow", "quick", "about", "on"]
VOCAB = ["<pad>"] + sorted({w for ws in (*POPULATION.values(), *USER.values()) for w in ws} | set(FILLER))
IDS = {w: i for i, w in enumerate(VOCAB)}


def phrases(words: dict, per_intent: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(N, LENGTH)`` int32 token ids (right-padded with 0) and their intent indices: one or two
    key words of the intent among 1-5 filler words."""
    rng = np.random.default_rng(seed)
    ids, ys = [], []
    for k, intent in enumerate(INTENTS):
        for _ in range(per_intent):
            keys = list(rng.choice(words[intent], size=rng.integers(1, 3)))
            tokens = keys + list(rng.choice(FILLER, size=rng.integers(1, 6)))
            rng.shuffle(tokens)
            row = np.zeros(LENGTH, np.int32)
            row[:len(tokens)] = [IDS[t] for t in tokens]
            ids.append(row)
            ys.append(k)
    return np.asarray(ids), np.asarray(ys)


class PhraseNet(nn.Module):
    """Token embeddings + positions -> 2 transformer encoder layers that ignore padding; the
    head reads the mean of their outputs over the real tokens beside the mean of the plain token
    embeddings (a bag of words: it keeps each word's own features, which lets a frozen network
    learn new words through its head alone)."""

    def __init__(self, vocab: int = len(VOCAB), e: int = 64, classes: int = len(INTENTS)):
        super().__init__()
        self.embed = nn.Embedding(vocab, e, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(1, LENGTH, e) * 0.02)
        layer = nn.TransformerEncoderLayer(e, 4, 64, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(2 * e, classes)

    def forward(self, ids):
        pad = ids == 0
        words = self.embed(ids)
        h = self.encoder(words + self.pos, src_key_padding_mask=pad)
        keep = (~pad).float().unsqueeze(-1)
        context = (h * keep).sum(1) / keep.sum(1)
        bag = (words * keep).sum(1) / keep.sum(1)
        return self.head(torch.cat([context, bag], dim=1))


def run(out: Path, *, per_intent: int = 150, epochs: int = 12, shots: int = 10, replay: int = 16,
        seed: int = 0) -> dict:
    torch.manual_seed(seed)
    x, y = phrases(POPULATION, per_intent, seed)
    net = PhraseNet()
    t0 = time.perf_counter()
    shared.train(net, x, y, epochs, lr=0.003, seed=seed)
    train_s = time.perf_counter() - t0
    for p in net.parameters():  # personalize the head: the encoder stays as trained
        p.requires_grad_(False)
    net.head.requires_grad_(True)
    spec = mp.convert(net, [mp.TensorType("ids", (LENGTH,), dtype="int32")],
                      classifier=mp.ClassifierConfig(labels=INTENTS), respect_trainable=True,
                      update=mp.UpdateConfig(optimizer=mp.Adam(learning_rate=0.01, mini_batch_size=16),
                                             epochs=60, epochs_range=(1, 200), shuffle=True, seed=seed),
                      metadata={"description": "phrase -> intent; token ids: " + " ".join(VOCAB)})
    out.mkdir(parents=True, exist_ok=True)
    model = mp.load(mp.save(spec, out / "phrases.mlmodel"), compute_units="cpu_only")

    result, ctx = shared.user_experiment(model, phrases, "ids", INTENTS, USER, POPULATION, shots=shots,
                                         replay=replay, tests=50, seed=seed,
                                         save_to=out / "phrases-personal.mlmodel")
    result.update(train_s=round(train_s, 2), loss=round(ctx.metrics["loss"], 4))
    (out / "results.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/text_demo")
    args = ap.parse_args(argv)
    r = run(Path(args.out))
    print(f"phrase classifier: Embedding({len(VOCAB)}, 64) + 2 encoder layers over {LENGTH} tokens, "
          f"updatable head; trained in {r['train_s']} s")
    shared.print_report("phrases", r, args.out)


if __name__ == "__main__":
    main()
