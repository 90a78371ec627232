"""``customModel`` specs: run by an implementation from the custom-model registry.

The spec's ``className`` is looked up in :data:`runtime.custom.CUSTOM_MODELS` (filled by
``mlpersonal.register_custom_model``) and nowhere else; an unknown className fails at load.

The implementation follows Core ML's MLCustomModel protocol in Python idiom:
``impl(description, parameters)`` (the spec's ``ModelDescription`` and ``{name: value}`` decoded
from ``CustomModelParamValue``: bool, int, float, str or bytes), ``predict(features) -> dict`` and
optionally ``predict_batch(list_of_features) -> list_of_dicts`` (otherwise a loop over ``predict``).

Per-example feature values handed to it: multi-arrays and images as numpy float32 arrays
(images ``(C, H, W)``, pixel values 0..255 in the model's colour order), int64 as ``int``, double
as ``float``, strings and dictionaries as they are. It returns the same kinds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mlpersonal.errors import CustomLayerError

from .custom import CUSTOM_MODELS, param_values
from .features import feature_kind
from .model import CompiledModel, register_model_kind


def _item(v, i: int):
    """Example ``i`` of a batched user-layout value, as a python/numpy value."""
    if isinstance(v, torch.Tensor):
        x = v[i].detach().cpu()
        return x.item() if x.dim() == 0 else x.numpy()
    x = v[i]
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return x


@register_model_kind("customModel")
class CustomModel(CompiledModel):
    """A custom model; :attr:`impl` is the registered implementation's instance."""

    def __init__(self, spec, device, **kw):
        super().__init__(spec, device, **kw)
        cm = spec.customModel
        name = cm.className
        if not name:
            raise CustomLayerError("custom model has no className")
        impl = CUSTOM_MODELS.get(name)
        if impl is None:
            raise CustomLayerError(
                f"custom model className {name!r} has no registered implementation. Call "
                f"mlpersonal.register_custom_model({name!r}, Impl) before loading the model, where "
                "Impl has __init__(description, parameters), predict(features) and optionally "
                "predict_batch(batch)"
            )
        try:
            self.impl = impl(spec.description, param_values(cm.parameters))
        except CustomLayerError:
            raise
        except Exception as e:  # noqa: BLE001 - user code: say which model failed
            raise CustomLayerError(f"custom model {name!r} failed to initialize: {e!r}") from e
        self.class_name = name

    def forward(self, feeds: dict[str, Any], n: int) -> dict[str, Any]:
        """Split batched feeds per example, call the implementation, re-stack its outputs."""
        examples = [{k: _item(v, i) for k, v in feeds.items()} for i in range(n)]
        if hasattr(self.impl, "predict_batch"):
            outs = list(self.impl.predict_batch(examples))
        else:
            outs = [self.impl.predict(e) for e in examples]
        if len(outs) != n:
            raise CustomLayerError(f"custom model {self.class_name!r} returned {len(outs)} "
                                   f"predictions for {n} examples")
        return self._stack(outs, n)

    def _stack(self, outs: list, n: int) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for fd in self.spec.description.output:
            vals = []
            for i, o in enumerate(outs):
                if not isinstance(o, dict) or fd.name not in o:
                    raise CustomLayerError(
                        f"custom model {self.class_name!r}: prediction {i} lacks output "
                        f"{fd.name!r} (outputs: {[f.name for f in self.spec.description.output]})"
                    )
                vals.append(o[fd.name])
            kind = feature_kind(fd)
            if kind in ("multiArrayType", "imageType"):
                arrs = [np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v,
                                   dtype=np.float32) for v in vals]
                if len({a.shape for a in arrs}) == 1:
                    result[fd.name] = torch.from_numpy(np.stack(arrs)).to(self.device)
                else:
                    result[fd.name] = [torch.from_numpy(a).to(self.device) for a in arrs]
            elif kind == "int64Type":
                result[fd.name] = torch.tensor([int(v) for v in vals], dtype=torch.int64,
                                               device=self.device)
            elif kind == "doubleType":
                result[fd.name] = torch.tensor([float(v) for v in vals], dtype=torch.float32,
                                               device=self.device)
            else:
                result[fd.name] = vals
        return result
