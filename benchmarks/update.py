"""UpdateTask vs a hand-written torch training loop on the same model and optimizer.

First table (head-only personalization, ``--head-epochs`` epochs): time per epoch after the
first, for the UpdateTask with its frozen-prefix cache (the conv features computed once in
prepare, each mini-batch runs only fc1/relu/fc2) and without it (MLPERSONAL_UPDATE_CACHE_BYTES=0),
a torch loop (NCHW, and channels_last images), and onnxruntime-training when
$MLPERSONAL_ORT_PYTHON names a python with it; the task's one-time prepare and its end-to-end
time per epoch (prepare and write-back amortized). Second table: per mini-batch, both variants.

Sticker CNN: 3 x [conv3x3 + relu + maxpool2] (3->16->32->64 channels, 28x28 RGB input),
FC 576->128 + relu, FC 128->10, softmax; categorical cross-entropy; mini-batches of 32, shuffled.
Variants: head-only (the two FC layers updatable) and all-updatable (every conv and FC layer),
each with SGD(momentum=0.9) and Adam. The spec is built with coremltools' NeuralNetworkBuilder
from the torch module's weights, so both sides train the very same network.

Printed per row: the median time per mini-batch after the first epoch (ours between two of the
task's mini_batch_end events, torch around one loop iteration; medians resist the load of other
processes), the same in CPU time of the training thread (time.thread_time(); with one torch
thread all the work runs in that thread, so this resists other processes' load best), the ratio
ours/torch of each; the same torch loop with channels_last images (the UpdateTask keeps image
blobs channels_last on cpu, where torch's convolution and max pooling are much faster), the
end-to-end
time per mini-batch of the task (copy + validation/encoding + training + write-back), and the
peak RSS of a child process doing only that training (2 epochs; both children import the same
modules and build the same spec first; ours also holds its copy of the model and the encoded
examples).

    python benchmarks/update.py [--threads 1] [--rounds 3] [--epochs 3] [--examples 384]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LABELS = [f"sticker{i}" for i in range(10)]
BATCH = 32
CONVS = ("conv1", "conv2", "conv3")
FCS = ("fc1", "fc2")


class StickerCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = torch.nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = torch.nn.Linear(576, 128)
        self.fc2 = torch.nn.Linear(128, 10)

    def forward(self, x):
        for conv in (self.conv1, self.conv2, self.conv3):
            x = F.max_pool2d(F.relu(conv(x)), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


def build_spec(m: StickerCNN, updatable, optimizer: str, epochs: int):
    from coremltools.models import datatypes
    from coremltools.models.neural_network import AdamParams, NeuralNetworkBuilder, SgdParams

    def np32(t):
        return t.detach().numpy().astype(np.float32)

    b = NeuralNetworkBuilder([("image", datatypes.Array(3, 28, 28))], [("probs", datatypes.Array(10))],
                             mode="classifier")
    x = "image"
    for i, name in enumerate(CONVS):
        conv = getattr(m, name)
        cin, cout = conv.in_channels, conv.out_channels
        b.add_convolution(name, cin, cout, 3, 3, 1, 1, "same", 1, np32(conv.weight).transpose(2, 3, 1, 0),
                          np32(conv.bias), True, input_name=x, output_name=f"{name}_out")
        b.add_activation(f"relu{i + 1}", "RELU", f"{name}_out", f"relu{i + 1}_out")
        b.add_pooling(f"pool{i + 1}", 2, 2, 2, 2, "MAX", "VALID", f"relu{i + 1}_out", f"pool{i + 1}_out")
        x = f"pool{i + 1}_out"
    b.add_flatten("flatten", 0, x, "flat")
    b.add_inner_product("fc1", np32(m.fc1.weight), np32(m.fc1.bias), 576, 128, True, "flat", "fc1_out")
    b.add_activation("relu4", "RELU", "fc1_out", "relu4_out")
    b.add_inner_product("fc2", np32(m.fc2.weight), np32(m.fc2.bias), 128, 10, True, "relu4_out", "logits")
    b.add_softmax("softmax", "logits", "probs")
    b.set_class_labels(LABELS, predicted_feature_name="label")
    b.make_updatable(list(updatable))
    b.set_categorical_cross_entropy_loss("lossLayer", input="probs")
    if optimizer == "sgd":
        b.set_sgd_optimizer(SgdParams(lr=0.01, batch=BATCH, momentum=0.9))
    else:
        b.set_adam_optimizer(AdamParams(lr=1e-3, batch=BATCH))
    b.set_epochs(epochs)
    b.set_shuffle(seed=0)
    return b.spec


def make_data(n: int):
    g = torch.Generator().manual_seed(1)
    X = torch.rand(n, 3, 28, 28, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    data = [{"image": X[i].numpy(), "label": LABELS[int(y[i])]} for i in range(n)]
    return X, y, data


def run_ours(spec, data, compute_units: str = "cpu_only"):
    """(per-mini-batch seconds after the first epoch, end-to-end seconds per mini-batch)."""
    import mlpersonal as mp

    stamps: list = []

    def on_mb(ctx):  # runs in the training thread: thread_time() is that thread's CPU time
        stamps.append((ctx.metrics["epoch_index"], time.perf_counter(), time.thread_time()))

    model = mp.load(spec, compute_units=compute_units)
    t0 = time.perf_counter()
    task = mp.UpdateTask(model, data, progress_handlers={"mini_batch_end": on_mb})
    task.resume()
    ctx = task.wait()
    t1 = time.perf_counter()
    if ctx.error is not None:
        raise ctx.error
    pairs = [(a, b) for a, b in zip(stamps, stamps[1:]) if b[0] >= 1]
    wall = [b[1] - a[1] for a, b in pairs]
    cpu = [b[2] - a[2] for a, b in pairs]
    return wall, cpu, (t1 - t0) / len(stamps)


def _torch_setup(m: StickerCNN, updatable, optimizer: str, X, channels_last: bool, device: str = "cpu"):
    """A copy of ``m`` on ``device`` training only the ``updatable`` submodules, its optimizer,
    and the images (in channels_last memory format when asked, as the UpdateTask keeps them on
    cpu)."""
    X = X.to(device)
    if channels_last:
        X = X.contiguous(memory_format=torch.channels_last)
    m = copy.deepcopy(m).to(device)
    for p in m.parameters():
        p.requires_grad_(False)
    params = [p for name in updatable for p in getattr(m, name).parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = (torch.optim.SGD(params, lr=0.01, momentum=0.9) if optimizer == "sgd"
           else torch.optim.Adam(params, lr=1e-3))
    return m, opt, X


def _torch_step(m, opt, X, y, idx) -> None:
    """One mini-batch of the hand-written loop (``.item()`` waits for the step, like a real loop
    reading its loss)."""
    loss = F.cross_entropy(m(X[idx]), y[idx])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    loss.item()


def run_torch(m: StickerCNN, updatable, optimizer: str, X, y, epochs: int, channels_last=False,
              device: str = "cpu"):
    """(wall, cpu) seconds per mini-batch after the first epoch of a plain torch loop
    (``channels_last``: the images in that memory format, as the UpdateTask keeps them on cpu)."""
    m, opt, X = _torch_setup(m, updatable, optimizer, X, channels_last, device)
    y = y.to(device)
    n = len(X)
    wall, cpu = [], []
    t, c = time.perf_counter(), time.thread_time()
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch)).to(device)
        for s in range(0, n, BATCH):
            _torch_step(m, opt, X, y, perm[s:s + BATCH])
            t2, c2 = time.perf_counter(), time.thread_time()
            if epoch >= 1:
                wall.append(t2 - t)
                cpu.append(c2 - c)
            t, c = t2, c2
    return wall, cpu


def run_ours_epochs(spec, data, cache: bool = True):
    """Per-epoch (wall, thread CPU) seconds of the task after its first epoch, the one-time
    prepare (copy + validation + encoding + frozen-prefix cache) and the task's end-to-end
    seconds per epoch (prepare and write-back amortized over the epochs)."""
    import mlpersonal as mp

    stamps: list = []

    def stamp(ctx):  # training thread: thread_time() is its CPU time
        stamps.append((time.perf_counter(), time.thread_time()))

    old = os.environ.get("MLPERSONAL_UPDATE_CACHE_BYTES")
    os.environ["MLPERSONAL_UPDATE_CACHE_BYTES"] = "" if cache else "0"
    try:
        model = mp.load(spec, compute_units="cpu_only")
        t0 = time.perf_counter()
        task = mp.UpdateTask(model, data, progress_handlers={"training_began": stamp, "epoch_end": stamp})
        task.resume()
        ctx = task.wait()
        t1 = time.perf_counter()
    finally:
        if old is None:
            os.environ.pop("MLPERSONAL_UPDATE_CACHE_BYTES", None)
        else:
            os.environ["MLPERSONAL_UPDATE_CACHE_BYTES"] = old
    if ctx.error is not None:
        raise ctx.error
    wall = [b[0] - a[0] for a, b in zip(stamps[1:], stamps[2:])]
    cpu = [b[1] - a[1] for a, b in zip(stamps[1:], stamps[2:])]
    return wall, cpu, stamps[0][0] - t0, (t1 - t0) / (len(stamps) - 1)


def run_torch_epochs(m: StickerCNN, updatable, optimizer: str, X, y, epochs: int, channels_last=False):
    """Per-epoch (wall, CPU) seconds after the first epoch of the plain torch loop."""
    m, opt, X = _torch_setup(m, updatable, optimizer, X, channels_last)
    n = len(X)
    wall, cpu = [], []
    for epoch in range(epochs):
        t, c = time.perf_counter(), time.thread_time()
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
        for s in range(0, n, BATCH):
            _torch_step(m, opt, X, y, perm[s:s + BATCH])
        if epoch >= 1:
            wall.append(time.perf_counter() - t)
            cpu.append(time.thread_time() - c)
    return wall, cpu


def personalization_table(args, m, X, y, data, onnx_path) -> None:
    """Head-only personalization over several epochs: per-epoch times side by side."""
    med = statistics.median
    rows = []
    epochs = args.head_epochs
    for optimizer in ("sgd", "adam"):
        spec = build_spec(m, FCS, optimizer, epochs)
        run_ours_epochs(spec, data[:BATCH * 2])
        run_ours_epochs(spec, data[:BATCH * 2], cache=False)
        t = {k: [] for k in ("c_w", "c_c", "u_w", "u_c", "n_w", "n_c", "l_w", "l_c", "prep", "e2e")}
        for _ in range(args.rounds):  # interleaved: load changes hit every contender alike
            w, c, prep, e2e = run_ours_epochs(spec, data)
            t["c_w"] += w
            t["c_c"] += c
            t["prep"].append(prep)
            t["e2e"].append(e2e)
            w, c, _, _ = run_ours_epochs(spec, data, cache=False)
            t["u_w"] += w
            t["u_c"] += c
            w, c = run_torch_epochs(m, FCS, optimizer, X, y, epochs)
            t["n_w"] += w
            t["n_c"] += c
            w, c = run_torch_epochs(m, FCS, optimizer, X, y, epochs, channels_last=True)
            t["l_w"] += w
            t["l_c"] += c
        ms = {k: med(v) * 1e3 for k, v in t.items()}
        ort = run_ort(args, onnx_path, "head-only", optimizer, epochs) if onnx_path else None
        ort_w = med(ort["epoch_wall"]) * 1e3 if ort else float("nan")
        ort_c = med(ort["epoch_cpu"]) * 1e3 if ort else float("nan")
        rows.append((optimizer, ms["c_w"], ms["c_c"], ms["u_w"], ms["u_c"], ms["n_w"], ms["n_c"],
                     ms["l_w"], ms["l_c"], ort_w, ort_c,
                     ms["c_c"] / min(ms["n_c"], ms["l_c"]), ms["c_c"] / ort_c if ort else float("nan"),
                     ms["prep"], ms["e2e"]))
    print(f"\nhead-only personalization (fc1 + fc2 updatable), {epochs} epochs of {len(data)} examples, "
          "per-epoch medians after the first epoch (ms; CPU = the training thread's CPU time; "
          "ORT CPU = its process CPU time)")
    _table(("optimizer", "UpdateTask cache ms/epoch", "cache CPU", "UpdateTask no-cache ms/epoch",
            "no-cache CPU", "torch NCHW ms/epoch", "NCHW CPU", "torch channels_last ms/epoch",
            "channels_last CPU", "ORT-training ms/epoch", "ORT CPU", "CPU ratio vs best torch",
            "CPU ratio vs ORT",
            "task prepare ms (once)", "task end-to-end ms/epoch"), rows)


def export_onnx(m: StickerCNN, path: str) -> None:
    """The torch module as an ONNX training graph (for onnxruntime-training's artifacts)."""
    torch.onnx.export(m, (torch.rand(BATCH, 3, 28, 28),), path, input_names=["image"],
                      output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                      training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False,
                      opset_version=17, dynamo=False)


def ort_child(args) -> None:
    """In onnxruntime-training's venv: build artifacts, train, print timings and peak RSS."""
    import tempfile

    import onnx
    from onnxruntime import SessionOptions
    from onnxruntime.training import artifacts, onnxblock
    from onnxruntime.training.api import CheckpointState, Module, Optimizer

    model = onnx.load(args.onnx)
    updatable = {f"{n}.{w}" for n in VARIANTS[args.variant] for w in ("weight", "bias")}
    names = [i.name for i in model.graph.initializer]
    opt = (onnxblock.optim.SGD() if args.optimizer == "sgd"
           else onnxblock.optim.AdamW(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0))
    d = tempfile.mkdtemp()
    artifacts.generate_artifacts(model, requires_grad=[n for n in names if n in updatable],
                                 frozen_params=[n for n in names if n not in updatable],
                                 loss=artifacts.LossType.CrossEntropyLoss, optimizer=opt, artifact_directory=d)
    for f in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx"):
        g = onnx.load(os.path.join(d, f))
        if g.ir_version > 10:  # onnx writes a newer IR than onnxruntime 1.19 reads
            g.ir_version = 10
            onnx.save(g, os.path.join(d, f))
    so = SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    state = CheckpointState.load_checkpoint(os.path.join(d, "checkpoint"))
    module = Module(os.path.join(d, "training_model.onnx"), state, os.path.join(d, "eval_model.onnx"),
                    device="cpu", session_options=so)
    optimizer = Optimizer(os.path.join(d, "optimizer_model.onnx"), module)
    optimizer.set_learning_rate(0.01 if args.optimizer == "sgd" else 1e-3)
    module.train()
    X, y, _ = make_data(args.examples)
    X, y = X.numpy(), y.numpy().astype(np.int64)
    base = peak_mib()
    wall, cpu, ep_wall, ep_cpu = [], [], [], []
    n = len(X)
    for epoch in range(args.epochs):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch)).numpy()
        te, ce = time.perf_counter(), time.process_time()
        for s in range(0, n, BATCH):
            idx = perm[s:s + BATCH]
            t, c = time.perf_counter(), time.process_time()
            module(X[idx], y[idx])
            optimizer.step()
            module.lazy_reset_grad()
            if epoch >= 1:
                wall.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
        if epoch >= 1:
            ep_wall.append(time.perf_counter() - te)
            ep_cpu.append(time.process_time() - ce)
    print(json.dumps({"wall": wall, "cpu": cpu, "epoch_wall": ep_wall, "epoch_cpu": ep_cpu,
                      "base_mib": base, "peak_mib": peak_mib()}))


def run_ort(args, onnx_path: str, variant: str, optimizer: str, epochs: int = 0):
    """Run ort_child with $MLPERSONAL_ORT_PYTHON; None when that venv is not given."""
    py = os.environ.get("MLPERSONAL_ORT_PYTHON")
    if not py:
        return None
    cmd = [py, os.path.abspath(__file__), "--child", "ort", "--onnx", onnx_path, "--variant", variant,
           "--optimizer", optimizer, "--threads", str(args.threads), "--epochs", str(epochs or args.epochs),
           "--examples", str(args.examples)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"onnxruntime-training run failed: {r.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


VARIANTS = {"head-only": FCS, "all-updatable": CONVS + FCS}


def peak_mib() -> float:
    """This process's peak RSS in MiB: VmHWM on Linux (reset at exec, unlike getrusage's
    ru_maxrss, which a child inherits from its parent), else resource.getrusage."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args):
    """Train once in this process and print its peak RSS (MiB) as JSON."""
    torch.set_num_threads(args.threads)
    m = StickerCNN()
    upd = VARIANTS[args.variant]
    X, y, data = make_data(args.examples)
    spec = build_spec(m, upd, args.optimizer, args.epochs)  # both sides: same imports and objects
    import mlpersonal  # noqa: F401
    import runtime  # noqa: F401
    base = peak_mib()
    if args.child == "ours":
        run_ours(spec, data)
    else:
        run_torch(m, upd, args.optimizer, X, y, args.epochs)
    peak = peak_mib()
    print(json.dumps({"base_mib": base, "peak_mib": peak}))



def threads_child(args) -> None:
    """All-updatable SGD per epoch on 2 torch threads, after this (caller's) thread has run torch
    ops, as every app predicting before it personalizes has: ``run()`` (caller's thread),
    ``resume()`` (a background thread), ``resume()`` with the caller's idle OpenMP team kept (the
    release stubbed out: what resume() did before), and the torch loop; JSON of medians (ms)."""
    import mlpersonal as mp
    import runtime.update as ru

    torch.set_num_threads(2)
    m = StickerCNN()
    X, y, data = make_data(args.examples)
    spec = build_spec(m, VARIANTS["all-updatable"], "sgd", args.epochs)
    release = ru._release_openmp_pool

    def ours(mode: str) -> list:
        stamps: list = []
        model = mp.load(spec, compute_units="cpu_only")
        model.predict(data[0])  # the caller's thread computes with torch (its OpenMP team)
        task = mp.UpdateTask(model, data, progress_handlers={"epoch_end": lambda c: stamps.append(time.perf_counter())})
        ru._release_openmp_pool = release if mode != "kept" else (lambda: None)
        try:
            ctx = task.run() if mode == "run" else (task.resume(), task.wait())[1]
        finally:
            ru._release_openmp_pool = release
        if ctx.error is not None:
            raise ctx.error
        return [b - a for a, b in zip(stamps, stamps[1:])]

    times: dict = {"run": [], "resume": [], "kept": [], "torch": []}
    for _ in range(args.rounds):
        for mode in ("run", "resume", "kept"):
            times[mode] += ours(mode)
        times["torch"] += run_torch_epochs(m, VARIANTS["all-updatable"], "sgd", X, y, args.epochs)[0]
    print(json.dumps({k: statistics.median(v) * 1e3 for k, v in times.items()}))


def threads_table(args) -> None:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "threads", "--rounds", str(args.rounds),
           "--epochs", str(max(args.epochs, 3)), "--examples", str(args.examples)]
    r = json.loads(subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout.splitlines()[-1])
    print("all-updatable SGD, 2 torch threads, the caller's thread has an OpenMP team (it predicted "
          "first): ms per epoch after the first, in a child process")
    _table(("run() ms/epoch", "resume() ms/epoch", "resume() keeping the caller's team ms/epoch",
            "torch loop ms/epoch", "resume/run ratio", "kept/run ratio", "run/torch ratio"),
           [(r["run"], r["resume"], r["kept"], r["torch"], r["resume"] / r["run"], r["kept"] / r["run"],
             r["run"] / r["torch"])])


def peak_rss(args, who: str, variant: str, optimizer: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", who, "--variant", variant,
           "--optimizer", optimizer, "--threads", str(args.threads), "--epochs", "2",
           "--examples", str(args.examples)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def transformer_table(args) -> None:
    """Head-only personalization of an ND (EXACT_ARRAY_MAPPING) transformer classifier exported by
    mlpersonal: ms per epoch, the task end to end (prepare + epochs + write-back, / epochs) with
    its frozen-prefix cache (the encoder once, then the head on the batch) and without it, vs a
    torch loop over the same frozen encoder and head (SGD, mini-batches of 16, unshuffled)."""
    import torch.nn.functional as F

    import mlpersonal as mp
    from nets import _Tokens

    torch.manual_seed(0)
    net = _Tokens().eval()

    class Scores(torch.nn.Module):  # the classifier without its final softmax (the loss's)
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return net.head(net.encoder(x + net.pos).mean(1))

    module = Scores().eval()
    for p in module.parameters():
        p.requires_grad_(False)
    net.head.requires_grad_(True)
    epochs, n, labels = 10, 128, [str(i) for i in range(10)]
    spec = mp.convert(module, [mp.TensorType("x", (16, 64))], classifier=mp.ClassifierConfig(labels),
                      respect_trainable=True, update=mp.UpdateConfig(
                          optimizer=mp.SGD(learning_rate=0.01, mini_batch_size=16), epochs=epochs,
                          shuffle=False))
    X, y = torch.randn(n, 16, 64), torch.randint(0, 10, (n,))
    data = [{"x": a.numpy(), "label": labels[int(t)]} for a, t in zip(X, y)]
    model = mp.load(spec, compute_units="cpu_only")
    opt = torch.optim.SGD(net.head.parameters(), lr=0.01)

    def torch_loop():
        for _ in range(epochs):
            for s in range(0, n, 16):
                loss = F.cross_entropy(module(X[s:s + 16]), y[s:s + 16])
                opt.zero_grad()
                loss.backward()
                opt.step()

    def uncached():
        os.environ["MLPERSONAL_UPDATE_CACHE_BYTES"] = "0"
        try:
            model.update(data)
        finally:
            del os.environ["MLPERSONAL_UPDATE_CACHE_BYTES"]

    fns = {"ours": lambda: model.update(data), "ours, no cache": uncached, "torch loop": torch_loop}
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(max(3, args.rounds)):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t) / epochs * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"transformer classifier (2 pre-norm encoder layers, 16 x 64 tokens, ND mode), head-only "
          f"personalization: {n} examples, mini-batch 16, SGD, {epochs} epochs; ms per epoch "
          f"(end to end / epochs), median of {max(3, args.rounds)} interleaved rounds")
    _table(("variant", "ms per epoch", "vs torch loop"),
           [(k, v, v / med["torch loop"]) for k, v in med.items()])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--examples", type=int, default=384)
    ap.add_argument("--head-epochs", type=int, default=5, help="epochs of the personalization table")
    ap.add_argument("--only", choices=["personalization", "steps", "threads", "transformer"],
                    help="print one table only")
    ap.add_argument("--child", choices=["ours", "torch", "ort", "threads"])
    ap.add_argument("--onnx")
    ap.add_argument("--variant", choices=list(VARIANTS), default="head-only")
    ap.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    args = ap.parse_args()
    if args.child == "ort":
        return ort_child(args)
    if args.child == "threads":
        return threads_child(args)
    if args.child:
        return child(args)

    torch.set_num_threads(args.threads)
    import logging

    logging.getLogger("coremltools").setLevel(logging.ERROR)
    m = StickerCNN()
    X, y, data = make_data(args.examples)
    print(f"sticker CNN, {args.examples} examples, batch {BATCH}, {args.epochs} epochs "
          f"(timed: epochs 2..{args.epochs}), torch threads {args.threads}, "
          f"medians over {args.rounds} interleaved rounds, torch {torch.__version__}")
    import tempfile

    onnx_path = None
    if os.environ.get("MLPERSONAL_ORT_PYTHON"):
        onnx_path = os.path.join(tempfile.mkdtemp(), "sticker.onnx")
        export_onnx(copy.deepcopy(m), onnx_path)
    if args.only in (None, "transformer"):
        transformer_table(args)
        if args.only == "transformer":
            return
        print()
    if args.only in (None, "threads"):
        threads_table(args)
        if args.only == "threads":
            return
        print()
    if args.only != "steps":
        personalization_table(args, m, X, y, data, onnx_path)
        if args.only == "personalization":
            return
        print()
    rows, ort_rows = [], []
    med = statistics.median
    for variant, upd in VARIANTS.items():
        for optimizer in ("sgd", "adam"):
            spec = build_spec(m, upd, optimizer, args.epochs)
            run_ours(spec, data[:BATCH * 2])  # warm-up (first torch.optim import, allocator)
            run_torch(m, upd, optimizer, X[:BATCH * 2], y[:BATCH * 2], 2)
            ours, ours_cpu, e2e, ref, ref_cpu, cl, cl_cpu = [], [], [], [], [], [], []
            for _ in range(args.rounds):
                w, c, e = run_ours(spec, data)
                ours += w
                ours_cpu += c
                e2e.append(e)
                w, c = run_torch(m, upd, optimizer, X, y, args.epochs)
                ref += w
                ref_cpu += c
                w, c = run_torch(m, upd, optimizer, X, y, args.epochs, channels_last=True)
                cl += w
                cl_cpu += c
            rss_o = peak_rss(args, "ours", variant, optimizer)
            rss_t = peak_rss(args, "torch", variant, optimizer)
            rows.append((variant, optimizer, med(ours) * 1e3, med(ref) * 1e3, med(ours) / med(ref),
                         med(ours_cpu) * 1e3, med(ref_cpu) * 1e3, med(ours_cpu) / med(ref_cpu),
                         med(cl_cpu) * 1e3, med(ours_cpu) / med(cl_cpu),
                         med(e2e) * 1e3, rss_o["peak_mib"], rss_t["peak_mib"]))
            if onnx_path:
                ort = run_ort(args, onnx_path, variant, optimizer)
                if ort:
                    ort_rows.append((variant, optimizer, med(ours) * 1e3, med(ort["wall"]) * 1e3,
                                     med(ours) / med(ort["wall"]), med(ours_cpu) * 1e3,
                                     med(ort["cpu"]) * 1e3, med(ours_cpu) / med(ort["cpu"]),
                                     rss_o["peak_mib"], ort["peak_mib"]))
    head = ("variant", "optimizer", "UpdateTask ms/mb", "torch loop ms/mb", "ratio",
            "UpdateTask CPU ms/mb", "torch CPU ms/mb", "CPU ratio", "torch channels_last CPU ms/mb",
            "CPU ratio vs channels_last", "task end-to-end ms/mb", "peak RSS ours MiB", "peak RSS torch MiB")
    _table(head, rows)
    if ort_rows:
        print("\nvs onnxruntime-training (its own process, run once after ours; sgd: ORT's plain SGD "
              "vs ours with momentum 0.9; adam: ORT's AdamW with weight_decay=0)")
        _table(("variant", "optimizer", "UpdateTask ms/mb", "ORT-training ms/mb", "ratio",
                "UpdateTask CPU ms/mb", "ORT CPU ms/mb", "CPU ratio", "peak RSS ours MiB",
                "peak RSS ORT MiB"), ort_rows)
    elif not onnx_path:
        print("\n(onnxruntime-training: `make bench-ort-training` creates .venv-ort-training with "
              "onnxruntime-training==1.19.2 and runs this with MLPERSONAL_ORT_PYTHON set to it)")


def _table(head, rows) -> None:
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        cells = []
        for h, v in zip(head, row):
            if isinstance(v, str):
                cells.append(v)
            elif "ratio" in h:
                cells.append(f"{v:.3f}x")
            elif "MiB" in h:
                cells.append(f"{v:.0f}")
            else:
                cells.append(f"{v:.2f}")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
