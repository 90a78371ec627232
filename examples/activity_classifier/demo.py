"""Activity classifier: an LSTM over motion windows, exported updatable and personalized.

1. Synthetic 3-axis accelerometer windows (2.5 s at 20 Hz, 50 steps): walking, running and
   sitting, as a population moves (walking ~1.8 steps/s, running ~2.8, small noise).
2. Train ``nn.LSTM(3 -> 32) -> Linear`` in torch and export it with ``respect_trainable``: the
   LSTM and the head updatable (Core ML allows updatable LSTM layers), or the head alone with
   ``--head-only``.
3. One user walks briskly (2.5 steps/s, swinging more): the base model takes much of it for
   running. Ten labelled windows per activity (plus ten stored population windows per activity,
   so the model does not forget everyone else) personalize the model on "device"
   (``UpdateTask.run``); accuracy on fresh windows of this user, and of the population, before and
   after.

    python examples/activity_classifier/demo.py [--out out/activity_demo] [--head-only]
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

ACTIVITIES = ["walk", "run", "sit"]
STEPS, RATE, AXES = 50, 20.0, 3
#: (steps per second, swing amplitude) of each activity; "sit" has no rhythm
POPULATION = {"walk": (1.8, 1.0), "run": (2.8, 2.0), "sit": (0.0, 0.0)}
USER = {"walk": (2.5, 1.7), "run": (3.0, 2.3), "sit": (0.0, 0.0)}


def windows(style: dict, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(N, STEPS, 3)`` float32 windows and their activity indices, moving in ``style``."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    t = np.arange(STEPS) / RATE
    for k, name in enumerate(ACTIVITIES):
        freq, amp = style[name]
        for _ in range(per_class):
            f = freq * rng.uniform(0.9, 1.1)
            a = amp * rng.uniform(0.85, 1.15)
            phase = rng.uniform(0, 2 * np.pi)
            w = np.stack([a * np.sin(2 * np.pi * f * t + phase),                 # forward sway
                          0.5 * a * np.sin(4 * np.pi * f * t + phase),           # bounce
                          np.full(STEPS, 1.0)], axis=1)                          # gravity
            xs.append(w + rng.normal(0, 0.08, w.shape))
            ys.append(k)
    return np.asarray(xs, np.float32), np.asarray(ys)


class ActivityNet(nn.Module):
    """``nn.LSTM(axes -> hidden)`` over a window, its last step -> ``nn.Linear`` to the classes."""

    def __init__(self, hidden: int = 32, axes: int = AXES, classes: int = len(ACTIVITIES)):
        super().__init__()
        self.lstm = nn.LSTM(axes, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


def run(out: Path, *, per_class: int = 200, epochs: int = 30, shots: int = 10, replay: int = 10,
        all_layers: bool = True, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    x, y = windows(POPULATION, per_class, seed)
    net = ActivityNet()
    t0 = time.perf_counter()
    shared.train(net, x, y, epochs, lr=0.01, seed=seed)
    train_s = time.perf_counter() - t0
    net.lstm.requires_grad_(all_layers)  # the head is updatable; the LSTM too unless --head-only
    spec = mp.convert(net, [mp.TensorType("motion", (STEPS, AXES))],
                      classifier=mp.ClassifierConfig(labels=ACTIVITIES), respect_trainable=True,
                      update=mp.UpdateConfig(optimizer=mp.Adam(learning_rate=0.003, mini_batch_size=15),
                                             epochs=100, epochs_range=(1, 200), shuffle=True, seed=seed))
    out.mkdir(parents=True, exist_ok=True)
    base_path = mp.save(spec, out / "activity.mlmodel")
    model = mp.load(base_path, compute_units="cpu_only")

    result, ctx = shared.user_experiment(model, windows, "motion", ACTIVITIES, USER, POPULATION,
                                         shots=shots, replay=replay, tests=60, seed=seed,
                                         save_to=out / "activity-personal.mlmodel")
    result.update(updatable="LSTM + head" if all_layers else "head", train_s=round(train_s, 2),
                  loss=round(ctx.metrics["loss"], 4))
    (out / "results.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/activity_demo")
    ap.add_argument("--head-only", action="store_true", help="keep the LSTM frozen")
    args = ap.parse_args(argv)
    r = run(Path(args.out), all_layers=not args.head_only)
    print(f"activity classifier: LSTM({AXES}->32) over {STEPS} steps, updatable: {r['updatable']}; "
          f"trained in {r['train_s']} s")
    shared.print_report("windows", r, args.out)


if __name__ == "__main__":
    main()
