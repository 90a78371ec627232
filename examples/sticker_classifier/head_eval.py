"""Plan the NN-head personalization in plain torch: what an updatable FC head can learn from 5 drawings.

A Core ML classifier cannot grow labels during an update, so the exported head has rows for the
base AND the new stickers from the start: the base rows come from training, the new rows start at
zero (or random).  The update trains only the head (features frozen) with Adam + cross-entropy on
the user's drawings, optionally mixed with a few shipped drawings per base sticker ("replay"),
since training on new drawings alone makes the head forget the old stickers.
Prints top-1 on fresh new/old drawings before -> after, averaged over ``--trials`` support sets.

    python examples/sticker_classifier/head_eval.py --model runs/sticker/sticker_base.pt
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.sticker_classifier.data import BASE_STICKERS, NEW_STICKERS, make_dataset  # noqa: E402
from examples.sticker_classifier.model import embed, extend_classifier  # noqa: E402
from examples.sticker_classifier.train import load  # noqa: E402


def personalize_head(model, labels, init: str, replay: int, epochs: int, lr: float, shots: int = 5,
                     trials: int = 5, batch: int = 8, seed: int = 10_000) -> np.ndarray:
    """Mean [new before, old before, new after, old after] top-1 over ``trials`` support sets."""
    allc = list(labels) + [c for c in NEW_STICKERS if c not in labels]
    idx = {c: i for i, c in enumerate(allc)}
    nb = len(labels)

    def data(classes, per, s):
        x, y = make_dataset(classes, per, s)
        return torch.from_numpy(embed(model, x)), torch.tensor([idx[c] for c in y])

    qn, yn = data(NEW_STICKERS, 100, seed)
    qo, yo = data(BASE_STICKERS, 20, seed + 1)
    res = []
    for t in range(trials):
        es, ys = data(NEW_STICKERS, shots, seed + 100 + t)
        if replay:
            eb, yb = data(BASE_STICKERS, replay, seed + 200 + t)
            es, ys = torch.cat([es, eb]), torch.cat([ys, yb])
        head = extend_classifier(copy.deepcopy(model), len(allc) - nb).classifier
        if init == "random":
            torch.manual_seed(t)
            fresh = torch.nn.Linear(head.in_features, len(allc) - nb)
            with torch.no_grad():
                head.weight[nb:], head.bias[nb:] = fresh.weight, fresh.bias

        def acc():
            with torch.no_grad():
                return [(head(q).argmax(1) == y).float().mean().item() for q, y in ((qn, yn), (qo, yo))]

        before = acc()
        opt = torch.optim.Adam(head.parameters(), lr=lr)
        g = torch.Generator().manual_seed(t)
        for _ in range(epochs):
            order = torch.randperm(len(es), generator=g)
            for i in range(0, len(es), batch):
                b = order[i:i + batch]
                opt.zero_grad()
                F.cross_entropy(head(es[b]), ys[b]).backward()
                opt.step()
        res.append(before + acc())
    return np.mean(res, 0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/sticker/sticker_base.pt")
    p.add_argument("--trials", type=int, default=5)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    model, labels = load(a.model)
    print(f"{'new rows':<9}{'replay/base':>12}{'epochs':>7}{'lr':>7}{'new before':>11}{'new after':>10}"
          f"{'old before':>11}{'old after':>10}")
    for init in ("random", "zero"):
        for replay in (0, 1, 3):
            for epochs, lr in ((10, 1e-3), (20, 1e-2)):
                nb, ob, na, oa = 100 * personalize_head(model, labels, init, replay, epochs, lr, trials=a.trials)
                print(f"{init:<9}{replay:>12}{epochs:>7}{lr:>7g}{nb:>10.1f}%{na:>9.1f}%{ob:>10.1f}%{oa:>9.1f}%")


if __name__ == "__main__":
    main()
