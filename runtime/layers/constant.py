"""loadConstant, loadConstantND and the fill kinds: outputs computed once at build time."""

from __future__ import annotations

import numpy as np
import torch

from . import register


@register("loadConstant")
def load_constant(layer, ctx):
    """A [C, H, W] constant; output (1, C, H, W), broadcast over the batch by later layers."""
    shape = [int(s) for s in layer.loadConstant.shape]
    if len(shape) != 3:
        raise ctx.fail(f"shape {shape} must be [C, H, W]")
    t = ctx.weights(layer.loadConstant.data, shape, "data")
    t = t if ctx.nd else t.unsqueeze(0)
    return lambda *_: t


@register("loadConstantND")
def load_constant_nd(layer, ctx):
    shape = [int(s) for s in layer.loadConstantND.shape]
    t = ctx.weights(layer.loadConstantND.data, shape, "data")
    return lambda *_: t


@register("fillStatic")
def fill_static(layer, ctx):
    p = layer.fillStatic
    t = torch.full([int(s) for s in p.targetShape], float(p.value), device=ctx.device)
    return lambda *_: t


@register("fillLike")
def fill_like(layer, ctx):
    value = float(layer.fillLike.value)
    return lambda x: torch.full_like(x, value)


@register("rangeStatic")
def range_static(layer, ctx):
    p = layer.rangeStatic
    t = ctx.const(np.arange(p.startValue, p.endValue, p.stepSizeValue or 1.0))
    return lambda *_: t
