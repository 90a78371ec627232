"""Quantization-aware training: fake-quantized Conv2d/Linear weights with a straight-through
estimator.

``prepare_qat(module, nbits, mode)`` registers a :class:`WeightFakeQuant` parametrization on the
``weight`` of each selected ``nn.Conv2d``/``nn.Linear``: ``module.weight`` then *is* the quantized
weight (the float master copy lives in ``module.parametrizations.weight.original`` and gets the
gradients). In eval mode the forward uses exactly the values the Core ML decoder produces from
:meth:`WeightFakeQuant.export_params`, so the exported spec (``exporters.quantized``) predicts
what the QAT module predicts.

- ``mode="linear"``: per-channel (or per-layer) [min, max] n-bit grid,
  ``w_q = scale * round((w - min) / scale) + min``.
- ``mode="palettize"``: a learned lookup table of ``2**n`` values (k-means initialised; the
  table gets gradients through the gather, weights get the straight-through gradient);
  ``recluster_every=k`` re-runs k-means on the float weights every ``k`` training steps.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Union

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from mlpersonal.errors import TrainingError
from mlpersonal.quantization import kmeans_1d

QAT_TYPES = (nn.Conv2d, nn.Linear)
ModuleSelector = Union[None, Iterable[str], Callable[[str, nn.Module], bool]]


class WeightFakeQuant(nn.Module):
    """Parametrization ``w -> fake_quant(w)`` for a Conv2d/Linear weight (channel axis 0)."""

    def __init__(self, weight: torch.Tensor, nbits: int, mode: str = "linear",
                 per_channel: bool = True, recluster_every: Optional[int] = None,
                 learn_lut: bool = True):
        super().__init__()
        if not 1 <= int(nbits) <= 8:
            raise TrainingError(f"QAT nbits={nbits}: use 1..8")
        if mode not in ("linear", "palettize"):
            raise TrainingError(f"QAT mode {mode!r}: use 'linear' or 'palettize'")
        self.nbits, self.mode, self.per_channel = int(nbits), mode, bool(per_channel)
        self.channels = int(weight.shape[0])
        self.recluster_every = recluster_every
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        if mode == "palettize":
            lut = torch.from_numpy(self._kmeans(weight.detach())).to(weight.dtype)
            self.lut = nn.Parameter(lut, requires_grad=learn_lut)

    # --- tables -----------------------------------------------------------------------------
    def _rows(self, w: torch.Tensor) -> torch.Tensor:
        return w.reshape(self.channels, -1) if self.per_channel else w.reshape(1, -1)

    def _kmeans(self, w: torch.Tensor) -> np.ndarray:
        rows = self._rows(w).cpu().double().numpy()
        return np.stack([kmeans_1d(r, 1 << self.nbits)[0] for r in rows]).astype(np.float32)

    @torch.no_grad()
    def recluster(self, weight: torch.Tensor) -> None:
        """Reset the lookup table(s) to k-means centroids of ``weight``."""
        if self.mode == "palettize":
            self.lut.copy_(torch.from_numpy(self._kmeans(weight)).to(self.lut))

    # --- quantization -----------------------------------------------------------------------
    @torch.no_grad()
    def _linear(self, w: torch.Tensor):
        rows = self._rows(w.detach())
        a = rows.min(dim=1).values
        b = rows.max(dim=1).values
        scale = (b - a) / float((1 << self.nbits) - 1)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round((rows - a[:, None]) / safe[:, None])
        q = torch.where(scale[:, None] > 0, q, torch.zeros_like(q)).clamp_(0, (1 << self.nbits) - 1)
        return q, scale, a

    @torch.no_grad()
    def _assign(self, w: torch.Tensor):
        rows = self._rows(w.detach())
        lut = self.lut.detach()
        order = torch.argsort(lut, dim=1)
        sorted_lut = torch.gather(lut, 1, order)
        mids = (sorted_lut[:, :-1] + sorted_lut[:, 1:]) / 2
        pos = torch.searchsorted(mids.contiguous(), rows.contiguous())
        return torch.gather(order, 1, pos)  # index into the (unsorted) table, [rows, L]

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.steps += 1
            if (self.mode == "palettize" and self.recluster_every
                    and int(self.steps) % int(self.recluster_every) == 0):
                self.recluster(w.detach())
        if self.mode == "linear":
            q, scale, bias = self._linear(w)
            wq = (q * scale[:, None] + bias[:, None]).reshape(w.shape)
            if not self.training:
                return wq
            return w + (wq - w).detach()
        idx = self._assign(w)
        wq = torch.gather(self.lut, 1, idx).reshape(w.shape)
        if not self.training:
            return wq
        return wq + (w - w.detach())

    @torch.no_grad()
    def export_params(self, w: torch.Tensor) -> dict:
        """What Core ML stores for float weight ``w``: ``{kind, nbits, q, scale, bias | lut}``.

        ``q`` is flat uint8 in the weight's row-major order; per-channel values index axis 0.
        """
        if self.mode == "linear":
            q, scale, bias = self._linear(w)
            return {"kind": "linear", "nbits": self.nbits,
                    "q": q.reshape(-1).to(torch.uint8).cpu().numpy(),
                    "scale": scale.float().cpu().numpy(), "bias": bias.float().cpu().numpy()}
        idx = self._assign(w)
        return {"kind": "lut", "nbits": self.nbits,
                "q": idx.reshape(-1).to(torch.uint8).cpu().numpy(),
                "lut": self.lut.detach().float().cpu().numpy().reshape(-1)}

    def extra_repr(self) -> str:
        return f"nbits={self.nbits}, mode={self.mode}, per_channel={self.per_channel}"


def _selector(modules: ModuleSelector) -> Callable[[str, nn.Module], bool]:
    if modules is None:
        return lambda name, m: isinstance(m, QAT_TYPES)
    if callable(modules):
        return lambda name, m: isinstance(m, QAT_TYPES) and bool(modules(name, m))
    names = {modules} if isinstance(modules, str) else set(modules)
    return lambda name, m: name in names


def prepare_qat(module: nn.Module, nbits: int, mode: str = "linear",
                per_channel: Optional[bool] = None, modules: ModuleSelector = None, *,
                recluster_every: Optional[int] = None, learn_lut: bool = True) -> nn.Module:
    """Make ``module``'s Conv2d/Linear weights fake-quantized (in place; returns ``module``).

    ``per_channel`` defaults to True for ``linear`` (one scale/bias per output channel) and to
    False for ``palettize`` (one table per layer: what Core ML's validator accepts).
    ``modules``: names (module paths), or a predicate ``(name, module) -> bool``; default every
    Conv2d/Linear. Layers marked updatable must stay float in Core ML: leave them out.
    """
    if per_channel is None:
        per_channel = mode == "linear"
    choose = _selector(modules)
    targets = [(n, m) for n, m in module.named_modules() if n and choose(n, m)]
    if isinstance(modules, (list, tuple, set, str)):
        wanted = {modules} if isinstance(modules, str) else set(modules)
        found = {n for n, _ in targets}
        bad = [n for n in wanted if n not in found or not isinstance(dict(targets)[n], QAT_TYPES)]
        if bad:
            raise TrainingError(f"prepare_qat: {sorted(bad)} are not Conv2d/Linear submodules")
    if not targets:
        raise TrainingError("prepare_qat found no Conv2d/Linear module to quantize")
    for name, m in targets:
        if parametrize.is_parametrized(m, "weight"):
            raise TrainingError(f"{name}.weight is already parametrized (prepare_qat twice?)")
        if isinstance(m, nn.Conv2d) and m.weight.shape[0] != m.out_channels:
            raise TrainingError(f"{name}: unexpected weight layout")
        fq = WeightFakeQuant(m.weight, nbits, mode, per_channel, recluster_every, learn_lut)
        fq.to(m.weight.device)
        parametrize.register_parametrization(m, "weight", fq)
    return module


def qat_layers(module: nn.Module) -> dict[str, tuple[nn.Module, WeightFakeQuant]]:
    """``{module path: (submodule, its WeightFakeQuant)}`` for every QAT-prepared weight."""
    out = {}
    for name, m in module.named_modules():
        if parametrize.is_parametrized(m, "weight"):
            for p in m.parametrizations.weight:
                if isinstance(p, WeightFakeQuant):
                    out[name] = (m, p)
    return out


def recluster(module: nn.Module) -> None:
    """Reset every palettized layer's table to k-means of its current float weights."""
    for m, fq in qat_layers(module).values():
        fq.recluster(m.parametrizations.weight.original.detach())
