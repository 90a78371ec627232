"""The update-parameter schema: Core ML spec fields <-> python keys, defaults and allowed values.

One table for the exporter (which writes the values) and the runtime (which reads them and checks
run-time overrides against the range/set stored in the model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from .errors import UpdateParameterError
from .proto import Model_pb2

#: python key -> Core ML field name (inside the optimizer, the update params or the kNN model)
SPEC_NAMES = {
    "epochs": "epochs",
    "learning_rate": "learningRate",
    "mini_batch_size": "miniBatchSize",
    "momentum": "momentum",
    "beta1": "beta1",
    "beta2": "beta2",
    "eps": "eps",
    "shuffle": "shuffle",
    "seed": "seed",
    "number_of_neighbors": "numberOfNeighbors",
}
#: Core ML's MLParameterKey names accepted as aliases.
ALIASES = {v: k for k, v in SPEC_NAMES.items()}


@dataclass(frozen=True)
class Parameter:
    """One update parameter: its default and what values the model allows."""

    name: str
    default: Any
    kind: str  # "double" | "int64" | "bool"
    range: Optional[tuple] = None  # (min, max), inclusive
    set: Optional[tuple] = None  # allowed values

    def check(self, value: Any) -> Any:
        """Return ``value`` converted to this parameter's type, or raise UpdateParameterError."""
        if self.kind == "bool":
            if not isinstance(value, (bool, int)) or value not in (0, 1, True, False):
                raise UpdateParameterError(f"update parameter {self.name!r} must be a bool, got {value!r}")
            return bool(value)
        try:
            if isinstance(value, bool):
                raise TypeError
            v = int(value) if self.kind == "int64" else float(value)
        except (TypeError, ValueError):
            raise UpdateParameterError(
                f"update parameter {self.name!r} must be a number, got {value!r}"
            ) from None
        if self.kind == "int64" and v != value:
            raise UpdateParameterError(f"update parameter {self.name!r} must be an integer, got {value!r}")
        if v != v:  # NaN
            raise UpdateParameterError(f"update parameter {self.name!r} is NaN")
        if self.set:
            if v not in self.set:
                raise UpdateParameterError(
                    f"update parameter {self.name!r}={value!r} is not allowed by the model; "
                    f"allowed values: {sorted(self.set)}"
                )
        elif self.range is not None:
            lo, hi = self.range
            if not (lo <= v <= hi):
                raise UpdateParameterError(
                    f"update parameter {self.name!r}={value!r} is outside the range the model "
                    f"allows [{lo}, {hi}]; pick a value inside it"
                )
        return v


def _from_message(name: str, msg, kind: str) -> Parameter:
    allowed = msg.WhichOneof("AllowedValues") if kind != "bool" else None
    rng = st = None
    if allowed == "range":
        rng = (msg.range.minValue, msg.range.maxValue)
    elif allowed == "set":
        st = tuple(msg.set.values)
    return Parameter(name, msg.defaultValue if kind != "int64" else int(msg.defaultValue), kind, rng, st)


def read_parameters(spec: Model_pb2.Model) -> dict[str, Parameter]:
    """The update parameters stored in ``spec`` (NN or kNN), keyed by python name."""
    kind = spec.WhichOneof("Type")
    out: dict[str, Parameter] = {}
    if kind in ("neuralNetwork", "neuralNetworkClassifier", "neuralNetworkRegressor"):
        up = getattr(spec, kind).updateParams
        if up.HasField("epochs"):
            out["epochs"] = _from_message("epochs", up.epochs, "int64")
        if up.HasField("shuffle"):
            out["shuffle"] = _from_message("shuffle", up.shuffle, "bool")
        if up.HasField("seed"):
            out["seed"] = _from_message("seed", up.seed, "int64")
        opt_kind = up.optimizer.WhichOneof("OptimizerType")
        if opt_kind is not None:
            opt = getattr(up.optimizer, opt_kind)
            for field in opt.DESCRIPTOR.fields:
                if opt.HasField(field.name):
                    key = ALIASES[field.name]
                    k = "int64" if field.name == "miniBatchSize" else "double"
                    out[key] = _from_message(key, getattr(opt, field.name), k)
    elif kind == "kNearestNeighborsClassifier":
        knn = spec.kNearestNeighborsClassifier
        if knn.HasField("numberOfNeighbors"):
            out["number_of_neighbors"] = _from_message("number_of_neighbors", knn.numberOfNeighbors, "int64")
    return out


def normalize_key(key: str) -> str:
    """Map a python or Core ML key (``learning_rate`` / ``learningRate``) to the python key."""
    if key in SPEC_NAMES:
        return key
    if key in ALIASES:
        return ALIASES[key]
    raise UpdateParameterError(
        f"unknown update parameter {key!r}; known keys: {', '.join(SPEC_NAMES)}"
    )


def resolve(params: dict[str, Parameter], overrides: Optional[dict] = None) -> dict[str, Any]:
    """Defaults from the model with ``overrides`` applied, each checked against what it allows."""
    values = {k: p.default for k, p in params.items()}
    for key, value in (overrides or {}).items():
        k = normalize_key(key)
        if k not in params:
            raise UpdateParameterError(
                f"update parameter {k!r} is not defined by this model (it defines: "
                f"{', '.join(params) or 'none'}); it cannot be overridden"
            )
        values[k] = params[k].check(value)
    return values
