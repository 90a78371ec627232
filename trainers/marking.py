"""Marking which modules stay updatable on device.

``mark_updatable(module)`` / ``freeze(module)`` set ``requires_grad`` on the module's parameters
and the marker attribute :data:`MARKER` on the module and on every submodule that owns
parameters. With ``convert(..., respect_trainable=True)`` the exporter makes updatable exactly the
layers whose parameters require grad or whose marker is ``True`` (a marker ``False`` wins over
``requires_grad``). Core ML can only update convolution, fully-connected and LSTM layers, so
mark ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Linear`` / ``nn.LSTM`` modules (or containers holding
only those and parameter-free modules); the exporter refuses anything else, naming the module.
"""

from __future__ import annotations

import torch

#: Attribute the exporter reads: True (updatable), False (frozen), absent (follow requires_grad).
MARKER = "_mlpersonal_updatable"


def _set(module: torch.nn.Module, updatable: bool) -> torch.nn.Module:
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(module).__name__}")
    for p in module.parameters():
        p.requires_grad_(updatable)
    setattr(module, MARKER, updatable)
    for sub in module.modules():
        if any(True for _ in sub.parameters(recurse=False)):
            setattr(sub, MARKER, updatable)
    return module


def mark_updatable(module: torch.nn.Module) -> torch.nn.Module:
    """Mark ``module`` (and its parameter-owning submodules) updatable on device; returns it."""
    return _set(module, True)


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """Freeze ``module``: no gradients in torch, not updatable on device; returns it."""
    return _set(module, False)


def is_marked_updatable(module: torch.nn.Module) -> bool:
    """True when ``module`` owns parameters and is marked, or (unmarked) any of them requires grad
    (Core ML updates a layer's weights and bias together)."""
    own = list(module.parameters(recurse=False))
    if not own:
        return False
    mark = getattr(module, MARKER, None)
    if mark is not None:
        return bool(mark)
    return any(p.requires_grad for p in own)
