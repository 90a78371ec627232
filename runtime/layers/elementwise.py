"""add, multiply and other element-wise layers over several inputs."""

from __future__ import annotations

import functools
import operator

from . import register


def _fold(op, alpha_default):
    def build(layer, ctx):
        kind = layer.WhichOneof("layer")
        alpha = float(getattr(layer, kind).alpha) if alpha_default is not None else None

        def f(*xs):
            if len(xs) == 1:
                return op(xs[0], alpha)
            return functools.reduce(op, xs)

        return f

    return build


register("add")(_fold(operator.add, 0.0))
register("multiply")(_fold(operator.mul, 1.0))
