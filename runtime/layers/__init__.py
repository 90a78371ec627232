"""The layer registry: one small builder per NeuralNetwork layer kind.

A builder takes the layer's spec and a :class:`BuildContext` and returns a callable that maps
input tensors to output tensor(s). Tensors carry a leading batch axis. In rank-5 mode (spec v1-v3
style, ``RANK5_ARRAY_MAPPING``) every blob is a 4-D ``(B, C, H, W)`` tensor (sequence length 1);
in ND mode (``EXACT_ARRAY_MAPPING``) blobs have exactly the shape the spec declares, one example
at a time (the model batches them with ``torch.func.vmap``), so ND layers implement Core ML's
per-example semantics literally. Classic layers address channels as axis -3 in both modes and
treat axes before -3 as batch. In rank-5 mode a blob with a sequence axis is 5-D ``(B, S, C, H, W)``.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from mlpersonal.codecs import decode
from mlpersonal.errors import InvalidModelError, UnsupportedLayerError
from mlpersonal.registry import registrar

Builder = Callable[..., Callable]
LAYERS: dict[str, Builder] = {}


#: ``@register("convolution", ...)``: the builder for those layer kinds (``WhichOneof('layer')``)
register = registrar(LAYERS)


class BuildContext:
    """What a builder may ask for while compiling a layer."""

    def __init__(self, *, nd: bool, device: torch.device, dtype=torch.float32, custom_layers=None):
        self.nd = nd
        self.device = device
        self.dtype = dtype
        self.custom_layers = custom_layers or {}
        #: updatable parameters: key -> nn.Parameter
        self.parameters: dict[str, torch.nn.Parameter] = {}
        #: field key -> (WeightParams message, shape, parameter key, offset in that parameter's
        #: flat values) to write trained values back into the spec
        self.bindings: dict[str, tuple] = {}
        #: names of the layers that own updatable parameters
        self.updatable_layers: set[str] = set()
        self.layer = None  # the NeuralNetworkLayer being built

    def where(self, field: str = "") -> str:
        name = self.layer.name if self.layer is not None else "?"
        return f"layer {name!r}" + (f" ({field})" if field else "")

    def weights(self, wp, shape, field: str, *, updatable: bool = False,
                channels: Optional[int] = None, inner: Optional[int] = None) -> torch.Tensor:
        """Decode ``wp`` into a tensor of ``shape``; a trainable Parameter when ``updatable``.

        ``channels``/``inner`` locate per-channel quantization parameters (see
        :func:`mlpersonal.codecs.decode`); by default the first axis is the channel axis.
        """
        shape = tuple(int(s) for s in shape)
        count = int(np.prod(shape)) if shape else 1
        if channels is None and shape:
            channels = shape[0]
        arr = decode(wp, count, self.where(field), channels=channels, inner=inner).reshape(shape)
        t = torch.from_numpy(np.ascontiguousarray(arr)).to(self.device, self.dtype)
        if updatable:
            key = f"{self.layer.name}.{field}"
            self.bindings[key] = (wp, shape, key, 0)
            return self._parameter(key, t)
        return t

    def stacked_weights(self, wps: list, shape, fields: list[str], *,
                        updatable: bool = False) -> torch.Tensor:
        """The WeightParams ``wps`` (each of ``shape``) decoded and stacked on axis 0 into one
        tensor; when ``updatable``, one Parameter whose slices write back to each message (one
        autograd leaf instead of a concatenation per call; SGD and Adam act per element, so
        training it equals training the pieces)."""
        parts = [self.weights(wp, shape, f) for wp, f in zip(wps, fields)]
        t = torch.cat(parts)
        if not updatable:
            return t
        key = f"{self.layer.name}.{fields[0]}+{len(fields) - 1}"
        step = int(np.prod(shape)) if shape else 1
        for i, (wp, f) in enumerate(zip(wps, fields)):
            self.bindings[f"{self.layer.name}.{f}"] = (wp, tuple(int(s) for s in shape), key, i * step)
        return self._parameter(key, t)

    def _parameter(self, key: str, t: torch.Tensor) -> torch.nn.Parameter:
        p = torch.nn.Parameter(t)
        self.parameters[key] = p
        self.updatable_layers.add(self.layer.name)
        return p

    def optional_weights(self, wp, shape, field: str, **kw) -> Optional[torch.Tensor]:
        """Like :meth:`weights` but ``None`` when ``wp`` holds nothing."""
        from mlpersonal.codecs import count_of

        if count_of(wp) == 0:
            return None
        return self.weights(wp, shape, field, **kw)

    def fail(self, msg: str) -> InvalidModelError:
        return InvalidModelError(f"{self.where()}: {msg}")

    def unsupported(self, msg: str) -> UnsupportedLayerError:
        kind = self.layer.WhichOneof("layer") if self.layer is not None else "?"
        return UnsupportedLayerError(f"{self.where()} of kind {kind!r}: {msg}")

    def const(self, values, shape=None) -> torch.Tensor:
        """A frozen float tensor on the model's device."""
        t = torch.as_tensor(np.asarray(values, dtype=np.float32), device=self.device)
        return t.reshape(shape) if shape is not None else t


def ints(values, default) -> list[int]:
    """A repeated int field, or ``default`` when empty."""
    v = [int(x) for x in values]
    return v if v else list(default)


def or_default(value: float, default: float) -> float:
    """Core ML's "defaults to ``default`` if not set or set to 0" rule."""
    return float(value) if value != 0 else float(default)


def spatial(fn: Callable) -> Callable:
    """Wrap a 4-D ``(N, C, H, W)`` op so that it accepts any rank >= 3 (leading axes are batch)."""

    def run(x, *rest):
        if x.dim() == 4:
            return fn(x, *rest)
        lead = x.shape[:-3]
        y = fn(x.reshape(-1, *x.shape[-3:]), *rest)
        return y.reshape(*lead, *y.shape[-3:])

    return run


# Register the built-in kinds (import for side effects).
from . import (  # noqa: E402,F401
    activation, constant, conv, custom, dense, elementwise, mathops, ndshape, normalization, pooling,
    recurrent, reduce, resize,
)
from . import shape as _shape  # noqa: E402,F401  (not "shape": BuildContext methods take a shape)
