"""Example inputs the exporters run a module on, made where the module's weights are."""

from __future__ import annotations

from typing import Callable, Sequence

import torch


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of ``module``'s first parameter or buffer (cpu for a module with neither)."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def probe_inputs(module: torch.nn.Module, shapes: Sequence[Sequence[int]],
                 fill: Callable[..., torch.Tensor] = torch.rand) -> tuple[torch.Tensor, ...]:
    """One ``fill(*shape)`` tensor per shape on ``module``'s device (a model trained on a GPU
    exports as it is)."""
    device = module_device(module)
    return tuple(fill(*shape, device=device) for shape in shapes)
