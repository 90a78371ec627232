"""compute_units -> torch device, and the arithmetic on it (float32, or float16 autocast on GPUs).

Core ML's ``MLModelConfiguration.computeUnits`` maps to torch devices:

==================  ==========================================================================
``cpu_only``        cpu
``cpu_and_gpu``     cuda, else mps, else cpu (with a RuntimeWarning saying so)
``all``             cuda, else mps, else cpu (silently: "all" includes the cpu)
``cpu_and_ne``      cpu (there is no Neural Engine off Apple, and this choice excludes the GPU;
                    a RuntimeWarning says so)
==================  ==========================================================================

Accepted spellings: the snake-case names above, coremltools' ``ComputeUnit`` members or their
names (``"CPU_ONLY"``, ``"ComputeUnit.CPU_AND_GPU"``, ``ct.ComputeUnit.ALL``) and Core ML's Swift
names (``"cpuOnly"``, ``"cpuAndGPU"``, ``"all"``, ``"cpuAndNeuralEngine"``).

``allow_low_precision_accumulation_on_gpu=True`` runs predictions under ``torch.autocast`` with
float16 on cuda/mps (Core ML's flag of the same name); it has no effect on the cpu. Without it a
cuda model computes in float32 throughout: TF32, which cuDNN uses by default for convolutions and
LSTMs, is off while the runtime predicts or trains.
"""

from __future__ import annotations

import contextlib
import re
import threading
import warnings
from typing import Any

import torch

from mlpersonal.errors import MLPersonalError

COMPUTE_UNITS = ("cpu_only", "cpu_and_gpu", "cpu_and_ne", "all")
_ALIASES = {"cpu_and_neural_engine": "cpu_and_ne", "cpuandgpu": "cpu_and_gpu",
            "cpuonly": "cpu_only", "cpu_and_n_e": "cpu_and_ne"}
GPU_TYPES = ("cuda", "mps")


def normalize_compute_units(compute_units: Any) -> str:
    """Any accepted spelling -> one of :data:`COMPUTE_UNITS`."""
    name = getattr(compute_units, "name", None)  # an enum member, e.g. ct.ComputeUnit.ALL
    text = str(name if isinstance(name, str) else compute_units)
    text = text.split(".")[-1]                          # "ComputeUnit.CPU_ONLY" -> "CPU_ONLY"
    text = re.sub(r"(?<=[a-z])(?=[A-Z])", "_", text)    # "cpuAndGPU" -> "cpu_And_GPU"
    cu = text.lower()
    cu = _ALIASES.get(cu, cu)
    if cu not in COMPUTE_UNITS:
        raise MLPersonalError(
            f"compute_units={compute_units!r} is not one of {', '.join(COMPUTE_UNITS)} "
            "(coremltools' ComputeUnit names CPU_ONLY, CPU_AND_GPU, CPU_AND_NE, ALL work too)"
        )
    return cu


def _gpu() -> torch.device | None:
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return None


def select_device(compute_units: Any = "all") -> torch.device:
    """The torch device for ``compute_units`` (see the module docstring)."""
    cu = normalize_compute_units(compute_units)
    if cu == "cpu_only":
        return torch.device("cpu")
    if cu == "cpu_and_ne":
        warnings.warn("compute_units='cpu_and_ne': there is no Neural Engine outside Apple "
                      "devices and this choice excludes the GPU; running on cpu",
                      RuntimeWarning, stacklevel=3)
        return torch.device("cpu")
    gpu = _gpu()
    if gpu is not None:
        return gpu
    if cu == "cpu_and_gpu":
        warnings.warn("compute_units='cpu_and_gpu': no CUDA or Metal device found; running on cpu",
                      RuntimeWarning, stacklevel=3)
    return torch.device("cpu")


def uses_low_precision(device: torch.device, allow_low_precision_accumulation_on_gpu: bool) -> bool:
    """Whether reduced-precision autocast applies: asked for, and running on a GPU."""
    return bool(allow_low_precision_accumulation_on_gpu) and torch.device(device).type in GPU_TYPES


def precision(device: torch.device, low: bool):
    """The arithmetic a model runs with on ``device``: ``torch.autocast`` to float16 when ``low``
    (on a GPU), else float32 throughout: on cuda, TF32 (cuDNN's default for convolutions and
    LSTMs, ~1e-3 relative error) is off while the context is open. A no-op on the cpu."""
    kind = torch.device(device).type
    if low and kind in GPU_TYPES:
        return torch.autocast(device_type=kind, dtype=torch.float16)
    if kind == "cuda":
        return _no_tf32()
    return contextlib.nullcontext()


_tf32_lock = threading.Lock()
_tf32_users = [0, None]  # open contexts (any thread), the flags saved by the first


@contextlib.contextmanager
def _no_tf32():
    """TF32 off in cuDNN and cuBLAS until the last open context (of any thread) closes; the
    process's own settings come back then."""
    with _tf32_lock:
        if _tf32_users[0] == 0:
            _tf32_users[1] = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        _tf32_users[0] += 1
    try:
        yield
    finally:
        with _tf32_lock:
            _tf32_users[0] -= 1
            if _tf32_users[0] == 0:
                torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = _tf32_users[1]
