"""CUDA prediction plan: the network captured once per input signature as a CUDA graph.

On a GPU the eager network's time at small and medium batches is mostly kernel launches from
Python (one per layer op). A captured graph replays every kernel of a forward pass in one launch.
Per signature (input names, shapes, dtypes) the first call warms the network up on a side
stream, captures one forward pass into a graph with static input/output buffers, replays it and
checks the replay against the eager result; a signature whose capture fails (an op that syncs
with the host, data-dependent shapes) or disagrees runs eagerly from then on. Calls copy their
inputs into the static buffers, replay, and copy the wanted outputs out, under one lock. A replay
reads the weights' memory as it is then, so weights trained in place (all the runtime's
optimizers do) need no re-capture. Networks with custom layers are not captured (their Python
would run only once, at capture).
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Callable, Optional

import torch

log = logging.getLogger(__name__)

#: signatures kept captured at once (each holds its own memory pool); the least recently used
#: one is dropped beyond this
MAX_GRAPHS = 8


class CudaGraphPlan:
    """``run(blobs, n)`` -> the wanted blobs of ``fn(blobs)`` through a captured graph, or None
    (the caller runs ``fn`` eagerly)."""

    def __init__(self, fn: Callable[[dict], dict], wanted: list[str]):
        self.fn, self.wanted = fn, list(wanted)
        self._graphs: collections.OrderedDict = collections.OrderedDict()
        self._failed: set = set()
        self._lock = threading.Lock()
        #: why the last signature was not captured (None: every capture so far succeeded)
        self.last_fallback_reason: Optional[str] = None

    @staticmethod
    def _key(blobs: dict) -> Optional[tuple]:
        if not all(isinstance(v, torch.Tensor) and v.is_cuda for v in blobs.values()):
            return None
        return tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(blobs.items()))

    def run(self, blobs: dict, n: int) -> Optional[dict]:
        key = self._key(blobs)
        if key is None or key in self._failed:
            return None
        with self._lock:
            entry = self._graphs.get(key)
            if entry is None:
                entry = self._capture(key, blobs)
                if entry is None:
                    return None
            self._graphs.move_to_end(key)
            graph, ins, outs = entry
            for k, v in blobs.items():
                ins[k].copy_(v)
            graph.replay()
            return {k: outs[k].clone() for k in self.wanted}

    def _capture(self, key: tuple, blobs: dict):
        try:
            ins = {k: v.clone() for k, v in blobs.items()}
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # lazy initialisation and cuDNN's algorithm choice
                    ref = self.fn(ins)
            torch.cuda.current_stream().wait_stream(side)
            ref = {k: ref[k].clone() for k in self.wanted}
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                outs = self.fn(ins)
            outs = {k: outs[k] for k in self.wanted}
            graph.replay()
            for k in self.wanted:
                if not torch.allclose(outs[k], ref[k], rtol=1e-5, atol=1e-6, equal_nan=True):
                    raise ValueError(f"the replayed graph's {k!r} differs from the eager network's")
        except Exception as e:  # noqa: BLE001  (any failure: this signature runs eagerly)
            self._failed.add(key)
            self.last_fallback_reason = f"{type(e).__name__}: {e}"
            log.debug("CUDA graph capture failed for %s: %s", key, self.last_fallback_reason)
            return None
        if len(self._graphs) >= MAX_GRAPHS:
            self._graphs.popitem(last=False)
        self._graphs[key] = entry = (graph, ins, outs)
        return entry
