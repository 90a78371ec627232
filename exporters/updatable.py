"""Update parameters for on-device training: :class:`UpdateConfig`, :class:`SGD`, :class:`Adam`
and :func:`make_updatable`, which writes them into a NeuralNetwork spec.

``make_updatable`` writes, field for field, what coremltools' ``NeuralNetworkBuilder``
``make_updatable`` + ``set_categorical_cross_entropy_loss`` / ``set_mean_squared_error_loss`` +
``set_sgd_optimizer`` / ``set_adam_optimizer`` + ``set_epochs`` (+ ``set_shuffle``) write for the
same settings. One deliberate difference: for a classifier, the training target is always the
predicted-feature name (the class label, as Core ML's validator allows), even when the softmax
output is not named like ``predictedProbabilitiesName`` (coremltools then falls back to an
INT32 index target named ``<input>_true``).

Every value may carry the values a run-time override may take: ``<name>_range=(lo, hi)``
(inclusive) or ``<name>_set=[...]`` (a set wins over a range). Defaults follow coremltools:
learning rate, momentum, beta1, beta2 and eps may lie in [0, 1]; mini-batch size and epochs may
only take their default unless a set or range is given.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

from mlpersonal.codecs import storage_of
from mlpersonal.errors import ConversionError, UpdateParameterError
from mlpersonal.validate import UPDATABLE_LAYER_KINDS, updatable_weights
from mlpersonal.proto import Model_pb2

#: Core ML refuses older specification versions for updatable models.
MIN_UPDATABLE_SPEC_VERSION = 4
#: The only layer kinds Core ML can update.
UPDATABLE_KINDS = UPDATABLE_LAYER_KINDS
#: Layer kinds Core ML backpropagates through (activation: ReLU, sigmoid, tanh only).
_COREML_BACKPROP = {"convolution", "innerProduct", "flatten", "pooling", "batchnorm"}
_COREML_BACKPROP_ACTIVATIONS = {"ReLU", "sigmoid", "tanh"}
_NN_KINDS = ("neuralNetwork", "neuralNetworkClassifier", "neuralNetworkRegressor")
_LOSSES = {
    "categorical_cross_entropy": "categorical_cross_entropy",
    "cross_entropy": "categorical_cross_entropy",
    "ce": "categorical_cross_entropy",
    "mse": "mse",
    "mean_squared_error": "mse",
}

Range = tuple


@dataclass
class SGD:
    """Stochastic gradient descent with momentum (``torch.optim.SGD`` semantics on device)."""

    learning_rate: float = 0.01
    mini_batch_size: int = 10
    momentum: float = 0.0
    learning_rate_range: Optional[Range] = (0.0, 1.0)
    learning_rate_set: Optional[Sequence[float]] = None
    mini_batch_size_range: Optional[Range] = None
    mini_batch_size_set: Optional[Sequence[int]] = None  # None and no range: {mini_batch_size}
    momentum_range: Optional[Range] = (0.0, 1.0)
    momentum_set: Optional[Sequence[float]] = None


@dataclass
class Adam:
    """Adam (``torch.optim.Adam`` semantics on device)."""

    learning_rate: float = 0.01
    mini_batch_size: int = 10
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    learning_rate_range: Optional[Range] = (0.0, 1.0)
    learning_rate_set: Optional[Sequence[float]] = None
    mini_batch_size_range: Optional[Range] = None
    mini_batch_size_set: Optional[Sequence[int]] = None
    beta1_range: Optional[Range] = (0.0, 1.0)
    beta1_set: Optional[Sequence[float]] = None
    beta2_range: Optional[Range] = (0.0, 1.0)
    beta2_set: Optional[Sequence[float]] = None
    eps_range: Optional[Range] = (0.0, 1.0)
    eps_set: Optional[Sequence[float]] = None


@dataclass
class UpdateConfig:
    """How an exported model trains on device.

    ``loss``: ``"categorical_cross_entropy"`` (input: a ``softmax`` layer's output, found
    automatically) or ``"mse"`` (input: the model's output). ``loss_input`` names the blob
    explicitly; ``target_shape`` gives the MSE target's shape when that blob is not a model
    output with a declared shape. ``seed=None`` writes no seed (Core ML then shuffles randomly).
    """

    loss: str = "categorical_cross_entropy"
    optimizer: Union[SGD, Adam, None] = None  # None: SGD()
    epochs: int = 1
    epochs_range: Optional[Range] = None
    epochs_set: Optional[Sequence[int]] = None  # None and no range: {epochs}
    shuffle: bool = True
    seed: Optional[int] = None
    loss_layer_name: str = "lossLayer"
    loss_input: Optional[str] = None
    target_shape: Optional[Sequence[int]] = None


# --- writing parameters ------------------------------------------------------------------
def _check_allowed(name: str, value, rng, st, integer: bool):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UpdateParameterError(f"update parameter {name!r} must be a number, got {value!r}")
    if integer and int(value) != value:
        raise UpdateParameterError(f"update parameter {name!r} must be an integer, got {value!r}")
    if value != value:
        raise UpdateParameterError(f"update parameter {name!r} is NaN")
    if st is not None:
        st = list(st)
        if not st:
            raise UpdateParameterError(f"{name}_set is empty; give the allowed values or None")
        if len(set(st)) != len(st):
            raise UpdateParameterError(f"{name}_set={st} has repeated values; values must be unique")
        if value not in st:
            raise UpdateParameterError(f"{name}={value!r} is not in its allowed set {st}")
    elif rng is not None:
        if len(rng) != 2 or not rng[0] < rng[1]:
            raise UpdateParameterError(f"{name}_range={rng!r} must be (min, max) with min < max")
        if not rng[0] <= value <= rng[1]:
            raise UpdateParameterError(f"{name}={value!r} lies outside its allowed range {tuple(rng)}")


def _write_double(msg, name: str, value, rng, st) -> None:
    _check_allowed(name, value, rng, st, integer=False)
    msg.defaultValue = float(value)
    if st is not None:
        msg.set.values.extend(float(v) for v in st)
    elif rng is not None:
        msg.range.minValue = float(rng[0])
        msg.range.maxValue = float(rng[1])


def _write_int(msg, name: str, value, rng, st, minimum: int = 1) -> None:
    if st is None and rng is None:
        st = [value]  # coremltools: only the default is allowed
    _check_allowed(name, value, rng, st, integer=True)
    for v in ([value] + list(st or []) + list(rng or [])):
        if int(v) < minimum:
            raise UpdateParameterError(f"{name} values must be >= {minimum}, got {v!r}")
    msg.defaultValue = int(value)
    if st is not None:
        msg.set.values.extend(int(v) for v in st)
    else:
        msg.range.minValue = int(rng[0])
        msg.range.maxValue = int(rng[1])


def _write_optimizer(opt_msg, opt) -> None:
    if isinstance(opt, SGD):
        m, doubles = opt_msg.sgdOptimizer, ("momentum",)
    elif isinstance(opt, Adam):
        m, doubles = opt_msg.adamOptimizer, ("beta1", "beta2", "eps")
    else:
        raise ConversionError(
            f"UpdateConfig.optimizer must be mlpersonal.SGD(...) or mlpersonal.Adam(...), got "
            f"{type(opt).__name__}"
        )
    _write_double(m.learningRate, "learning_rate", opt.learning_rate,
                  opt.learning_rate_range, opt.learning_rate_set)
    _write_int(m.miniBatchSize, "mini_batch_size", opt.mini_batch_size,
               opt.mini_batch_size_range, opt.mini_batch_size_set)
    for key in doubles:  # same field names in the proto and the config
        _write_double(getattr(m, key), key, getattr(opt, key), getattr(opt, f"{key}_range"),
                      getattr(opt, f"{key}_set"))


# --- the network ---------------------------------------------------------------------------
def _producers(nn) -> dict:
    out = {}
    for layer in nn.layers:
        for blob in layer.output:
            out[blob] = layer
    return out


def _check_layer(layer, name: str) -> None:
    kind = layer.WhichOneof("layer")
    if kind not in UPDATABLE_KINDS:
        raise ConversionError(
            f"module {name!r} became a {kind!r} layer, which Core ML cannot update (only "
            "convolution, fully-connected and LSTM layers: nn.Conv1d/2d, nn.Linear, nn.LSTM). Freeze it with "
            "trainers.freeze(...) or set requires_grad=False on its parameters."
        )
    for field, wp in updatable_weights(layer):
        storage = storage_of(wp)
        if storage not in ("float32", "raw"):
            raise ConversionError(
                f"module {name!r}: its {field} are stored as {storage}; updatable layers must keep "
                "float32 weights (do not quantize or convert to fp16 the layers you mark updatable)"
            )


def _mark_layer(layer) -> None:
    """Mirror coremltools: the layer and every WeightParams field of it (an LSTM's, nested in
    weightParams) become updatable."""
    layer.isUpdatable = True
    params = getattr(layer, layer.WhichOneof("layer"))
    if layer.WhichOneof("layer") == "uniDirectionalLSTM":
        params = params.weightParams
    for fd in params.DESCRIPTOR.fields:
        if fd.message_type is not None and fd.message_type.name == "WeightParams":
            getattr(params, fd.name).isUpdatable = True


def _ce_input(spec, nn, kind: str, update: UpdateConfig) -> str:
    producers = _producers(nn)
    softmax_outs = [l.output[0] for l in nn.layers if l.WhichOneof("layer") == "softmax"]
    if update.loss_input:
        layer = producers.get(update.loss_input)
        if layer is None or layer.WhichOneof("layer") != "softmax" or layer.output[0] != update.loss_input:
            raise ConversionError(
                f"loss_input {update.loss_input!r} is not the output of a 'softmax' layer; the "
                "categorical cross-entropy loss needs one (Core ML rule)"
            )
        return update.loss_input
    if kind == "neuralNetworkClassifier":
        for blob in (nn.labelProbabilityLayerName, spec.description.predictedProbabilitiesName):
            if blob and blob in softmax_outs:
                return blob
    if softmax_outs:
        return softmax_outs[-1]
    nd = [l.name for l in nn.layers if l.WhichOneof("layer") == "softmaxND"]
    raise ConversionError(
        "the categorical cross-entropy loss needs a classic 'softmax' layer output (Core ML rule) "
        "and the network has none"
        + (f" (it has softmaxND layer(s) {nd}, which Core ML does not accept as the loss input)" if nd else "")
        + "; end the model with nn.Softmax(dim=1) over the class axis, or use loss='mse'"
    )


def _mse_input(spec, nn, update: UpdateConfig) -> tuple[str, list[int]]:
    producers = _producers(nn)
    outputs = {o.name: o for o in spec.description.output}
    if update.loss_input:
        name = update.loss_input
        if name not in producers:
            raise ConversionError(f"loss_input {name!r} is not produced by any layer of the network")
    else:
        cands = [o.name for o in spec.description.output
                 if o.type.WhichOneof("Type") == "multiArrayType" and o.name in producers]
        if len(cands) != 1:
            raise ConversionError(
                f"the mse loss needs one array output to compare with the target; the model has "
                f"{cands or 'none'}: name it with UpdateConfig(loss_input=...)"
            )
        name = cands[0]
    if update.target_shape is not None:
        shape = [int(s) for s in update.target_shape]
    elif name in outputs and list(outputs[name].type.multiArrayType.shape):
        shape = [int(s) for s in outputs[name].type.multiArrayType.shape]
    else:
        raise ConversionError(
            f"the shape of the mse target for {name!r} is unknown; give UpdateConfig(target_shape=...)"
        )
    return name, shape


def _warn_coreml_backprop(nn, updatable: set, loss_input: str, ce: bool) -> None:
    """Warn about layers between an updatable layer and the loss Core ML cannot backprop through."""
    producers = _producers(nn)
    index = {l.name: i for i, l in enumerate(nn.layers)}
    ancestors: dict[str, object] = {}
    stack = [loss_input]
    while stack:
        layer = producers.get(stack.pop())
        if layer is None or layer.name in ancestors:
            continue
        ancestors[layer.name] = layer
        stack.extend(layer.input)
    downstream = set(updatable)
    for layer in sorted(ancestors.values(), key=lambda l: index[l.name]):
        if any(producers.get(b) is not None and producers[b].name in downstream for b in layer.input):
            downstream.add(layer.name)
    bad = []
    for name in downstream - set(updatable):
        layer = ancestors[name]
        kind = layer.WhichOneof("layer")
        ok = kind in _COREML_BACKPROP or (
            kind == "activation" and layer.activation.WhichOneof("NonlinearityType") in _COREML_BACKPROP_ACTIVATIONS
        ) or (ce and kind == "softmax" and layer.output[0] == loss_input)
        if not ok:
            bad.append(f"{name} ({kind})")
    if bad:
        warnings.warn(
            "layers between an updatable layer and the loss that Core ML on Apple devices cannot "
            f"backpropagate through: {', '.join(sorted(bad))}. The mlpersonal runtime trains this "
            "model, Core ML will refuse to compile it as updatable.", RuntimeWarning, stacklevel=3)


def make_updatable(spec: Model_pb2.Model, layer_names: Iterable[str],
                   update: Optional[UpdateConfig] = None) -> Model_pb2.Model:
    """Make ``layer_names`` updatable in ``spec`` and write ``update`` (in place; returns ``spec``).

    Raises :class:`ConversionError` for a layer that Core ML cannot update or that holds
    fp16/quantized weights, or when the loss input cannot be found; :class:`UpdateParameterError`
    for a default outside its allowed range/set.
    """
    update = update if update is not None else UpdateConfig()
    kind = spec.WhichOneof("Type")
    if kind not in _NN_KINDS:
        raise ConversionError(f"make_updatable needs a neural network spec, got a {kind!r} model")
    nn = getattr(spec, kind)
    loss = _LOSSES.get(str(update.loss).lower())
    if loss is None:
        raise ConversionError(f"unknown loss {update.loss!r}; use 'categorical_cross_entropy' or 'mse'")
    opt = update.optimizer if update.optimizer is not None else SGD()
    layers = {l.name: l for l in nn.layers}
    names = list(dict.fromkeys(layer_names))
    if not names:
        raise ConversionError(
            "no layer is updatable: mark the modules to personalize with trainers.mark_updatable(...) "
            "(or keep requires_grad=True on them) and freeze the rest"
        )
    for name in names:
        if name not in layers:
            raise ConversionError(f"module {name!r} has no layer in the spec (layers: {list(layers)[:20]})")
        _check_layer(layers[name], name)
    if update.loss_layer_name in layers:
        raise ConversionError(f"loss layer name {update.loss_layer_name!r} is already a layer name")

    # start from a clean slate when called twice
    nn.ClearField("updateParams")
    del spec.description.trainingInput[:]

    # make_updatable
    spec.isUpdatable = True
    if spec.specificationVersion < MIN_UPDATABLE_SPEC_VERSION:
        spec.specificationVersion = MIN_UPDATABLE_SPEC_VERSION
    up = nn.updateParams
    up.SetInParent()
    for name in names:
        _mark_layer(layers[name])

    # loss + training inputs
    out_names = {o.name for o in spec.description.output}
    loss_layer = up.lossLayers.add()
    loss_layer.name = update.loss_layer_name
    training = spec.description.trainingInput
    training.extend(spec.description.input)
    target = training.add()
    if loss == "categorical_cross_entropy":
        loss_in = _ce_input(spec, nn, kind, update)
        loss_layer.categoricalCrossEntropyLossLayer.input = loss_in
        loss_layer.categoricalCrossEntropyLossLayer.target = loss_in + "_true"
        if kind == "neuralNetworkClassifier":
            label = spec.description.predictedFeatureName
            out = next((o for o in spec.description.output if o.name == label), None)
            if not label or out is None:
                raise ConversionError("the classifier declares no predicted-feature (label) output")
            target.name = label
            if out.type.WhichOneof("Type") == "int64Type":
                target.type.int64Type.SetInParent()
            else:
                target.type.stringType.SetInParent()
        else:
            target.name = loss_in + "_true"
            target.type.multiArrayType.shape.append(1)
            target.type.multiArrayType.dataType = Model_pb2.ArrayFeatureType.INT32
    else:
        loss_in, shape = _mse_input(spec, nn, update)
        loss_layer.meanSquaredErrorLossLayer.input = loss_in
        loss_layer.meanSquaredErrorLossLayer.target = loss_in + "_true"
        target.name = loss_in + "_true"
        target.type.multiArrayType.shape.extend(shape)
        target.type.multiArrayType.dataType = Model_pb2.ArrayFeatureType.DOUBLE
    if loss_in + "_true" in out_names:
        raise ConversionError(f"loss target {loss_in + '_true'!r} must not be a model output")

    _write_optimizer(up.optimizer, opt)
    _write_int(up.epochs, "epochs", update.epochs, update.epochs_range, update.epochs_set)
    up.shuffle.defaultValue = bool(update.shuffle)
    if update.seed is not None:
        if isinstance(update.seed, bool) or int(update.seed) != update.seed:
            raise UpdateParameterError(f"seed must be an integer, got {update.seed!r}")
        up.seed.defaultValue = int(update.seed)
    _warn_coreml_backprop(nn, set(names), loss_in, loss == "categorical_cross_entropy")
    return spec


__all__ = ["Adam", "SGD", "UpdateConfig", "make_updatable", "MIN_UPDATABLE_SPEC_VERSION", "UPDATABLE_KINDS"]
