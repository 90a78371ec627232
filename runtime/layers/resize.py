"""upsample (nearest / bilinear with Core ML's grid modes) and resizeBilinear."""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Callable

import torch
import torch.nn.functional as F

from . import register, spatial

NN, BILINEAR = 0, 1
DEFAULT, ALIGN_CORNERS_TRUE, ALIGN_CORNERS_FALSE = 0, 1, 2


def _linear_axis(x: torch.Tensor, grid: torch.Tensor, dim: int) -> torch.Tensor:
    """Sample ``x`` along ``dim`` at fractional positions ``grid`` (already within [0, X-1])."""
    size = x.shape[dim]
    lo = grid.floor().long().clamp(0, size - 1)
    hi = (lo + 1).clamp(max=size - 1)
    frac = (grid - lo.to(grid.dtype)).to(x.dtype)
    shape = [1] * x.dim()
    shape[dim] = -1
    frac = frac.reshape(shape)
    return x.index_select(dim, lo) * (1 - frac) + x.index_select(dim, hi) * frac


def bilinear(grid_fn: Callable[[int, int], list], out_size: Callable[[int, int], tuple]):
    """A bilinear resize over the last two axes; ``grid_fn(X_in, X_out)`` gives source positions."""

    @lru_cache(maxsize=32)
    def grids(h, w, device):
        oh, ow = out_size(h, w)
        gh = torch.tensor(grid_fn(h, oh), dtype=torch.float64, device=device)
        gw = torch.tensor(grid_fn(w, ow), dtype=torch.float64, device=device)
        return gh, gw

    def f(x):
        gh, gw = grids(x.shape[-2], x.shape[-1], x.device)
        return _linear_axis(_linear_axis(x, gh, -2), gw, -1)

    return f


def _clamped(points, size):
    return [min(max(p, 0.0), size - 1.0) for p in points]


def _upsample_grid(mode):
    def grid(x_in, x_out):
        if mode == ALIGN_CORNERS_TRUE:
            step = (x_in - 1) / (x_out - 1) if x_out > 1 else 0.0
            return _clamped([i * step for i in range(x_out)], x_in)
        if mode == ALIGN_CORNERS_FALSE:
            step = x_in / x_out
            return _clamped([i * step + 0.5 * step - 0.5 for i in range(x_out)], x_in)
        step = (x_in - x_in / x_out) / (x_out - 1) if x_out > 1 else 0.0
        return _clamped([i * step for i in range(x_out)], x_in)

    return grid


@register("upsample")
def upsample(layer, ctx):
    p = layer.upsample
    frac = [float(v) for v in p.fractionalScalingFactor]
    ints_ = [int(v) for v in p.scalingFactor] or [1, 1]
    sh, sw = (frac[0], frac[1]) if frac else (ints_[0], ints_[1] if len(ints_) > 1 else ints_[0])
    if int(p.mode) == NN:
        if frac:
            raise ctx.fail("fractional scaling factors need BILINEAR mode")
        return lambda x: x.repeat_interleave(sh, dim=-2).repeat_interleave(sw, dim=-1)
    out = lambda h, w: (int(math.floor(h * sh)), int(math.floor(w * sw)))  # noqa: E731
    return spatial(bilinear(_upsample_grid(int(p.linearUpsampleMode)), out))


STRICT_ALIGN_ENDPOINTS, ALIGN_ENDPOINTS, UPSAMPLE_MODE, ROI_ALIGN = 0, 1, 2, 3


def _linspace(start, end, n):
    return [start + (end - start) * i / (n - 1) for i in range(n)] if n > 1 else [start]


def _sampling_grid(method):
    def grid(x_in, n):
        if method == STRICT_ALIGN_ENDPOINTS:
            return _linspace(0.0, x_in - 1.0, n)
        if method == ALIGN_ENDPOINTS:
            return [(x_in - 1) / 2.0] if n == 1 else _linspace(0.0, x_in - 1.0, n)
        if method == UPSAMPLE_MODE:
            return _clamped(_linspace(0.0, x_in - x_in / n, n), x_in)
        spacing = max(1.0, x_in - 1.0) / n
        start = 0.5 * spacing
        return _clamped(_linspace(start, start + (n - 1) * spacing, n), x_in)

    return grid


@register("resizeBilinear")
def resize_bilinear(layer, ctx):
    p = layer.resizeBilinear
    size = [int(v) for v in p.targetSize] or [1, 1]
    oh, ow = size[0], size[1] if len(size) > 1 else size[0]
    method = int(p.mode.samplingMethod)
    if method == STRICT_ALIGN_ENDPOINTS:  # torch's align_corners=True grid, no size read in Python
        return spatial(lambda x: F.interpolate(x, size=(oh, ow), mode="bilinear", align_corners=True))
    return spatial(bilinear(_sampling_grid(method), lambda h, w: (oh, ow)))
