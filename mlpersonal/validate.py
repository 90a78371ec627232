"""The load-time validator: refuse a malformed spec before anything is allocated or run.

``validate(spec)`` checks what Core ML's validators (InterfaceValidators, NeuralNetworkValidator,
UpdatableNeuralNetworkValidator, KNNValidator, PipelineValidator) check, and bounds the sizes a
file declares: every weight tensor must match the data actually stored (so a declared
``outputChannels=2**40`` is refused before anything is allocated), declared features and layer
shape fields hold at most :data:`MAX_ELEMENTS` values, layer geometry at most :data:`MAX_DIM`.
(Intermediate activations are not shape-inferred: a chain of layers can still grow them; the
runtime reports a refused allocation as InvalidModelError.) It raises :class:`InvalidModelError`
with one exact message per rule and never imports, evaluates or unpickles anything in the spec.
"""

from __future__ import annotations

import math
import os
from .codecs import count_of, storage_of
from .errors import InvalidModelError

#: Largest number of values one declared multi-array feature (or layer shape field) may hold
#: (``MLPERSONAL_MAX_ELEMENTS`` raises it for a trusted model that needs more).
MAX_ELEMENTS = 2**26
#: Largest image side (pixels) a feature may declare.
MAX_IMAGE_SIDE = 2**14
#: Largest kernel size / stride / dilation / padding / single dimension a layer may declare.
MAX_DIM = 2**16
#: Deepest nesting of pipelines inside pipelines.
MAX_PIPELINE_DEPTH = 16

NN_KINDS = ("neuralNetwork", "neuralNetworkClassifier", "neuralNetworkRegressor")
PIPELINE_KINDS = ("pipeline", "pipelineClassifier", "pipelineRegressor")
UPDATABLE_LAYER_KINDS = ("convolution", "innerProduct", "uniDirectionalLSTM")
#: layer kinds that read a sequence ([Seq, Batch, C, 1, 1]) as their first input
RECURRENT_LAYER_KINDS = ("simpleRecurrent", "gru", "uniDirectionalLSTM", "biDirectionalLSTM")

_ONE = (1, 1)
#: layer kind -> (min inputs, max inputs or None); kinds not listed are left to their builder.
ARITY = {
    **{k: _ONE for k in (
        "activation", "softmax", "softmaxND", "innerProduct", "embedding", "embeddingND",
        "batchnorm", "pooling", "flatten", "scale", "bias", "reshape", "permute", "padding",
        "upsample", "unary", "l2normalize", "lrn", "mvn", "reduce", "reorganizeData",
        "sequenceRepeat", "flattenTo2D", "reshapeStatic", "squeeze", "expandDims", "transpose",
        "split", "splitND", "sliceStatic", "reduceSum", "reduceMean", "reduceMax", "reduceMin",
        "argMax", "argMin", "tile", "clip", "exp", "log", "sqrt", "abs")},
    "convolution": (1, 2), "batchedMatMul": (1, 2), "crop": (1, 2),
    "loadConstant": (0, 0), "loadConstantND": (0, 0),
    **{k: (1, None) for k in ("add", "multiply", "max", "min", "average", "concatND", "dot")},
    "concat": (2, None),
    # Core ML (NeuralNetworkLayerValidator.cpp): the sequence and its initial states
    "simpleRecurrent": (2, 2), "gru": (1, 2), "uniDirectionalLSTM": (1, 3),
    "biDirectionalLSTM": (1, 5),
}
#: layer kind -> (min outputs, max outputs) where Core ML wants other than one: a recurrent
#: layer gives its sequence and every final state
OUTPUT_ARITY = {"simpleRecurrent": (2, 2), "gru": (2, 2), "uniDirectionalLSTM": (3, 3),
                "biDirectionalLSTM": (5, 5), "split": (2, None)}
#: layer kinds that may produce several outputs
MULTI_OUTPUT = frozenset({"split", "splitND", *RECURRENT_LAYER_KINDS, "topK", "argSort", "custom", "loop",
                          "branch", "constantPad", "nonMaximumSuppression"})

#: Layer geometry fields: each value must lie within [-MAX_DIM, MAX_DIM].
GEOMETRY_FIELDS = frozenset({
    "kernelSize", "stride", "dilationFactor", "startEdgeSize", "endEdgeSize", "paddingAmounts",
    "scalingFactor", "blockSize", "size", "nGroups",
})
#: Of those, the ones that must be >= 1 when given.
POSITIVE_FIELDS = frozenset({"kernelSize", "stride", "dilationFactor"})
#: Fields declaring a tensor shape or a count: the product of their values is at most MAX_ELEMENTS
#: (tensors with stored data are further checked against the stored bytes).
EXTENT_FIELDS = frozenset({
    "outputShape", "targetShape", "shape", "reps", "outputChannels", "kernelChannels",
    "inputChannels", "inputDim", "channels", "vocabSize", "embeddingSize",
    "weightMatrixFirstDimension", "weightMatrixSecondDimension", "shapeScale", "shapeBias",
    "inputVectorSize", "outputVectorSize",
})


def fail(msg: str) -> InvalidModelError:
    """The error every rule raises (one exact message per rule)."""
    return InvalidModelError(msg)


def validate(spec, *, where: str = "", _depth: int = 0) -> None:
    """Raise :class:`InvalidModelError` unless ``spec`` (a ``Model_pb2.Model``) is well formed."""
    pre = f"{where}: " if where else ""
    if _depth > MAX_PIPELINE_DEPTH:
        raise fail(f"pipelines are nested more than {MAX_PIPELINE_DEPTH} levels deep")
    _check_description(spec.description, pre, spec.specificationVersion)
    kind = spec.WhichOneof("Type")
    if kind and kind.endswith("Classifier"):
        _check_classifier_names(spec.description, pre)
    if kind in ("neuralNetworkClassifier", "kNearestNeighborsClassifier"):
        _check_classifier_interface(spec, kind, pre)
    elif kind == "neuralNetworkRegressor":
        _check_regressor_interface(spec.description, pre)
    if spec.isUpdatable and spec.specificationVersion < 4:
        raise fail(
            f"{pre}the model is updatable but its specificationVersion is "
            f"{spec.specificationVersion}; updatable models need version 4 (Core ML 3) or newer"
        )
    if kind in NN_KINDS:
        _check_network(spec, getattr(spec, kind), kind, pre)
    elif kind == "kNearestNeighborsClassifier":
        _check_knn(spec, pre)
    elif kind in PIPELINE_KINDS:
        pipe = getattr(spec, kind)
        _check_pipeline(spec, pipe if kind == "pipeline" else pipe.pipeline, pre, _depth)


# --- feature descriptions ----------------------------------------------------------------------
_FLOAT16_VERSION = 7  # iOS 16: FLOAT16 multi-arrays and GRAYSCALE_FLOAT16 images


def _check_feature_format(fd, what: str, is_input: bool, version: int) -> None:
    """Core ML (InterfaceValidators.cpp): a multi-array names its element type (FLOAT16 from
    specification 7) and, as an input, its shape; an image names its colour space."""
    kind = fd.type.WhichOneof("Type")
    if kind == "multiArrayType":
        m = fd.type.multiArrayType
        if m.dataType not in (m.DOUBLE, m.FLOAT32, m.INT32, m.FLOAT16):
            raise fail(f"{what}: no element type (dataType); Core ML wants DOUBLE, FLOAT32, "
                       "FLOAT16 or INT32")
        if m.dataType == m.FLOAT16 and version < _FLOAT16_VERSION:
            raise fail(f"{what}: FLOAT16 multi-arrays need specificationVersion >= "
                       f"{_FLOAT16_VERSION}, the model has {version}")
        if is_input and not len(m.shape) and m.WhichOneof("ShapeFlexibility") is None:
            raise fail(f"{what}: no shape; Core ML wants an input multi-array's shape (or its "
                       "allowed shapes) declared")
    elif kind == "imageType":
        it = fd.type.imageType
        if it.colorSpace not in (it.GRAYSCALE, it.RGB, it.BGR, it.GRAYSCALE_FLOAT16):
            raise fail(f"{what}: no colour space; Core ML wants RGB, BGR or GRAYSCALE")
        if it.colorSpace == it.GRAYSCALE_FLOAT16 and version < _FLOAT16_VERSION:
            raise fail(f"{what}: GRAYSCALE_FLOAT16 images need specificationVersion >= "
                       f"{_FLOAT16_VERSION}, the model has {version}")


def _check_description(desc, pre: str, version: int = 1) -> None:
    for group, feats in (("input", desc.input), ("output", desc.output),
                         ("training input", desc.trainingInput)):
        seen = set()
        for i, fd in enumerate(feats):
            if not fd.name:
                raise fail(f"{pre}model {group} #{i} has no name")
            if fd.name in seen:
                raise fail(f"{pre}two model {group}s are named {fd.name!r}; feature names must be unique")
            seen.add(fd.name)
            _check_feature_type(fd, f"{pre}{group} {fd.name!r}")
            _check_feature_format(fd, f"{pre}{group} {fd.name!r}", group != "output", version)


def _check_classifier_names(desc, pre: str) -> None:
    outputs = [f.name for f in desc.output]
    for field in ("predictedFeatureName", "predictedProbabilitiesName"):
        name = getattr(desc, field)
        if name and name not in outputs:
            raise fail(f"{pre}{field} {name!r} is not one of the model's outputs {outputs}")


def _output_type(desc, name: str):
    fd = next((f for f in desc.output if f.name == name), None)
    return None if fd is None else fd.type.WhichOneof("Type")


def _check_regressor_interface(desc, pre: str) -> None:
    """Core ML (InterfaceValidators.cpp, validateRegressorInterface): a regressor names its
    prediction, a double or multi-array output."""
    name = desc.predictedFeatureName
    if not name:
        raise fail(f"{pre}the regressor names no predictedFeatureName (the output holding its "
                   "prediction); Core ML refuses it: set description.predictedFeatureName")
    if _output_type(desc, name) not in ("doubleType", "multiArrayType"):
        raise fail(f"{pre}the regressor's predictedFeatureName {name!r} must be a double or "
                   "multi-array output")


def _check_classifier_interface(spec, kind: str, pre: str) -> None:
    """Core ML (validateClassifierFeatureDescriptions): a classifier names its label output, of
    the labels' type (string or int64), and its probabilities output is a dictionary."""
    desc, model = spec.description, getattr(spec, kind)
    which = model.WhichOneof("ClassLabels")
    if which is None and kind == "kNearestNeighborsClassifier":
        which = {"defaultStringLabel": "stringClassLabels"}.get(model.WhichOneof("DefaultClassLabel"),
                                                                "int64ClassLabels")
    want = "int64Type" if which == "int64ClassLabels" else "stringType"
    name = desc.predictedFeatureName
    if not name:
        raise fail(f"{pre}the classifier names no predictedFeatureName (its label output); Core ML "
                   "refuses it: set description.predictedFeatureName")
    got = _output_type(desc, name)
    if got != want:
        raise fail(f"{pre}the classifier's label output {name!r} is {got or 'missing'}; its class "
                   f"labels are {want[:-4]}s, so Core ML wants a {want[:-4]} output")
    probs = desc.predictedProbabilitiesName
    if probs and _output_type(desc, probs) not in ("dictionaryType", "multiArrayType"):
        raise fail(f"{pre}the classifier's probabilities output {probs!r} must be a dictionary "
                   "(label -> probability)")


def max_elements() -> int:
    """:data:`MAX_ELEMENTS`, or ``MLPERSONAL_MAX_ELEMENTS`` when set to a larger number."""
    value = os.environ.get("MLPERSONAL_MAX_ELEMENTS", "")
    return max(MAX_ELEMENTS, int(value)) if value.isdigit() else MAX_ELEMENTS


def _over_limit(n: int) -> str:
    """The end of a size refusal: the limit, why it exists and how to lift it."""
    return (f"more than the {max_elements()} limit (mlpersonal's guard against files that "
            f"declare huge tensors; for a model you trust, set MLPERSONAL_MAX_ELEMENTS to at "
            f"least {n})")


def _check_shape(shape, what: str) -> None:
    shape = [int(s) for s in shape]
    if any(s < 0 for s in shape):
        raise fail(f"{what}: multi-array shape {shape} has a negative dimension")
    n = math.prod(shape)
    if n > max_elements():
        raise fail(f"{what}: multi-array shape {shape} holds {n} values, {_over_limit(n)}")


def _check_feature_type(fd, what: str) -> None:
    t = fd.type
    kind = t.WhichOneof("Type")
    if kind is None:
        raise fail(f"{what}: no feature type set (multi-array, image, string, ...)")
    if kind == "multiArrayType":
        m = t.multiArrayType
        _check_shape(m.shape, what)
        flex = m.WhichOneof("ShapeFlexibility")
        if flex == "enumeratedShapes":
            for e in m.enumeratedShapes.shapes:
                _check_shape(e.shape, what)
        elif flex == "shapeRange":
            lows = [int(r.lowerBound) for r in m.shapeRange.sizeRanges]
            _check_shape(lows, what)
    elif kind == "imageType":
        it = t.imageType
        sizes = [(int(it.width), int(it.height))]
        flex = it.WhichOneof("SizeFlexibility")
        if flex == "enumeratedSizes":
            sizes += [(int(s.width), int(s.height)) for s in it.enumeratedSizes.sizes]
        elif flex == "imageSizeRange":
            r = it.imageSizeRange
            sizes.append((int(r.widthRange.lowerBound), int(r.heightRange.lowerBound)))
        for w, h in sizes:
            if not (1 <= w <= MAX_IMAGE_SIDE and 1 <= h <= MAX_IMAGE_SIDE):
                raise fail(f"{what}: image size {w}x{h} is outside 1..{MAX_IMAGE_SIDE} pixels per side")


# --- neural networks ---------------------------------------------------------------------------
#: layer kinds of iOS 12's NeuralNetwork.proto; any other kind (spec v4's ND layers) makes Core ML
#: read a network in ND mode (coremltools' mlmodel/src/Utils.cpp, isIOS12NeuralNetworkLayer)
IOS12_LAYER_KINDS = frozenset({
    "convolution", "innerProduct", "batchnorm", "activation", "pooling", "padding", "concat",
    "lrn", "softmax", "split", "add", "multiply", "unary", "upsample", "bias", "l2normalize",
    "reshape", "flatten", "permute", "reduce", "loadConstant", "scale", "simpleRecurrent", "gru",
    "uniDirectionalLSTM", "biDirectionalLSTM", "crop", "average", "max", "min", "dot", "mvn",
    "embedding", "sequenceRepeat", "reorganizeData", "slice", "custom", "resizeBilinear",
    "cropResize",
})
_PIXEL_SHUFFLE = 2


def ios12_layer(layer) -> bool:
    """Whether Core ML 2 (iOS 12) had this layer, with the options it uses."""
    lk = layer.WhichOneof("layer")
    if lk == "convolution":
        return len(layer.input) == 1  # weights as a second input came in iOS 13
    if lk == "innerProduct":
        return not layer.innerProduct.int8DynamicQuantize
    if lk == "upsample":
        return not layer.upsample.linearUpsampleMode and not len(layer.upsample.fractionalScalingFactor)
    if lk == "reorganizeData":
        return layer.reorganizeData.mode != _PIXEL_SHUFFLE
    return lk in IOS12_LAYER_KINDS


def _check_shape_mapping(spec, nn, pre: str) -> None:
    """Core ML refuses a network whose multi-array inputs keep the rank-5 mapping while it holds
    a layer added in iOS 13 (such a network runs in ND mode) or maps images the new way."""
    if nn.arrayInputShapeMapping != 0 or not any(
            f.type.WhichOneof("Type") == "multiArrayType" for f in spec.description.input):
        return
    if nn.imageInputShapeMapping != 0:
        raise fail(f"{pre}multi-array inputs use RANK5_ARRAY_MAPPING but images do not use "
                   "RANK5_IMAGE_MAPPING; Core ML refuses the mix: set arrayInputShapeMapping "
                   "to EXACT_ARRAY_MAPPING")
    newer = next((layer for layer in nn.layers if not ios12_layer(layer)), None)
    if newer is not None:
        raise fail(f"{pre}layer {newer.name!r} ({newer.WhichOneof('layer')}) was added in Core ML 3 "
                   "(iOS 13), so Core ML runs the network in ND mode, which multi-array inputs "
                   "with RANK5_ARRAY_MAPPING cannot be: Core ML refuses this model. Set "
                   "arrayInputShapeMapping to EXACT_ARRAY_MAPPING (coremltools: "
                   "NeuralNetworkBuilder(..., disable_rank5_shape_mapping=True)) or use the "
                   "layer's iOS 12 form")


#: the padding oneof a layer must set (Core ML refuses it unset)
_PADDING_CHOICE = {"convolution": "ConvolutionPaddingType", "pooling": "PoolingPaddingType",
                   "padding": "PaddingType"}
#: activations Core ML allows inside recurrent layers (validateRecurrentActivationParams)
RECURRENT_ACTIVATIONS = frozenset({"linear", "sigmoid", "tanh", "scaledTanh", "sigmoidHard", "ReLU"})


def _check_layer_choices(layer, lk: str, params, pre: str) -> None:
    """Core ML (NeuralNetworkLayerValidator.cpp): convolution, pooling and padding layers say how
    they pad; LSTMs list their 3 activations (each direction), of the kinds recurrent layers take."""
    oneof = _PADDING_CHOICE.get(lk)
    if oneof and params.WhichOneof(oneof) is None:
        raise fail(f"{pre}layer {layer.name!r} ({lk}) sets no padding type ({oneof}); Core ML "
                   "requires one (e.g. valid or same)")
    precisions = {"convolution": ("weights", "bias"), "innerProduct": ("weights", "bias"),
                  "embedding": ("weights", "bias"),
                  "batchnorm": ("gamma", "beta", "mean", "variance")}.get(lk, ())
    kinds = {storage_of(getattr(params, f)) for f in precisions if storage_of(getattr(params, f)) != "empty"}
    if {"float32", "fp16"} <= kinds:
        raise fail(f"{pre}layer {layer.name!r} ({lk}) mixes float32 and fp16 parameters "
                   f"({', '.join(precisions)}); Core ML wants them all in one precision")
    if lk == "upsample":
        for field in ("scalingFactor", "fractionalScalingFactor"):
            if len(getattr(params, field)) not in (0, 2):
                raise fail(f"{pre}layer {layer.name!r} (upsample) lists {len(getattr(params, field))} "
                           f"{field} values; Core ML wants 2 (height, width) or none")
    groups = {"uniDirectionalLSTM": [("activations", 3)], "gru": [("activations", None)],
              "biDirectionalLSTM": [("activationsForwardLSTM", 3), ("activationsBackwardLSTM", 3)],
              }.get(lk, [])
    for field, count in groups:
        acts = list(getattr(params, field))
        if count is not None and len(acts) != count:
            raise fail(f"{pre}layer {layer.name!r} ({lk}) lists {len(acts)} {field}; Core ML "
                       f"requires {count} (gates, cell, output)")
        bad = [a.WhichOneof("NonlinearityType") for a in acts
               if a.WhichOneof("NonlinearityType") not in RECURRENT_ACTIVATIONS]
        if bad:
            raise fail(f"{pre}layer {layer.name!r} ({lk}): activation {bad[0]!r} is not one Core ML "
                       f"runs in recurrent layers ({', '.join(sorted(RECURRENT_ACTIVATIONS))})")


def _check_network_interface(spec, nn, kind: str, pre: str) -> None:
    """Core ML (NeuralNetworkValidator.cpp, InterfaceValidators.cpp): a network has layers and
    outputs, reads images or multi-arrays (at least one of them required), and a plain network
    answers images or multi-arrays; outputs are never optional."""
    desc = spec.description
    if not nn.layers:
        raise fail(f"{pre}the network has no layers; Core ML requires at least one")
    if not desc.output:
        raise fail(f"{pre}the model declares no outputs; Core ML requires at least one")
    for f in desc.output:
        if f.type.isOptional:
            raise fail(f"{pre}output {f.name!r} is marked optional; Core ML's outputs cannot be")
    io = (("input", desc.input),) + ((("output", desc.output),) if kind == "neuralNetwork" else ())
    for group, feats in io:
        for f in feats:
            if _type_name(f) not in ("multiArrayType", "imageType"):
                raise fail(f"{pre}{group} {f.name!r} is a {_type_name(f)}; a neural network's "
                           f"{group}s must be images or multi-arrays (wrap it: e.g. a "
                           "pipeline stage, or declare a (1,) multi-array)")
    if desc.input and all(f.type.isOptional for f in desc.input):
        raise fail(f"{pre}every input is optional; Core ML wants at least one required input")


#: ND mode (NeuralNetworkLayerValidator.cpp validateRankCount): kind -> (min rank, max rank or
#: None, input rank == output rank), checked on a layer's first input and output where their rank
#: is known (model inputs and outputs, the layers' optional inputTensor/outputTensor ranks)
ND_RANKS = {
    "innerProduct": (1, 5, True), "softmax": (3, None, True), "convolution": (4, None, True),
    "pooling": (4, None, True), "batchnorm": (3, None, True), "mvn": (3, None, True),
    "embeddingND": (2, 5, True), "flatten": (3, None, False), "uniDirectionalLSTM": (5, 5, False),
    "reshape": (5, 5, False), "permute": (5, 5, False), "concat": (3, None, False),
    "sequenceRepeat": (5, None, True), "unary": (0, None, True),
}
#: activations with a rank rule of their own in ND mode (per-channel parameters)
_ND_CHANNEL_ACTIVATIONS = {"PReLU", "parametricSoftplus"}


def nd_interpretation(nn) -> bool:
    """Whether Core ML reads the network in ND mode: a layer added in iOS 13, or either input
    shape mapping other than rank 5 (validateNeuralNetworkTopLevel)."""
    return (nn.arrayInputShapeMapping != 0 or nn.imageInputShapeMapping != 0
            or any(not ios12_layer(layer) for layer in nn.layers))


def _check_nd_ranks(spec, nn, pre: str) -> None:
    """Core ML's rank rules of ND mode. Ranks are not inferred from layer to layer: they are
    known for model inputs (the shape's length; images 4 with RANK4_IMAGE_MAPPING, else 5),
    multi-array outputs declaring a shape, and blobs a layer gives an inputTensor/outputTensor
    rank (which must agree wherever the blob appears)."""
    ranks: dict[str, int] = {}
    for f in spec.description.input:
        t = f.type.WhichOneof("Type")
        if t == "multiArrayType":
            ranks[f.name] = len(f.type.multiArrayType.shape) if nn.arrayInputShapeMapping else 5
        elif t == "imageType":
            ranks[f.name] = 4 if nn.imageInputShapeMapping else 5
    for f in spec.description.output:
        if f.type.WhichOneof("Type") == "multiArrayType" and len(f.type.multiArrayType.shape):
            ranks[f.name] = len(f.type.multiArrayType.shape)
    for layer in nn.layers:
        for blobs, tensors, side in ((layer.input, layer.inputTensor, "input"),
                                     (layer.output, layer.outputTensor, "output")):
            if not len(tensors):
                continue
            if len(tensors) != len(blobs):
                raise fail(f"{pre}layer {layer.name!r} lists {len(tensors)} {side}Tensor ranks for "
                           f"{len(blobs)} {side}s; Core ML wants one per {side}")
            for blob, t in zip(blobs, tensors):
                if len(t.dimValue) and t.rank != len(t.dimValue):
                    raise fail(f"{pre}layer {layer.name!r}: {side} {blob!r} has rank {t.rank} but "
                               f"{len(t.dimValue)} dimValue entries")
                if ranks.setdefault(blob, int(t.rank)) != int(t.rank):
                    raise fail(f"{pre}blob {blob!r} has rank {ranks[blob]} elsewhere but rank {t.rank} "
                               f"at layer {layer.name!r}; Core ML wants one rank per blob")
        lk = layer.WhichOneof("layer")
        rule = ND_RANKS.get(lk)
        if lk == "activation" and layer.activation.WhichOneof("NonlinearityType") in _ND_CHANNEL_ACTIVATIONS:
            rule = (3, None, True)
        if rule is None or not layer.input:
            continue
        lo, hi, same = rule
        got = [(side, ranks.get(blob)) for side, blob in (("input", layer.input[0]), ("output", layer.output[0]))]
        for side, r in got:
            if r is not None and (r < lo or (hi is not None and r > hi)):
                want = f"exactly {lo}" if lo == hi else (f"{lo} to {hi}" if hi else f"at least {lo}")
                raise fail(f"{pre}layer {layer.name!r} ({lk}) has a rank-{r} {side}; in ND mode "
                           f"(EXACT_ARRAY_MAPPING or Core ML 3 layers) Core ML wants rank {want}"
                           + (": reshape the scores to (C, 1, 1) first" if lk == "softmax" else ""))
        if same and got[0][1] is not None and got[1][1] is not None and got[0][1] != got[1][1]:
            raise fail(f"{pre}layer {layer.name!r} ({lk}) turns a rank-{got[0][1]} input into a "
                       f"rank-{got[1][1]} output; Core ML wants the same rank")


def _check_network(spec, nn, kind: str, pre: str) -> None:
    desc = spec.description
    _check_shape_mapping(spec, nn, pre)
    if nd_interpretation(nn):
        _check_nd_ranks(spec, nn, pre)
    available = {f.name for f in desc.input}
    producers: dict = {}  # blob -> the layer writing it
    _check_network_interface(spec, nn, kind, pre)
    names: set[str] = set()
    updatable = []
    for i, layer in enumerate(nn.layers):
        if not layer.name:
            raise fail(f"{pre}layer #{i} has no name")
        lk = layer.WhichOneof("layer")
        if lk is None:
            raise fail(f"{pre}layer {layer.name!r} has no layer kind set; the file is corrupt or "
                       "from a newer Core ML")
        if layer.name in names:
            raise fail(f"{pre}two layers are named {layer.name!r}; layer names must be unique")
        names.add(layer.name)
        for blob in layer.input:
            if blob not in available:
                raise fail(f"{pre}layer {layer.name!r} reads blob {blob!r}, which no earlier layer "
                           "or model input produces (layers must be in topological order, "
                           "without cycles)")
        if not layer.output:
            raise fail(f"{pre}layer {layer.name!r} has no output")
        for blob in layer.output:  # Core ML: every blob has one producer
            if blob in available:
                by = producers.get(blob)
                raise fail(f"{pre}layer {layer.name!r} writes blob {blob!r}, which "
                           + (f"layer {by.name!r} already writes" if by else "is a model input")
                           + "; Core ML wants every blob written once: rename one")
        lo, hi = ARITY.get(lk, (0, None))
        if len(layer.input) < lo or (hi is not None and len(layer.input) > hi):
            want = f"exactly {lo}" if lo == hi else (f"{lo} to {hi}" if hi is not None else
                                                      f"at least {lo}")
            raise fail(f"{pre}layer {layer.name!r} ({lk}) has {len(layer.input)} inputs; it takes "
                       f"{want}")
        if lk not in MULTI_OUTPUT and len(layer.output) != 1:
            raise fail(f"{pre}layer {layer.name!r} ({lk}) has {len(layer.output)} outputs; it "
                       "produces exactly 1")
        lo, hi = OUTPUT_ARITY.get(lk, (1, None))
        if len(layer.output) < lo or (hi is not None and len(layer.output) > hi):
            want = f"exactly {lo}" if lo == hi else f"at least {lo}"
            raise fail(f"{pre}layer {layer.name!r} ({lk}) has {len(layer.output)} outputs; Core ML "
                       f"wants {want}" + (" (the sequence and each final state, read or not)"
                                          if lk in RECURRENT_LAYER_KINDS else ""))
        params = getattr(layer, lk)
        _check_layer_choices(layer, lk, params, pre)
        # global pooling ignores its (often zero) kernel size and stride
        _check_sizes(params, f"{pre}layer {layer.name!r}",
                     positive=not (lk == "pooling" and params.globalPooling))
        check = WEIGHT_CHECKS.get(lk)
        if check is not None:
            check(getattr(layer, lk), _Weights(f"{pre}layer {layer.name!r}", len(layer.input)))
        if layer.isUpdatable:
            updatable.append((layer, lk))
        available.update(layer.output)
        producers.update((b, layer) for b in layer.output)
    kinds = {b: layer.WhichOneof("layer") for b, layer in producers.items()}
    is_classifier = kind == "neuralNetworkClassifier"
    exempt = {desc.predictedFeatureName or "classLabel", desc.predictedProbabilitiesName} \
        if is_classifier else set()
    # a plain network's outputs are computed by layers (Core ML passes no input through)
    given = producers if kind == "neuralNetwork" else available
    for fd in desc.output:
        if fd.name not in exempt and fd.name not in given:
            raise fail(f"{pre}output {fd.name!r} is " + (
                "not computed by any layer (Core ML does not pass an input through as an output: "
                "add a layer, e.g. a linear activation)" if given is producers
                else "not produced by any layer of the network"))
    if is_classifier and nn.labelProbabilityLayerName and nn.labelProbabilityLayerName not in available:
        raise fail(f"{pre}labelProbabilityLayerName {nn.labelProbabilityLayerName!r} is not "
                   "produced by any layer of the network")
    if spec.isUpdatable:
        _check_update(spec, nn, updatable, kinds, is_classifier, pre)


def _check_sizes(msg, where: str, positive: bool = True) -> None:
    """Every declared size field of a layer (recursively, weights excluded) is bounded."""
    for field, value in msg.ListFields():
        if field.type == field.TYPE_MESSAGE:
            if field.message_type.name == "WeightParams":
                continue
            if field.message_type.GetOptions().map_entry:
                vf = field.message_type.fields_by_name["value"]
                items = list(value.values()) if vf.type == vf.TYPE_MESSAGE else []
            else:
                items = value if _is_repeated(field) else [value]
            for item in items:
                _check_sizes(item, where, positive)
            continue
        name = field.name
        if name not in GEOMETRY_FIELDS and name not in EXTENT_FIELDS:
            continue
        if field.cpp_type not in (field.CPPTYPE_INT32, field.CPPTYPE_INT64,
                                  field.CPPTYPE_UINT32, field.CPPTYPE_UINT64):
            continue
        values = [int(v) for v in value] if _is_repeated(field) else [int(value)]
        if name in GEOMETRY_FIELDS and any(abs(v) > MAX_DIM for v in values):
            raise fail(f"{where}: {name} {values} exceeds the limit of {MAX_DIM} per dimension")
        if positive and name in POSITIVE_FIELDS and any(v < 1 for v in values):
            raise fail(f"{where}: {name} {values} must be at least 1")
        n = math.prod(abs(v) for v in values)
        if n > max_elements():
            raise fail(f"{where}: {name} {values} declares {n} values, {_over_limit(n)}")


def _is_repeated(field) -> bool:
    rep = getattr(field, "is_repeated", None)
    return bool(rep) if rep is not None else field.label == field.LABEL_REPEATED


class _Weights:
    """Checks a layer's WeightParams against the count its declared shape needs."""

    def __init__(self, where: str, n_inputs: int = 1):
        self.where = where
        self.n_inputs = n_inputs

    def __call__(self, wp, field: str, *dims: int, optional: bool = False) -> None:
        where = f"{self.where} ({field})"
        stored = [n for n in ("floatValue", "float16Value", "rawValue", "int8RawValue")
                  if len(getattr(wp, n))]
        if len(stored) > 1:
            raise fail(f"{where}: weights are stored in more than one format ({', '.join(stored)})")
        n = math.prod(int(d) for d in dims)
        if optional and not stored:
            return
        if stored == ["rawValue"] and not wp.HasField("quantization"):
            raise fail(f"{where}: rawValue without quantization parameters; Core ML reads no "
                       "weights from it (float32 weights belong in floatValue, n-bit ones need "
                       "their quantization message)")
        if stored == ["int8RawValue"]:
            have = len(wp.int8RawValue)
        elif wp.HasField("quantization") and stored == ["rawValue"]:
            bits = int(wp.quantization.numberOfBits)
            if not 1 <= bits <= 8:
                raise fail(f"{where}: quantization.numberOfBits is {bits}; n-bit quantization "
                           "needs 1..8 bits")
            need = (n * bits + 7) // 8
            if len(wp.rawValue) != need:
                raise fail(f"{where}: rawValue holds {len(wp.rawValue)} bytes but its declared "
                           f"shape {list(dims)} of {bits}-bit values needs {need}; the model is "
                           "corrupt")
            return
        else:
            have = count_of(wp)
        if have != n:
            raise fail(f"{where}: holds {have} values but its declared shape {list(dims)} needs "
                       f"{n}; the model is corrupt or its weights are missing")


def _positive(where: str, **values) -> None:
    for name, v in values.items():
        if int(v) < 1:
            raise fail(f"{where}: {name} must be at least 1, got {int(v)}")


def _conv(p, w: _Weights) -> None:
    _positive(w.where, outputChannels=p.outputChannels, kernelChannels=p.kernelChannels)
    groups = max(int(p.nGroups), 1)
    k = [int(x) for x in p.kernelSize] or [3, 3]
    kh, kw = (k + k)[:2] if len(k) == 1 else k[:2]
    if p.outputChannels % groups:
        raise fail(f"{w.where}: outputChannels {p.outputChannels} is not divisible by nGroups {groups}")
    if w.n_inputs == 2:  # weights come from the second input: none may be stored
        if count_of(p.weights) or len(p.weights.int8RawValue):
            raise fail(f"{w.where}: takes its weights from a second input but also stores weights")
        return
    if p.isDeconvolution:
        w(p.weights, "weights", p.kernelChannels, p.outputChannels // groups, kh, kw)
    else:
        w(p.weights, "weights", p.outputChannels, p.kernelChannels, kh, kw)
    if p.hasBias:
        w(p.bias, "bias", p.outputChannels)


def _inner_product(p, w: _Weights) -> None:
    _positive(w.where, inputChannels=p.inputChannels, outputChannels=p.outputChannels)
    w(p.weights, "weights", p.outputChannels, p.inputChannels)
    if p.hasBias:
        w(p.bias, "bias", p.outputChannels)


def _embedding(p, w: _Weights) -> None:
    _positive(w.where, inputDim=p.inputDim, outputChannels=p.outputChannels)
    w(p.weights, "weights", p.outputChannels, p.inputDim)
    if p.hasBias:
        w(p.bias, "bias", p.outputChannels)


def _embedding_nd(p, w: _Weights) -> None:
    _positive(w.where, vocabSize=p.vocabSize, embeddingSize=p.embeddingSize)
    w(p.weights, "weights", p.embeddingSize, p.vocabSize)
    if p.hasBias:
        w(p.bias, "bias", p.embeddingSize)


def _batchnorm(p, w: _Weights) -> None:
    _positive(w.where, channels=p.channels)
    w(p.gamma, "gamma", p.channels)
    w(p.beta, "beta", p.channels)
    if not (p.computeMeanVar or p.instanceNormalization):
        w(p.mean, "mean", p.channels)
        w(p.variance, "variance", p.channels)


def _scale(p, w: _Weights) -> None:
    w(p.scale, "scale", *(p.shapeScale or [1]))
    if p.hasBias:
        w(p.bias, "bias", *(p.shapeBias or [1]))


def _bias(p, w: _Weights) -> None:
    w(p.bias, "bias", *(p.shape or [1]))


def _load_constant(p, w: _Weights) -> None:
    if len(p.shape) != 3:
        raise fail(f"{w.where}: loadConstant shape {list(p.shape)} must have 3 dimensions (C, H, W)")
    w(p.data, "data", *p.shape)


def _load_constant_nd(p, w: _Weights) -> None:
    w(p.data, "data", *(p.shape or [1]))


def _batched_matmul(p, w: _Weights) -> None:
    if count_of(p.weights) or p.weightMatrixFirstDimension or p.weightMatrixSecondDimension:
        w(p.weights, "weights", p.weightMatrixFirstDimension, p.weightMatrixSecondDimension)
        if p.hasBias:
            w(p.bias, "bias", p.weightMatrixSecondDimension)


WEIGHT_CHECKS = {
    "convolution": _conv,
    "innerProduct": _inner_product,
    "embedding": _embedding,
    "embeddingND": _embedding_nd,
    "batchnorm": _batchnorm,
    "scale": _scale,
    "bias": _bias,
    "loadConstant": _load_constant,
    "loadConstantND": _load_constant_nd,
    "batchedMatMul": _batched_matmul,
}


# --- update parameters -------------------------------------------------------------------------
def _check_update(spec, nn, updatable, kinds: dict, is_classifier: bool, pre: str) -> None:
    desc = spec.description
    if not nn.HasField("updateParams"):
        raise fail(f"{pre}the model is updatable but has no update parameters (updateParams); "
                   "set a loss, an optimizer and epochs (coremltools: make_updatable, "
                   "set_categorical_cross_entropy_loss, set_sgd_optimizer, set_epochs)")
    up = nn.updateParams
    if not desc.trainingInput:
        raise fail(f"{pre}the model is updatable but declares no training inputs "
                   "(description.trainingInput is empty)")
    if len(up.lossLayers) != 1:
        raise fail(f"{pre}update parameters: exactly one loss layer is required, found "
                   f"{len(up.lossLayers)}")
    loss = up.lossLayers[0]
    lk = loss.WhichOneof("LossLayerType")
    if lk is None:
        raise fail(f"{pre}update parameters: loss layer {loss.name!r} has no loss kind set "
                   "(categoricalCrossEntropyLossLayer or meanSquaredErrorLossLayer)")
    lp = getattr(loss, lk)
    if lp.input not in kinds:
        raise fail(f"{pre}update parameters: loss layer {loss.name!r} reads {lp.input!r}, which no "
                   "layer of the network produces")
    if lk == "categoricalCrossEntropyLossLayer" and kinds[lp.input] != "softmax":
        raise fail(f"{pre}update parameters: categorical cross-entropy loss {loss.name!r} reads "
                   f"{lp.input!r}, the output of a {kinds[lp.input]!r} layer; it must read the "
                   "output of a (classic) softmax layer")
    targets = {f.name for f in desc.trainingInput}
    if lp.target not in targets and not (is_classifier and desc.predictedFeatureName in targets):
        raise fail(f"{pre}update parameters: loss target {lp.target!r} is not a training input "
                   f"(trainingInput: {sorted(targets)})")
    _check_training_inputs(desc, lp.target, is_classifier, pre)
    opt_kind = up.optimizer.WhichOneof("OptimizerType")
    if opt_kind is None:
        raise fail(f"{pre}update parameters: no optimizer set (sgdOptimizer or adamOptimizer)")
    opt = getattr(up.optimizer, opt_kind)
    required = ("learningRate", "miniBatchSize") + (("beta1", "beta2", "eps")
                                                     if opt_kind == "adamOptimizer" else ())
    for key in required:
        if not opt.HasField(key):
            raise fail(f"{pre}update parameters: {opt_kind} has no {key}; Core ML requires it")
    if not up.HasField("epochs"):
        raise fail(f"{pre}update parameters: epochs is missing; it is required")
    params = [(f.name, getattr(opt, f.name)) for f in opt.DESCRIPTOR.fields if opt.HasField(f.name)]
    params += [(n, getattr(up, n)) for n in ("epochs", "seed") if up.HasField(n)]
    for name, p in params:
        _check_default(name, p, pre + "update parameters")
    for name, minimum in (("miniBatchSize", 1), ("epochs", 1)):
        value = opt.miniBatchSize.defaultValue if name == "miniBatchSize" else up.epochs.defaultValue
        if value < minimum:
            raise fail(f"{pre}update parameters: {name} default {value} must be at least {minimum}")
    for key, p in (("miniBatchSize", opt.miniBatchSize), ("epochs", up.epochs)):
        allowed = p.WhichOneof("AllowedValues")
        values = list(p.set.values) if allowed == "set" else (
            [p.range.minValue, p.range.maxValue] if allowed == "range" else [])
        if any(v <= 0 for v in values):
            raise fail(f"{pre}update parameters: the allowed values of {key} ({values}) must all "
                       "be positive")
    if not opt.learningRate.defaultValue > 0:
        raise fail(f"{pre}update parameters: learningRate default {opt.learningRate.defaultValue} "
                   "must be positive")
    if not updatable:
        raise fail(f"{pre}the model is updatable but none of its layers is marked updatable")
    for layer, lk in updatable:
        if lk not in UPDATABLE_LAYER_KINDS:
            raise fail(f"{pre}layer {layer.name!r} is marked updatable but is a {lk!r} layer; only "
                       f"{', '.join(UPDATABLE_LAYER_KINDS)} layers can be updated")
        for field, wp in updatable_weights(layer):
            storage = storage_of(wp)
            if storage != "float32":
                raise fail(f"{pre}layer {layer.name!r} ({field}) is updatable but stored as "
                           f"{storage}; updatable weights must be float32 (floatValue)")
            if lk != "uniDirectionalLSTM" and not wp.isUpdatable:
                raise fail(f"{pre}layer {layer.name!r} is updatable but its {field} are not marked "
                           f"updatable ({field}.isUpdatable); Core ML requires both flags")
    names = [l.name for l in nn.layers]
    if loss.name in names:
        raise fail(f"{pre}update parameters: loss layer {loss.name!r} has the name of a layer of the "
                   "network; Core ML wants every layer and loss layer named differently")
    # layers Core ML cannot backpropagate through between an updatable layer and the loss are
    # not refused: this runtime trains through them (exporters.updatable warns at export)


def _check_training_inputs(desc, target: str, is_classifier: bool, pre: str) -> None:
    """Core ML (validateTrainingInputs): the training inputs are the prediction inputs a loss
    needs plus the target; a classifier's label target has the label output's type."""
    predict = {f.name: f for f in desc.input}
    own = [f for f in desc.trainingInput
           if f.name not in predict or type_mismatch(predict[f.name], f)]
    if len(desc.trainingInput) < 2 or len(own) == len(desc.trainingInput) or not own:
        raise fail(f"{pre}training inputs {[f.name for f in desc.trainingInput]} must hold at "
                   "least one prediction input (same name and type) and the loss target; Core ML "
                   "refuses the model otherwise")
    label = desc.predictedFeatureName
    for f in own:
        if is_classifier and f.name == label:
            out = _output_type(desc, label)
            if out is not None and out != _type_name(f):
                raise fail(f"{pre}training input {label!r} is {_type_name(f)} but the classifier's "
                           f"label output is {out}; declare them alike")


def updatable_weights(layer) -> list[tuple[str, object]]:
    """``(field, WeightParams)`` an updatable layer trains: a convolution's or innerProduct's
    weights and bias, every weight blob an LSTM holds (gate matrices, biases, peepholes)."""
    p = getattr(layer, layer.WhichOneof("layer"))
    if layer.WhichOneof("layer") == "uniDirectionalLSTM":
        wp = p.weightParams
        return [(f.name, getattr(wp, f.name)) for f in wp.DESCRIPTOR.fields if count_of(getattr(wp, f.name))]
    return [("weights", p.weights)] + ([("bias", p.bias)] if getattr(p, "hasBias", False) else [])


def _check_default(name: str, p, where: str) -> None:
    """A DoubleParameter/Int64Parameter's default lies inside its own range/set."""
    v = p.defaultValue
    if v != v or v in (math.inf, -math.inf):
        raise fail(f"{where}: {name} default {v} is not a finite number")
    allowed = p.WhichOneof("AllowedValues")
    if allowed == "range":
        lo, hi = p.range.minValue, p.range.maxValue
        if lo > hi:
            raise fail(f"{where}: {name} allows the empty range [{lo}, {hi}]")
        if not lo <= v <= hi:
            raise fail(f"{where}: {name} default {v} is outside its allowed range [{lo}, {hi}]")
    elif allowed == "set":
        values = list(p.set.values)
        if v not in values:
            raise fail(f"{where}: {name} default {v} is not in its allowed set {values}")


# --- kNN ---------------------------------------------------------------------------------------
def _check_knn(spec, pre: str) -> None:
    knn = spec.kNearestNeighborsClassifier
    idx = knn.nearestNeighborsIndex
    d = int(idx.numberOfDimensions)
    if d < 1:
        raise fail(f"{pre}kNN: numberOfDimensions must be at least 1, got {d}")
    if d > max_elements():
        raise fail(f"{pre}kNN: numberOfDimensions {d} is {_over_limit(d)}")
    # Core ML (KNearestNeighborsClassifierValidator.cpp): every choice is spelled out
    for owner, oneof, what in ((knn, "WeightingScheme", "a weighting scheme (uniformWeighting or "
                                "inverseDistanceWeighting)"),
                               (idx, "IndexType", "an index type (linearIndex or singleKdTreeIndex)"),
                               (idx, "DistanceFunction", "a distance function (squaredEuclideanDistance)")):
        if owner.WhichOneof(oneof) is None:
            raise fail(f"{pre}kNN: no {oneof} set; Core ML requires {what}")
    if knn.WhichOneof("ClassLabels") is None and knn.WhichOneof("DefaultClassLabel") is None:
        raise fail(f"{pre}kNN: neither class labels nor a default label; Core ML requires a "
                   "default label (defaultStringLabel or defaultInt64Label) when no labels are stored")
    samples = len(idx.floatSamples)
    which = knn.WhichOneof("ClassLabels")
    labels = len(getattr(knn, which).vector) if which else 0
    if samples != labels:
        raise fail(f"{pre}kNN: {samples} samples but {labels} labels; every sample needs "
                   "exactly one class label")
    for i, s in enumerate(idx.floatSamples):
        if len(s.vector) != d:
            raise fail(f"{pre}kNN: sample {i} has {len(s.vector)} values but numberOfDimensions "
                       f"is {d}")
    arrays = [f for f in spec.description.input if f.type.WhichOneof("Type") == "multiArrayType"]
    if len(arrays) != 1:
        raise fail(f"{pre}kNN: the model needs exactly one multi-array input, found {len(arrays)}")
    shape = [int(s) for s in arrays[0].type.multiArrayType.shape]
    if shape and math.prod(shape) != d:
        raise fail(f"{pre}kNN: input {arrays[0].name!r} has shape {shape} "
                   f"({math.prod(shape)} values) but numberOfDimensions is {d}")
    if idx.WhichOneof("IndexType") == "singleKdTreeIndex" and idx.singleKdTreeIndex.leafSize < 1:
        raise fail(f"{pre}kNN: kd-tree leafSize must be at least 1, got "
                   f"{idx.singleKdTreeIndex.leafSize}")
    if knn.HasField("numberOfNeighbors"):
        k = knn.numberOfNeighbors
        if k.defaultValue < 1:
            raise fail(f"{pre}kNN: numberOfNeighbors default {k.defaultValue} must be at least 1")
        allowed = k.WhichOneof("AllowedValues")
        if allowed == "range" and k.range.minValue < 1:
            raise fail(f"{pre}kNN: numberOfNeighbors range [{k.range.minValue}, "
                       f"{k.range.maxValue}] must start at 1 or more")
        if allowed == "set" and any(v < 1 for v in k.set.values):
            raise fail(f"{pre}kNN: numberOfNeighbors set {list(k.set.values)} must hold values "
                       "of at least 1")
        _check_default("numberOfNeighbors", k, f"{pre}kNN")


# --- pipelines ---------------------------------------------------------------------------------
def _type_name(fd) -> str:
    return fd.type.WhichOneof("Type") or "undefined"


def type_mismatch(a, b) -> str:
    """How feature type ``b`` differs from ``a`` where Core ML (Comparison.cpp, isEquivalent)
    tells them apart: the kind; a multi-array's data type, rank and (both fixed) shape; an
    image's size and colour space; a dictionary's key type. Empty when equivalent."""
    ka, kb = _type_name(a), _type_name(b)
    if ka != kb:
        return f"a {kb} for a {ka}"
    ta, tb = a.type, b.type
    if ka == "multiArrayType":
        x, y = ta.multiArrayType, tb.multiArrayType
        if x.dataType != y.dataType:
            names = x.DESCRIPTOR.fields_by_name["dataType"].enum_type.values_by_number
            name = lambda v: names[v].name if v in names else str(v)  # noqa: E731
            return f"{name(y.dataType)} values for {name(x.dataType)} ones"
        flex_x, flex_y = x.WhichOneof("ShapeFlexibility"), y.WhichOneof("ShapeFlexibility")
        if _rank(x) != _rank(y) or (not flex_x and not flex_y and list(x.shape) != list(y.shape)):
            return f"shape {list(y.shape)} for {list(x.shape)}"
    elif ka == "imageType":
        x, y = ta.imageType, tb.imageType
        if (x.width, x.height, x.colorSpace) != (y.width, y.height, y.colorSpace):
            return (f"a {y.width}x{y.height} image (colour space {y.colorSpace}) for a "
                    f"{x.width}x{x.height} one (colour space {x.colorSpace})")
    elif ka == "dictionaryType":
        if ta.dictionaryType.WhichOneof("KeyType") != tb.dictionaryType.WhichOneof("KeyType"):
            return "a dictionary with other keys"
    return ""


def _rank(marray) -> int:
    flex = marray.WhichOneof("ShapeFlexibility")
    if flex == "enumeratedShapes":
        return len(marray.enumeratedShapes.shapes[0].shape) if marray.enumeratedShapes.shapes else 0
    if flex == "shapeRange":
        return len(marray.shapeRange.sizeRanges)
    return len(marray.shape)


def _check_pipeline(spec, pipe, pre: str, depth: int) -> None:
    models = list(pipe.models)
    names = list(pipe.names)
    if not models:
        raise fail(f"{pre}pipeline has no models")
    if names and len(names) != len(models):
        raise fail(f"{pre}pipeline has {len(names)} stage names for {len(models)} models")
    seen = set()
    for n in names:
        if n in seen:
            raise fail(f"{pre}pipeline stage name {n!r} is used twice; stage names must be unique")
        seen.add(n)
    updatable = [i for i, sub in enumerate(models) if sub.isUpdatable]
    if spec.isUpdatable and updatable != [len(models) - 1]:
        raise fail(f"{pre}an updatable pipeline trains its last stage only: mark stage "
                   f"{len(models) - 1} updatable and no other (updatable now: {updatable})")
    if not spec.isUpdatable and updatable:
        raise fail(f"{pre}stage {updatable[0]} is updatable inside a pipeline that is not: mark the "
                   "pipeline isUpdatable too (only its last stage may be updatable)")
    produced = {f.name: (f, "the pipeline input") for f in spec.description.input}
    for i, sub in enumerate(models):
        label = f"pipeline stage {i}" + (f" ({names[i]!r})" if names else "")
        for fd in sub.description.input:
            if fd.name not in produced:
                if fd.type.isOptional:
                    continue
                raise fail(f"{pre}{label} reads {fd.name!r}, which no earlier stage or pipeline "
                           "input produces")
            given, src = produced[fd.name]
            if _type_name(given) != _type_name(fd):
                raise fail(f"{pre}{label}: input {fd.name!r} expects a {_type_name(fd)} but "
                           f"{src} gives a {_type_name(given)}")
            why = type_mismatch(fd, given)
            if why:
                raise fail(f"{pre}{label}: input {fd.name!r} is declared unlike what {src} gives "
                           f"({why}); Core ML wants the same type on both sides")
        validate(sub, where=f"{pre}{label}".rstrip(": "), _depth=depth + 1)
        for fd in sub.description.output:
            produced[fd.name] = (fd, f"{label}")
    for fd in spec.description.output:
        if fd.name not in produced:
            raise fail(f"{pre}pipeline output {fd.name!r} is not produced by any stage")
        given, src = produced[fd.name]
        why = type_mismatch(fd, given)
        if why:
            raise fail(f"{pre}pipeline output {fd.name!r} is declared unlike what {src} gives "
                       f"({why}); Core ML wants the same type")
