"""Prediction speed of the sticker CNN, all measured side by side in one run:

* mlpersonal runtime ``predict_batch`` on the spec from ``exporters.converter`` (a list of
  feature dicts, and the same batch as ``ArrayBatchProvider`` columns)
* torch eager on the source module
* onnxruntime on ``exporters.to_onnx`` of the same module

at batch 1 and 64 (median ms; ratios = runtime / peer, < 1 means the runtime is faster), and
``predict_batch`` vs a per-sample ``predict`` loop on 256 samples. Two input declarations:
an image input (grayscale 28x28, scale 1/255: decoding and preprocessing included) and a
multi-array input (the same network on float tensors).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlpersonal as mp  # noqa: E402
from _util import block_medians_ms, medians_ms, table  # noqa: E402
from exporters.converter import ClassifierConfig, convert  # noqa: E402
from exporters.onnx_export import to_onnx  # noqa: E402
from examples.sticker_classifier.model import StickerNet  # noqa: E402

LABELS = ["heart", "star", "sun", "house", "cat", "dog", "tree", "car", "moon", "fish"]


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads (2)")
    threads = ap.parse_args().threads
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    import onnxruntime as ort

    module = StickerNet(len(LABELS)).eval()
    image = mp.ImageType("image", (1, 28, 28), color="grayscale", scale=1 / 255.0)
    tensor = mp.TensorType("image", (1, 28, 28))
    cfg = ClassifierConfig(labels=LABELS)
    runtimes = {"image input": mp.load(convert(module, [image], classifier=cfg)),
                "array input": mp.load(convert(module, [tensor], classifier=cfg))}
    # the personalization model: frozen features and embedding, an updatable classifier
    for part in (module.features, module.embedding):
        part.requires_grad_(False)
    runtimes["image input, updatable"] = mp.load(convert(module, [image], classifier=cfg,
                                                         respect_trainable=True,
                                                         update=mp.UpdateConfig()))
    module.requires_grad_(True)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    with tempfile.TemporaryDirectory() as tmp:
        path = to_onnx(module, [tensor], Path(tmp) / "sticker.onnx")
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (256, 28, 28)).astype(np.uint8)
    floats = (pixels[:, None] / 255.0).astype(np.float32)

    # the three agree before we time them
    with torch.no_grad():
        ref = torch.softmax(module(torch.from_numpy(floats[:8])), 1).numpy()
    for kind, m in runtimes.items():
        feeds = [{"image": p} for p in (pixels[:8] if kind.startswith("image") else floats[:8])]
        got = np.array([[o["labelProbs"][k] for k in LABELS] for o in m.predict_batch(feeds)])
        assert np.abs(got - ref).max() < 1e-5, kind
    (onnx_logits,) = sess.run(None, {"image": floats[:8]})
    assert np.abs(torch.softmax(torch.from_numpy(onnx_logits), 1).numpy() - ref).max() < 1e-5

    rows = []
    for batch in (1, 64):
        x = torch.from_numpy(floats[:batch])
        xn = floats[:batch]

        def eager():
            with torch.inference_mode():
                return module(x)

        fns = {"torch": eager, "ort": lambda: sess.run(None, {"image": xn})}
        for kind, m in runtimes.items():
            data = pixels[:batch] if kind.startswith("image") else floats[:batch]
            feeds = [{"image": d} for d in data]
            fns[kind] = (lambda m=m, feeds=feeds: m.predict_batch(feeds))
            columns = mp.ArrayBatchProvider({"image": data})
            fns[kind + ", columns"] = (lambda m=m, c=columns: m.predict_batch(c))
        for fn in fns.values():
            fn()  # builds plans
        blocks = block_medians_ms(fns, 5, {k: 8 if batch == 64 else 60 for k in fns})
        t = {k: statistics.median(v) for k, v in blocks.items()}
        for kind in runtimes:
            for how in (kind, kind + ", columns"):
                rows.append([how, batch, t[how], t["torch"], t["ort"], t[how] / t["torch"],
                             t[how] / t["ort"]])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"sticker CNN, torch threads = {torch.get_num_threads()}, onnxruntime intra-op "
          f"threads = {threads}, {os.cpu_count()} cores, load average {load:.1f} (median ms)")
    print(table(["runtime input", "batch", "runtime", "torch eager", "onnxruntime",
                 "runtime/torch", "runtime/ort"], rows))

    rows = []
    for kind, m in runtimes.items():
        data = pixels if kind.startswith("image") else floats
        feeds = [{"image": d} for d in data]
        t = medians_ms({"batch": lambda: m.predict_batch(feeds),
                        "loop": lambda: [m.predict(f) for f in feeds]}, repeat=7, warmup=1)
        rows.append([kind, len(feeds), t["batch"], t["loop"], t["loop"] / t["batch"]])
    print()
    print(table(["runtime input", "samples", "predict_batch", "predict loop", "loop/batch"], rows))
    print()
    print(flexible_vs_fixed())


def flexible_vs_fixed() -> str:
    """A fully convolutional net exported with a fixed shape, enumerated sizes and a range,
    timed at the same size (64x48, batch 8)."""
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                        nn.ReLU(), nn.Conv2d(16, 3, 3, padding=1)).eval()
    shape = (3, 48, 64)
    variants = {
        "fixed": mp.TensorType("x", shape),
        "enumerated": mp.TensorType("x", shape, enumerated_shapes=[(3, 144, 192)]),
        "range": mp.TensorType("x", shape, shape_range=[(3, 3), (16, 512), (16, 512)]),
    }
    feeds = [{"x": a} for a in np.random.default_rng(1).random((8, *shape), dtype=np.float32)]
    models = {k: mp.load(convert(net, [t])) for k, t in variants.items()}
    t = medians_ms({k: (lambda m=m: m.predict_batch(feeds)) for k, m in models.items()}, repeat=30)
    rows = [[k, "x".join(map(str, shape)), 8, t[k], t[k] / t["fixed"]] for k in variants]
    return table(["fully convolutional net", "size", "batch", "ms", "vs fixed"], rows)


if __name__ == "__main__":
    main()
