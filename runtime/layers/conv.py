"""convolution (and deconvolution) layers."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import ints, register


def same_padding(size: int, k: int, s: int, d: int, top_left_heavy: bool = False) -> tuple[int, int]:
    """Core ML 'same' padding for one spatial axis: (before, after)."""
    out = math.ceil(size / s)
    total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
    small, big = total // 2, total - total // 2
    return (big, small) if top_left_heavy else (small, big)


def explicit_padding(valid_or_same, kind, spatial, kernel, stride, dilation):
    """(top, bottom, left, right) padding for a conv/pool padding oneof."""
    if kind == "same":
        heavy = valid_or_same.asymmetryMode == 1  # TOP_LEFT_HEAVY
        ph = same_padding(spatial[0], kernel[0], stride[0], dilation[0], heavy)
        pw = same_padding(spatial[1], kernel[1], stride[1], dilation[1], heavy)
        return ph + pw
    amounts = list(valid_or_same.paddingAmounts.borderAmounts)
    if not amounts:
        return (0, 0, 0, 0)
    h, w = amounts[0], amounts[1] if len(amounts) > 1 else amounts[0]
    return (h.startEdgeSize, h.endEdgeSize, w.startEdgeSize, w.endEdgeSize)


@register("convolution")
def convolution(layer, ctx):
    p = layer.convolution
    groups = max(int(p.nGroups), 1)
    k = ints(p.kernelSize, (3, 3))
    stride = ints(p.stride, (1, 1))
    dil = ints(p.dilationFactor, (1, 1))
    cout, kc = int(p.outputChannels), int(p.kernelChannels)
    upd = layer.isUpdatable
    if p.isDeconvolution:
        wshape = (kc, cout // groups, k[0], k[1])
    else:
        wshape = (cout, kc, k[0], k[1])
    if p.isDeconvolution:  # quantized along axis 1 (Cout/groups), as coremltools does
        w = ctx.weights(p.weights, wshape, "weights", updatable=upd,
                        channels=wshape[1], inner=k[0] * k[1])
    else:
        w = ctx.weights(p.weights, wshape, "weights", updatable=upd, channels=cout)
    b = ctx.weights(p.bias, (cout,), "bias", updatable=upd) if p.hasBias else None
    pad_kind = p.WhichOneof("ConvolutionPaddingType") or "valid"
    pad_msg = getattr(p, pad_kind)

    if p.isDeconvolution:
        out_shape = [int(s) for s in p.outputShape]
        pads = explicit_padding(pad_msg, "valid", None, k, stride, dil) if pad_kind == "valid" else None

        def deconv(x):
            y = F.conv_transpose2d(x, w, b, stride=stride, groups=groups, dilation=dil)
            H, W = y.shape[-2:]
            if pads is not None:
                t, bo, l, r = pads
                y = y[..., t:H - bo, l:W - r]
            elif pad_kind == "same":
                oh, ow = x.shape[-2] * stride[0], x.shape[-1] * stride[1]
                t, l = (H - oh) // 2, (W - ow) // 2
                y = y[..., t:t + oh, l:l + ow]
            if out_shape:
                y = y[..., : out_shape[0], : out_shape[1]]
            return y

        return deconv

    if pad_kind == "valid":
        t, bo, l, r = explicit_padding(pad_msg, "valid", None, k, stride, dil)
        if t == bo and l == r:
            return lambda x: F.conv2d(x, w, b, stride, (t, l), dil, groups)
        return lambda x: F.conv2d(F.pad(x, (l, r, t, bo)), w, b, stride, 0, dil, groups)

    def conv_same(x):
        t, bo, l, r = explicit_padding(pad_msg, "same", x.shape[-2:], k, stride, dil)
        if t == bo and l == r:
            return F.conv2d(x, w, b, stride, (t, l), dil, groups)
        return F.conv2d(F.pad(x, (l, r, t, bo)), w, b, stride, 0, dil, groups)

    return conv_same
