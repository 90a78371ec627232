"""Shared helpers for the benchmarks: median timing and plain-text tables."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence


def median_ms(fn: Callable[[], object], *, repeat: int = 20, warmup: int = 3,
              min_time: float = 0.0) -> float:
    """Median wall time of ``fn()`` in milliseconds (after ``warmup`` untimed calls)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start < min_time:
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def settle(fn: Callable[[], object]) -> None:
    """Let the previous backend's thread pool stop spinning, then warm ``fn``'s own pool up.

    torch (OpenMP) and each onnxruntime session keep their own worker threads, which spin for
    a while after a call; on 2 cores the spinning workers of the backend timed just before
    would slow down whichever backend is timed next.
    """
    time.sleep(0.05)
    fn()


def block_medians_ms(fns: dict[str, Callable[[], object]], rounds: int,
                     reps: dict[str, int]) -> dict[str, list[float]]:
    """Per function, ``rounds`` medians (ms) of ``reps[name]`` consecutive calls: functions take
    turns block by block (load changes hit all alike), each block after :func:`settle`, so no
    backend is timed beside another one's spinning threads. For comparing engines."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            settle(fn)
            times[k].append(median_ms(fn, repeat=reps[k], warmup=0))
    return times


def medians_ms(fns: dict[str, Callable[[], object]], *, repeat: int = 20,
               warmup: int = 2) -> dict[str, float]:
    """Median ms of each function, timed round-robin so load changes hit all of them alike
    (only for functions on one engine: see :func:`block_medians_ms`)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Format rows as an aligned text table (floats with 3 significant decimals)."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
        return str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, cells)])
