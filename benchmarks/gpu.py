"""The runtime on a CUDA GPU vs hand-written torch on the same GPU, side by side in one run.

    PYTHONPATH=$PWD python benchmarks/gpu.py [--rounds 5] [--examples 1024]

Without a CUDA device it says so and measures nothing (``--device cpu`` runs the same tables on
the cpu). The sticker CNNs of benchmarks/inference.py (1x28x28) and benchmarks/update.py
(3x28x28); 3 x conv3x3+relu+maxpool, FC 576->128, FC 128->10; specs built with coremltools'
builder from the torch modules' weights; compute_units="cpu_and_gpu" (float32: the runtime
turns TF32 off, and so does the torch side here).

- predict: ``predict_batch(ArrayBatchProvider)`` (numpy in; labels and probabilities out, on the
  host; on cuda through runtime.cuda_graphs) vs the torch module on the GPU (host array ->
  device -> softmax -> argmax -> host), per call, batch 1, 64 and 1024; interleaved rounds,
  medians; max |diff| of the probabilities; the same call with the plan off (op by op).
- update: per mini-batch (32) after the first epoch, the UpdateTask vs a torch loop reading
  each step's loss (``loss.item()``, as a loop that reports progress does), head-only and
  all-updatable, SGD(momentum 0.9) and Adam.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import block_medians_ms  # noqa: E402
import inference  # noqa: E402
from update import VARIANTS, StickerCNN, build_spec, make_data, run_ours, run_torch  # noqa: E402

UNITS = {"cuda": "cpu_and_gpu", "cpu": "cpu_only"}


def predict_rows(rounds: int, device: str) -> list[dict]:
    import mlpersonal as mp

    module, spec, probs_name, shape = inference.build("sticker_cnn")  # softmax included
    model = mp.load(spec, compute_units=UNITS[device])
    eager = mp.load(spec, compute_units=UNITS[device])
    eager.use_plan = False  # the network op by op (no CUDA graph / onnxruntime plan)
    assert model.device.type == device
    ref = module.to(device)
    rows = []
    for batch in (1, 64, 1024):
        x = np.random.default_rng(0).random((batch, *shape), dtype=np.float32)
        cols = mp.ArrayBatchProvider({"x": x})

        def torch_call():
            with torch.inference_mode():
                p = ref(torch.from_numpy(x).to(device))
                i = p.argmax(1).cpu().tolist()
                return [inference.LABELS[k] for k in i], p.cpu().numpy()

        ours = model.predict_batch(cols)
        labels, probs = torch_call()
        diff = float(np.abs(ours.column(probs_name).values - probs).max())
        assert ours.column("label") == labels or diff > 1e-5, "labels differ"
        fns = {"ours": lambda: model.predict_batch(cols), "torch": torch_call,
               "eager": lambda: eager.predict_batch(cols)}
        times = block_medians_ms(fns, rounds, {"ours": 20, "torch": 20, "eager": 20})
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append(dict(what=f"predict, batch {batch}", ours=med["ours"], torch=med["torch"],
                         ratio=med["ours"] / med["torch"],
                         note=f"max|diff| {diff:.1e}; op by op {med['eager']:.3f} ms"))
    return rows


def update_rows(m: StickerCNN, examples: int, epochs: int, device: str) -> list[dict]:
    X, y, data = make_data(examples)
    rows = []
    for variant, updatable in VARIANTS.items():
        for opt in ("sgd", "adam"):
            spec = build_spec(m, updatable, opt, epochs)
            wall, _, e2e = run_ours(spec, data, compute_units=UNITS[device])
            twall, _ = run_torch(m, updatable, opt, X, y, epochs, device=device)
            ours, theirs = statistics.median(wall) * 1e3, statistics.median(twall) * 1e3
            rows.append(dict(what=f"update {variant}, {opt}", ours=ours, torch=theirs,
                             ratio=ours / theirs, note=f"end-to-end {e2e * 1e3:.2f} ms/mini-batch"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--examples", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--device", choices=list(UNITS), default="cuda", help="cpu: the same tables there")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device on this machine; nothing measured")
        return
    torch.backends.cudnn.allow_tf32 = False  # both sides in float32, as the runtime computes
    m = StickerCNN()
    rows = predict_rows(args.rounds, args.device) + update_rows(m, args.examples, args.epochs, args.device)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"\n{name}, torch {torch.__version__}; ms per call (predict) or "
          "per mini-batch of 32 after the first epoch (update), medians; ratio = ours / torch\n")
    print(f"{'':<28}{'ours':>9}{'torch':>9}{'ratio':>7}  ")
    for r in rows:
        print(f"{r['what']:<28}{r['ours']:>9.3f}{r['torch']:>9.3f}{r['ratio']:>7.2f}  {r['note']}")


if __name__ == "__main__":
    main()
