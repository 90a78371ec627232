"""unary (sqrt, rsqrt, inverse, power, exp, log, abs, threshold) and the ND math kinds
(trigonometric, exp2, floor, ceil, round, sign)."""

from __future__ import annotations

import torch

from . import or_default, register

SQRT, RSQRT, INVERSE, POWER, EXP, LOG, ABS, THRESHOLD = range(8)


@register("unary")
def unary(layer, ctx):
    """f(scale * x + shift); scale defaults to 1 and epsilon to 1e-6 when 0."""
    p = layer.unary
    op, alpha = int(p.type), float(p.alpha)
    eps = or_default(p.epsilon, 1e-6)
    scale, shift = or_default(p.scale, 1.0), float(p.shift)
    fns = {
        SQRT: torch.sqrt,
        RSQRT: lambda x: torch.rsqrt(x + eps),
        INVERSE: lambda x: 1.0 / (x + eps),
        POWER: lambda x: torch.pow(x, alpha),
        EXP: torch.exp,
        LOG: lambda x: torch.log(x + eps),  # MIL's log(x + epsilon); builders store 1e-45
        ABS: torch.abs,
        THRESHOLD: lambda x: torch.clamp(x, min=alpha),
    }
    if op not in fns:
        raise ctx.unsupported(f"unknown unary operation {op}")
    fn = fns[op]
    if scale == 1.0 and shift == 0.0:
        return fn
    return lambda x: fn(x * scale + shift)


_SIMPLE = {
    "sin": torch.sin, "cos": torch.cos, "tan": torch.tan, "asin": torch.asin, "acos": torch.acos,
    "atan": torch.atan, "sinh": torch.sinh, "cosh": torch.cosh, "tanh": torch.tanh,
    "asinh": torch.asinh, "acosh": torch.acosh, "atanh": torch.atanh, "exp2": torch.exp2,
    "floor": torch.floor, "ceil": torch.ceil, "round": torch.round, "sign": torch.sign,
}

for _kind, _fn in _SIMPLE.items():
    register(_kind)(lambda layer, ctx, _fn=_fn: _fn)
