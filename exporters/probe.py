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
                 fill: Callable[..., torch.Tensor] = torch.rand,
                 inputs: Sequence = ()) -> tuple[torch.Tensor, ...]:
    """One ``fill(*shape)`` tensor per shape on ``module``'s device (a model trained on a GPU
    exports as it is); for ``inputs`` (the declared input types) of ``dtype="int32"``: token ids
    0 and 1 (int64, what nn.Embedding reads)."""
    device = module_device(module)
    ints = [getattr(i, "dtype", "float32") == "int32" for i in inputs] + [False] * len(shapes)
    return tuple(torch.randint(0, 2, tuple(shape), device=device) if ints[k] else fill(*shape, device=device)
                 for k, shape in enumerate(shapes))
