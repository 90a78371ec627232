"""Core ML's update optimizers, ``SgdOptimizer`` and ``AdamOptimizer``, over a list of tensors.

The arithmetic of ``torch.optim.SGD`` (dampening 0, no Nesterov, no weight decay) and
``torch.optim.Adam`` (no AMSGrad, no weight decay), the oracles the tests compare against, done
with torch's foreach kernels: one dispatch per operation for all parameters. Not torch.optim
itself: a process's first torch.optim optimizer imports ``torch._dynamo`` (0.4-1 s on these
machines, before a first on-device update), and its per-step bookkeeping is most of a small
head's step. Hyperparameters are plain attributes, so an update task can change them between
mini-batches (Core ML lets progress handlers do that). A parameter without a gradient in a step
is left alone, its state included, as torch.optim does.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


class _Optimizer:
    def __init__(self, params, lr: float):
        self.params = list(params)
        self.lr = float(lr)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One update of the parameters that have a gradient."""
        idx = [i for i, p in enumerate(self.params) if p.grad is not None]
        if idx:
            self._update(idx, [self.params[i] for i in idx], [self.params[i].grad for i in idx])

    def _update(self, idx: list[int], params: list, grads: list) -> None:
        raise NotImplementedError


class SGD(_Optimizer):
    """``v = momentum * v + g`` (``v`` starts as the first gradient), ``w -= lr * v``; plain
    ``w -= lr * g`` without momentum."""

    def __init__(self, params, lr: float, momentum: float = 0.0):
        super().__init__(params, lr)
        self.momentum = float(momentum)
        self._velocity: list[Optional[torch.Tensor]] = [None] * len(self.params)

    def _update(self, idx: list[int], params: list, grads: list) -> None:
        if self.momentum == 0.0:
            torch._foreach_add_(params, grads, alpha=-self.lr)
            return
        old = [i for i in idx if self._velocity[i] is not None]
        if old:
            bufs = [self._velocity[i] for i in old]
            torch._foreach_mul_(bufs, self.momentum)
            torch._foreach_add_(bufs, [self.params[i].grad for i in old])
        for i in idx:
            if self._velocity[i] is None:
                self._velocity[i] = self.params[i].grad.detach().clone()
        torch._foreach_add_(params, [self._velocity[i] for i in idx], alpha=-self.lr)


class Adam(_Optimizer):
    """``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``, ``w -= lr / (1 - b1^t) * m /
    (sqrt(v) / sqrt(1 - b2^t) + eps)``, ``t`` counted per parameter."""

    def __init__(self, params, lr: float, betas: tuple = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, lr)
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self._steps = [0] * len(self.params)
        self._m: list[Optional[torch.Tensor]] = [None] * len(self.params)
        self._v: list[Optional[torch.Tensor]] = [None] * len(self.params)

    def _update(self, idx: list[int], params: list, grads: list) -> None:
        b1, b2 = self.betas
        for i in idx:
            if self._m[i] is None:
                self._m[i] = torch.zeros_like(self.params[i])
                self._v[i] = torch.zeros_like(self.params[i])
            self._steps[i] += 1
        m = [self._m[i] for i in idx]
        v = [self._v[i] for i in idx]
        torch._foreach_lerp_(m, grads, 1.0 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, grads, grads, 1.0 - b2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, [math.sqrt(1.0 - b2 ** self._steps[i]) for i in idx])
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(params, m, denom,
                                [-self.lr / (1.0 - b1 ** self._steps[i]) for i in idx])
