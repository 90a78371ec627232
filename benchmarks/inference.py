"""Inference speed: mlpersonal predict_batch vs onnxruntime vs torch eager, side by side.

    PYTHONPATH=$PWD python benchmarks/inference.py [--rounds 7] [--nets sticker_cnn,...]

For each network (benchmarks/nets.py) the torch module's weights become a Core ML spec through
coremltools' NeuralNetworkBuilder; we time, interleaved round by round (medians; the machine is
shared, compare ratios within one run only), with torch.set_num_threads(2) and ORT
intra_op_num_threads=2:

- ``ours``: ``model.predict_batch(list of {"x": array})`` (runtime.plan: onnxruntime on the traced
  Network), including feature encoding and output decoding (label + probability dicts);
- ``arrays``: ``model.predict_batch(ArrayBatchProvider({"x": batch}))``: the same model fed one
  ``(B, ...)`` array, answering label and probability columns (no per-example dicts);
- ``eager Net``: the same call with the plan off (each spec layer a torch eager op);
- ``ORT``: ``InferenceSession.run`` on ``torch.onnx.export`` of the source module, on one
  pre-stacked array (no Python feature handling), its output left unread;
- ``ORT+labels``: the same run plus what a classifier's caller does next and ``arrays`` answers:
  the label of each row (argmax, label lookup) beside the probability matrix;
- ``torch``: the source module in eager mode under ``torch.inference_mode``.

Also: load time (compile), the first predict call (plan build), peak RSS growth of predicting
(fresh subprocess per backend) and the max abs difference of our probabilities vs torch float32.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import block_medians_ms  # noqa: E402
from nets import NETS, to_spec  # noqa: E402

THREADS = 2
LABELS = [f"class{i}" for i in range(10)]


def build(name: str):
    torch.manual_seed(0)
    factory, shape = NETS[name]
    module = factory().eval()
    spec, probs = to_spec(module, shape, labels=LABELS)
    return module, spec, probs, shape


def ort_session(module, shape):
    import onnxruntime as ort

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros((2, *shape)),), buf, dynamo=False,
                          input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "b"}, "y": {0: "b"}}, opset_version=17)
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(buf.getvalue(), so, providers=["CPUExecutionProvider"])


def ort_labels(probs: np.ndarray) -> tuple[list, np.ndarray]:
    """What a classifier's caller does with onnxruntime's output: a label per row."""
    return [LABELS[i] for i in probs.argmax(1).tolist()], probs


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_child(name: str, backend: str, batch: int) -> None:
    """Print the peak RSS growth (MiB) of predicting ``batch`` examples 20 times with ``backend``."""
    import runtime.neural_network  # noqa: F401
    from runtime.model import compile_spec

    torch.set_num_threads(THREADS)
    module, spec, _, shape = build(name)
    x = np.random.default_rng(0).random((batch, *shape), dtype=np.float32)
    feeds = [{"x": a} for a in x]
    if backend == "ort":
        import onnxruntime  # noqa: F401  (import outside the measured span, like the others)
    import threading

    base, peak, done = rss_mb(), [0.0], threading.Event()

    def sample():  # RSS sampled every millisecond: the peak of the measured span only
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    if backend in ("ours", "eager_net"):
        model = compile_spec(spec, "cpu_only")
        model.use_plan = backend == "ours"
        fn = lambda: model.predict_batch(feeds)  # noqa: E731
    elif backend == "ort":
        sess = ort_session(module, shape)
        fn = lambda: sess.run(None, {"x": x})  # noqa: E731
    else:
        def fn():
            with torch.inference_mode():
                module(torch.from_numpy(x))
    fn()  # ours: builds the plan
    first = max(peak[0], rss_mb()) - base
    peak[0], base = 0.0, rss_mb()
    for _ in range(20):
        fn()
    done.set()
    sampler.join()
    print(f"{first:.0f}/{max(peak[0], rss_mb()) - base:.0f}")


def memory(name: str, backend: str, batch: int) -> str:
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory", name, backend,
                        str(batch)], capture_output=True, text=True, env=env)
    lines = r.stdout.strip().splitlines()
    return lines[-1] if r.returncode == 0 and lines else "n/a"


def bench(name: str, rounds: int) -> list[dict]:
    import runtime.neural_network  # noqa: F401
    from runtime.batch import ArrayBatchProvider
    from runtime.model import compile_spec

    module, spec, probs_name, shape = build(name)
    t0 = time.perf_counter()
    ours = compile_spec(spec, "cpu_only")
    load_ms = (time.perf_counter() - t0) * 1e3
    eager = compile_spec(spec, "cpu_only")
    eager.use_plan = False
    sess = ort_session(module, shape)
    rows = []
    rng = np.random.default_rng(0)
    for batch in (1, 64):
        x = rng.random((batch, *shape), dtype=np.float32)
        feeds = [{"x": a} for a in x]
        columns = ArrayBatchProvider({"x": x})
        xt = torch.from_numpy(x)
        t0 = time.perf_counter()
        outs = ours.predict_batch(feeds)  # builds the plan (first batch size only)
        first_ms = (time.perf_counter() - t0) * 1e3
        outs = ours.predict_batch(feeds)  # through the plan now
        with torch.inference_mode():
            ref = module(xt).numpy()
        got = np.array([[o[probs_name][lab] for lab in LABELS] for o in outs])
        cols = ours.predict_batch(columns)
        col_probs = cols.column(probs_name)
        assert col_probs.keys == LABELS
        diff = max(float(np.abs(got - ref).max()), float(np.abs(col_probs.values - ref).max()))
        want = [LABELS[i] for i in ref.argmax(1)]
        labels_ok = [o["label"] for o in outs] == want == cols.column("label")

        def torch_eager():
            with torch.inference_mode():
                module(xt)

        fns = {"ours": lambda: ours.predict_batch(feeds), "arrays": lambda: ours.predict_batch(columns),
               "ort": lambda: sess.run(None, {"x": x}),
               "ort_labels": lambda: ort_labels(sess.run(None, {"x": x})[0]),
               "torch": torch_eager, "eager_net": lambda: eager.predict_batch(feeds)}
        reps = {"ours": 100, "arrays": 100, "ort": 100, "ort_labels": 100, "torch": 30,
                "eager_net": 30} if batch == 1 else \
            {"ours": 10, "arrays": 10, "ort": 10, "ort_labels": 10, "torch": 3, "eager_net": 3}
        for fn in fns.values():
            fn()
        times = block_medians_ms(fns, rounds, reps)
        med = {k: float(np.median(v)) for k, v in times.items()}
        ratios = [a / b for a, b in zip(times["ours"], times["ort"])]
        aratios = [a / b for a, b in zip(times["arrays"], times["ort"])]
        lratios = [a / b for a, b in zip(times["arrays"], times["ort_labels"])]
        rows.append(dict(net=name, batch=batch, **med, ratio=med["ours"] / med["ort"],
                         ratio_rounds=f"{min(ratios):.2f}-{max(ratios):.2f}",
                         aratio=med["arrays"] / med["ort"],
                         aratio_rounds=f"{min(aratios):.2f}-{max(aratios):.2f}",
                         lratio=med["arrays"] / med["ort_labels"],
                         lratio_rounds=f"{min(lratios):.2f}-{max(lratios):.2f}", diff=diff,
                         labels_ok=labels_ok, load_ms=load_ms, first_ms=first_ms,
                         plan=ours.inference_plan().last_fallback_reason or "onnxruntime"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--nets", default=",".join(NETS))
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--memory", nargs=3, metavar=("NET", "BACKEND", "BATCH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory:
        memory_child(args.memory[0], args.memory[1], int(args.memory[2]))
        return
    torch.set_num_threads(THREADS)
    rows = []
    for name in args.nets.split(","):
        rows += bench(name, args.rounds)
    print(f"\ntorch {torch.__version__}, threads {THREADS}, {args.rounds} interleaved rounds; "
          "ms per call (median); ratio = ours / ORT, arrays/ORT = the ArrayBatchProvider call's, "
          "arrays/+lab = vs ORT+labels (min-max over rounds)\n")
    hdr = (f"{'net':<13}{'batch':>6}{'ours':>8}{'arrays':>8}{'ORT':>8}{'ORT+lab':>8}{'ratio':>7}"
           f"{'rounds':>11}{'arrays/ORT':>11}{'rounds':>11}{'arrays/+lab':>12}{'rounds':>11}"
           f"{'torch':>8}{'eagerNet':>9}{'max|diff|':>10}{'labels':>7}{'load':>6}{'1st call':>9}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['net']:<13}{r['batch']:>6}{r['ours']:>8.3f}{r['arrays']:>8.3f}{r['ort']:>8.3f}"
              f"{r['ort_labels']:>8.3f}{r['ratio']:>7.2f}{r['ratio_rounds']:>11}{r['aratio']:>11.2f}"
              f"{r['aratio_rounds']:>11}{r['lratio']:>12.2f}{r['lratio_rounds']:>11}"
              f"{r['torch']:>8.3f}{r['eager_net']:>9.3f}{r['diff']:>10.1e}"
              f"{'ok' if r['labels_ok'] else 'DIFF':>7}{r['load_ms']:>5.0f}m{r['first_ms']:>8.0f}m")
    if not args.no_memory:
        print("\npeak RSS growth in MiB, fresh process per cell: first/steady = loading + first "
              "predict of batch 64 (ours: plan build) / 20 more predicts after it\n")
        print(f"{'net':<13}{'ours':>10}{'ORT':>10}{'torch':>10}{'eagerNet':>10}")
        for name in args.nets.split(","):
            vals = [memory(name, b, 64) for b in ("ours", "ort", "torch", "eager_net")]
            print(f"{name:<13}" + "".join(f"{v:>10}" for v in vals))


if __name__ == "__main__":
    main()
