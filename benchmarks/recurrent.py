"""Recurrent models: an exported LSTM sequence classifier, predicted and personalized.

    PYTHONPATH=$PWD python benchmarks/recurrent.py [--rounds 5]

The model: ``nn.LSTM(6 -> 32)`` over 50 steps (2.5 s of 6 motion channels at 20 Hz, the shape of
an activity classifier) -> last step -> ``nn.Linear(32 -> 3)``, exported with
``exporters.convert`` (LSTM and Linear updatable). Side by side, interleaved round by round
(medians; compare ratios within one run only), torch and onnxruntime on 2 threads:

- predict (batch 1, 64, 256): ``predict_batch`` of per-example dicts and of one column, vs
  onnxruntime on ``to_onnx`` of the same module (one pre-stacked array), vs the module in torch
  eager; each timed in blocks of consecutive calls after the previous engine's threads settled
  (``_util.block_medians_ms``), after the plan's engine calibration (batches of 64+);
- update, per epoch after the first (64 examples, mini-batches of 16, SGD): the UpdateTask with
  every layer updatable and with the LSTM frozen (the head alone), trained in its own thread
  (``resume``) and in this one (``run``), vs a hand-written torch loop over the same batches
  (nn.LSTM + Linear, cross-entropy, torch.optim.SGD) in this thread; and every layer updatable
  on windows of different lengths (20-49 steps), which the task pads to one length per
  mini-batch, vs the torch loop doing the same (``pad_sequence``, each row's output at its
  last step).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mlpersonal as mp  # noqa: E402
from _util import block_medians_ms, table  # noqa: E402
from exporters.converter import ClassifierConfig, convert  # noqa: E402
from examples.activity_classifier.demo import ActivityNet  # noqa: E402
from exporters.onnx_export import to_onnx  # noqa: E402

STEPS, CHANNELS, HIDDEN = 50, 6, 32
LABELS = ["walk", "run", "sit"]
N, BATCH, EPOCHS = 64, 16, 4
THREADS = 2


def activity() -> ActivityNet:
    """The activity example's network at this benchmark's sizes."""
    return ActivityNet(HIDDEN, axes=CHANNELS, classes=len(LABELS))


def export(net: ActivityNet, lstm_updatable: bool):
    net.lstm.requires_grad_(lstm_updatable)
    spec = convert(net.eval(), [mp.TensorType("x", (STEPS, CHANNELS))],
                   classifier=ClassifierConfig(LABELS), respect_trainable=True,
                   update=mp.UpdateConfig(optimizer=mp.SGD(learning_rate=0.05, mini_batch_size=BATCH),
                                          epochs=EPOCHS, shuffle=False))
    net.lstm.requires_grad_(True)
    return spec


def ours_epochs(spec, data, background: bool) -> list[float]:
    """Seconds of each epoch after the first (the epoch_end events' spacing); the task trains in
    its own thread (``resume``) or in this one (``run``)."""
    stamps: list[float] = []
    model = mp.load(spec, compute_units="cpu_only")
    task = mp.UpdateTask(model, data, progress_handlers={"epoch_end": lambda c: stamps.append(time.perf_counter())})
    if background:
        task.resume()
        ctx = task.wait()
    else:
        ctx = task.run()
    if ctx.error is not None:
        raise ctx.error
    return [b - a for a, b in zip(stamps, stamps[1:])]


def torch_epochs(X, y, lstm_updatable: bool) -> list[float]:
    """``X``: one ``(N, Seq, C)`` tensor, or a list of ``(Seq_i, C)`` windows of mixed lengths
    (each mini-batch padded with ``pad_sequence``, each row's LSTM output at its last step)."""
    net = activity()
    params = list(net.head.parameters()) + (list(net.lstm.parameters()) if lstm_updatable else [])
    net.lstm.requires_grad_(lstm_updatable)
    opt = torch.optim.SGD(params, lr=0.05)
    stamps = []
    for _ in range(EPOCHS):
        for s in range(0, len(X), BATCH):
            if isinstance(X, list):
                rows = X[s:s + BATCH]
                out = net.lstm(nn.utils.rnn.pad_sequence(rows, batch_first=True))[0]
                logits = net.head(out[torch.arange(len(rows)), torch.tensor([len(r) for r in rows]) - 1])
            elif lstm_updatable:
                logits = net(X[s:s + BATCH])
            else:  # a frozen LSTM: no graph through it
                with torch.no_grad():
                    h = net.lstm(X[s:s + BATCH])[0][:, -1]
                logits = net.head(h)
            loss = nn.functional.cross_entropy(logits, y[s:s + BATCH])
            opt.zero_grad()
            loss.backward()
            opt.step()
        stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps, stamps[1:])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    import onnxruntime as ort

    net = activity().eval()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(N, STEPS, CHANNELS, generator=g)
    y = torch.arange(N) % len(LABELS)
    model = mp.load(export(net, True), compute_units="cpu_only")
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = to_onnx(net, [mp.TensorType("x", (STEPS, CHANNELS))], os.path.join(tmp, "a.onnx"))
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = THREADS, 1, 3
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    rows = []
    for b in (1, 64, 256):
        xb = (X if b <= N else X.repeat(-(-b // N), 1, 1))[:b].numpy()
        dicts = [{"x": x[:, None, :]} for x in xb]
        column = mp.ArrayBatchProvider({"x": xb[:, :, None, :]})
        for _ in range(16):  # past the plan's engine calibration (batches of 64+: plan vs eager)
            model.predict_batch(column)
            model.predict_batch(dicts)
        got = model.predict_batch(column).column("labelProbs").values
        with torch.no_grad():
            ref = torch.softmax(net(torch.from_numpy(xb)), 1).numpy()
        diff = float(np.abs(got - ref).max())

        xt = torch.from_numpy(xb)

        def eager():
            with torch.inference_mode():
                net(xt)

        fns = {"dicts": lambda: model.predict_batch(dicts), "columns": lambda: model.predict_batch(column),
               "ort": lambda: sess.run(None, {"x": xb}), "torch": eager}
        times = block_medians_ms(fns, args.rounds, {k: 30 if b == 1 else 10 for k in fns})
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append([b, med["dicts"], med["columns"], med["ort"], med["torch"],
                     f"{med['dicts'] / med['ort']:.2f}", f"{med['columns'] / med['ort']:.2f}",
                     f"{med['columns'] / med['torch']:.2f}", f"{diff:.1e}"])
    print(f"\nLSTM({CHANNELS}->{HIDDEN}) x {STEPS} steps -> Linear({HIDDEN}->{len(LABELS)}); "
          f"predict, ms per call (median of {args.rounds} interleaved rounds)\n")
    print(table(["batch", "dicts", "columns", "onnxruntime", "torch", "dicts/ORT", "columns/ORT",
                 "columns/torch", "max|diff|"], rows))

    data = [{"x": x[:, None, :].numpy(), "label": LABELS[int(t)]} for x, t in zip(X, y)]
    mixed = [x[:n] for x, n in zip(X, torch.randint(20, STEPS, (N,), generator=g).tolist())]
    mixed_data = [{"x": x[:, None, :].numpy(), "label": LABELS[int(t)]} for x, t in zip(mixed, y)]
    rows = []
    for name, lstm_updatable, inputs, examples in (
            ("all layers", True, X, data), ("head only", False, X, data),
            ("all layers, lengths 20-49", True, mixed, mixed_data)):
        spec = export(net, lstm_updatable)
        bg, fg, theirs = [], [], []
        for _ in range(args.rounds):
            bg += ours_epochs(spec, examples, True)
            fg += ours_epochs(spec, examples, False)
            theirs += torch_epochs(inputs, y, lstm_updatable)
        b, f, t = (statistics.median(v) * 1e3 for v in (bg, fg, theirs))
        rows.append([name, b, f, t, f"{b / t:.2f}", f"{f / t:.2f}"])
    print(f"\nupdate, ms per epoch ({N} examples, mini-batch {BATCH}, SGD; median over "
          f"{args.rounds} tasks x {EPOCHS - 1} epochs); the task in its own thread (resume) or "
          "in this one (run)\n")
    print(table(["updatable", "resume()", "run()", "torch loop", "resume/torch", "run/torch"], rows))


if __name__ == "__main__":
    main()
