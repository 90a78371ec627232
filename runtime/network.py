"""Network: the layers of a NeuralNetwork spec compiled into an ordered plan of torch callables."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import numpy as np
import torch

from mlpersonal.codecs import encode_float
from mlpersonal.errors import InvalidModelError, UnsupportedLayerError

from .layers import LAYERS, BuildContext


def unread_blobs(steps, keep) -> frozenset:
    """Blobs the ``steps`` compute that none of them reads and that are not in ``keep``."""
    read = {b for s in steps for b in s.inputs}
    return frozenset(b for s in steps for b in s.outputs if b not in read and b not in keep)


@dataclass
class Step:
    name: str
    kind: str
    fn: Callable
    inputs: list[str]
    outputs: list[str]


class Network(torch.nn.Module):
    """Runs layers in spec order over a dict of named blobs.

    Weights of updatable layers are ``nn.Parameter`` s (``self.params``); the rest are frozen
    tensors captured by the layer callables.
    """

    def __init__(self, layers: Iterable, *, inputs: Iterable[str], nd: bool, device: torch.device,
                 custom_layers: Optional[dict] = None):
        super().__init__()
        ctx = BuildContext(nd=nd, device=device, custom_layers=custom_layers)
        available = set(inputs)
        names: set[str] = set()
        self.steps: list[Step] = []
        for i, layer in enumerate(layers):
            kind = layer.WhichOneof("layer")
            if not layer.name:
                raise InvalidModelError(f"layer #{i} has no name")
            if layer.name in names:
                raise InvalidModelError(f"two layers are named {layer.name!r}; layer names must be unique")
            names.add(layer.name)
            builder = LAYERS.get(kind)
            if builder is None:
                raise UnsupportedLayerError(
                    f"layer {layer.name!r} is of kind {kind!r}, which the mlpersonal runtime does "
                    "not support" + ("" if kind else " (no layer kind set: corrupt file?)")
                )
            for blob in layer.input:
                if blob not in available:
                    raise InvalidModelError(
                        f"layer {layer.name!r} reads blob {blob!r}, which no earlier layer or model "
                        "input produces (layers must be in topological order)"
                    )
            if not layer.output:
                raise InvalidModelError(f"layer {layer.name!r} has no output")
            ctx.layer = layer
            fn = builder(layer, ctx)
            self.steps.append(Step(layer.name, kind, fn, list(layer.input), list(layer.output)))
            available.update(layer.output)
        self.blobs = available
        self.params = torch.nn.ParameterDict(
            {k.replace(".", "__"): p for k, p in ctx.parameters.items()}
        )
        self.param_names = list(ctx.parameters)
        #: the layers whose weights train (keys of named_updatable are "layer.field")
        self.updatable_layers = frozenset(ctx.updatable_layers)
        self._bindings = ctx.bindings
        self._params_by_name = dict(ctx.parameters)

    def forward(self, blobs: dict[str, torch.Tensor], stop_after: Optional[set] = None) -> dict:
        env = dict(blobs)
        for s in self.steps:
            r = s.fn(*[env[b] for b in s.inputs])
            if len(s.outputs) == 1:
                env[s.outputs[0]] = r
            else:
                env.update(zip(s.outputs, r))
        return env

    def named_updatable(self) -> dict[str, torch.nn.Parameter]:
        """``{"layer.weights": Parameter, ...}`` for every updatable weight."""
        return dict(self._params_by_name)

    def write_back(self) -> None:
        """Store the current values of updatable parameters into their spec WeightParams."""
        flat: dict[str, np.ndarray] = {}
        for wp, shape, key, start in self._bindings.values():
            if key not in flat:
                flat[key] = self._params_by_name[key].detach().cpu().numpy().reshape(-1)
            count = int(np.prod(shape)) if shape else 1
            encode_float(wp, flat[key][start:start + count])
