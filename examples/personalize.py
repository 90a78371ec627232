"""What the sequence and text examples share: train a torch classifier, score a Core ML model on
one input column, personalize it on "device" and print the before/after table."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

import mlpersonal as mp


def train(net: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, lr: float, seed: int = 0) -> None:
    """Adam on cross-entropy, shuffled mini-batches of 32; ``net`` in eval mode afterwards."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    if xt.dtype == torch.int32:
        xt = xt.long()  # token ids for nn.Embedding
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=g).split(32):
            loss = nn.functional.cross_entropy(net(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()


def accuracy(model, name: str, x: np.ndarray, y: np.ndarray, labels: list) -> float:
    """Top-1 of a Core ML classifier on examples ``x`` of its input ``name``, given as one column."""
    got = model.predict_batch(mp.ArrayBatchProvider({name: x})).column("label")
    return float(np.mean([lab == labels[i] for lab, i in zip(got, y)]))


def personalize(model, columns: dict):
    """``mp.UpdateTask(model, columns).run()`` timed: (the task's context, seconds); its error
    raised."""
    t0 = time.perf_counter()
    ctx = mp.UpdateTask(model, mp.ArrayBatchProvider(columns)).run()
    seconds = time.perf_counter() - t0
    if ctx.error is not None:
        raise ctx.error
    return ctx, seconds


def user_experiment(model, make, name: str, labels: list, user, population, *, shots: int,
                    replay: int, tests: int, seed: int, save_to) -> tuple[dict, object]:
    """The examples' experiment: ``shots`` labelled examples per class of one ``user`` (made by
    ``make(style, per_class, seed)``) plus ``replay`` stored ``population`` ones personalize
    ``model``; top-1 on fresh examples of the user and of the population before and after. The
    personalized model is saved to ``save_to``. (result dict, the task's context)."""
    user_train = make(user, shots, seed + 1)           # what the user labels on the device
    stored = make(population, replay, seed + 4)        # reference examples shipped with the app
    user_test, pop_test = make(user, tests, seed + 2), make(population, tests, seed + 3)
    before = {"user": accuracy(model, name, *user_test, labels),
              "population": accuracy(model, name, *pop_test, labels)}
    x = np.concatenate([user_train[0], stored[0]])
    y = [labels[i] for i in np.concatenate([user_train[1], stored[1]])]
    ctx, update_s = personalize(model, {name: x, "label": y})
    ctx.model.save(save_to)
    after = {"user": accuracy(ctx.model, name, *user_test, labels),
             "population": accuracy(ctx.model, name, *pop_test, labels)}
    return {"before": before, "after": after, "examples": len(user_train[1]), "replayed": len(stored[1]),
            "update_s": round(update_s, 3)}, ctx


def print_report(noun: str, r: dict, out) -> None:
    """The before/after accuracies of the user and the population in ``r`` (``noun``: what the
    examples are, "windows"), and how the personalization went."""
    print(f"{noun + ' of':<12}{'before':>8}{'after':>8}")
    for who in ("user", "population"):
        print(f"{who:<12}{r['before'][who]:>8.1%}{r['after'][who]:>8.1%}")
    print(f"personalized with {r['examples']} labelled {noun} of the user (+ {r['replayed']} stored "
          f"population {noun}) in {r['update_s']} s (final loss {r['loss']}); models and "
          f"results.json in {out}/")
