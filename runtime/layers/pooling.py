"""pooling layers: max / average / L2, global, valid / same / includeLastPixel padding."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import ints, register, spatial
from .conv import explicit_padding

MAX, AVERAGE, L2 = 0, 1, 2


@register("pooling")
def pooling(layer, ctx):
    p = layer.pooling
    kind = int(p.type)
    if p.globalPooling:
        if kind == MAX:
            return lambda x: torch.amax(x, dim=(-2, -1), keepdim=True)
        if kind == AVERAGE:
            return lambda x: torch.mean(x, dim=(-2, -1), keepdim=True)
        return lambda x: torch.sqrt(torch.sum(x * x, dim=(-2, -1), keepdim=True))
    k = ints(p.kernelSize, (3, 3))
    s = ints(p.stride, (1, 1))
    pad_kind = p.WhichOneof("PoolingPaddingType") or "valid"
    exclude_pad = bool(p.avgPoolExcludePadding)

    def pool(x, pads, ceil_mode=False):
        t, b, l, r = pads
        symmetric = t == b and l == r and t <= k[0] // 2 and l <= k[1] // 2
        if kind == MAX:
            if symmetric:
                return F.max_pool2d(x, k, s, (t, l), ceil_mode=ceil_mode)
            x = F.pad(x, (l, r, t, b), value=float("-inf"))
            return F.max_pool2d(x, k, s, 0, ceil_mode=ceil_mode)
        if kind == AVERAGE:
            if symmetric:
                return F.avg_pool2d(x, k, s, (t, l), ceil_mode=ceil_mode, count_include_pad=not exclude_pad)
            if exclude_pad:
                ones = F.pad(torch.ones_like(x[..., :1, :, :]), (l, r, t, b))
                xs = F.avg_pool2d(F.pad(x, (l, r, t, b)), k, s, 0, ceil_mode=ceil_mode, divisor_override=1)
                cnt = F.avg_pool2d(ones, k, s, 0, ceil_mode=ceil_mode, divisor_override=1)
                return xs / cnt
            return F.avg_pool2d(F.pad(x, (l, r, t, b)), k, s, 0, ceil_mode=ceil_mode)
        sq = F.avg_pool2d(F.pad(x * x, (l, r, t, b)), k, s, 0, ceil_mode=ceil_mode, divisor_override=1)
        return torch.sqrt(sq)

    if pad_kind == "includeLastPixel":
        amounts = [int(a) for a in p.includeLastPixel.paddingAmounts] or [0, 0]
        ph, pw = amounts[0], amounts[1] if len(amounts) > 1 else amounts[0]
        return spatial(lambda x: pool(x, (ph, ph, pw, pw), ceil_mode=True))
    pad_msg = getattr(p, pad_kind)
    if pad_kind == "valid":
        pads = explicit_padding(pad_msg, "valid", None, k, s, (1, 1))
        return spatial(lambda x: pool(x, pads))
    return spatial(lambda x: pool(x, explicit_padding(pad_msg, "same", x.shape[-2:], k, s, (1, 1))))
