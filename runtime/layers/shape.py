"""flatten, concat and other layers that move data between axes."""

from __future__ import annotations

import torch

from . import register


@register("flatten")
def flatten(layer, ctx):
    channel_last = int(layer.flatten.mode) == 1

    def f(x):
        if channel_last:
            x = x.movedim(-3, -1)
        lead = x.shape[:-3]
        return x.reshape(*lead, -1, 1, 1)

    return f


@register("concat")
def concat(layer, ctx):
    axis = -4 if layer.concat.sequenceConcat else -3
    return lambda *xs: torch.cat(xs, dim=axis)
