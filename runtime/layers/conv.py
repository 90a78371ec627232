"""convolution (and deconvolution) layers."""

from __future__ import annotations

import math

import torch.nn.functional as F

from . import ints, register, spatial

TOP_LEFT_HEAVY = 1


def same_padding(size: int, k: int, s: int, d: int, top_left_heavy: bool = False) -> tuple[int, int]:
    """Core ML 'same' padding for one spatial axis: (before, after)."""
    out = math.ceil(size / s)
    total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
    small, big = total // 2, total - total // 2
    return (big, small) if top_left_heavy else (small, big)


def border_amounts(border) -> tuple[int, int, int, int]:
    """A BorderAmounts message -> (top, bottom, left, right)."""
    amounts = list(border.borderAmounts)
    if not amounts:
        return (0, 0, 0, 0)
    h, w = amounts[0], amounts[1] if len(amounts) > 1 else amounts[0]
    return (int(h.startEdgeSize), int(h.endEdgeSize), int(w.startEdgeSize), int(w.endEdgeSize))


def explicit_padding(valid_or_same, kind, spatial_size, kernel, stride, dilation):
    """(top, bottom, left, right) padding for a conv/pool padding oneof."""
    if kind == "same":
        heavy = valid_or_same.asymmetryMode == TOP_LEFT_HEAVY
        ph = same_padding(spatial_size[0], kernel[0], stride[0], dilation[0], heavy)
        pw = same_padding(spatial_size[1], kernel[1], stride[1], dilation[1], heavy)
        return ph + pw
    return border_amounts(valid_or_same.paddingAmounts)


def _conv_with_pads(w, b, stride, dil, groups):
    def run(x, pads):
        t, bo, l, r = pads
        if t == bo and l == r:
            return F.conv2d(x, w, b, stride, (t, l), dil, groups)
        return F.conv2d(F.pad(x, (l, r, t, bo)), w, b, stride, 0, dil, groups)

    return run


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
        if cout % groups:
            raise ctx.fail(f"outputChannels {cout} is not divisible by nGroups {groups}")
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
        return spatial(_deconvolution(p, w, b, k, stride, dil, groups, pad_kind, pad_msg))

    conv = _conv_with_pads(w, b, stride, dil, groups)
    if pad_kind == "valid":
        pads = explicit_padding(pad_msg, "valid", None, k, stride, dil)
        return spatial(lambda x: conv(x, pads))
    return spatial(lambda x: conv(x, explicit_padding(pad_msg, "same", x.shape[-2:], k, stride, dil)))


def _deconvolution(p, w, b, k, stride, dil, groups, pad_kind, pad_msg):
    """Transposed convolution: the full result, cropped by the padding (or to ``outputShape``).

    Rows beyond the full result (an ``outputShape`` larger than it) hold the bias only.
    """
    out_shape = [int(s) for s in p.outputShape]
    pads = border_amounts(pad_msg.paddingAmounts) if pad_kind == "valid" else None
    heavy = pad_kind == "same" and pad_msg.asymmetryMode == TOP_LEFT_HEAVY

    def window(full: int, size_in: int, s: int, before: int, after: int) -> tuple[int, int]:
        if pads is not None:
            start, n = before, full - before - after
        else:
            n = size_in * s
            total = max(full - n, 0)
            start = total - total // 2 if heavy else total // 2
        return start, n

    def deconv(x):
        y = F.conv_transpose2d(x, w, None, stride=stride, groups=groups, dilation=dil)
        H, W = y.shape[-2:]
        t, bo, l, r = pads if pads is not None else (0, 0, 0, 0)
        top, oh = window(H, x.shape[-2], stride[0], t, bo)
        left, ow = window(W, x.shape[-1], stride[1], l, r)
        if out_shape:
            oh, ow = out_shape[0], out_shape[1] if len(out_shape) > 1 else out_shape[0]
        y = F.pad(y, (-left, ow + left - W, -top, oh + top - H))
        return y if b is None else y + b.reshape(-1, 1, 1)

    return deconv
