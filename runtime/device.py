"""compute_units -> torch device."""

from __future__ import annotations

import warnings

import torch

from mlpersonal.errors import MLPersonalError

COMPUTE_UNITS = ("cpu_only", "cpu_and_gpu", "cpu_and_ne", "all")


def select_device(compute_units: str = "all") -> torch.device:
    """cpu for ``cpu_only``; cuda or mps when present for the others, else cpu with a note."""
    cu = str(compute_units).lower().replace("computeunit.", "")
    if cu not in COMPUTE_UNITS:
        raise MLPersonalError(
            f"compute_units={compute_units!r} is not one of {', '.join(COMPUTE_UNITS)}"
        )
    if cu == "cpu_only":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    if cu == "cpu_and_gpu":
        warnings.warn("compute_units='cpu_and_gpu': no CUDA or Metal device found; running on cpu",
                      RuntimeWarning, stacklevel=3)
    return torch.device("cpu")
