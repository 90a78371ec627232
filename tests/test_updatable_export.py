"""exporters.make_updatable writes what coremltools' builder helpers write; marking helpers."""

import numpy as np
import pytest
import torch
from coremltools.models import datatypes
from coremltools.models.neural_network import AdamParams, NeuralNetworkBuilder, SgdParams

import mlpersonal as mp
import trainers
from exporters.updatable import make_updatable
from mlpersonal.update_params import read_parameters, resolve
from update_models import CNN, cnn_builder


def _nn(spec):
    return getattr(spec, spec.WhichOneof("Type"))


def test_classifier_ce_sgd_matches_coremltools_field_for_field():
    m = CNN()
    theirs = cnn_builder(m, "ce")
    theirs.make_updatable(["conv1", "fc"])
    theirs.set_categorical_cross_entropy_loss("lossLayer", input="probs")
    p = SgdParams(lr=0.02, batch=16, momentum=0.5)
    p.set_lr(0.02, 1e-4, 0.5)
    p.set_batch(16, [8, 16, 32])
    p.set_momentum(0.5, 0.0, 0.95)
    theirs.set_sgd_optimizer(p)
    theirs.set_epochs(7, [1, 7, 20])
    theirs.set_shuffle(seed=3)

    ours = cnn_builder(m, "ce").spec
    cfg = mp.UpdateConfig(
        loss="categorical_cross_entropy",
        optimizer=mp.SGD(learning_rate=0.02, mini_batch_size=16, momentum=0.5,
                         learning_rate_range=(1e-4, 0.5), mini_batch_size_set=[8, 16, 32],
                         momentum_range=(0.0, 0.95)),
        epochs=7, epochs_set=[1, 7, 20], shuffle=True, seed=3)
    out = make_updatable(ours, ["conv1", "fc"], cfg)
    assert out is ours
    t = theirs.spec
    assert ours.specificationVersion == t.specificationVersion >= 4
    assert ours.isUpdatable and t.isUpdatable
    assert _nn(ours).updateParams == _nn(t).updateParams
    assert list(ours.description.trainingInput) == list(t.description.trainingInput)
    assert ours.description.trainingInput[-1].name == "label"
    for a, b in zip(_nn(ours).layers, _nn(t).layers):
        assert a == b, a.name  # isUpdatable on layers and their WeightParams
    assert ours == t  # and nothing else differs


def test_regressor_mse_adam_defaults_match_coremltools():
    m = CNN(n_out=3)
    theirs = cnn_builder(m, "mse")
    theirs.make_updatable(["fc"])
    theirs.set_mean_squared_error_loss("lossLayer", input_feature=("out", datatypes.Array(3)))
    theirs.set_adam_optimizer(AdamParams())
    theirs.set_epochs(1)
    ours = make_updatable(cnn_builder(m, "mse").spec, ["fc"],
                          mp.UpdateConfig(loss="mse", optimizer=mp.Adam(), epochs=1))
    assert ours == theirs.spec
    tin = ours.description.trainingInput[-1]
    assert tin.name == "out_true" and list(tin.type.multiArrayType.shape) == [3]
    # the runtime reads back what was written, and enforces the allowed values
    params = read_parameters(ours)
    assert params["learning_rate"].default == 0.01 and params["learning_rate"].range == (0.0, 1.0)
    assert params["beta2"].default == 0.999 and params["mini_batch_size"].set == (10,)
    assert resolve(params, {"learning_rate": 0.5})["learning_rate"] == 0.5
    with pytest.raises(mp.UpdateParameterError, match="outside the range"):
        resolve(params, {"learning_rate": 2.0})
    with pytest.raises(mp.UpdateParameterError, match="not allowed"):
        resolve(params, {"mini_batch_size": 4})


def test_plain_network_ce_target_is_index_array_like_coremltools():
    def base():
        b = NeuralNetworkBuilder([("x", datatypes.Array(4))], [("p", datatypes.Array(3))])
        b.add_inner_product("fc", np.ones((3, 4), np.float32), np.zeros(3, np.float32), 4, 3, True, "x", "z")
        b.add_softmax("sm", "z", "p")
        return b

    theirs = base()
    theirs.make_updatable(["fc"])
    theirs.set_categorical_cross_entropy_loss("lossLayer", input="p")
    theirs.set_sgd_optimizer(SgdParams())
    theirs.set_epochs(1)
    ours = make_updatable(base().spec, ["fc"], mp.UpdateConfig())  # defaults = coremltools'
    assert ours == theirs.spec
    assert ours.description.trainingInput[-1].name == "p_true"


def test_shuffle_off_and_no_seed():
    spec = make_updatable(cnn_builder(CNN(), "ce").spec, ["fc"], mp.UpdateConfig(shuffle=False))
    up = spec.neuralNetworkClassifier.updateParams
    assert up.HasField("shuffle") and up.shuffle.defaultValue is False
    assert not up.HasField("seed")
    assert read_parameters(spec)["shuffle"].default is False


def test_refuses_non_updatable_layer_kinds_naming_the_module():
    spec = cnn_builder(CNN(), "ce").spec
    with pytest.raises(mp.ConversionError, match=r"module 'bn'.*'batchnorm'.*convolution, fully-connected and LSTM"):
        make_updatable(spec, ["fc", "bn"], mp.UpdateConfig())
    assert not spec.isUpdatable  # nothing half-written


def test_refuses_fp16_and_quantized_weights():
    spec = cnn_builder(CNN(), "ce").spec
    fc = next(l for l in spec.neuralNetworkClassifier.layers if l.name == "fc")
    w = np.asarray(fc.innerProduct.weights.floatValue, np.float32)
    fc.innerProduct.weights.ClearField("floatValue")
    fc.innerProduct.weights.float16Value = w.astype("<f2").tobytes()
    with pytest.raises(mp.ConversionError, match=r"module 'fc'.*fp16.*float32"):
        make_updatable(spec, ["fc"], mp.UpdateConfig())
    fc.innerProduct.weights.ClearField("float16Value")
    fc.innerProduct.weights.rawValue = bytes(len(w))
    fc.innerProduct.weights.quantization.numberOfBits = 8
    fc.innerProduct.weights.quantization.linearQuantization.scale.append(0.1)
    fc.innerProduct.weights.quantization.linearQuantization.bias.append(0.0)
    with pytest.raises(mp.ConversionError, match=r"8-bit linear"):
        make_updatable(spec, ["fc"], mp.UpdateConfig())


def test_cross_entropy_needs_a_classic_softmax():
    b = NeuralNetworkBuilder([("x", datatypes.Array(4))], [("p", datatypes.Array(3))],
                             disable_rank5_shape_mapping=True)
    b.add_inner_product("fc", np.ones((3, 4), np.float32), None, 4, 3, False, "x", "z")
    b.add_softmax_nd("sm", "z", "p", axis=-1)
    with pytest.raises(mp.ConversionError, match="softmaxND"):
        make_updatable(b.spec, ["fc"], mp.UpdateConfig())
    # mse is fine on the same model for our runtime; Core ML cannot backpropagate through
    # softmaxND, and the warning says so
    with pytest.warns(RuntimeWarning, match=r"cannot backpropagate through: sm \(softmaxND\)"):
        make_updatable(b.spec, ["fc"], mp.UpdateConfig(loss="mse"))
    assert b.spec.neuralNetwork.updateParams.lossLayers[0].meanSquaredErrorLossLayer.input == "p"


def test_bad_options():
    spec = cnn_builder(CNN(), "ce").spec
    with pytest.raises(mp.ConversionError, match="no layer is updatable"):
        make_updatable(spec, [], mp.UpdateConfig())
    with pytest.raises(mp.ConversionError, match="has no layer"):
        make_updatable(spec, ["head"], mp.UpdateConfig())
    with pytest.raises(mp.UpdateParameterError, match="outside its allowed range"):
        make_updatable(spec, ["fc"], mp.UpdateConfig(optimizer=mp.SGD(learning_rate=0.5,
                                                                     learning_rate_range=(0.0, 0.1))))
    with pytest.raises(mp.UpdateParameterError, match="not in its allowed set"):
        make_updatable(spec, ["fc"], mp.UpdateConfig(epochs=3, epochs_set=[1, 2]))
    with pytest.raises(mp.ConversionError, match="unknown loss"):
        make_updatable(spec, ["fc"], mp.UpdateConfig(loss="hinge"))
    with pytest.raises(mp.ConversionError, match="SGD"):
        make_updatable(spec, ["fc"], mp.UpdateConfig(optimizer=torch.optim.SGD))


def test_warns_about_layers_core_ml_cannot_backprop():
    b = NeuralNetworkBuilder([("x", datatypes.Array(4))], [("y", datatypes.Array(2))])
    b.add_inner_product("fc1", np.ones((2, 4), np.float32), None, 4, 2, False, "x", "h")
    b.add_activation("elu", "ELU", "h", "e", params=1.0)
    b.add_inner_product("fc2", np.ones((2, 2), np.float32), None, 2, 2, False, "e", "y")
    with pytest.warns(RuntimeWarning, match=r"elu \(activation\)"):
        make_updatable(b.spec, ["fc1"], mp.UpdateConfig(loss="mse"))


def test_mark_updatable_and_freeze():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8, 3))
    trainers.freeze(net)
    assert not any(p.requires_grad for p in net.parameters())
    assert all(getattr(mod, trainers.MARKER) is False for mod in (net, net[0], net[3]))
    assert not hasattr(net[1], trainers.MARKER)  # parameter-free modules are left alone
    assert trainers.mark_updatable(net[3]) is net[3]
    assert net[3].weight.requires_grad and net[3].bias.requires_grad
    assert [trainers.is_marked_updatable(mod) for mod in net] == [False, False, False, True]
    # without marks, requires_grad decides
    plain = torch.nn.Linear(2, 2)
    assert trainers.is_marked_updatable(plain)
    plain.weight.requires_grad_(False)
    plain.bias.requires_grad_(False)
    assert not trainers.is_marked_updatable(plain)
