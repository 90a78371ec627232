"""The load-time validator: one minimal bad spec per rule, with the exact error.

Each bad spec is a valid coremltools-built spec (benchmarks.fuzz.base_specs) with one field
corrupted; the same specs unmodified pass and predict.
"""

import re
import tracemalloc

import numpy as np
import pytest

import mlpersonal as mp
from benchmarks.fuzz import base_specs, valid_input
from mlpersonal.proto import Model_pb2
from mlpersonal.validate import MAX_ELEMENTS, MAX_PIPELINE_DEPTH, validate


@pytest.fixture(scope="module")
def bases():
    return base_specs()


def _copy(spec):
    m = Model_pb2.Model()
    m.CopyFrom(spec)
    return m


def _layer(nn, name):
    return next(l for l in nn.layers if l.name == name)


# --- (base, corruption, exact message) per rule -------------------------------------------------
def img(s):
    return s.neuralNetworkClassifier


def upd(s):
    return s.neuralNetworkClassifier


def reg(s):
    return s.neuralNetwork


def up(s):
    return s.neuralNetworkClassifier.updateParams


def knn(s):
    return s.kNearestNeighborsClassifier


def pipe(s):
    return s.pipelineClassifier.pipeline


def _set(obj, **kw):
    for k, v in kw.items():
        setattr(obj, k, v)


def _dup_input(s):
    s.description.input.add().CopyFrom(s.description.input[0])


def _dup_output(s):
    s.description.output.add().CopyFrom(s.description.output[0])


def _swap_layers(s, i, j):
    a, b = _copy_msg(img(s).layers[i]), _copy_msg(img(s).layers[j])
    img(s).layers[i].CopyFrom(b)
    img(s).layers[j].CopyFrom(a)


def _output(s, name):
    return next(f for f in s.description.output if f.name == name)


def _copy_msg(msg):
    m = type(msg)()
    m.CopyFrom(msg)
    return m


def _fp16(wp, n):
    wp.Clear()
    wp.float16Value = np.zeros(n, dtype="<f2").tobytes()


def _restore(wp, field: str, dtype: str):
    """Move ``wp``'s float values into ``field`` as ``dtype`` bytes."""
    setattr(wp, field, np.asarray(wp.floatValue, dtype).tobytes())
    wp.ClearField("floatValue")


def _quant(wp, nbytes, bits=8):
    wp.Clear()
    wp.rawValue = bytes(nbytes)
    wp.quantization.numberOfBits = bits
    wp.quantization.linearQuantization.scale.append(1.0)
    wp.quantization.linearQuantization.bias.append(0.0)


def _add_output(s, name):
    f = s.description.output.add()
    f.name = name
    f.type.stringType.SetInParent()


def _two_losses(s):
    up(s).lossLayers.add().CopyFrom(up(s).lossLayers[0])


def _nested(spec, depth):
    m = spec
    for _ in range(depth):
        outer = Model_pb2.Model()
        outer.specificationVersion = 4
        outer.description.CopyFrom(m.description)
        outer.pipeline.models.add().CopyFrom(m)
        outer.isUpdatable = m.isUpdatable  # Core ML: an updatable stage only in an updatable pipeline
        m = outer
    return m


RULES = [
    # feature descriptions
    ("input_name", "nn_image_classifier", lambda s: _set(s.description.input[0], name=""),
     "model input #0 has no name"),
    ("input_unique", "nn_image_classifier", _dup_input,
     "two model inputs are named 'image'; feature names must be unique"),
    ("output_unique", "updatable_regressor", _dup_output,
     "two model outputs are named 'y'; feature names must be unique"),
    ("training_input_name", "updatable_nn", lambda s: _set(s.description.trainingInput[1], name=""),
     "model training input #1 has no name"),
    ("feature_type", "updatable_regressor", lambda s: s.description.input[0].ClearField("type"),
     "input 'x': no feature type set (multi-array, image, string, ...)"),
    ("shape_negative", "updatable_regressor",
     lambda s: s.description.input[0].type.multiArrayType.shape.__setitem__(1, -4),
     "input 'x': multi-array shape [2, -4, 4] has a negative dimension"),
    ("shape_bounded", "updatable_regressor",
     lambda s: s.description.input[0].type.multiArrayType.shape.__setitem__(0, 2**40),
     f"input 'x': multi-array shape [{2**40}, 4, 4] holds {2**44} values, more than the "
     f"{MAX_ELEMENTS} limit (mlpersonal's guard against files that declare huge tensors; for a "
     f"model you trust, set MLPERSONAL_MAX_ELEMENTS to at least {2**44})"),
    ("image_size", "nn_image_classifier",
     lambda s: _set(s.description.input[0].type.imageType, width=0),
     "input 'image': image size 0x8 is outside 1..16384 pixels per side"),
    ("image_size_huge", "nn_image_classifier",
     lambda s: _set(s.description.input[0].type.imageType, height=2**40),
     f"input 'image': image size 8x{2**40} is outside 1..16384 pixels per side"),
    ("predicted_feature", "knn", lambda s: _set(s.description, predictedFeatureName="os.system"),
     "predictedFeatureName 'os.system' is not one of the model's outputs ['label', 'labelProbs']"),
    ("predicted_probs", "nn_image_classifier",
     lambda s: _set(s.description, predictedProbabilitiesName="p"),
     "predictedProbabilitiesName 'p' is not one of the model's outputs ['probs', 'label']"),
    # layer graph
    ("layer_name", "nn_image_classifier", lambda s: _set(img(s).layers[2], name=""),
     "layer #2 has no name"),
    ("layer_kind", "nn_image_classifier", lambda s: img(s).layers[2].ClearField("activation"),
     "layer 'relu' has no layer kind set; the file is corrupt or from a newer Core ML"),
    ("layer_unique", "nn_image_classifier", lambda s: _set(img(s).layers[2], name="bn"),
     "two layers are named 'bn'; layer names must be unique"),
    ("layer_order", "nn_image_classifier", lambda s: _swap_layers(s, 1, 2),
     "layer 'relu' reads blob 'n', which no earlier layer or model input produces (layers must be "
     "in topological order, without cycles)"),
    ("layer_cycle", "nn_image_classifier",
     lambda s: img(s).layers[2].input.__setitem__(0, "r"),
     "layer 'relu' reads blob 'r', which no earlier layer or model input produces (layers must be "
     "in topological order, without cycles)"),
    ("layer_output", "nn_image_classifier", lambda s: img(s).layers[2].ClearField("output"),
     "layer 'relu' has no output"),
    ("layer_arity_in", "nn_image_classifier", lambda s: img(s).layers[6].input.append("f"),
     "layer 'sm' (softmax) has 2 inputs; it takes exactly 1"),
    ("layer_arity_out", "nn_image_classifier", lambda s: img(s).layers[2].output.append("r2"),
     "layer 'relu' (activation) has 2 outputs; it produces exactly 1"),
    ("blob_written_twice", "updatable_nn", lambda s: upd(s).layers[2].output.__setitem__(0, "h"),
     "layer 'fc2' writes blob 'h', which layer 'fc1' already writes; Core ML wants every blob "
     "written once: rename one"),
    ("input_overwritten", "updatable_nn", lambda s: upd(s).layers[0].output.__setitem__(0, "x"),
     "layer 'fc1' writes blob 'x', which is a model input; Core ML wants every blob written once: "
     "rename one"),
    ("array_dtype", "updatable_regressor", lambda s: _set(s.description.input[0].type.multiArrayType, dataType=0),
     "input 'x': no element type (dataType); Core ML wants DOUBLE, FLOAT32, FLOAT16 or INT32"),
    ("array_float16_version", "updatable_regressor",
     lambda s: _set(s.description.input[0].type.multiArrayType, dataType=65552),
     "input 'x': FLOAT16 multi-arrays need specificationVersion >= 7, the model has 4"),
    ("input_shape", "updatable_regressor", lambda s: s.description.input[0].type.multiArrayType.ClearField("shape"),
     "input 'x': no shape; Core ML wants an input multi-array's shape (or its allowed shapes) declared"),
    ("image_colorspace", "nn_image_classifier", lambda s: _set(s.description.input[0].type.imageType, colorSpace=0),
     "input 'image': no colour space; Core ML wants RGB, BGR or GRAYSCALE"),
    ("raw_without_quantization", "nn_image_classifier",
     lambda s: _restore(img(s).layers[5].innerProduct.weights, "rawValue", "<f4"),
     "layer 'fc' (weights): rawValue without quantization parameters; Core ML reads no weights "
     "from it (float32 weights belong in floatValue, n-bit ones need their quantization message)"),
    ("mixed_precision", "nn_image_classifier",
     lambda s: _restore(img(s).layers[5].innerProduct.bias, "float16Value", "<f2"),
     "layer 'fc' (innerProduct) mixes float32 and fp16 parameters (weights, bias); Core ML wants them "
     "all in one precision"),
    ("conv_padding_type", "nn_image_classifier",
     lambda s: img(s).layers[0].convolution.ClearField("valid") or img(s).layers[0].convolution.ClearField("same"),
     "layer 'conv' (convolution) sets no padding type (ConvolutionPaddingType); Core ML requires "
     "one (e.g. valid or same)"),
    ("lstm_activations", "recurrent",
     lambda s: s.neuralNetwork.layers[0].uniDirectionalLSTM.activations.pop(),
     "layer 'lstm' (uniDirectionalLSTM) lists 2 activations; Core ML requires 3 (gates, cell, output)"),
    ("lstm_activation_kind", "recurrent",
     lambda s: s.neuralNetwork.layers[0].uniDirectionalLSTM.activations[0].leakyReLU.SetInParent(),
     "layer 'lstm' (uniDirectionalLSTM): activation 'leakyReLU' is not one Core ML runs in recurrent "
     "layers (ReLU, linear, scaledTanh, sigmoid, sigmoidHard, tanh)"),
    ("output_optional", "updatable_regressor", lambda s: _set(s.description.output[0].type, isOptional=True),
     "output 'y' is marked optional; Core ML's outputs cannot be"),
    ("input_kind", "updatable_regressor", lambda s: s.description.input[0].type.doubleType.SetInParent(),
     "input 'x' is a doubleType; a neural network's inputs must be images or multi-arrays (wrap "
     "it: e.g. a pipeline stage, or declare a (1,) multi-array)"),
    ("no_layers", "updatable_regressor", lambda s: reg(s).ClearField("layers"),
     "the network has no layers; Core ML requires at least one"),
    ("output_produced", "updatable_regressor",
     lambda s: reg(s).layers[0].output.__setitem__(0, "z"),
     "output 'y' is not computed by any layer (Core ML does not pass an input through as an "
     "output: add a layer, e.g. a linear activation)"),
    ("prob_layer_produced", "nn_image_classifier",
     lambda s: _set(img(s), labelProbabilityLayerName="nope"),
     "labelProbabilityLayerName 'nope' is not produced by any layer of the network"),
    # weight sizes vs declared shapes
    ("ip_weights", "nn_image_classifier", lambda s: _set(img(s).layers[5].innerProduct, inputChannels=63),
     "layer 'fc' (weights): holds 192 values but its declared shape [3, 63] needs 189; the model "
     "is corrupt or its weights are missing"),
    ("ip_bias", "nn_image_classifier", lambda s: img(s).layers[5].innerProduct.bias.floatValue.append(1),
     "layer 'fc' (bias): holds 4 values but its declared shape [3] needs 3; the model is corrupt "
     "or its weights are missing"),
    ("conv_weights", "nn_image_classifier", lambda s: _set(img(s).layers[0].convolution, kernelChannels=2),
     "layer 'conv' (weights): holds 108 values but its declared shape [4, 2, 3, 3] needs 72; the "
     "model is corrupt or its weights are missing"),
    ("conv_two_weights", "nn_image_classifier", lambda s: img(s).layers[0].input.append("image"),
     "layer 'conv': takes its weights from a second input but also stores weights"),
    ("conv_groups", "nn_image_classifier", lambda s: _set(img(s).layers[0].convolution, nGroups=3),
     "layer 'conv': outputChannels 4 is not divisible by nGroups 3"),
    ("bn_mean", "nn_image_classifier", lambda s: img(s).layers[1].batchnorm.mean.ClearField("floatValue"),
     "layer 'bn' (mean): holds 0 values but its declared shape [4] needs 4; the model is corrupt "
     "or its weights are missing"),
    ("fp16_count", "nn_image_classifier",
     lambda s: (_fp16(img(s).layers[5].innerProduct.weights, 191), _fp16(img(s).layers[5].innerProduct.bias, 3)),
     "layer 'fc' (weights): holds 191 values but its declared shape [3, 64] needs 192; the model "
     "is corrupt or its weights are missing"),
    ("quant_bytes", "nn_image_classifier", lambda s: _quant(img(s).layers[5].innerProduct.weights, 95, 4),
     "layer 'fc' (weights): rawValue holds 95 bytes but its declared shape [3, 64] of 4-bit values "
     "needs 96; the model is corrupt"),
    ("quant_bits", "nn_image_classifier", lambda s: _quant(img(s).layers[5].innerProduct.weights, 96, 0),
     "layer 'fc' (weights): quantization.numberOfBits is 0; n-bit quantization needs 1..8 bits"),
    ("two_formats", "nn_image_classifier",
     lambda s: _set(img(s).layers[5].innerProduct.weights, float16Value=bytes(4)),
     "layer 'fc' (weights): weights are stored in more than one format (floatValue, float16Value)"),
    ("huge_channels", "nn_image_classifier",
     lambda s: _set(img(s).layers[5].innerProduct, outputChannels=2**40),
     f"layer 'fc': outputChannels [{2**40}] declares {2**40} values, more than the {MAX_ELEMENTS} "
     f"limit (mlpersonal's guard against files that declare huge tensors; for a model you trust, "
     f"set MLPERSONAL_MAX_ELEMENTS to at least {2**40})"),
    ("huge_product", "nn_image_classifier",
     lambda s: _set(img(s).layers[5].innerProduct, outputChannels=2**20, inputChannels=2**20),
     f"layer 'fc' (weights): holds 192 values but its declared shape [{2**20}, {2**20}] needs "
     f"{2**40}; the model is corrupt or its weights are missing"),
    ("uint64_negative", "nn_image_classifier",
     lambda s: _set(img(s).layers[0].convolution, outputChannels=2**64 - 1),
     f"layer 'conv': outputChannels [{2**64 - 1}] declares {2**64 - 1} values, more than the "
     f"{MAX_ELEMENTS} limit (mlpersonal's guard against files that declare huge tensors; for a "
     f"model you trust, set MLPERSONAL_MAX_ELEMENTS to at least {2**64 - 1})"),
    ("positive_channels", "nn_image_classifier",
     lambda s: _set(img(s).layers[5].innerProduct, outputChannels=0),
     "layer 'fc': outputChannels must be at least 1, got 0"),
    ("kernel_bounded", "nn_image_classifier",
     lambda s: img(s).layers[3].pooling.kernelSize.__setitem__(0, 2**30),
     f"layer 'pool': kernelSize [{2**30}, 2] exceeds the limit of 65536 per dimension"),
    ("global_pool_kernel_zero_ok", "nn_image_classifier",
     lambda s: (_set(img(s).layers[3].pooling, globalPooling=True),
                img(s).layers[3].pooling.kernelSize.__setitem__(0, 0),
                _set(img(s).layers[0].convolution, nGroups=3)),
     "layer 'conv': outputChannels 4 is not divisible by nGroups 3"),
    ("stride_positive", "nn_image_classifier",
     lambda s: img(s).layers[3].pooling.stride.__setitem__(1, 0),
     "layer 'pool': stride [2, 0] must be at least 1"),
    # update parameters
    ("upd_version", "updatable_nn", lambda s: _set(s, specificationVersion=3),
     "the model is updatable but its specificationVersion is 3; updatable models need version 4 "
     "(Core ML 3) or newer"),
    ("upd_params", "updatable_nn", lambda s: upd(s).ClearField("updateParams"),
     "the model is updatable but has no update parameters (updateParams); set a loss, an "
     "optimizer and epochs (coremltools: make_updatable, set_categorical_cross_entropy_loss, "
     "set_sgd_optimizer, set_epochs)"),
    ("upd_training_inputs", "updatable_nn", lambda s: s.description.ClearField("trainingInput"),
     "the model is updatable but declares no training inputs (description.trainingInput is empty)"),
    ("one_loss_two", "updatable_nn", _two_losses,
     "update parameters: exactly one loss layer is required, found 2"),
    ("one_loss_zero", "updatable_nn", lambda s: up(s).ClearField("lossLayers"),
     "update parameters: exactly one loss layer is required, found 0"),
    ("loss_kind", "updatable_nn",
     lambda s: up(s).lossLayers[0].ClearField("categoricalCrossEntropyLossLayer"),
     "update parameters: loss layer 'loss' has no loss kind set (categoricalCrossEntropyLossLayer "
     "or meanSquaredErrorLossLayer)"),
    ("loss_input", "updatable_nn",
     lambda s: _set(up(s).lossLayers[0].categoricalCrossEntropyLossLayer, input="nowhere"),
     "update parameters: loss layer 'loss' reads 'nowhere', which no layer of the network produces"),
    ("ce_on_softmax", "updatable_nn",
     lambda s: _set(up(s).lossLayers[0].categoricalCrossEntropyLossLayer, input="logits"),
     "update parameters: categorical cross-entropy loss 'loss' reads 'logits', the output of a "
     "'innerProduct' layer; it must read the output of a (classic) softmax layer"),
    ("loss_target", "updatable_regressor",
     lambda s: _set(reg(s).updateParams.lossLayers[0].meanSquaredErrorLossLayer, target="t"),
     "update parameters: loss target 't' is not a training input (trainingInput: ['x', 'y_true'])"),
    ("optimizer", "updatable_nn", lambda s: up(s).ClearField("optimizer"),
     "update parameters: no optimizer set (sgdOptimizer or adamOptimizer)"),
    ("learning_rate_present", "updatable_nn",
     lambda s: up(s).optimizer.adamOptimizer.ClearField("learningRate"),
     "update parameters: adamOptimizer has no learningRate; Core ML requires it"),
    ("batch_present", "updatable_regressor",
     lambda s: reg(s).updateParams.optimizer.sgdOptimizer.ClearField("miniBatchSize"),
     "update parameters: sgdOptimizer has no miniBatchSize; Core ML requires it"),
    ("epochs_present", "updatable_nn", lambda s: up(s).ClearField("epochs"),
     "update parameters: epochs is missing; it is required"),
    ("default_in_range", "updatable_nn",
     lambda s: _set(up(s).optimizer.adamOptimizer.learningRate, defaultValue=2.0),
     "update parameters: learningRate default 2.0 is outside its allowed range [0.0, 1.0]"),
    ("default_in_set", "updatable_nn", lambda s: _set(up(s).epochs, defaultValue=5),
     "update parameters: epochs default 5 is not in its allowed set [2]"),
    ("range_nonempty", "updatable_nn",
     lambda s: _set(up(s).optimizer.adamOptimizer.beta1.range, minValue=0.5, maxValue=0.1),
     "update parameters: beta1 allows the empty range [0.5, 0.1]"),
    ("default_finite", "updatable_nn",
     lambda s: _set(up(s).optimizer.adamOptimizer.eps, defaultValue=float("nan")),
     "update parameters: eps default nan is not a finite number"),
    ("adam_beta1_present", "updatable_nn",
     lambda s: up(s).optimizer.adamOptimizer.ClearField("beta1"),
     "update parameters: adamOptimizer has no beta1; Core ML requires it"),
    ("batch_set_positive", "updatable_regressor",
     lambda s: reg(s).updateParams.optimizer.sgdOptimizer.miniBatchSize.set.values.__setitem__(slice(None), [2, 0]),
     "update parameters: the allowed values of miniBatchSize ([2, 0]) must all be positive"),
    ("weights_flag", "updatable_nn",
     lambda s: _set(_layer(upd(s), "fc2").innerProduct.bias, isUpdatable=False),
     "layer 'fc2' is updatable but its bias are not marked updatable (bias.isUpdatable); Core ML "
     "requires both flags"),
    ("loss_name_clash", "updatable_nn", lambda s: _set(up(s).lossLayers[0], name="fc1"),
     "update parameters: loss layer 'fc1' has the name of a layer of the network; Core ML wants "
     "every layer and loss layer named differently"),
    ("training_target_only", "updatable_nn", lambda s: s.description.trainingInput.__delitem__(0),
     "training inputs ['label'] must hold at least one prediction input (same name and type) and "
     "the loss target; Core ML refuses the model otherwise"),
    ("batch_positive", "updatable_regressor",
     lambda s: (_set(reg(s).updateParams.optimizer.sgdOptimizer.miniBatchSize, defaultValue=0),
                reg(s).updateParams.optimizer.sgdOptimizer.miniBatchSize.set.values.append(0)),
     "update parameters: miniBatchSize default 0 must be at least 1"),
    ("lr_positive", "updatable_nn",
     lambda s: _set(up(s).optimizer.adamOptimizer.learningRate, defaultValue=0.0),
     "update parameters: learningRate default 0.0 must be positive"),
    ("some_updatable", "updatable_nn",
     lambda s: [_set(l, isUpdatable=False) for l in upd(s).layers],
     "the model is updatable but none of its layers is marked updatable"),
    ("updatable_kind", "updatable_nn", lambda s: _set(upd(s).layers[1], isUpdatable=True),
     "layer 'relu' is marked updatable but is a 'activation' layer; only convolution, "
     "innerProduct, uniDirectionalLSTM layers can be updated"),
    ("updatable_float", "updatable_nn",
     lambda s: (_fp16(upd(s).layers[2].innerProduct.weights, 10), _fp16(upd(s).layers[2].innerProduct.bias, 2)),
     "layer 'fc2' (weights) is updatable but stored as fp16; updatable weights must be float32 "
     "(floatValue)"),
    ("updatable_quantized", "updatable_regressor",
     lambda s: _quant(reg(s).layers[0].convolution.weights, 18, 8),
     "layer 'conv' (weights) is updatable but stored as 8-bit linear; updatable weights must be "
     "float32 (floatValue)"),
    # kNN
    ("knn_labels", "knn", lambda s: knn(s).stringClassLabels.vector.append("d"),
     "kNN: 6 samples but 7 labels; every sample needs exactly one class label"),
    ("knn_dims_positive", "knn", lambda s: _set(knn(s).nearestNeighborsIndex, numberOfDimensions=0),
     "kNN: numberOfDimensions must be at least 1, got 0"),
    ("knn_sample_dims", "knn",
     lambda s: knn(s).nearestNeighborsIndex.floatSamples[2].vector.append(0.0),
     "kNN: sample 2 has 5 values but numberOfDimensions is 4"),
    ("knn_input_shape", "knn",
     lambda s: s.description.input[0].type.multiArrayType.shape.__setitem__(0, 5),
     "kNN: input 'features' has shape [5] (5 values) but numberOfDimensions is 4"),
    ("knn_one_input", "knn", lambda s: s.description.input[0].type.stringType.SetInParent(),
     "kNN: the model needs exactly one multi-array input, found 0"),
    ("knn_k_positive", "knn", lambda s: _set(knn(s).numberOfNeighbors, defaultValue=0),
     "kNN: numberOfNeighbors default 0 must be at least 1"),
    ("knn_k_range", "knn", lambda s: _set(knn(s).numberOfNeighbors, defaultValue=9),
     "kNN: numberOfNeighbors default 9 is outside its allowed range [1, 5]"),
    ("knn_k_range_start", "knn", lambda s: _set(knn(s).numberOfNeighbors.range, minValue=0),
     "kNN: numberOfNeighbors range [0, 5] must start at 1 or more"),
    ("knn_k_set", "knn", lambda s: knn(s).numberOfNeighbors.set.values.extend([1, 2]),
     "kNN: numberOfNeighbors default 3 is not in its allowed set [1, 2]"),
    ("knn_leaf", "knn", lambda s: knn(s).nearestNeighborsIndex.singleKdTreeIndex.SetInParent(),
     "kNN: kd-tree leafSize must be at least 1, got 0"),
    # pipelines
    ("pipe_names_count", "pipeline", lambda s: pipe(s).names.append("extra"),
     "pipeline has 3 stage names for 2 models"),
    ("pipe_names_unique", "pipeline", lambda s: pipe(s).names.__setitem__(1, "embed"),
     "pipeline stage name 'embed' is used twice; stage names must be unique"),
    ("pipe_empty", "pipeline", lambda s: (pipe(s).ClearField("models"), pipe(s).ClearField("names")),
     "pipeline has no models"),
    ("pipe_inputs", "pipeline", lambda s: _set(pipe(s).models[1].description.input[0], name="emb"),
     "pipeline stage 1 ('knn') reads 'emb', which no earlier stage or pipeline input produces"),
    ("pipe_types", "pipeline",
     lambda s: pipe(s).models[1].description.input[0].type.stringType.SetInParent(),
     "pipeline stage 1 ('knn'): input 'features' expects a stringType but pipeline stage 0 "
     "('embed') gives a multiArrayType"),
    ("nn_output_kind", "pipeline",
     lambda s: pipe(s).models[0].description.output[0].type.stringType.SetInParent(),
     "pipeline stage 0 ('embed'): output 'features' is a stringType; a neural network's outputs "
     "must be images or multi-arrays (wrap it: e.g. a pipeline stage, or declare a (1,) "
     "multi-array)"),
    ("classifier_unnamed_label", "nn_image_classifier",
     lambda s: s.description.ClearField("predictedFeatureName"),
     "the classifier names no predictedFeatureName (its label output); Core ML refuses it: set "
     "description.predictedFeatureName"),
    ("classifier_label_type", "nn_image_classifier",
     lambda s: _output(s, s.description.predictedFeatureName).type.int64Type.SetInParent(),
     "the classifier's label output 'label' is int64Type; its class labels are strings, so "
     "Core ML wants a string output"),
    ("classifier_probs_type", "nn_image_classifier",
     lambda s: _output(s, s.description.predictedProbabilitiesName).type.doubleType.SetInParent(),
     "the classifier's probabilities output 'probs' must be a dictionary (label -> probability)"),
    ("pipe_dtype", "pipeline",
     lambda s: setattr(pipe(s).models[0].description.output[0].type.multiArrayType, "dataType", 65600),
     "pipeline stage 1 ('knn'): input 'features' is declared unlike what pipeline stage 0 ('embed') "
     "gives (DOUBLE values for FLOAT32 ones); Core ML wants the same type on both sides"),
    ("pipe_updatable_first", "pipeline", lambda s: setattr(pipe(s).models[0], "isUpdatable", True),
     "an updatable pipeline trains its last stage only: mark stage 1 updatable and no other "
     "(updatable now: [0, 1])"),
    ("pipe_updatable_inside", "pipeline", lambda s: setattr(s, "isUpdatable", False),
     "stage 1 is updatable inside a pipeline that is not: mark the pipeline isUpdatable too (only "
     "its last stage may be updatable)"),
    ("knn_weighting", "knn", lambda s: knn(s).ClearField("uniformWeighting") or knn(s).ClearField("inverseDistanceWeighting"),
     "kNN: no WeightingScheme set; Core ML requires a weighting scheme (uniformWeighting or "
     "inverseDistanceWeighting)"),
    ("knn_index", "knn", lambda s: knn(s).nearestNeighborsIndex.ClearField("linearIndex"),
     "kNN: no IndexType set; Core ML requires an index type (linearIndex or singleKdTreeIndex)"),
    ("pipe_outputs", "pipeline", lambda s: _add_output(s, "answer"),
     "pipeline output 'answer' is not produced by any stage"),
    ("pipe_substage", "pipeline", lambda s: knn(pipe(s).models[1]).stringClassLabels.vector.append("z"),
     "pipeline stage 1 ('knn'): kNN: 6 samples but 7 labels; every sample needs exactly one class "
     "label"),
]


@pytest.mark.parametrize("base, corrupt, message", [r[1:] for r in RULES], ids=[r[0] for r in RULES])
def test_rule(bases, base, corrupt, message):
    spec = _copy(bases[base])
    validate(spec)  # the uncorrupted base is valid
    corrupt(spec)
    with pytest.raises(mp.InvalidModelError, match=f"^{re.escape(message)}$"):
        validate(spec)
    # the same error comes out of mlpersonal.load, before any compilation
    with pytest.raises(mp.InvalidModelError, match=re.escape(message)):
        mp.load(spec.SerializeToString())


def test_deep_pipeline(bases):
    validate(_nested(bases["knn"], MAX_PIPELINE_DEPTH))
    with pytest.raises(mp.InvalidModelError,
                       match=f"^pipelines are nested more than {MAX_PIPELINE_DEPTH} levels deep$"):
        validate(_nested(bases["knn"], MAX_PIPELINE_DEPTH + 1))


@pytest.mark.parametrize("name", ["nn_image_classifier", "updatable_nn", "updatable_regressor", "knn", "pipeline",
                                  "quantized_nn", "recurrent", "updatable_lstm"])
def test_valid_bases_run(bases, name):
    """The validator accepts coremltools-built specs, and they predict."""
    m = mp.load(bases[name].SerializeToString())
    out = m.predict(valid_input(m.spec, np.random.default_rng(0)))
    assert set(out) == set(m.output_names)


def test_huge_declared_size_refused_before_allocating(bases):
    """A 2^20 x 2^20 innerProduct (4 TiB of floats) is refused with no allocation beyond the file."""
    spec = _copy(bases["nn_image_classifier"])
    _set(img(spec).layers[5].innerProduct, outputChannels=2**20, inputChannels=2**20)
    data = spec.SerializeToString()
    tracemalloc.start()
    try:
        with pytest.raises(mp.InvalidModelError, match="needs 1099511627776"):
            mp.load(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, peak



def test_a_trusted_model_may_lift_the_size_limit(monkeypatch):
    """A real model (a 1000x1000 super-resolution network) reshapes to 2**28 values: refused by
    default with the way out in the message, loaded and run once the limit is raised."""
    from coremltools.models import datatypes
    from coremltools.models.neural_network import NeuralNetworkBuilder

    b = NeuralNetworkBuilder([("x", datatypes.Array(4, 2, 2))], [("y", None)])
    b.add_reshape("big", "x", "y", (1, 1, 16), 0)
    b.spec.neuralNetwork.layers[0].reshape.targetShape[:] = [1, 2**14, 2**14]
    with pytest.raises(mp.InvalidModelError, match="set MLPERSONAL_MAX_ELEMENTS to at least 268435456"):
        mp.load(b.spec)
    monkeypatch.setenv("MLPERSONAL_MAX_ELEMENTS", str(2**28))
    mp.load(b.spec)  # the declared size passes; its reshape is checked when it runs


def test_iOS13_layers_need_the_nd_array_mapping_as_core_ml_says():
    """Core ML (coremltools' NeuralNetworkValidator): a layer added in iOS 13 (gelu, an upsample
    with an align-corners mode, ...) switches a network to ND mode, which multi-array inputs
    under RANK5_ARRAY_MAPPING cannot be; with EXACT_ARRAY_MAPPING, or image inputs only, it loads."""
    import numpy as np
    from coremltools.models import datatypes
    from coremltools.models.neural_network import NeuralNetworkBuilder

    def net(nd: bool, layer: str, image: bool = False):
        b = NeuralNetworkBuilder([("x", datatypes.Array(2, 3, 4))], [("y", None)],
                                 disable_rank5_shape_mapping=nd)
        if image:  # the same network reading a grayscale image instead
            it = b.spec.description.input[0].type.imageType
            it.width, it.height, it.colorSpace = 4, 3, 10
        if layer == "gelu":
            b.add_gelu("newer", "x", "y")
        else:
            b.add_upsample("newer", 2, 2, "x", "y", mode="BILINEAR", linear_upsample_mode="ALIGN_CORNERS_TRUE")
        return b.spec

    for layer, kind in (("gelu", "gelu"), ("upsample", "upsample")):
        with pytest.raises(mp.InvalidModelError, match=rf"layer 'newer' \({kind}\) was added in Core ML 3 "
                                                       r"\(iOS 13\).*EXACT_ARRAY_MAPPING"):
            mp.load(net(False, layer))
        model = mp.load(net(True, layer))
        assert model.predict({"x": np.ones((2, 3, 4), np.float32)})["y"].size
    mp.load(net(False, "gelu", image=True))


def test_a_regressor_names_its_prediction_as_core_ml_requires():
    """coremltools' builder in regressor mode leaves predictedFeatureName empty, which Core ML
    refuses (validateRegressorInterface); the exporter names it."""
    import torch
    from coremltools.models import datatypes
    from coremltools.models.neural_network import NeuralNetworkBuilder

    b = NeuralNetworkBuilder([("x", datatypes.Array(3))], [("y", datatypes.Array(2))], mode="regressor")
    b.add_inner_product("fc", np.ones((2, 3), np.float32), None, 3, 2, False, "x", "y")
    with pytest.raises(mp.InvalidModelError, match="names no predictedFeatureName"):
        mp.load(b.spec)
    b.spec.description.predictedFeatureName = "y"
    assert mp.load(b.spec).predict({"x": np.ones(3, np.float32)})["y"].tolist() == [3.0, 3.0]
    exported = mp.convert(torch.nn.Linear(3, 1), [mp.TensorType("x", (3,))], regressor="price")
    assert exported.description.predictedFeatureName == "price"


def test_an_upsample_lists_two_scaling_factors():
    """Core ML (NeuralNetworkLayerValidator.cpp): scalingFactor holds (height, width) or nothing."""
    from coremltools.models import datatypes
    from coremltools.models.neural_network import NeuralNetworkBuilder

    b = NeuralNetworkBuilder([("x", datatypes.Array(1, 2, 2))], [("y", None)])
    b.add_upsample("up", 2, 2, "x", "y", mode="NN")
    assert mp.load(b.spec).predict({"x": np.ones((1, 2, 2), np.float32)})["y"].shape == (1, 4, 4)
    del b.spec.neuralNetwork.layers[0].upsample.scalingFactor[1]
    with pytest.raises(mp.InvalidModelError, match=r"lists 1 scalingFactor values; Core ML wants 2"):
        mp.load(b.spec)


# --- ND mode rank rules (NeuralNetworkLayerValidator.cpp validateRankCount) ---------------------
def _nd_spec(shape, build):
    from coremltools.models import datatypes
    from coremltools.models.neural_network import NeuralNetworkBuilder

    b = NeuralNetworkBuilder([("x", datatypes.Array(*shape))], [("y", None)],
                             disable_rank5_shape_mapping=True)
    build(b)
    return b.spec


def test_nd_rank_rules_refuse_what_core_ml_refuses():
    softmax = _nd_spec((4, 5), lambda b: b.add_softmax("sm", "x", "y"))  # classic: rank >= 3
    with pytest.raises(mp.InvalidModelError, match=r"layer 'sm' \(softmax\) has a rank-2 input; "
                                                   r"in ND mode .* rank at least 3"):
        validate(softmax)
    emb = _nd_spec((6,), lambda b: b.add_embedding_nd("e", "x", "y", 10, 3, np.ones((3, 10), np.float32)))
    with pytest.raises(mp.InvalidModelError, match=r"\(embeddingND\) has a rank-1 input; .* rank 2 to 5"):
        validate(emb)

    def mismatch(b):
        b.add_activation("a", "RELU", "x", "h")
        b.add_activation("c", "RELU", "h", "y")
    spec = _nd_spec((4, 5), mismatch)
    spec.neuralNetwork.layers[0].outputTensor.add(rank=2)
    spec.neuralNetwork.layers[1].inputTensor.add(rank=3)
    with pytest.raises(mp.InvalidModelError, match="blob 'h' has rank 2 elsewhere but rank 3"):
        validate(spec)


def test_nd_rank_rules_pass_the_same_layers_at_allowed_ranks():
    validate(_nd_spec((2, 4, 5), lambda b: b.add_softmax("sm", "x", "y")))
    validate(_nd_spec((6, 1), lambda b: b.add_embedding_nd("e", "x", "y", 10, 3,
                                                           np.ones((3, 10), np.float32))))
    # ranks are not inferred from layer to layer: an inner blob of unknown rank is not checked
    validate(_nd_spec((4,), lambda b: (b.add_inner_product("fc", np.ones((3, 4), np.float32), None, 4, 3,
                                                          False, "x", "h"), b.add_softmax("sm", "h", "y"))))
