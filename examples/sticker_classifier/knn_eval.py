"""How well does a kNN on the base model's embeddings learn new stickers from a few drawings?

Protocol: the base CNN (trained on BASE_STICKERS only) embeds drawings to 128-d.  For each of
``--trials`` support seeds, ``--shots`` fresh drawings of every NEW sticker form the kNN index;
``--queries`` other fresh drawings per new sticker are classified (top-1).  "5-way" indexes the new
stickers only; "all-way" also indexes ``--shots`` drawings of each base sticker and scores new and
old queries.  scikit-learn's KNeighborsClassifier is the kNN here (the oracle the runtime's kNN
is tested against).  Prints a table.

    python examples/sticker_classifier/knn_eval.py --model runs/sticker/sticker_base.pt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sklearn.neighbors import KNeighborsClassifier  # noqa: E402

from examples.sticker_classifier.data import BASE_STICKERS, NEW_STICKERS, make_dataset  # noqa: E402
from examples.sticker_classifier.model import embed  # noqa: E402
from examples.sticker_classifier.train import load  # noqa: E402


def _norm(e: np.ndarray) -> np.ndarray:
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def evaluate(model, shots: int = 5, queries: int = 100, trials: int = 10, seed: int = 10_000) -> list[tuple]:
    qx_new, qy_new = make_dataset(NEW_STICKERS, queries, seed)
    qx_old, qy_old = make_dataset(BASE_STICKERS, max(queries // 5, 1), seed + 1)
    q_new, q_old = embed(model, qx_new), embed(model, qx_old)
    rows = []
    for k, weights in [(1, "uniform"), (3, "uniform"), (3, "distance"), (5, "distance")]:
        for normalized in (False, True):
            f = _norm if normalized else (lambda e: e)
            acc5, acc_new, acc_old = [], [], []
            for t in range(trials):
                sx, sy = make_dataset(NEW_STICKERS, shots, seed + 100 + t)
                bx, by = make_dataset(BASE_STICKERS, shots, seed + 200 + t)
                s_new, s_old = embed(model, sx), embed(model, bx)
                knn = KNeighborsClassifier(n_neighbors=k, weights=weights).fit(f(s_new), sy)
                acc5.append((knn.predict(f(q_new)) == np.array(qy_new)).mean())
                knn = KNeighborsClassifier(n_neighbors=k, weights=weights).fit(
                    f(np.vstack([s_new, s_old])), sy + by)
                acc_new.append((knn.predict(f(q_new)) == np.array(qy_new)).mean())
                acc_old.append((knn.predict(f(q_old)) == np.array(qy_old)).mean())
            rows.append((k, weights, "l2" if normalized else "raw", np.mean(acc5), np.min(acc5),
                         np.mean(acc_new), np.mean(acc_old)))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/sticker/sticker_base.pt")
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--trials", type=int, default=10)
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    model, _ = load(a.model)
    rows = evaluate(model, a.shots, a.queries, a.trials)
    print(f"new stickers {NEW_STICKERS}, {a.shots} drawings each, {a.queries} fresh queries each, {a.trials} trials")
    print(f"{'k':>2} {'weights':<9}{'emb':<5}{'5-way mean':>11}{'5-way min':>10}{'all-way new':>12}{'all-way old':>12}")
    for k, w, n, m5, mn5, an, ao in rows:
        print(f"{k:>2} {w:<9}{n:<5}{100 * m5:>10.2f}%{100 * mn5:>9.2f}%{100 * an:>11.2f}%{100 * ao:>11.2f}%")


if __name__ == "__main__":
    main()
