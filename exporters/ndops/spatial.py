"""Convolutions, pooling, batch/instance norm and upsampling in ND mode: the rank-5 converters
of :mod:`exporters.ops`, run on the example's rank-5 layout with a leading 1.

Core ML's convolution and pooling layers want rank >= 4 in ND mode (batchnorm >= 3) and work on
the last three axes (C, H, W). An example ``(C, H, W)`` is expanded to ``(1, C, H, W)``, a
``(C, L)`` map to ``(1, C, 1, L)`` (a 1-D layer is a 1 x k one, as in the rank-5 export), a
``(C,)`` vector to ``(1, C, 1, 1)``; the classic converter emits its one layer on that blob, and
the result is squeezed back to the torch shape. So a ViT patch embedding or a CNN stem feeding
attention exports in one ND network, and its convolutions stay updatable.
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from ..ops import activation, arg, conv, helper_layer, normalization, pooling
from . import register_function, register_module

#: rank-5 converters whose layers (convolution, pooling, batchnorm, mvn + scale, upsample /
#: resizeBilinear) all read and write the (C, H, W) layout, with no classic reshape (which ND
#: mode allows only at rank 5)
LIFTED = frozenset({
    conv.conv2d, conv.conv_transpose, pooling.pool1d, pooling.pool1d_fn, pooling.adaptive_pool1d,
    pooling.max_pool2d, pooling.max_pool2d_fn, pooling.avg_pool2d, pooling.avg_pool2d_fn,
    pooling.adaptive_avg_pool2d, pooling.adaptive_max_pool2d, pooling.adaptive_avg_pool2d_fn,
    pooling.adaptive_max_pool2d_fn, normalization.batchnorm, normalization.instance_norm,
})

#: per-example rank -> the axes expandDims adds to reach the rank-5 layout (1, C, H, W)
_LAYOUT_AXES = {1: [0, 2, 3], 2: [0, 2], 3: [0]}


def lifted(converter):
    """``converter`` (one of :data:`LIFTED`) as an ND converter."""

    def convert(ctx, node, target) -> str:
        x = node.args[0]
        rank_in, rank_out = (len(ctx.shape(t)) - 1 for t in (x, node))
        if rank_in not in _LAYOUT_AXES or rank_out not in _LAYOUT_AXES:
            raise ctx.unsupported(node, f"a convolution/pooling of a rank-{rank_in + 1} tensor")
        expanded = helper_layer(ctx, node, "nchw")
        ctx.builder.add_expand_dims(expanded, ctx.inp(x), expanded, _LAYOUT_AXES[rank_in])
        own = ctx.blobs[x]
        ctx.blobs[x] = expanded  # what the classic converter reads as its input
        try:
            out = converter(ctx, node, target)
        finally:
            ctx.blobs[x] = own
        squeezed = ctx.new_blob(f"{out}_squeezed")
        ctx.used_layers.add(squeezed)
        ctx.builder.add_squeeze(squeezed, out, squeezed, axes=_LAYOUT_AXES[rank_out])
        return squeezed

    return convert


def _bilinear_half_pixel(ctx, node, target) -> str:
    """torch's default bilinear grid (align_corners=False) by whole factors: Core ML 3's upsample
    layer in ALIGN_CORNERS_FALSE mode (an ND-only option)."""
    (h, w), (oh, ow) = ctx.shape(node.args[0])[2:], ctx.shape(node)[2:]
    if oh % h or ow % w or oh < h or ow < w:
        raise ctx.unsupported(node, f"resizing {h}x{w} to {oh}x{ow} (whole upsampling factors only)")
    name, out = ctx.layer(node)
    ctx.builder.add_upsample(name, oh // h, ow // w, ctx.inp(node.args[0]), out, mode="BILINEAR",
                             linear_upsample_mode="ALIGN_CORNERS_FALSE")
    return out


@register_module(nn.Upsample)
@register_function(F.interpolate, F.upsample)
def upsample(ctx, node, target) -> str:
    """Upsampling of (N, C, H, W): bilinear with align_corners=False through Core ML 3's mode,
    everything else as the rank-5 export does (on the (1, C, H, W) layout)."""
    if isinstance(target, nn.Module):
        mode, align = target.mode, bool(target.align_corners)
    else:
        mode, align = arg(node, 3, "mode", "nearest"), bool(arg(node, 4, "align_corners", False))
    if mode == "bilinear" and not align and len(ctx.shape(node.args[0])) == 4:
        return lifted(_bilinear_half_pixel)(ctx, node, target)
    return lifted(activation.upsample)(ctx, node, target)
