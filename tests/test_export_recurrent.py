"""torch nn.LSTM / nn.RNN -> Core ML recurrent layers (exporters.recurrent): the exported spec
predicts what the module computes, an exported updatable LSTM trains like torch, and what Core
ML's layout cannot express is refused with a message that says what to change."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import mlpersonal as mp
from exporters.converter import ClassifierConfig, convert

S, C, H = 9, 6, 8
LABELS = ["walk", "run", "sit"]
ATOL = 1e-5 if torch.cuda.is_available() else 2e-6  # cuda: cuDNN's fused LSTM sums in its own order


class LastStep(nn.Module):
    """Sequence classifier: LSTM (or RNN) -> its last step -> Linear."""

    def __init__(self, rnn: nn.Module, hidden: int = H):
        super().__init__()
        self.rnn, self.fc = rnn, nn.Linear(hidden, len(LABELS))

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.fc(out[:, -1])


class FinalState(nn.Module):
    """Sequence classifier reading the last layer's final hidden state."""

    def __init__(self, layers: int = 1):
        super().__init__()
        self.lstm, self.fc = nn.LSTM(C, H, num_layers=layers, batch_first=True), nn.Linear(H, 3)

    def forward(self, x):
        _, (h, _) = self.lstm(x)
        return torch.softmax(self.fc(h[-1]), 1)


def _seqs(n: int, seed: int = 0, s: int = S) -> torch.Tensor:
    return torch.randn(n, s, C, generator=torch.Generator().manual_seed(seed))


def _probs(model, xs: torch.Tensor) -> np.ndarray:
    got = model.predict_batch([{"x": x[:, None, :].numpy()} for x in xs])  # Core ML's (Seq, 1, C)
    return np.array([[g["labelProbs"][lab] for lab in LABELS] for g in got])


@pytest.mark.parametrize("make", [
    lambda: LastStep(nn.LSTM(C, H, batch_first=True)),
    lambda: LastStep(nn.LSTM(C, H, num_layers=3, batch_first=True)),
    lambda: LastStep(nn.LSTM(C, H, batch_first=True, bias=False)),
    lambda: LastStep(nn.RNN(C, H, batch_first=True)),
    lambda: FinalState(layers=2),
], ids=["lstm", "lstm-3-layers", "lstm-no-bias", "rnn", "final-state"])
def test_exported_sequence_classifier_matches_torch(make):
    torch.manual_seed(0)
    net = make().eval()
    spec = convert(net, [mp.TensorType("x", (S, C))], classifier=ClassifierConfig(LABELS))
    assert list(spec.description.input[0].type.multiArrayType.shape) == [C]
    model = mp.load(spec)
    xs = torch.cat([_seqs(4, 1), _seqs(1, 2)])
    with torch.no_grad():
        ref = torch.softmax(net(xs), 1).numpy() if not isinstance(net, FinalState) else net(xs).numpy()
    np.testing.assert_allclose(_probs(model, xs), ref, atol=ATOL)
    # sequences of other lengths than the traced one: the Core ML input takes any length
    other = _seqs(3, 3, s=4)
    with torch.no_grad():
        ref = torch.softmax(net(other), 1).numpy() if not isinstance(net, FinalState) else net(other).numpy()
    np.testing.assert_allclose(_probs(model, other), ref, atol=ATOL)


class BiFinalStates(nn.Module):
    """Bidirectional classifier: the last layer's forward and backward final states, side by side."""

    def __init__(self, layers: int):
        super().__init__()
        self.lstm = nn.LSTM(C, H, num_layers=layers, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(2 * H, len(LABELS))

    def forward(self, x):
        _, (h, _) = self.lstm(x)
        return self.fc(torch.cat([h[-2], h[-1]], 1))


@pytest.mark.parametrize("layers", [1, 2])
def test_bidirectional_lstm_classifier_and_tagger_match_torch(layers):
    torch.manual_seed(7)
    net = BiFinalStates(layers).eval()
    spec = convert(net, [mp.TensorType("x", (S, C))], classifier=ClassifierConfig(LABELS))
    assert [l.WhichOneof("layer") for l in spec.neuralNetworkClassifier.layers][:layers] == \
        ["biDirectionalLSTM"] * layers
    model = mp.load(spec)
    for xs in (_seqs(3, 8), _seqs(2, 9, s=3)):  # the traced length and another
        with torch.no_grad():
            np.testing.assert_allclose(_probs(model, xs), torch.softmax(net(xs), 1).numpy(), atol=ATOL)
    xs = _seqs(3, 8)

    class Tagger(nn.Module):  # the whole (N, S, 2H) sequence out: aligned as in Core ML
        def __init__(self):
            super().__init__()
            self.lstm = net.lstm

        def forward(self, x):
            return self.lstm(x)[0]

    tagger = Tagger().eval()
    got = mp.load(convert(tagger, [mp.TensorType("x", (S, C))])).predict_batch(
        [{"x": x[:, None, :].numpy()} for x in xs[:3]])
    with torch.no_grad():
        want = tagger(xs[:3]).numpy()
    np.testing.assert_allclose(np.stack([g["output"][:, 0] for g in got]), want, atol=ATOL)


def test_sequence_output_and_stacked_modules():
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.LSTM(C, H, batch_first=True)
            self.b = nn.RNN(H, 5, batch_first=True)

        def forward(self, x):
            return self.b(self.a(x)[0])[0]

    torch.manual_seed(1)
    net = Tagger().eval()
    model = mp.load(convert(net, [mp.TensorType("x", (S, C))], outputs=["tags"]))
    xs = _seqs(2, 4)
    with torch.no_grad():
        ref = net(xs).numpy()  # (N, S, 5)
    got = model.predict_batch([{"x": x[:, None, :].numpy()} for x in xs])
    for g, r in zip(got, ref):
        assert g["tags"].shape == (S, 1, 5)
        np.testing.assert_allclose(g["tags"][:, 0], r, atol=ATOL)


def test_exported_updatable_lstm_trains_like_torch():
    """respect_trainable marks the LSTM's layers updatable (Core ML allows uniDirectionalLSTM);
    the runtime's update equals torch SGD on the same module with one bias per gate."""
    torch.manual_seed(2)
    net = LastStep(nn.LSTM(C, H, batch_first=True))
    with torch.no_grad():  # Core ML holds one bias per gate: fold torch's second one in
        net.rnn.bias_ih_l0 += net.rnn.bias_hh_l0
        net.rnn.bias_hh_l0.zero_()
    net.rnn.bias_hh_l0.requires_grad_(False)
    spec = convert(net.eval(), [mp.TensorType("x", (S, C))], classifier=ClassifierConfig(LABELS),
                   respect_trainable=True,
                   update=mp.UpdateConfig(optimizer=mp.SGD(learning_rate=0.3, mini_batch_size=6),
                                          epochs=2, shuffle=False))
    layers = {l.name: l for l in spec.neuralNetworkClassifier.layers}
    assert layers["rnn"].isUpdatable and layers["fc"].isUpdatable
    assert layers["rnn"].uniDirectionalLSTM.weightParams.inputGateWeightMatrix.isUpdatable
    xs, ys = _seqs(12, 5), torch.arange(12) % 3
    data = [{"x": x[:, None, :].numpy(), "label": LABELS[int(y)]} for x, y in zip(xs, ys)]
    trained = mp.load(spec).update(data)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.3)
    net.train()
    for _ in range(2):
        for s in range(0, 12, 6):
            loss = nn.functional.cross_entropy(net(xs[s:s + 6]), ys[s:s + 6])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    again = convert(net, [mp.TensorType("x", (S, C))], classifier=ClassifierConfig(LABELS))
    got = {l.name: l for l in trained.spec.neuralNetworkClassifier.layers}
    want = {l.name: l for l in again.neuralNetworkClassifier.layers}
    for name in ("rnn", "fc"):
        a, b = getattr(got[name], got[name].WhichOneof("layer")), getattr(want[name], want[name].WhichOneof("layer"))
        wa = a.weightParams if name == "rnn" else a
        wb = b.weightParams if name == "rnn" else b
        for fd in wb.DESCRIPTOR.fields:
            if fd.message_type is not None and fd.message_type.name == "WeightParams":
                np.testing.assert_allclose(np.asarray(getattr(wa, fd.name).floatValue),
                                           np.asarray(getattr(wb, fd.name).floatValue), atol=1e-5,
                                           err_msg=f"{name}.{fd.name}")
    with torch.no_grad():
        np.testing.assert_allclose(_probs(trained, xs), torch.softmax(net(xs), 1).numpy(), atol=1e-5)


class _Direct(nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        return self.rnn(x)[0][:, -1]


class _SequenceToLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm, self.fc = nn.LSTM(C, H, batch_first=True), nn.Linear(H, 2)

    def forward(self, x):
        return self.fc(self.lstm(x)[0]).mean(1)


class _InputElsewhere(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(C, H, batch_first=True)

    def forward(self, x):
        return self.lstm(x * 2)[0][:, -1]


@pytest.mark.parametrize("net,needle", [
    (_Direct(nn.LSTM(C, H)), r"batch_first=False .*set `rnn\.batch_first = True`"),
    (_Direct(nn.LSTM(C, H, batch_first=True, bidirectional=True)), r"out\[:, -1\] of a bidirectional"),
    (_Direct(nn.RNN(C, H, batch_first=True, bidirectional=True)), "RNN with bidirectional=True"),
    (_Direct(nn.GRU(C, H, batch_first=True)), "reset gate"),
    (_Direct(nn.RNN(C, H, batch_first=True, nonlinearity="relu")), "nonlinearity='relu'"),
    (_SequenceToLinear(), "sequence can only feed another nn.LSTM/nn.RNN"),
    (_InputElsewhere(), "only nn.LSTM / nn.RNN may read it"),
], ids=["batch-first", "bidirectional-last-step", "bidirectional-rnn", "gru", "relu",
        "sequence-to-linear", "input-elsewhere"])
def test_what_core_ml_cannot_express_is_refused(net, needle):
    with pytest.raises(mp.MLPersonalError, match=needle):
        convert(net.eval(), [mp.TensorType("x", (S, C))])


def test_onnx_export_of_the_same_model_takes_any_length(tmp_path):
    """to_onnx gives the (Seq, C) input a dynamic sequence axis; onnxruntime, torch and the
    Core ML export agree on sequences of two lengths."""
    import warnings

    import onnxruntime as ort

    from exporters.onnx_export import to_onnx

    torch.manual_seed(3)
    net = LastStep(nn.LSTM(C, H, num_layers=2, batch_first=True)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's RNN-export deprecation notice
        path = to_onnx(net, [mp.TensorType("x", (S, C))], tmp_path / "lstm.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    coreml = mp.load(convert(net, [mp.TensorType("x", (S, C))], classifier=ClassifierConfig(LABELS)))
    for s in (S, 4):
        xs = _seqs(3, 6, s=s)
        with torch.no_grad():
            ref = net(xs).numpy()
        np.testing.assert_allclose(sess.run(None, {"x": xs.numpy()})[0], ref, atol=2e-6)
        np.testing.assert_allclose(_probs(coreml, xs), torch.softmax(torch.from_numpy(ref), 1).numpy(),
                                   atol=2e-6)


class Streaming(nn.Module):
    """Core ML's streaming form: the state comes in as inputs and goes out as outputs."""

    def __init__(self):
        super().__init__()
        self.rnn, self.fc = nn.LSTM(C, H, batch_first=True), nn.Linear(H, len(LABELS))

    def forward(self, x, h0, c0):  # hx= as a keyword
        out, (h, c) = self.rnn(x, hx=(h0.unsqueeze(0), c0.unsqueeze(0)))
        return self.fc(out[:, -1]), h[-1], c[-1]


class StreamingRNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.fc = nn.RNN(C, H, batch_first=True), nn.Linear(H, len(LABELS))

    def forward(self, x, h0):
        out, h = self.rnn(x, h0[None])
        return self.fc(out[:, -1]), h[-1]


@pytest.mark.parametrize("cls,outputs", [(Streaming, ["y", "h", "c"]), (StreamingRNN, ["y", "h"])])
def test_initial_states_become_optional_inputs_for_streaming(cls, outputs):
    torch.manual_seed(10)
    net = cls().eval()
    states = [mp.TensorType(n, (H,)) for n in ("h0", "c0")[:len(outputs) - 1]]
    spec = convert(net, [mp.TensorType("x", (S, C)), *states], outputs=outputs)
    assert [(f.name, f.type.isOptional) for f in spec.description.input] == \
        [("x", False)] + [(t.name, True) for t in states]
    model = mp.load(spec)
    x = _seqs(1, 11, s=13)
    with torch.no_grad():
        whole = [t.numpy()[0] for t in net(x, *[torch.zeros(1, H)] * len(states))]
    first = model.predict({"x": x[0, :6].numpy()})  # states left out: zeros
    feed = {"x": x[0, 6:].numpy(), "h0": first["h"]}
    if "c" in outputs:
        feed["c0"] = first["c"]
    second = model.predict(feed)  # the state carried over: as if the 13 steps came at once
    for name, want in zip(outputs, whole):
        np.testing.assert_allclose(second[name], want, atol=ATOL)


class StreamingStack(nn.Module):
    """A stacked LSTM streamed as two chained one-layer modules, each with its own state (what
    the refusal below points to)."""

    def __init__(self):
        super().__init__()
        self.lower, self.upper = nn.LSTM(C, H, batch_first=True), nn.LSTM(H, H, batch_first=True)
        self.fc = nn.Linear(H, len(LABELS))

    def forward(self, x, h1, c1, h2, c2):
        mid, (h1n, c1n) = self.lower(x, (h1.unsqueeze(0), c1.unsqueeze(0)))
        out, (h2n, c2n) = self.upper(mid, (h2.unsqueeze(0), c2.unsqueeze(0)))
        return self.fc(out[:, -1]), h1n[-1], c1n[-1], h2n[-1], c2n[-1]


def test_chained_one_layer_lstms_stream_a_stacked_lstm():
    torch.manual_seed(11)
    net = StreamingStack().eval()
    names = ["h1", "c1", "h2", "c2"]
    outputs = ["y"] + [n + "_out" for n in names]
    spec = convert(net, [mp.TensorType("x", (S, C))] + [mp.TensorType(n, (H,)) for n in names],
                   outputs=outputs)
    model = mp.load(spec)
    x = _seqs(1, 12, s=13)
    with torch.no_grad():  # the whole sequence at once, from zero states
        whole = [t.numpy()[0] for t in net(x, *[torch.zeros(1, H)] * 4)]
        stacked = nn.LSTM(C, H, num_layers=2, batch_first=True)
        for k, m in enumerate((net.lower, net.upper)):  # the same weights as one stacked module
            for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(stacked, f"{p}_l{k}").copy_(getattr(m, f"{p}_l0"))
        np.testing.assert_allclose(net.fc(stacked(x)[0][:, -1]).numpy()[0], whole[0], atol=1e-6)
    first = model.predict({"x": x[0, :5].numpy()})  # states left out: zeros
    second = model.predict({"x": x[0, 5:].numpy(), **{n: first[n + "_out"] for n in names}})
    for name, want in zip(outputs, whole):
        np.testing.assert_allclose(second[name], want, atol=ATOL)


def test_initial_state_of_a_stacked_module_is_refused():
    class Stacked(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(C, H, num_layers=2, batch_first=True)

        def forward(self, x, h0, c0):  # one state per layer
            return self.lstm(x, (torch.stack([h0, h0]), torch.stack([c0, c0])))[0][:, -1]

    # a stacked module's states need more than h0.unsqueeze(0): that op is what gets refused
    with pytest.raises(mp.UnsupportedLayerError, match="torch.stack.*(batch axis|no Core ML conversion).*"
                       "initial state.*chain one-layer modules"):
        convert(Stacked().eval(), [mp.TensorType("x", (S, C)), mp.TensorType("h0", (H,)),
                                   mp.TensorType("c0", (H,))])


def test_the_batch_first_advice_keeps_the_trained_weights():
    """What the batch_first=False refusal says to do: flip the flag on the trained module and
    feed it (N, Seq, C); the export then equals the original module on (Seq, N, C)."""
    torch.manual_seed(21)
    net = _Direct(nn.LSTM(C, H)).eval()
    xs = _seqs(3, 22)
    with torch.no_grad():
        want = net.rnn(xs.transpose(0, 1))[0][-1].numpy()  # the original (Seq, N, C) module
    net.rnn.batch_first = True
    model = mp.load(convert(net, [mp.TensorType("x", (S, C))], outputs=["y"]))
    got = np.stack([model.predict({"x": x.numpy()})["y"] for x in xs])
    np.testing.assert_allclose(got, want, atol=ATOL)
