"""kNN benchmark, side by side in one run (2 threads).

10,000 stored 128-d samples, 256 queries, k=3, 10 classes, uniform votes:
  * runtime ``predict_batch`` (feature dicts in, label + probabilities dicts out), and the same
    with ``ArrayBatchProvider`` columns (one query array in, a label list and a matrix out)
  * plain torch brute force (norms + matmul + topk + majority vote on ready tensors; the BLAS limit)
  * scikit-learn ``KNeighborsClassifier(algorithm="brute")``
  * faiss ``IndexFlatL2`` (default settings) + majority vote, when faiss-cpu is installed
then the time to add 1,000 examples (an update task's work: copy, validate, append, result) and how
predict time grows with 1k / 10k / 100k stored samples.

Run: ``PYTHONPATH=$PWD python benchmarks/knn.py``
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

import mlpersonal as mp  # noqa: E402
from exporters.knn import knn_classifier  # noqa: E402
from runtime.updating import run_updater  # noqa: E402

N, D, B, K, C = 10_000, 128, 256, 3, 10
REPEATS = 40
#: statistic reported: the machine is shared (load average often > cores), so the best of
#: interleaved runs is the stable estimate of each method's cost; medians are printed too.


def timeit(fn, repeats=REPEATS):
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def interleaved(fns: dict, repeats=REPEATS):
    """Best wall time, best process CPU time and median wall time of each function; rounds are
    interleaved so machine noise hits all methods alike. Each timed call directly follows an
    untimed call of the same method (steady state: the method's own data is in cache, not evicted
    by whichever library ran before it, and other libraries' worker threads have gone idle)."""
    for f in fns.values():
        f()
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            f()
            c, t = time.process_time(), time.perf_counter()
            f()
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    return ({k: min(v) for k, v in wall.items()}, {k: min(v) for k, v in cpu.items()},
            {k: statistics.median(v) for k, v in wall.items()})


def main():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D)).astype(np.float32)
    y = rng.integers(0, C, N)
    labels = [f"c{v}" for v in y]
    q = rng.normal(size=(B, D)).astype(np.float32)
    batch = [{"features": v} for v in q]
    columns = mp.ArrayBatchProvider({"features": q})  # label list + probability matrix out

    model = mp.load(knn_classifier(D, number_of_neighbors=K, k_range=(1, 10), samples=x, labels=labels),
                    compute_units="cpu_only")

    s = torch.from_numpy(x)
    s2 = (s * s).sum(1)
    y_t = torch.from_numpy(y)

    def torch_brute():
        qt = torch.from_numpy(q)
        d = (qt * qt).sum(1, keepdim=True) - 2.0 * qt @ s.T + s2
        d.clamp_min_(0)
        idx = d.topk(K, dim=1, largest=False).indices
        return torch.mode(y_t[idx], dim=1).values

    from sklearn.neighbors import KNeighborsClassifier

    sk = KNeighborsClassifier(K, algorithm="brute").fit(x, y)
    fns = {
        "runtime predict_batch": lambda: model.predict_batch(batch),
        "runtime, columns": lambda: model.predict_batch(columns),
        "plain torch brute force": torch_brute,
        "scikit-learn brute": lambda: sk.predict(q),
    }
    faiss_note = ""
    try:
        import faiss

        faiss.omp_set_num_threads(2)
        index = faiss.IndexFlatL2(D)
        index.add(x)

        def faiss_search():
            _, idx = index.search(q, K)
            return torch.mode(y_t[torch.from_numpy(idx)], dim=1).values

        fns["faiss IndexFlatL2"] = faiss_search
    except ImportError:
        faiss_note = "faiss not installed (pip install faiss-cpu failed or was not run): no faiss row"

    # the neighbors found must be the same (no distance ties in continuous data)
    _, ours = model.kneighbors(torch.from_numpy(q))
    same_sk = float(np.mean(np.sort(ours.numpy(), 1) == np.sort(sk.kneighbors(q, K)[1], 1)))

    times, cpu, medians = interleaved(fns)
    base, base_cpu = times["plain torch brute force"], cpu["plain torch brute force"]
    rt, rt_cpu = times["runtime predict_batch"], cpu["runtime predict_batch"]
    print(f"\nkNN predict: {N} stored {D}-d samples, {B} queries, k={K}, torch threads=2 "
          f"(best of {REPEATS} interleaved runs; wall and process-CPU time; median wall in brackets)")
    print(f"{'method':26s} {'wall ms':>8s} {'(median)':>10s} {'cpu ms':>8s} {'x torch wall/cpu':>17s} "
          f"{'runtime speed-up wall/cpu':>26s}")
    for name, t in times.items():
        print(f"{name:26s} {t * 1e3:8.2f} {'(' + format(medians[name] * 1e3, '.1f') + ')':>10s} "
              f"{cpu[name] * 1e3:8.2f} {t / base:8.2f}/{cpu[name] / base_cpu:<8.2f} "
              f"{t / rt:16.2f}x/{cpu[name] / rt_cpu:.2f}x")
    if faiss_note:
        print(f"{'faiss IndexFlatL2':26s} {'n/a':>8s}   ({faiss_note})")
    print(f"same neighbor sets as scikit-learn: {same_sk:.4f}")
    if "faiss IndexFlatL2" in fns:
        same_fa = float(np.mean(np.sort(ours.numpy(), 1) == np.sort(index.search(q, K)[1], 1)))
        print(f"same neighbor sets as faiss:        {same_fa:.4f}")

    # --- adding 1,000 examples ------------------------------------------------------------------
    new_x = rng.normal(size=(1000, D)).astype(np.float32)
    new = [{"features": v, "label": f"n{i % 5}"} for i, v in enumerate(new_x)]

    def add_1000():
        return run_updater(model, new)

    t_add = timeit(add_1000, repeats=5)
    grown = add_1000()
    assert grown.num_samples == N + 1000
    print(f"\nadd 1,000 examples to {N} (copy + validate + append + result): {t_add * 1e3:.1f} ms")

    # --- growth with the index size -------------------------------------------------------------
    print(f"\npredict_batch of {B} queries vs stored samples")
    print(f"{'samples':>9s} {'runtime ms':>11s} {'torch ms':>9s} {'ratio':>6s} {'rt cpu ms':>11s} "
          f"{'torch cpu':>9s} {'ratio':>6s} {'load s':>7s}")
    for n in (1_000, 10_000, 100_000):
        xn = rng.normal(size=(n, D)).astype(np.float32)
        yn = rng.integers(0, C, n)
        t0 = time.perf_counter()
        m = mp.load(knn_classifier(D, number_of_neighbors=K, samples=xn, labels=[f"c{v}" for v in yn]),
                    compute_units="cpu_only")
        t_load = time.perf_counter() - t0
        sn, s2n, yt = torch.from_numpy(xn), torch.from_numpy((xn * xn).sum(1)), torch.from_numpy(yn)

        def tb(sn=sn, s2n=s2n, yt=yt):
            qt = torch.from_numpy(q)
            d = (qt * qt).sum(1, keepdim=True) - 2.0 * qt @ sn.T + s2n
            d.clamp_min_(0)
            return torch.mode(yt[d.topk(K, dim=1, largest=False).indices], dim=1).values

        r, c, _ = interleaved({"rt": lambda m=m: m.predict_batch(batch), "torch": tb}, repeats=9)
        print(f"{n:9d} {r['rt'] * 1e3:11.2f} {r['torch'] * 1e3:9.2f} {r['rt'] / r['torch']:6.2f} "
              f"{c['rt'] * 1e3:11.2f} {c['torch'] * 1e3:9.2f} {c['rt'] / c['torch']:6.2f} {t_load:7.2f}")


if __name__ == "__main__":
    main()
