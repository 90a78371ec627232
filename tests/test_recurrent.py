"""Recurrent layers (simpleRecurrent, gru, uniDirectionalLSTM, biDirectionalLSTM) on specs built
with coremltools' NeuralNetworkBuilder, against torch's nn.RNN / nn.LSTM and, where torch has no
equivalent (Core ML's GRU, peepholes, coupled gates, clipping), a step-by-step float64 reference of
the equations in NeuralNetwork.proto."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from coremltools.models import datatypes
from coremltools.models.neural_network import NeuralNetworkBuilder

import mlpersonal as mp
from runtime.batch import ArrayBatchProvider

C, H, S = 5, 7, 6
ATOL = 1e-5 if torch.cuda.is_available() else 2e-6  # cuda: cuDNN's fused LSTM sums in its own order


#: outputs Core ML wants per recurrent layer (the sequence and each final state)
_OUTPUTS = {"simpleRecurrent": 2, "gru": 2, "uniDirectionalLSTM": 3, "biDirectionalLSTM": 5}


def _complete(spec):
    """``spec`` with every recurrent layer's outputs as Core ML wants them (unread final states
    get names of their own) and a simpleRecurrent layer's initial state read from an optional
    model input (coremltools' builder lets both be left out; Core ML refuses that)."""
    nn = getattr(spec, spec.WhichOneof("Type"))
    for layer in nn.layers:
        kind = layer.WhichOneof("layer")
        while kind in _OUTPUTS and len(layer.output) < _OUTPUTS[kind]:
            layer.output.append(f"{layer.name}_state{len(layer.output)}")
        if kind == "simpleRecurrent" and len(layer.input) == 1:
            fd = spec.description.input.add()
            fd.name = f"{layer.name}_h_in"
            fd.type.multiArrayType.shape.append(layer.simpleRecurrent.outputVectorSize)
            fd.type.multiArrayType.dataType = fd.type.multiArrayType.FLOAT32
            fd.type.isOptional = True
            layer.input.append(fd.name)
    return spec


def _seq(seed: int, s: int = S, c: int = C) -> np.ndarray:
    """A sequence of ``s`` vectors in Core ML's ``(Seq, 1, C)`` form."""
    return np.random.default_rng(seed).standard_normal((s, 1, c)).astype(np.float32)


def _optional_states(b: NeuralNetworkBuilder) -> None:
    for f in b.spec.description.input[1:]:
        f.type.isOptional = True


def _torch_lstm_gates(lstm: torch.nn.LSTM, suffix: str = ""):
    """nn.LSTM's weights as Core ML's per-gate lists, in the builder's [i, f, o, z] order."""
    wi, wf, wz, wo = [w.detach().numpy() for w in getattr(lstm, "weight_ih_l0" + suffix).chunk(4)]
    ri, rf, rz, ro = [w.detach().numpy() for w in getattr(lstm, "weight_hh_l0" + suffix).chunk(4)]
    b = (getattr(lstm, "bias_ih_l0" + suffix) + getattr(lstm, "bias_hh_l0" + suffix)).detach().numpy()
    bi, bf, bz, bo = np.split(b, 4)
    return [ri, rf, ro, rz], [wi, wf, wo, wz], [bi, bf, bo, bz]


def _lstm_model(lstm, output_all: bool, reverse: bool = False):
    b = NeuralNetworkBuilder([("x", datatypes.Array(C)), ("h_in", datatypes.Array(H)),
                              ("c_in", datatypes.Array(H))],
                             [("y", None), ("h_out", None), ("c_out", None)])
    b.add_unilstm("lstm", *_torch_lstm_gates(lstm), H, C, ["x", "h_in", "c_in"],
                  ["y", "h_out", "c_out"], output_all=output_all, reverse_input=reverse)
    _optional_states(b)
    return mp.load(_complete(b.spec))


def _classifier(lstm: torch.nn.LSTM, fc: torch.nn.Linear, labels: list) -> NeuralNetworkBuilder:
    """LSTM (its last output) -> innerProduct -> softmax, a classifier over ``labels``."""
    b = NeuralNetworkBuilder([("x", datatypes.Array(C))], [("probs", None)], mode="classifier")
    b.add_unilstm("lstm", *_torch_lstm_gates(lstm), H, C, ["x"], ["h"])
    b.add_inner_product("fc", fc.weight.detach().numpy(), fc.bias.detach().numpy(), H, len(labels),
                        True, "h", "logits")
    b.add_softmax("softmax", "logits", "probs")
    b.set_class_labels(labels, predicted_feature_name="label", prediction_blob="probs")
    return b


@pytest.mark.parametrize("output_all", [True, False])
@pytest.mark.parametrize("reverse", [False, True])
def test_unidirectional_lstm_matches_torch(output_all, reverse):
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(C, H)
    model = _lstm_model(lstm, output_all, reverse)
    x = _seq(1)
    h0, c0 = (torch.randn(1, 1, H) for _ in range(2))
    with torch.no_grad():  # reverseInput: read right to left, outputs in reading order
        ref, (hn, cn) = lstm(torch.from_numpy(x[::-1].copy() if reverse else x), (h0, c0))
    out = model.predict({"x": x, "h_in": h0.numpy().ravel(), "c_in": c0.numpy().ravel()})
    want = ref.numpy() if output_all else ref.numpy()[-1].ravel()
    assert out["y"].shape == want.shape  # (Seq, 1, H) for sequences, (H,) for the last output
    np.testing.assert_allclose(out["y"], want, atol=ATOL)
    np.testing.assert_allclose(out["h_out"], hn.numpy().ravel(), atol=ATOL)
    np.testing.assert_allclose(out["c_out"], cn.numpy().ravel(), atol=ATOL)


def test_omitted_states_start_at_zero_and_carried_states_stream():
    """Core ML's stateful pattern: feed h_out/c_out back as h_in/c_in for the next chunk."""
    torch.manual_seed(1)
    lstm = torch.nn.LSTM(C, H)
    model = _lstm_model(lstm, output_all=True)
    x = _seq(2, s=8)
    whole = model.predict({"x": x})
    zeros = model.predict({"x": x, "h_in": np.zeros(H, np.float32), "c_in": np.zeros(H, np.float32)})
    np.testing.assert_array_equal(whole["y"], zeros["y"])
    with torch.no_grad():
        np.testing.assert_allclose(whole["y"], lstm(torch.from_numpy(x))[0].numpy(), atol=ATOL)
    np.testing.assert_array_equal(model.predict({"x": x[:, 0]})["y"], whole["y"])  # (Seq, C) too
    first = model.predict({"x": x[:3]})
    second = model.predict({"x": x[3:], "h_in": first["h_out"], "c_in": first["c_out"]})
    np.testing.assert_allclose(np.concatenate([first["y"], second["y"]]), whole["y"], atol=ATOL)


def test_batches_of_equal_and_mixed_lengths_match_single_predictions():
    torch.manual_seed(2)
    model = _lstm_model(torch.nn.LSTM(C, H), output_all=True)
    same = [{"x": _seq(i)} for i in range(4)]
    mixed = [{"x": _seq(10 + i, s=s)} for i, s in enumerate((1, 4, 9))]
    for batch in (same, mixed):
        got = model.predict_batch(batch)
        for g, ex in zip(got, batch):
            one = model.predict(ex)
            steps = len(ex["x"])  # a one-step sequence answers like a single vector
            assert type(g["y"]) is np.ndarray and g["y"].shape == ((steps, 1, H) if steps > 1 else (H,))
            for k in ("y", "h_out", "c_out"):
                np.testing.assert_allclose(g[k], one[k], atol=ATOL)
    cols = model.predict_batch(ArrayBatchProvider({"x": np.stack([ex["x"] for ex in same])}))
    np.testing.assert_allclose(cols.column("y"), np.stack([g["y"] for g in model.predict_batch(same)]),
                               atol=ATOL)
    flat = model.predict_batch(ArrayBatchProvider({"x": np.stack([ex["x"][:, 0] for ex in same])}))
    np.testing.assert_array_equal(flat.column("y"), cols.column("y"))  # (B, Seq, C) columns too
    fresh = _lstm_model(torch.nn.LSTM(C, H), output_all=True)  # generic encoder (no plan yet)
    two = [fresh.predict_batch([{"x": ex["x"][:, 0]} for ex in same]),
           fresh.predict_batch([{"x": ex["x"]} for ex in same])]
    for a, b_ in zip(*two):  # (Seq, C) values are (Seq, 1, C) ones
        np.testing.assert_array_equal(a["y"], b_["y"])


@pytest.mark.parametrize("output_all", [True, False])
def test_bidirectional_lstm_matches_torch(output_all):
    torch.manual_seed(3)
    lstm = torch.nn.LSTM(C, H, bidirectional=True)
    rf, wf, bf = _torch_lstm_gates(lstm)
    rb, wb, bb = _torch_lstm_gates(lstm, "_reverse")
    names = ["x", "hf", "cf", "hb", "cb"]
    b = NeuralNetworkBuilder([(n, datatypes.Array(C if n == "x" else H)) for n in names],
                             [("y", None)] + [(n + "_out", None) for n in names[1:]])
    b.add_bidirlstm("bi", rf, wf, bf, rb, wb, bb, H, C, names, ["y"] + [n + "_out" for n in names[1:]],
                    output_all=output_all)
    _optional_states(b)
    model = mp.load(_complete(b.spec))
    x = _seq(4)
    with torch.no_grad():
        ref, (hn, cn) = lstm(torch.from_numpy(x))
    out = model.predict({"x": x})
    # torch aligns the backward outputs with the input positions, as Core ML's docs describe
    want = ref.numpy() if output_all else torch.cat([hn[0], hn[1]], -1).numpy().ravel()
    np.testing.assert_allclose(out["y"], want, atol=ATOL)
    for k, t in (("hf_out", hn[0]), ("cf_out", cn[0]), ("hb_out", hn[1]), ("cb_out", cn[1])):
        np.testing.assert_allclose(out[k], t.numpy().ravel(), atol=ATOL)


def test_simple_recurrent_matches_torch_rnn():
    torch.manual_seed(4)
    rnn = torch.nn.RNN(C, H, nonlinearity="tanh")
    b = NeuralNetworkBuilder([("x", datatypes.Array(C)), ("h_in", datatypes.Array(H))],
                             [("y", None), ("h_out", None)])
    b.add_simple_rnn("rnn", rnn.weight_hh_l0.detach().numpy(), rnn.weight_ih_l0.detach().numpy(),
                     (rnn.bias_ih_l0 + rnn.bias_hh_l0).detach().numpy(), H, C, "TANH",
                     ["x", "h_in"], ["y", "h_out"], output_all=True)
    _optional_states(b)
    model = mp.load(_complete(b.spec))
    x, h0 = _seq(5), torch.randn(1, 1, H)
    with torch.no_grad():
        ref, hn = rnn(torch.from_numpy(x), h0)
    out = model.predict({"x": x, "h_in": h0.numpy().ravel()})
    np.testing.assert_allclose(out["y"], ref.numpy(), atol=ATOL)
    np.testing.assert_allclose(out["h_out"], hn.numpy().ravel(), atol=ATOL)


# --- Core ML equations without a torch module: a float64 reference, step by step ---------------
def _sigmoid(v):
    return 1 / (1 + np.exp(-v))


def _hard_sigmoid(v, alpha=0.2, beta=0.5):  # the builder's SIGMOID_HARD defaults
    return np.clip(alpha * v + beta, 0, 1)


def _clip(v):
    return np.clip(v, -50, 50)


def test_gru_matches_the_spec_equations():
    rng = np.random.default_rng(6)
    W = [rng.standard_normal((H, C)) * 0.5 for _ in range(3)]  # z, r, o
    R = [rng.standard_normal((H, H)) * 0.5 for _ in range(3)]
    bias = [rng.standard_normal(H) * 0.1 for _ in range(3)]
    b = NeuralNetworkBuilder([("x", datatypes.Array(C))], [("y", None), ("h_out", None)])
    b.add_gru("gru", [r.astype(np.float32) for r in R], [w.astype(np.float32) for w in W],
              [v.astype(np.float32) for v in bias], H, C, ["x"], ["y", "h_out"], output_all=True)
    model = mp.load(_complete(b.spec))  # default inner activation: SIGMOID_HARD
    x = _seq(7)
    y, ys = np.zeros(H), []
    for t in range(S):
        xt = x[t, 0].astype(np.float64)
        z = _hard_sigmoid(_clip(W[0] @ xt + R[0] @ y + bias[0]))
        r = _hard_sigmoid(_clip(W[1] @ xt + R[1] @ y + bias[1]))
        o = np.tanh(_clip(W[2] @ xt + R[2] @ (y * r) + bias[2]))
        y = (1 - z) * o + z * y
        ys.append(y)
    out = model.predict({"x": x})
    np.testing.assert_allclose(out["y"], np.stack(ys)[:, None, :], atol=1e-5)
    np.testing.assert_allclose(out["h_out"], y, atol=1e-5)


@pytest.mark.parametrize("peep,forget_bias,coupled,clip", [
    (True, False, False, 50000.0), (False, True, False, 50000.0), (False, False, True, 50000.0),
    (True, True, False, 0.3)])
def test_lstm_options_match_the_spec_equations(peep, forget_bias, coupled, clip):
    rng = np.random.default_rng(8)
    W = [rng.standard_normal((H, C)) * 0.6 for _ in range(4)]  # i, f, o, z (builder order)
    R = [rng.standard_normal((H, H)) * 0.6 for _ in range(4)]
    bias = [rng.standard_normal(H) * 0.2 for _ in range(4)]
    P = [rng.standard_normal(H) * 0.5 for _ in range(3)]  # i, f, o
    f32 = lambda vs: [v.astype(np.float32) for v in vs]  # noqa: E731
    b = NeuralNetworkBuilder([("x", datatypes.Array(C))], [("y", None), ("h_out", None), ("c_out", None)])
    b.add_unilstm("lstm", f32(R), f32(W), f32(bias), H, C, ["x"], ["y", "h_out", "c_out"],
                  inner_activation="SIGMOID_HARD", peep=f32(P) if peep else None, output_all=True,
                  forget_bias=forget_bias, coupled_input_forget_gate=coupled, cell_clip_threshold=clip)
    model = mp.load(_complete(b.spec))
    x = _seq(9)
    y, c, ys = np.zeros(H), np.zeros(H), []
    p = P if peep else [np.zeros(H)] * 3
    for t in range(S):
        xt = x[t, 0].astype(np.float64)
        pre = [W[k] @ xt + R[k] @ y + bias[k] for k in range(4)]
        i = _hard_sigmoid(_clip(pre[0] + p[0] * c))
        f = 1 - i if coupled else _hard_sigmoid(_clip(pre[1] + float(forget_bias) + p[1] * c))
        c = np.clip(c * f + i * np.tanh(_clip(pre[3])), -clip, clip)
        o = _hard_sigmoid(_clip(pre[2] + p[2] * c))
        y = np.tanh(c) * o
        ys.append(y)
    out = model.predict({"x": x})
    np.testing.assert_allclose(out["y"], np.stack(ys)[:, None, :], atol=1e-5)
    np.testing.assert_allclose(out["c_out"], c, atol=1e-5)


def test_lstm_feeding_a_classifier_head_predicts_like_torch():
    """A sequence classifier (LSTM -> innerProduct -> softmax), the activity-classifier shape."""
    torch.manual_seed(10)
    lstm, fc = torch.nn.LSTM(C, H), torch.nn.Linear(H, 3)
    labels = ["walk", "run", "sit"]
    b = _classifier(lstm, fc, labels)
    model = mp.load(_complete(b.spec))
    xs = np.stack([_seq(20 + i) for i in range(5)])
    with torch.no_grad():
        last = lstm(torch.from_numpy(xs[:, :, 0, :]).transpose(0, 1))[0][-1]
        ref = torch.softmax(fc(last), -1).numpy()
    got = model.predict_batch([{"x": x} for x in xs])
    np.testing.assert_allclose([[g["probs"][lab] for lab in labels] for g in got], ref, atol=ATOL)
    assert [g["label"] for g in got] == [labels[i] for i in ref.argmax(1)]


def test_sequence_of_the_wrong_vector_size_is_refused():
    torch.manual_seed(11)
    model = _lstm_model(torch.nn.LSTM(C, H), output_all=True)
    with pytest.raises(mp.InvalidInputError, match=r"'x'.*\(Seq, 1, 5\)"):
        model.predict({"x": np.zeros((4, 1, C + 1), np.float32)})
    with pytest.raises(mp.InvalidInputError, match="h_in"):
        model.predict({"x": _seq(0), "h_in": np.zeros(H + 2, np.float32)})


@pytest.mark.parametrize("optimizer,mixed", [("sgd", False), ("adam", False), ("adam", True)])
def test_updatable_lstm_trains_like_torch(optimizer, mixed, tmp_path):
    """Core ML allows uniDirectionalLSTM layers to be updatable: backprop through time into the
    LSTM's 12 weight blobs, checked against nn.LSTM + Linear with torch.optim, then saved.
    ``mixed``: sequences of 16 different lengths in one task, padded to one length per
    mini-batch (each mini-batch's loss the mean of its examples' losses, as torch computes it
    example by example)."""
    from coremltools.models.neural_network import AdamParams, SgdParams

    torch.manual_seed(12)
    lstm, fc = torch.nn.LSTM(C, H), torch.nn.Linear(H, 3)
    labels = ["walk", "run", "sit"]
    b = _classifier(lstm, fc, labels)
    before = _torch_lstm_gates(lstm)[1][0].copy()  # W_i (torch trains the parameter in place)
    b.make_updatable(["fc"])
    layer = next(l for l in b.spec.neuralNetworkClassifier.layers if l.name == "lstm")
    layer.isUpdatable = True
    for field in layer.uniDirectionalLSTM.weightParams.DESCRIPTOR.fields:
        getattr(layer.uniDirectionalLSTM.weightParams, field.name).isUpdatable = True
    b.set_categorical_cross_entropy_loss("loss", "probs")
    b.set_sgd_optimizer(SgdParams(lr=0.5, batch=8)) if optimizer == "sgd" else \
        b.set_adam_optimizer(AdamParams(lr=0.05, batch=8))
    b.set_epochs(2)
    xs = [_seq(30 + i, s=3 + (5 * i) % 16 if mixed else S) for i in range(16)]
    ys = np.arange(16) % 3
    data = [{"x": x, "label": labels[y]} for x, y in zip(xs, ys)]
    trained = mp.load(_complete(b.spec)).update(data, parameters={"shuffle": False})
    if mixed:  # one padded batch per mini-batch, not one batch per length
        assert _updater(b.spec, data).lengths == [len(x) for x in xs]
    # torch oracle: the same two epochs of two mini-batches; the spec holds one bias per gate,
    # so torch trains b_ih = b_ih + b_hh alone (two biases would each get the full gradient)
    with torch.no_grad():
        lstm.bias_ih_l0 += lstm.bias_hh_l0
        lstm.bias_hh_l0.zero_()
    lstm.bias_hh_l0.requires_grad_(False)
    params = [p for p in lstm.parameters() if p.requires_grad] + list(fc.parameters())
    opt = torch.optim.SGD(params, lr=0.5) if optimizer == "sgd" else torch.optim.Adam(params, lr=0.05)
    seqs = [torch.from_numpy(x[:, 0, :]) for x in xs]  # (Seq, C) each
    for _ in range(2):
        for s in range(0, 16, 8):
            logits = torch.cat([fc(lstm(x[:, None])[0][-1]) for x in seqs[s:s + 8]])
            loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(ys[s:s + 8]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    want_r, want_w, want_b = _torch_lstm_gates(lstm)
    wp = next(l for l in trained.spec.neuralNetworkClassifier.layers if l.name == "lstm").uniDirectionalLSTM.weightParams
    for got, want in zip([wp.inputGateWeightMatrix, wp.forgetGateWeightMatrix, wp.outputGateWeightMatrix,
                          wp.blockInputWeightMatrix], want_w):
        np.testing.assert_allclose(np.asarray(got.floatValue).reshape(H, C), want, atol=1e-5)
    for got, want in zip([wp.inputGateRecursionMatrix, wp.forgetGateRecursionMatrix,
                          wp.outputGateRecursionMatrix, wp.blockInputRecursionMatrix], want_r):
        np.testing.assert_allclose(np.asarray(got.floatValue).reshape(H, H), want, atol=1e-5)
    for got, want in zip([wp.inputGateBiasVector, wp.forgetGateBiasVector,
                          wp.outputGateBiasVector, wp.blockInputBiasVector], want_b):
        np.testing.assert_allclose(np.asarray(got.floatValue), want, atol=1e-5)
    assert np.abs(np.asarray(wp.inputGateWeightMatrix.floatValue).reshape(H, C) - before).max() > 1e-3
    again = mp.load(trained.save(tmp_path / "lstm.mlmodel"))
    q = [{"x": x} for x in xs[:4]]
    assert [r["label"] for r in again.predict_batch(q)] == [r["label"] for r in trained.predict_batch(q)]


def test_truncated_or_half_precision_updatable_lstm_weights_are_refused():
    torch.manual_seed(13)
    b = NeuralNetworkBuilder([("x", datatypes.Array(C))], [("y", None)])
    b.add_unilstm("lstm", *_torch_lstm_gates(torch.nn.LSTM(C, H)), H, C, ["x"], ["y"])
    short = b.spec.__class__.FromString(b.spec.SerializeToString())
    del short.neuralNetwork.layers[0].uniDirectionalLSTM.weightParams.forgetGateRecursionMatrix.floatValue[-1]
    with pytest.raises(mp.InvalidModelError, match="lstm.*forgetGateRecursionMatrix"):
        mp.load(_complete(short))
    b.make_updatable([])
    b.set_mean_squared_error_loss("loss", input_feature=("y", datatypes.Array(H)))
    from coremltools.models.neural_network import SgdParams

    b.set_sgd_optimizer(SgdParams(lr=0.1, batch=2))
    b.set_epochs(1)
    layer = b.spec.neuralNetwork.layers[0]
    layer.isUpdatable = True
    wp = layer.uniDirectionalLSTM.weightParams.outputGateBiasVector
    wp.float16Value = np.asarray(wp.floatValue, np.float16).tobytes()
    del wp.floatValue[:]
    with pytest.raises(mp.InvalidModelError, match="lstm.*outputGateBiasVector.*float32"):
        mp.load(_complete(b.spec))


def test_nd_network_takes_the_rank5_blob_literally():
    """An ND (EXACT_ARRAY_MAPPING) network declares the [Seq, Batch, C, 1, 1] input itself."""
    torch.manual_seed(14)
    lstm = torch.nn.LSTM(C, H)
    b = NeuralNetworkBuilder([("x", datatypes.Array(S, 1, C, 1, 1))], [("y", None)],
                             disable_rank5_shape_mapping=True)
    b.add_unilstm("lstm", *_torch_lstm_gates(lstm), H, C, ["x"], ["y"], output_all=True)
    model = mp.load(_complete(b.spec))
    xs = [_seq(40 + i).reshape(S, 1, C, 1, 1) for i in range(3)]
    got = model.predict_batch([{"x": x} for x in xs])
    with torch.no_grad():
        for g, x in zip(got, xs):
            ref = lstm(torch.from_numpy(x.reshape(S, 1, C)))[0].numpy()
            assert g["y"].shape == (S, 1, H, 1, 1)
            np.testing.assert_allclose(g["y"].reshape(S, 1, H), ref, atol=ATOL)


@pytest.mark.parametrize("steps", [2, 8])
@pytest.mark.parametrize("plan", [True, False])
def test_standard_lstm_cell_clip_with_and_without_the_fused_kernel(steps, plan):
    """Eagerly, standard gates run torch's fused kernel only while the clip cannot engage
    (|c0| + steps <= clip); 8 saturated steps under a clip of 3 need the step-by-step form,
    which the ONNX plan always traces."""
    rng = np.random.default_rng(15)
    W = [np.full((H, C), 2.0) for _ in range(4)]  # i, f, o, z: every gate near 1, the cell grows
    R = [np.zeros((H, H)) for _ in range(4)]
    bias = [np.full(H, 3.0) for _ in range(4)]
    f32 = lambda vs: [v.astype(np.float32) for v in vs]  # noqa: E731
    b = NeuralNetworkBuilder([("x", datatypes.Array(C))], [("y", None), ("h_out", None), ("c_out", None)])
    b.add_unilstm("lstm", f32(R), f32(W), f32(bias), H, C, ["x"], ["y", "h_out", "c_out"],
                  output_all=True, cell_clip_threshold=3.0)
    model = mp.load(_complete(b.spec))
    model.use_plan = plan
    x = np.abs(rng.standard_normal((steps, 1, C))).astype(np.float32)
    y, c = np.zeros(H), np.zeros(H)
    for t in range(steps):
        pre = [W[k] @ x[t, 0] + R[k] @ y + bias[k] for k in range(4)]
        c = np.clip(c * _sigmoid(pre[1]) + _sigmoid(pre[0]) * np.tanh(pre[3]), -3, 3)
        y = np.tanh(c) * _sigmoid(pre[2])
    out = model.predict({"x": x})
    np.testing.assert_allclose(out["c_out"], c, atol=1e-5)
    np.testing.assert_allclose(out["h_out"], y, atol=1e-5)
    assert (np.abs(c).max() == 3.0) == (steps == 8)  # the clip engaged only in the long run


def _updater(spec, data: list, parameters: dict | None = None):
    """The model's updater, prepared on ``data`` as an UpdateTask would (no training)."""
    from mlpersonal.update_params import resolve

    up = mp.load(_complete(spec)).make_updater()
    up.prepare(data, resolve(up.parameters(), parameters or {"shuffle": False}))
    return up


def _make_lstms_updatable(b: NeuralNetworkBuilder, heads: list) -> None:
    """Every uniDirectionalLSTM of the builder's network updatable, and the ``heads``."""
    b.make_updatable(heads)
    for layer in b.spec.neuralNetworkClassifier.layers:
        if layer.WhichOneof("layer") == "uniDirectionalLSTM":
            layer.isUpdatable = True
            wp = layer.uniDirectionalLSTM.weightParams
            for field in wp.DESCRIPTOR.fields:
                getattr(wp, field.name).isUpdatable = True


def _trained_layers(spec, data: list, monkeypatch, padded: bool) -> list:
    """The layers of ``spec`` after an update on ``data``, padded or one batch per length."""
    from runtime.update import NeuralNetworkUpdater

    with monkeypatch.context() as m:
        if not padded:
            m.setattr(NeuralNetworkUpdater, "_padding_agrees", lambda self: None)
        trained = mp.load(_complete(spec)).update(data, parameters={"shuffle": False})
    return list(trained.spec.neuralNetworkClassifier.layers)


def _floats(layer) -> np.ndarray:
    """Every float weight of a layer, concatenated."""
    out = [np.zeros(0)]

    def walk(msg):
        for field, value in msg.ListFields():
            if field.name == "floatValue":
                out.append(np.asarray(value))
            elif field.type == field.TYPE_MESSAGE:
                for v in (value if hasattr(value, "add") else [value]):  # repeated or one
                    walk(v)

    walk(layer)
    return np.concatenate(out)


def test_updatable_reversed_lstm_trains_on_distinct_lengths_like_torch():
    """reverseInput on padded rows: each row is read from its own last step back (torch: each
    sequence flipped), one mini-batch of 6 different lengths."""
    from coremltools.models.neural_network import SgdParams

    torch.manual_seed(21)
    lstm, fc = torch.nn.LSTM(C, H), torch.nn.Linear(H, 3)
    labels = ["walk", "run", "sit"]
    b = NeuralNetworkBuilder([("x", datatypes.Array(C))], [("probs", None)], mode="classifier")
    b.add_unilstm("lstm", *_torch_lstm_gates(lstm), H, C, ["x"], ["h", "h_out", "c_out"],
                  reverse_input=True)
    b.add_inner_product("fc", fc.weight.detach().numpy(), fc.bias.detach().numpy(), H, 3, True,
                        "h", "logits")
    b.add_softmax("softmax", "logits", "probs")
    b.set_class_labels(labels, predicted_feature_name="label", prediction_blob="probs")
    _make_lstms_updatable(b, ["fc"])
    b.set_categorical_cross_entropy_loss("loss", "probs")
    b.set_sgd_optimizer(SgdParams(lr=0.5, batch=6))
    b.set_epochs(3)
    xs = [_seq(70 + i, s=2 + 3 * i) for i in range(6)]
    ys = np.array([0, 1, 2, 2, 1, 0])
    data = [{"x": x, "label": labels[y]} for x, y in zip(xs, ys)]
    assert _updater(b.spec, data).lengths == [len(x) for x in xs]
    trained = mp.load(_complete(b.spec)).update(data, parameters={"shuffle": False})
    with torch.no_grad():
        lstm.bias_ih_l0 += lstm.bias_hh_l0
        lstm.bias_hh_l0.zero_()
    lstm.bias_hh_l0.requires_grad_(False)
    params = [p for p in lstm.parameters() if p.requires_grad] + list(fc.parameters())
    opt = torch.optim.SGD(params, lr=0.5)
    for _ in range(3):
        logits = torch.cat([fc(lstm(torch.from_numpy(x[::-1].copy()))[0][-1]) for x in xs])
        loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(ys))
        opt.zero_grad()
        loss.backward()
        opt.step()
    layers = {l.name: l for l in trained.spec.neuralNetworkClassifier.layers}
    want_r, want_w, want_b = _torch_lstm_gates(lstm)
    wp = layers["lstm"].uniDirectionalLSTM.weightParams
    for got, want in [(wp.inputGateWeightMatrix, want_w[0]), (wp.forgetGateRecursionMatrix, want_r[1]),
                      (wp.outputGateBiasVector, want_b[2]), (wp.blockInputWeightMatrix, want_w[3])]:
        np.testing.assert_allclose(np.asarray(got.floatValue).reshape(want.shape), want, atol=1e-5)
    np.testing.assert_allclose(np.asarray(layers["fc"].innerProduct.weights.floatValue).reshape(3, H),
                               fc.weight.detach().numpy(), atol=1e-5)


@pytest.mark.parametrize("variant", ["peephole_lstm_cell_read", "bidirectional", "gru_rnn"])
def test_padded_sequences_train_like_one_batch_per_length(variant, monkeypatch):
    """Layers on the padded path: an LSTM the fused kernel cannot run (peepholes) whose cell
    state a later layer reads (the step-by-step loop, rows frozen past their ends); a frozen
    bidirectional LSTM (the backward direction starts at each row's end) behind an updatable
    per-step innerProduct; GRU and simple RNN layers (their loops, masked) in front of an
    updatable LSTM. Oracle: the same update run with one batch per length (no padding)."""
    from coremltools.models.neural_network import AdamParams

    rng = np.random.default_rng(22)
    w = lambda *shape: (rng.standard_normal(shape) * 0.4).astype(np.float32)  # noqa: E731
    gates = lambda c: ([w(H, H) for _ in range(4)], [w(H, c) for _ in range(4)], [w(H) for _ in range(4)])  # noqa: E731
    labels = ["walk", "run", "sit"]
    b = NeuralNetworkBuilder([("x", datatypes.Array(C))], [("probs", None)], mode="classifier")
    heads = ["fc"]
    if variant == "peephole_lstm_cell_read":
        b.add_unilstm("lstm", *gates(C), H, C, ["x"], ["h", "h_out", "c_out"],
                      peep=[w(H) for _ in range(3)])
        b.add_elementwise("mix", ["h", "c_out"], "feat", mode="ADD")
        size = H
    elif variant == "bidirectional":
        b.add_inner_product("pre", w(C, C), w(C), C, C, True, "x", "x2")
        b.add_bidirlstm("bi", *gates(C), *gates(C), H, C, ["x2"], ["feat", "hf", "cf", "hb", "cb"])
        heads.append("pre")
        size = 2 * H
    else:
        b.add_gru("gru", [w(H, H) for _ in range(3)], [w(H, C) for _ in range(3)],
                  [w(H) for _ in range(3)], H, C, ["x"], ["g"], output_all=True)
        b.add_simple_rnn("rnn", w(H, H), w(H, H), w(H), H, H, "TANH", ["g"], ["r"], output_all=True)
        b.add_unilstm("lstm", *gates(H), H, H, ["r"], ["feat"])
        size = H
    b.add_inner_product("fc", w(3, size), w(3), size, 3, True, "feat", "logits")
    b.add_softmax("softmax", "logits", "probs")
    b.set_class_labels(labels, predicted_feature_name="label", prediction_blob="probs")
    _make_lstms_updatable(b, heads)
    b.set_categorical_cross_entropy_loss("loss", "probs")
    b.set_adam_optimizer(AdamParams(lr=0.05, batch=4))
    b.set_epochs(3)
    xs = [_seq(80 + i, s=1 + (3 * i) % 10) for i in range(10)]  # lengths 1, 4, 7, 10, 3, ...
    data = [{"x": x, "label": labels[i % 3]} for i, x in enumerate(xs)]
    assert _updater(b.spec, data).lengths == [len(x) for x in xs]
    padded = _trained_layers(b.spec, data, monkeypatch, padded=True)
    grouped = _trained_layers(b.spec, data, monkeypatch, padded=False)
    before = list(b.spec.neuralNetworkClassifier.layers)
    for p, g, o in zip(padded, grouped, before):
        np.testing.assert_allclose(_floats(p), _floats(g), atol=2e-5, err_msg=p.name)
        if p.isUpdatable:
            assert np.abs(_floats(p) - _floats(o)).max() > 1e-3, p.name


def _head_updatable(seed: int, *, lr: float, batch: int, epochs: int, momentum: float = 0.0):
    """(lstm, fc, labels, builder): the LSTM classifier with its head updatable, CE + SGD."""
    from coremltools.models.neural_network import SgdParams

    torch.manual_seed(seed)
    lstm, fc = torch.nn.LSTM(C, H), torch.nn.Linear(H, 3)
    labels = ["walk", "run", "sit"]
    b = _classifier(lstm, fc, labels)
    b.make_updatable(["fc"])
    b.set_categorical_cross_entropy_loss("loss", "probs")
    b.set_sgd_optimizer(SgdParams(lr=lr, batch=batch, momentum=momentum))
    b.set_epochs(epochs)
    return lstm, fc, labels, b


def test_background_recurrent_training_keeps_the_callers_threads():
    """resume()'s thread trains a recurrent network on one OpenMP thread of its own: the same
    weights as run() in this thread (to float rounding), and torch's count here is untouched."""
    lstm, fc, labels, b = _head_updatable(16, lr=0.5, batch=4, epochs=2)
    data = [{"x": _seq(50 + i), "label": labels[i % 3]} for i in range(8)]
    before = torch.get_num_threads()
    task = mp.UpdateTask(mp.load(_complete(b.spec)), data, parameters={"shuffle": False})
    task.resume()
    background = task.wait()
    here = mp.UpdateTask(mp.load(_complete(b.spec)), data, parameters={"shuffle": False}).run()
    assert torch.get_num_threads() == before
    w = lambda ctx: np.asarray(next(l for l in ctx.model.spec.neuralNetworkClassifier.layers  # noqa: E731
                                    if l.name == "fc").innerProduct.weights.floatValue)
    assert not np.array_equal(w(background), fc.weight.detach().numpy().ravel())
    np.testing.assert_allclose(w(background), w(here), atol=1e-6)


def test_sequences_take_the_plans_short_path_with_the_same_outputs(monkeypatch):
    """Once the plan is ready, float32 sequences (dicts of (Seq, 1, C), columns of (B, Seq, 1, C)
    or (B, Seq, C)) skip the generic encoder; outputs equal the eager network's; a NaN still
    gets the generic path's error."""
    import runtime.model as model_mod

    torch.manual_seed(17)
    labels = ["walk", "run", "sit"]
    lstm, fc = torch.nn.LSTM(C, H), torch.nn.Linear(H, 3)
    b = _classifier(lstm, fc, labels)
    planned, eager = (mp.load(_complete(b.spec), compute_units="cpu_only") for _ in range(2))  # plans: cpu
    eager.use_plan = False
    xs = np.stack([_seq(60 + i) for i in range(4)])
    feeds = [{"x": x} for x in xs]
    planned.predict_batch(feeds)  # builds the plan through the generic path
    monkeypatch.setattr(model_mod, "encode_inputs", lambda *a, **k: 1 / 0)
    got = planned.predict_batch(feeds)
    cols = planned.predict_batch(ArrayBatchProvider({"x": xs}))
    flat = planned.predict_batch(ArrayBatchProvider({"x": xs[:, :, 0]}))
    monkeypatch.undo()
    want = eager.predict_batch(feeds)
    assert [g["label"] for g in got] == [w["label"] for w in want] == cols.column("label")
    np.testing.assert_allclose([[g["probs"][k] for k in labels] for g in got],
                               [[w["probs"][k] for k in labels] for w in want], atol=ATOL)
    np.testing.assert_array_equal(cols.column("probs").values, flat.column("probs").values)
    bad = xs.copy()
    bad[2, 3, 0, 1] = np.nan
    with pytest.raises(mp.InvalidInputError, match="example 2: feature 'x' contains NaN"):
        planned.predict_batch([{"x": x} for x in bad])


@pytest.mark.parametrize("mutate,needle", [
    (lambda l: setattr(l.uniDirectionalLSTM.params, "cellClipThreshold", float("nan")), "cellClipThreshold nan"),
    (lambda l: setattr(l.uniDirectionalLSTM.params, "cellClipThreshold", -5.0), "cellClipThreshold -5"),
    (lambda l: l.input.extend(["x", "x", "x"]), r"has 4 inputs; it takes 1 to 3"),
    (lambda l: l.output.extend(["a", "b", "c"]), r"has 4 outputs; Core ML wants exactly 3"),
    (lambda l: l.input.pop(), r"has 0 inputs; it takes 1 to 3"),
    (lambda l: setattr(l.uniDirectionalLSTM, "outputVectorSize", 0), "inputGateWeightMatrix.*needs 0"),
], ids=["clip-nan", "clip-negative", "inputs", "outputs", "no-input", "hidden-0"])
def test_hostile_recurrent_layers_are_refused_at_load(mutate, needle):
    torch.manual_seed(18)
    b = NeuralNetworkBuilder([("x", datatypes.Array(C))], [("y", None)])
    b.add_unilstm("lstm", *_torch_lstm_gates(torch.nn.LSTM(C, H)), H, C, ["x"], ["y"])
    mutate(b.spec.neuralNetwork.layers[0])
    with pytest.raises(mp.InvalidModelError, match=f"lstm.*{needle}"):
        mp.load(_complete(b.spec))


def test_recurrent_weights_quantize_like_coremltools():
    """quantize_weights stores every recurrent weight blob n-bit (as coremltools' quantize_weights
    does); both tools' 8-bit models predict within 2e-2 of the float model in this runtime (three
    stacked recurrent layers over 6 steps compound the rounding; measured 5.5e-3 ours, 1.1e-2
    coremltools')."""
    from coremltools.models import MLModel
    from coremltools.models.neural_network.quantization_utils import quantize_weights

    torch.manual_seed(19)
    rng = np.random.default_rng(19)
    f32 = lambda *shape: rng.normal(size=shape).astype(np.float32) * 0.5  # noqa: E731
    b = NeuralNetworkBuilder([("x", datatypes.Array(C))], [("y", None)])
    b.add_unilstm("lstm", *_torch_lstm_gates(torch.nn.LSTM(C, H)), H, C, ["x"], ["l"], output_all=True)
    b.add_gru("gru", [f32(H, H) for _ in range(3)], [f32(H, H) for _ in range(3)], [f32(H) for _ in range(3)],
              H, H, ["l"], ["g"], output_all=True)
    b.add_simple_rnn("rnn", f32(4, 4), f32(4, H), f32(4), 4, H, "TANH", ["g"], ["y"])
    spec = b.spec
    ours = mp.quantize_weights(spec, nbits=8, mode="linear")
    theirs = quantize_weights(MLModel(spec), nbits=8, quantization_mode="linear").get_spec()
    for q in (ours, theirs):
        layers = {l.name: l for l in q.neuralNetwork.layers}
        assert len(layers["lstm"].uniDirectionalLSTM.weightParams.blockInputRecursionMatrix.rawValue) == H * H
        assert len(layers["gru"].gru.resetGateWeightMatrix.rawValue) == H * H
        assert len(layers["rnn"].simpleRecurrent.recursionMatrix.rawValue) == 16
    xs = [{"x": _seq(70 + i)} for i in range(6)]
    ref = np.stack([o["y"] for o in mp.load(_complete(spec)).predict_batch(xs)])
    err = [np.abs(np.stack([o["y"] for o in mp.load(_complete(q)).predict_batch(xs)]) - ref).max() for q in (ours, theirs)]
    assert max(err) < 2e-2 and err[0] <= err[1]  # ours, per channel, no worse than theirs


@pytest.mark.parametrize("states", [False, True])
def test_one_plan_session_serves_every_sequence_length_when_the_graph_allows(states):
    """Without a cell state fed in, an LSTM traces to onnxruntime's LSTM op: one session takes
    any length (checked at a second length when built). With state inputs the trace is an
    unrolled loop: each length then gets its own session. Outputs equal the eager network's."""
    torch.manual_seed(20)
    lstm = torch.nn.LSTM(C, H)
    if states:
        spec = _lstm_model(lstm, output_all=True).spec
    else:  # no state inputs at all
        b = NeuralNetworkBuilder([("x", datatypes.Array(C))], [("y", None)])
        b.add_unilstm("lstm", *_torch_lstm_gates(lstm), H, C, ["x"], ["y"], output_all=True)
        spec = b.spec
    model, eager = (mp.load(_complete(spec), compute_units="cpu_only") for _ in range(2))  # plans: cpu
    eager.use_plan = False
    extra = {"h_in": np.full(H, 0.1, np.float32), "c_in": np.full(H, -0.2, np.float32)} if states else {}
    for s in (5, 9, 13, 5):
        feeds = [{"x": _seq(80 + s + i, s=s), **extra} for i in range(3)]
        for g, w in zip(model.predict_batch(feeds), eager.predict_batch(feeds)):
            np.testing.assert_allclose(g["y"], w["y"], atol=ATOL)
    plan = model.inference_plan()
    assert plan.last_fallback_reason is None
    assert len(plan._sessions) == (3 if states else 1)


def test_head_only_update_on_sequences_of_mixed_lengths_caches_the_frozen_lstm(monkeypatch):
    """A frozen LSTM under an updatable head, sequences of different lengths: each example runs
    alone once, the LSTM's last outputs are kept (the cache) and the head trains on them in
    mini-batches as it would without the cache; a torch loop over the LSTM's features is the
    oracle."""
    lstm, fc, labels, b = _head_updatable(13, lr=0.3, batch=4, epochs=3, momentum=0.5)
    xs = [_seq(60 + i, s=3 + i) for i in range(10)]
    ys = np.arange(10) % 3
    data = [{"x": x, "label": labels[y]} for x, y in zip(xs, ys)]
    from runtime.update import UpdateTask

    results = {}
    for cache in (True, False):
        monkeypatch.setenv("MLPERSONAL_UPDATE_CACHE_BYTES", "" if cache else "0")
        task = UpdateTask(mp.load(_complete(b.spec)), data, parameters={"shuffle": False})
        ctx = task.run()
        assert ctx.error is None
        results[cache] = ctx.model.spec.neuralNetworkClassifier.layers[1].innerProduct
    from mlpersonal.update_params import resolve

    monkeypatch.delenv("MLPERSONAL_UPDATE_CACHE_BYTES")
    up = mp.load(_complete(b.spec)).make_updater()
    up.prepare(data, resolve(up.parameters(), {"shuffle": False}))
    assert up.cache_info is not None and up.cache_info["blobs"] == ["h"]  # the LSTM ran once
    assert up.blobs["h"].shape[0] == 10  # its outputs, one length: the head trains in batches
    # (the LSTM runs torch's kernel with and without autograd: last-bit differences)
    np.testing.assert_allclose(results[True].weights.floatValue, results[False].weights.floatValue, atol=1e-6)
    with torch.no_grad():
        feats = torch.cat([lstm(torch.from_numpy(x))[0][-1] for x in xs])  # (10, H)
    opt = torch.optim.SGD(fc.parameters(), lr=0.3, momentum=0.5)
    for _ in range(3):
        for s in range(0, 10, 4):
            loss = torch.nn.functional.cross_entropy(fc(feats[s:s + 4]), torch.from_numpy(ys[s:s + 4]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    np.testing.assert_allclose(np.asarray(results[True].weights.floatValue).reshape(3, H),
                               fc.weight.detach().numpy(), atol=1e-5)


def test_large_batches_of_a_recurrent_network_pick_the_faster_engine_and_stay_exact():
    """Batches of 64+ of a network with recurrent layers are timed on the onnxruntime plan and on
    the eager Network (torch's fused LSTM) over their first calls; whichever is kept, every call
    matches nn.LSTM. Smaller batches always run the plan."""
    from runtime.plan import CALIBRATION_RUNS, CALIBRATION_WARMUP, ENGINE_BATCH_MIN

    torch.manual_seed(14)
    lstm, fc = torch.nn.LSTM(C, H), torch.nn.Linear(H, 3)
    labels = ["walk", "run", "sit"]
    model = mp.load(_complete(_classifier(lstm, fc, labels).spec), compute_units="cpu_only")  # plans: cpu
    rng = np.random.default_rng(15)
    for n in (ENGINE_BATCH_MIN, 5):
        xs = rng.standard_normal((n, S, C)).astype(np.float32)
        with torch.no_grad():
            ref = torch.softmax(fc(lstm(torch.from_numpy(xs).transpose(0, 1))[0][-1]), -1).numpy()
        for _ in range(2 * (CALIBRATION_WARMUP + CALIBRATION_RUNS) + 2):
            got = model.predict_batch(mp.ArrayBatchProvider({"x": xs})).column("probs").values
            np.testing.assert_allclose(got, ref, atol=ATOL)
    plan = model._plan
    assert set(plan.eager_batches) == {ENGINE_BATCH_MIN.bit_length()}  # decided, for 64-127 only
    assert plan.last_fallback_reason is None
    # each choice, forced, serves that bucket and agrees with torch (this machine made one)
    xs = rng.standard_normal((ENGINE_BATCH_MIN + 7, S, C)).astype(np.float32)
    with torch.no_grad():
        ref = torch.softmax(fc(lstm(torch.from_numpy(xs).transpose(0, 1))[0][-1]), -1).numpy()
    entry = next(iter(plan._sessions.values()))
    session_run = entry.sess.run
    for eager in (True, False):
        plan.eager_batches[ENGINE_BATCH_MIN.bit_length()] = eager
        runs = []
        entry.sess.run = lambda *a: runs.append(1) or session_run(*a)
        got = model.predict_batch(mp.ArrayBatchProvider({"x": xs})).column("probs").values
        entry.sess.run = session_run
        np.testing.assert_allclose(got, ref, atol=ATOL)
        assert len(runs) == (0 if eager else 1)  # eager: the caller runs the Network instead


@pytest.mark.parametrize("variant", ["lstm_reversed_all_states", "bidirectional_sequence", "gru_rnn_lstm", "classifier"])
def test_batches_of_many_lengths_run_padded_and_match_single_predictions(variant, monkeypatch):
    """Sequences in 3+ lengths run as one padded batch of the eager Network: every output
    (sequence outputs cut to each example's length, last states, class probabilities) equals
    the example predicted alone."""
    from runtime.neural_network import NeuralNetworkModel

    rng = np.random.default_rng(31)
    w = lambda *shape: (rng.standard_normal(shape) * 0.5).astype(np.float32)  # noqa: E731
    gates = lambda c: ([w(H, H) for _ in range(4)], [w(H, c) for _ in range(4)], [w(H) for _ in range(4)])  # noqa: E731
    if variant == "classifier":
        b = _classifier(torch.nn.LSTM(C, H), torch.nn.Linear(H, 3), ["walk", "run", "sit"])
    else:
        b = NeuralNetworkBuilder([("x", datatypes.Array(C))], [("y", None), ("s", None)])
        if variant == "lstm_reversed_all_states":
            b.add_unilstm("lstm", *gates(C), H, C, ["x"], ["y", "s", "c"], output_all=True,
                          reverse_input=True, peep=[w(H) for _ in range(3)])
        elif variant == "bidirectional_sequence":
            b.add_bidirlstm("bi", *gates(C), *gates(C), H, C, ["x"], ["y", "s", "cf", "hb", "cb"],
                            output_all=True)
        else:
            b.add_gru("gru", [w(H, H) for _ in range(3)], [w(H, C) for _ in range(3)],
                      [w(H) for _ in range(3)], H, C, ["x"], ["g"], output_all=True)
            b.add_simple_rnn("rnn", w(H, H), w(H, H), w(H), H, H, "TANH", ["g"], ["r"], output_all=True)
            b.add_unilstm("lstm", *gates(H), H, H, ["r"], ["y", "s"], output_all=True)
    model = mp.load(_complete(b.spec))
    calls = []
    original = NeuralNetworkModel._forward_padded
    monkeypatch.setattr(NeuralNetworkModel, "_forward_padded",
                        lambda self, *a: calls.append(a[1]) or original(self, *a))
    batch = [{"x": _seq(90 + i, s=s)} for i, s in enumerate((5, 1, 8, 3, 5, 12))]
    got = model.predict_batch(batch)
    assert calls == [[5, 1, 8, 3, 5, 12]]  # one padded pass
    for g, ex in zip(got, batch):
        one = model.predict(ex)
        assert g.keys() == one.keys()
        for k in g:
            if isinstance(one[k], dict):
                np.testing.assert_allclose([g[k][c] for c in one[k]], list(one[k].values()), atol=1e-6)
            elif isinstance(one[k], str):
                assert g[k] == one[k]
            else:
                assert np.shape(g[k]) == np.shape(one[k]), k
                np.testing.assert_allclose(g[k], one[k], atol=1e-5)
