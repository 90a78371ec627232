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


def print_table(kind: str, r: dict) -> None:
    """The before/after accuracies of the user and the population in ``r``."""
    print(f"{kind:<12}{'before':>8}{'after':>8}")
    for who in ("user", "population"):
        print(f"{who:<12}{r['before'][who]:>8.1%}{r['after'][who]:>8.1%}")
