"""Attention and transformer encoders export in ND mode (EXACT_ARRAY_MAPPING, Core ML 3 layers):
predictions equal the torch module's, heads personalize like torch.optim.SGD, refusals say why."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mlpersonal as mp
from exporters.converter import ClassifierConfig, convert
from mlpersonal.update_params import resolve
from test_exporter import _randomize, _torch_sgd

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import coremltools as ct

LABELS = list("abcde")


class Encoder(nn.Module):
    """Tokens (L, E) + a learned position table -> nn.TransformerEncoder -> mean over tokens ->
    class scores."""

    def __init__(self, e=16, heads=4, length=6, classes=5, norm_first=False, activation="relu",
                 layers=2, final_norm=False, causal=False):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, length, e) * 0.1)
        layer = nn.TransformerEncoderLayer(e, heads, 32, dropout=0.1, activation=activation,
                                           batch_first=True, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(e) if final_norm else None,
                                             enable_nested_tensor=False)
        self.causal = causal
        if causal:
            self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(length))
        self.head = nn.Linear(e, classes)

    def forward(self, x):
        h = self.encoder(x + self.pos, mask=self.mask if self.causal else None)
        return self.head(h.mean(dim=1))


class ClassToken(nn.Module):
    """A ViT-style head: a learned class token in front of the tokens, one MultiheadAttention
    block (its weights an output too), the class token's state classifies."""

    def __init__(self, e=12, heads=3, classes=5):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, e))
        self.attn = nn.MultiheadAttention(e, heads, batch_first=True)
        self.norm = nn.LayerNorm(e)
        self.head = nn.Linear(e, classes)

    def forward(self, x):
        t = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        a, w = self.attn(t, t, t)
        h = self.norm(t + a)
        return self.head(h[:, 0]), w


class HandWritten(nn.Module):
    """Attention written out: q @ k^T / sqrt(d), softmax, @ v, heads by view/transpose; and
    F.scaled_dot_product_attention with a causal mask."""

    def __init__(self, e=8, heads=2):
        super().__init__()
        self.qkv, self.out, self.heads = nn.Linear(e, 3 * e), nn.Linear(e, e), heads

    def forward(self, x):
        n, length, e = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        split = [t.view(n, length, self.heads, e // self.heads).transpose(1, 2) for t in (q, k, v)]
        s = (split[0] @ split[1].transpose(-2, -1)) / (e // self.heads) ** 0.5
        a = F.softmax(s, dim=-1) @ split[2]
        c = F.scaled_dot_product_attention(*split, is_causal=True)
        y = (a + c).transpose(1, 2).reshape(n, length, e)
        return F.gelu(self.out(y), approximate="tanh") * torch.sigmoid(y)


def _probs(outs):
    return np.array([[o["labelProbs"][c] for c in LABELS] for o in outs])


@pytest.mark.parametrize("kw", [
    {}, {"norm_first": True, "activation": "gelu", "final_norm": True}, {"causal": True, "layers": 1},
], ids=["post_norm_relu", "pre_norm_gelu_final_norm", "causal_mask"])
def test_transformer_encoder_classifier_predicts_like_torch(kw, tmp_path):
    torch.manual_seed(0)
    net = Encoder(**kw).eval()
    spec = convert(net, [mp.TensorType("x", (6, 16))], classifier=ClassifierConfig(LABELS))
    nn_spec = spec.neuralNetworkClassifier
    assert nn_spec.arrayInputShapeMapping == 1  # EXACT_ARRAY_MAPPING
    assert spec.specificationVersion >= 4
    kinds = {layer.WhichOneof("layer") for layer in nn_spec.layers}
    assert {"batchedMatmul", "softmaxND", "layerNormalization", "innerProduct"} <= kinds
    ct.models.MLModel(spec)  # coremltools accepts it
    path = tmp_path / "enc.mlmodel"
    mp.save(spec, path)
    model = mp.load(path)
    x = torch.randn(7, 6, 16)
    with torch.no_grad():
        ref = F.softmax(net(x), -1).numpy()
    outs = model.predict_batch([{"x": a.numpy()} for a in x])
    assert np.abs(_probs(outs) - ref).max() <= 1e-5
    assert [o["label"] for o in outs] == [LABELS[i] for i in ref.argmax(1)]
    names = {layer.name for layer in nn_spec.layers}
    assert {"encoder.layers.0.linear1", "encoder.layers.0.self_attn.out_proj", "head"} <= names
    # Core ML's loss reads a classic softmax, which in ND mode wants rank >= 3: the head reads
    # its (E,) input as (1, E, 1, 1), so its scores are (1, C, 1, 1) and nothing but the softmax
    # stands between it and the loss
    last, head = nn_spec.layers[-1], next(l for l in nn_spec.layers if l.name == "head")
    assert last.WhichOneof("layer") == "softmax" and list(last.input) == list(head.output)
    assert [l.reshapeStatic.targetShape for l in nn_spec.layers if l.output[0] == head.input[0]] == [[1, 16, 1, 1]]


def test_class_token_and_multihead_attention_weights_match_torch(tmp_path):
    torch.manual_seed(1)
    net = ClassToken().eval()
    spec = convert(net, [mp.TensorType("x", (5, 12))], outputs=["scores", "weights"])
    ct.models.MLModel(spec)
    x = torch.randn(4, 5, 12)
    with torch.no_grad():
        scores, weights = net(x)
    outs = mp.load(spec).predict_batch([{"x": a.numpy()} for a in x])
    got_s = np.stack([o["scores"] for o in outs])
    got_w = np.stack([o["weights"] for o in outs])
    assert got_s.shape == (4, 5) and got_w.shape == (4, 6, 6)
    assert np.abs(got_s - scores.numpy()).max() <= 1e-5
    assert np.abs(got_w - weights.numpy()).max() <= 1e-6


def test_hand_written_attention_and_sdpa_match_torch(tmp_path):
    torch.manual_seed(2)
    net = HandWritten().eval()
    spec = convert(net, [mp.TensorType("x", (7, 8))], outputs=["y"])
    ct.models.MLModel(spec)
    x = torch.randn(3, 7, 8)
    with torch.no_grad():
        ref = net(x).numpy()
    got = np.stack([o["y"] for o in mp.load(spec).predict_batch([{"x": a.numpy()} for a in x])])
    assert np.abs(got - ref).max() <= 1e-5




@pytest.mark.parametrize("trainable", [("head",), ("head", "encoder.layers.1.linear2")])
def test_personalizing_a_frozen_encoder_trains_like_torch(trainable):
    """Frozen encoder, updatable head (and a feed-forward layer inside the encoder): the update
    task equals torch.optim.SGD on the same layers."""
    torch.manual_seed(3)
    net = Encoder().eval()
    for p in net.parameters():
        p.requires_grad_(False)
    for path in trainable:
        net.get_submodule(path).requires_grad_(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec = convert(net, [mp.TensorType("x", (6, 16))], classifier=ClassifierConfig(LABELS),
                       respect_trainable=True,
                       update=mp.UpdateConfig(optimizer=mp.SGD(learning_rate=0.05, mini_batch_size=4),
                                              epochs=3, shuffle=False))
    # Core ML backpropagates through none of an encoder's layers: said when one is updatable
    said = [str(w.message) for w in caught if "cannot backpropagate" in str(w.message)]
    assert len(said) == (len(trainable) > 1) and (not said or "layerNormalization" in said[0])
    layers = {layer.name: layer for layer in spec.neuralNetworkClassifier.layers}
    assert all(layers[p].isUpdatable for p in trainable)
    x, y = torch.randn(8, 6, 16), torch.arange(8) % 5
    data = [{"x": a.numpy(), "label": LABELS[int(t)]} for a, t in zip(x, y)]
    # the frozen encoder runs once (vmapped chunks) and, head-only, mini-batches run the head on
    # the batch without vmap (runtime.update: _cache_vmapped, _batched_agrees)
    up = mp.load(spec, compute_units="cpu_only").make_updater()
    up.prepare(data, resolve(up.parameters(), {}))
    assert up.cache_info is not None and up.cache_info["steps"] > 10
    assert up._batched_tail == (trainable == ("head",))
    trained = mp.load(spec, compute_units="cpu_only").update(data)
    _torch_sgd(net, x, y, lr=0.05, epochs=3, batch=4)
    got = {layer.name: layer for layer in trained.spec.neuralNetworkClassifier.layers}
    for path in trainable:
        mod = net.get_submodule(path)
        w = np.asarray(got[path].innerProduct.weights.floatValue).reshape(mod.weight.shape)
        np.testing.assert_allclose(w, mod.weight.detach().numpy(), atol=1e-5)
    with torch.no_grad():
        ref = F.softmax(net(x), -1).numpy()
    assert np.abs(_probs(trained.predict_batch([{"x": a.numpy()} for a in x])) - ref).max() <= 1e-5


def test_exact_shapes_forces_the_nd_mode_for_an_mlp():
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.LayerNorm(8), nn.Linear(8, 3)).eval()
    classic = convert(net, [mp.TensorType("x", (6,))], outputs=["y"])
    nd = convert(net, [mp.TensorType("x", (6,))], outputs=["y"], exact_shapes=True)
    assert classic.neuralNetwork.arrayInputShapeMapping == 0
    assert nd.neuralNetwork.arrayInputShapeMapping == 1
    x = torch.randn(4, 6)
    with torch.no_grad():
        ref = net(x).numpy()
    for spec in (classic, nd):
        got = np.stack([o["y"] for o in mp.load(spec).predict_batch([{"x": a.numpy()} for a in x])])
        assert np.abs(got - ref).max() <= 1e-5


class _Bad(nn.Module):
    def __init__(self, make):
        super().__init__()
        self.make = make
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        return self.make(self, x)


@pytest.mark.parametrize("make,what", [
    (lambda s, x: s.attn(x, x, x, attn_mask=torch.zeros(4, 5, 5))[0], "shared by every example"),
    (lambda s, x: x @ torch.ones(8), "vector operand"),
    (lambda s, x: F.scaled_dot_product_attention(x, x, x, dropout_p=0.5), "dropout"),
])
def test_attention_core_ml_cannot_express_is_refused_with_the_reason(make, what):
    with pytest.raises(mp.UnsupportedLayerError, match=what):
        convert(_Bad(make).eval(), [mp.TensorType("x", (5, 8))])


def test_batch_first_false_is_refused_with_the_fix():
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2)

        def forward(self, x):
            return self.attn(x, x, x)[0]

    with pytest.raises(mp.MLPersonalError, match="batch"):
        convert(Seq().eval(), [mp.TensorType("x", (5, 8))])


@pytest.mark.parametrize("first", [1, 4])
def test_attention_predicts_through_the_compiled_plan_at_any_batch_size(first):
    """Under vmap a batched matmul traces its shapes at the probe's batch size ((B * heads, L,
    d)); the plan computes them from the batch size instead (runtime.plan.batch_generic), so the
    onnxruntime session serves every batch size, whatever size came first."""
    torch.manual_seed(6)
    net = Encoder(norm_first=True, activation="gelu").eval()
    model = mp.load(convert(net, [mp.TensorType("x", (6, 16))], outputs=["y"]), compute_units="cpu_only")
    for n in (first, 9, 1):
        x = torch.randn(n, 6, 16)
        with torch.no_grad():
            ref = net(x).numpy()
        got = np.stack([o["y"] for o in model.predict_batch([{"x": a.numpy()} for a in x])])
        assert np.abs(got - ref).max() <= 1e-5
        plan = model.inference_plan()
        assert plan.last_fallback_reason is None
        assert len(plan._sessions) == 1 and all(type(s).__name__ == "_Signature" for s in plan._sessions.values())


def test_the_same_attention_models_export_to_onnx(tmp_path):
    import onnxruntime as ort

    for cls, shape in ((Encoder, (6, 16)), (ClassToken, (5, 12)), (HandWritten, (7, 8))):
        torch.manual_seed(7)
        net = cls().eval()
        path = tmp_path / f"{cls.__name__}.onnx"
        mp.to_onnx(net, [mp.TensorType("x", shape)], path)
        x = torch.randn(3, *shape)
        with torch.no_grad():
            ref = net(x)
        ref = ref if isinstance(ref, tuple) else (ref,)
        got = ort.InferenceSession(str(path)).run(None, {"x": x.numpy()})
        assert len(got) == len(ref)
        for g, r in zip(got, ref):
            assert np.abs(g - r.numpy()).max() <= 1e-5


class TextClassifier(nn.Module):
    """Token ids (L,) -> nn.Embedding + positions -> a transformer encoder layer -> mean -> head."""

    def __init__(self, vocab=40, e=16, length=8, classes=5):
        super().__init__()
        self.embed = nn.Embedding(vocab, e, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(1, length, e) * 0.1)
        self.block = nn.TransformerEncoderLayer(e, 2, 32, batch_first=True)
        self.head = nn.Linear(e, classes)

    def forward(self, ids):
        return self.head(self.block(self.embed(ids) + self.pos).mean(dim=1))


class BagOfWords(nn.Module):
    """fastText-style: the mean of the token embeddings, a linear classifier."""

    def __init__(self, vocab=30, e=8, classes=5):
        super().__init__()
        self.embed, self.head = nn.Embedding(vocab, e), nn.Linear(e, classes)

    def forward(self, ids):
        return self.head(self.embed(ids).mean(1))


@pytest.mark.parametrize("cls", [TextClassifier, BagOfWords])
def test_token_id_inputs_predict_and_personalize_like_torch(cls, tmp_path):
    torch.manual_seed(8)
    net = cls().eval()
    vocab = net.embed.num_embeddings
    for p in net.parameters():
        p.requires_grad_(False)
    net.head.requires_grad_(True)
    spec = convert(net, [mp.TensorType("ids", (8,), dtype="int32")], classifier=ClassifierConfig(LABELS),
                   respect_trainable=True,
                   update=mp.UpdateConfig(optimizer=mp.SGD(learning_rate=0.1, mini_batch_size=4),
                                          epochs=2, shuffle=False))
    fd = spec.description.input[0]
    assert fd.type.multiArrayType.dataType == fd.type.multiArrayType.INT32
    assert spec.neuralNetworkClassifier.arrayInputShapeMapping == 1
    ct.models.MLModel(spec)
    mp.save(spec, tmp_path / "text.mlmodel")
    model = mp.load(tmp_path / "text.mlmodel", compute_units="cpu_only")
    ids = torch.randint(0, vocab, (9, 8))
    with torch.no_grad():
        ref = F.softmax(net(ids), -1).numpy()
    outs = model.predict_batch([{"ids": a.numpy().astype(np.int32)} for a in ids])
    assert np.abs(_probs(outs) - ref).max() <= 1e-5
    assert model.inference_plan().last_fallback_reason is None  # onnxruntime ran it
    y = torch.arange(8) % 5
    trained = model.update([{"ids": a.numpy().astype(np.int32), "label": LABELS[int(t)]}
                            for a, t in zip(ids[:8], y)])
    _torch_sgd(net, ids[:8], y, lr=0.1, epochs=2, batch=4)
    w = np.asarray({l.name: l for l in trained.spec.neuralNetworkClassifier.layers}["head"]
                   .innerProduct.weights.floatValue).reshape(net.head.weight.shape)
    np.testing.assert_allclose(w, net.head.weight.detach().numpy(), atol=1e-5)


def test_token_ids_outside_the_vocabulary_are_refused_with_the_fix():
    torch.manual_seed(9)
    model = mp.load(convert(BagOfWords().eval(), [mp.TensorType("ids", (8,), dtype="int32")],
                            outputs=["y"]), compute_units="cpu_only")
    ok = np.arange(8, dtype=np.int32)
    model.predict({"ids": ok})
    for bad in (np.full(8, 30, np.int32), np.full(8, -1, np.int32), ok + np.float32(0.5)):
        with pytest.raises(mp.InvalidInputError, match="vocabulary of 30"):
            model.predict({"ids": bad})
        with pytest.raises(mp.InvalidInputError, match="vocabulary of 30"):
            model.predict_batch([{"ids": ok}, {"ids": bad}])


def test_token_inputs_need_the_nd_mode_and_a_known_dtype():
    with pytest.raises(mp.ConversionError, match="dtype"):
        mp.TensorType("ids", (8,), dtype="int64")
    with pytest.raises(mp.ConversionError, match="ND mode"):
        convert(BagOfWords().eval(), [mp.TensorType("ids", (8,), dtype="int32")], exact_shapes=False)


def test_a_text_classifier_exports_to_onnx_with_integer_ids(tmp_path):
    import onnxruntime as ort

    torch.manual_seed(10)
    net = TextClassifier().eval()
    mp.to_onnx(net, [mp.TensorType("ids", (8,), dtype="int32")], tmp_path / "t.onnx")
    ids = torch.randint(0, 40, (3, 8))
    with torch.no_grad():
        ref = net(ids).numpy()
    got = ort.InferenceSession(str(tmp_path / "t.onnx")).run(None, {"ids": ids.numpy()})[0]
    assert np.abs(got - ref).max() <= 1e-5


class PaddedText(nn.Module):
    """Right-padded token ids (0 = padding): the encoder ignores padded keys, a masked mean pools
    the real tokens; the attention block reads the same mask through MultiheadAttention."""

    def __init__(self, norm_first=False, vocab=30, e=16, length=8, classes=5):
        super().__init__()
        self.embed = nn.Embedding(vocab, e)
        self.pos = nn.Parameter(torch.randn(1, length, e) * 0.1)
        layer = nn.TransformerEncoderLayer(e, 2, 32, batch_first=True, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 2)  # nested tensors on: torch's default
        self.attn = nn.MultiheadAttention(e, 2, batch_first=True)
        self.head = nn.Linear(e, classes)

    def forward(self, ids):
        pad = ids == 0
        h = self.encoder(self.embed(ids) + self.pos, src_key_padding_mask=pad)
        a, _ = self.attn(h, h, h, key_padding_mask=pad)
        keep = (~pad).float().unsqueeze(-1)
        return self.head((a * keep).sum(1) / keep.sum(1))


@pytest.mark.parametrize("norm_first", [False, True])
def test_padding_masks_computed_from_token_ids_match_torch(norm_first):
    """key_padding_mask / src_key_padding_mask computed from the inputs (ids == 0), logical not,
    masked mean; the post-norm encoder's padded positions come out 0 as in torch's nested-tensor
    inference path."""
    torch.manual_seed(11)
    net = PaddedText(norm_first).eval()
    spec = convert(net, [mp.TensorType("ids", (8,), dtype="int32")], classifier=ClassifierConfig(LABELS))
    ct.models.MLModel(spec)
    ids = torch.randint(1, 30, (6, 8))
    for row, n in enumerate((8, 5, 3, 1, 7, 2)):
        ids[row, n:] = 0
    with torch.no_grad():
        ref = F.softmax(net(ids), -1).numpy()
    model = mp.load(spec, compute_units="cpu_only")
    outs = model.predict_batch([{"ids": a.numpy().astype(np.int32)} for a in ids])
    assert np.abs(_probs(outs) - ref).max() <= 1e-5
    assert model.inference_plan().last_fallback_reason is None


def test_sdpa_with_a_boolean_mask_from_the_inputs_matches_torch():
    class Net(nn.Module):
        def forward(self, x):
            allow = (x[:, :, :1] > -0.5).transpose(1, 2)  # (N, 1, S): keys with feature 0 > -0.5
            return F.scaled_dot_product_attention(x, x, x, attn_mask=allow)

    torch.manual_seed(12)
    spec = convert(Net(), [mp.TensorType("x", (6, 4))], outputs=["y"])
    x = torch.randn(5, 6, 4)
    x[:, 0, 0] = 1.0  # every row keeps a key
    got = np.stack([o["y"] for o in mp.load(spec).predict_batch([{"x": a.numpy()} for a in x])])
    assert np.abs(got - Net()(x).numpy()).max() <= 1e-5


class TinyViT(nn.Module):
    """A ViT: 4 x 4 patches of a (3, 16, 16) image by a strided convolution, a class token,
    positions, a pre-norm encoder, the class token's state classifies."""

    def __init__(self, e=16, classes=5):
        super().__init__()
        self.patch = nn.Conv2d(3, e, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, e))
        self.pos = nn.Parameter(torch.randn(1, 17, e) * 0.1)
        layer = nn.TransformerEncoderLayer(e, 4, 32, batch_first=True, norm_first=True, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, 2)
        self.norm, self.head = nn.LayerNorm(e), nn.Linear(e, classes)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(x.shape[0], -1, -1), t], dim=1) + self.pos
        return self.head(self.norm(self.encoder(t))[:, 0])


class ConvAttention(nn.Module):
    """A CNN stem (conv, BatchNorm2d, ReLU, max pool) whose feature map's pixels attend to each
    other, and a 1-D branch: Conv1d + MaxPool1d over (C, L) sequences into the same attention."""

    def __init__(self, classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
        self.seq = nn.Sequential(nn.Conv1d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool1d(5))
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, classes)

    def forward(self, img, seq):
        pixels = self.stem(img).flatten(2).transpose(1, 2)           # (N, 16, 8)
        steps = self.seq(seq).transpose(1, 2)                         # (N, 5, 8)
        a, _ = self.attn(pixels, steps, steps)
        return self.head(a.mean(1))


def test_convolutions_feed_attention_in_one_nd_network(tmp_path):
    """Conv2d / Conv1d / BatchNorm2d / pooling in ND mode (the classic layers on (1, C, H, W)):
    a ViT patch embedding and a CNN + 1-D CNN feeding attention predict like torch, and an
    updatable patch embedding trains like torch.optim.SGD."""
    torch.manual_seed(13)
    vit = TinyViT().eval()
    spec = convert(vit, [mp.TensorType("x", (3, 16, 16))], classifier=ClassifierConfig(LABELS))
    ct.models.MLModel(spec)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        ref = F.softmax(vit(x), -1).numpy()
    model = mp.load(spec, compute_units="cpu_only")
    assert np.abs(_probs(model.predict_batch([{"x": a.numpy()} for a in x])) - ref).max() <= 1e-5
    assert model.inference_plan().last_fallback_reason is None  # the class token too (batch_generic)

    net = _randomize(ConvAttention())
    spec = convert(net, [mp.TensorType("img", (1, 8, 8)), mp.TensorType("seq", (3, 10))], outputs=["y"])
    kinds = [l.WhichOneof("layer") for l in spec.neuralNetwork.layers]
    assert {"convolution", "batchnorm", "pooling", "batchedMatmul"} <= set(kinds)
    img, seq = torch.randn(3, 1, 8, 8), torch.randn(3, 3, 10)
    with torch.no_grad():
        ref = net(img, seq).numpy()
    model = mp.load(spec, compute_units="cpu_only")
    got = np.stack([o["y"] for o in model.predict_batch(
        [{"img": a.numpy(), "seq": b.numpy()} for a, b in zip(img, seq)])])
    assert np.abs(got - ref).max() <= 1e-5
    assert model.inference_plan().last_fallback_reason is None

    for p in vit.parameters():
        p.requires_grad_(False)
    vit.patch.requires_grad_(True)
    with pytest.warns(RuntimeWarning, match="cannot backpropagate"):
        spec = convert(vit, [mp.TensorType("x", (3, 16, 16))], classifier=ClassifierConfig(LABELS),
                       respect_trainable=True,
                       update=mp.UpdateConfig(optimizer=mp.SGD(learning_rate=0.05, mini_batch_size=4),
                                              epochs=2, shuffle=False))
    y = torch.arange(4) % 5
    trained = mp.load(spec, compute_units="cpu_only").update(
        [{"x": a.numpy(), "label": LABELS[int(t)]} for a, t in zip(x, y)])
    _torch_sgd(vit, x, y, lr=0.05, epochs=2, batch=4)
    layer = next(l for l in trained.spec.neuralNetworkClassifier.layers if l.name == "patch")
    w = np.asarray(layer.convolution.weights.floatValue).reshape(vit.patch.weight.shape)
    np.testing.assert_allclose(w, vit.patch.weight.detach().numpy(), atol=1e-5)


def test_quantization_aware_encoder_exports_its_n_bit_linear_layers():
    """trainers.prepare_qat reaches the Linear layers inside encoder layers (feed-forward,
    out_proj): they are stored with their learned 4-bit weights and the spec predicts what the
    QAT module does; q/k/v projections (raw parameters of MultiheadAttention) stay float."""
    from trainers import prepare_qat

    torch.manual_seed(14)
    net = Encoder()
    prepare_qat(net, nbits=4)
    net.eval()
    spec = convert(net, [mp.TensorType("x", (6, 16))], outputs=["y"])
    bits = {l.name: l.innerProduct.weights.quantization.numberOfBits for l in spec.neuralNetwork.layers
            if l.WhichOneof("layer") == "innerProduct"}
    assert bits["encoder.layers.0.linear1"] == bits["encoder.layers.1.self_attn.out_proj"] == bits["head"] == 4
    assert bits["encoder.layers.0.self_attn.q_proj"] == 0
    x = torch.randn(4, 6, 16)
    with torch.no_grad():
        ref = net(x).numpy()
    got = np.stack([o["y"] for o in mp.load(spec).predict_batch([{"x": a.numpy()} for a in x])])
    assert np.abs(got - ref).max() <= 1e-5


def test_a_vit_reads_images_with_core_mls_preprocessing(tmp_path):
    """An ImageType input in ND mode: RANK4_IMAGE_MAPPING (the image arrives as (1, C, H, W),
    squeezed to the torch shape), scale and bias applied by Core ML's preprocessing, as torch's
    x / 255 - 0.5."""
    from PIL import Image

    torch.manual_seed(15)
    vit = TinyViT().eval()
    spec = convert(vit, [mp.ImageType("image", (3, 16, 16), color="rgb", scale=1 / 255, bias=(-0.5,) * 3)],
                   classifier=ClassifierConfig(LABELS))
    nn_spec = spec.neuralNetworkClassifier
    assert (nn_spec.arrayInputShapeMapping, nn_spec.imageInputShapeMapping) == (1, 1)
    ct.models.MLModel(spec)
    pixels = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    model = mp.load(spec, compute_units="cpu_only")
    outs = model.predict_batch([{"image": Image.fromarray(p)} for p in pixels])
    with torch.no_grad():
        ref = F.softmax(vit(torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - 0.5), -1).numpy()
    assert np.abs(_probs(outs) - ref).max() <= 1e-5
    assert model.inference_plan().last_fallback_reason is None


class _NanoAttention(nn.Module):
    """nanoGPT's CausalSelfAttention, as written there: a causal buffer sliced by the traced
    length, masked_fill with -inf, 1 / math.sqrt(k.size(-1))."""

    def __init__(self, n_embd=32, n_head=4, block_size=8):
        super().__init__()
        self.c_attn, self.c_proj = nn.Linear(n_embd, 3 * n_embd), nn.Linear(n_embd, n_embd)
        self.n_head, self.n_embd = n_head, n_embd
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x):
        import math

        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        y = F.softmax(att, dim=-1) @ v
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class NanoGPT(nn.Module):
    """Two pre-norm blocks, token + position embeddings (positions from torch.arange of the
    traced length), tied input/output embeddings, the next-token logits of the last position."""

    def __init__(self, vocab=50, length=8):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, 32), nn.Embedding(length, 32)
        self.ln = nn.ModuleList([nn.LayerNorm(32) for _ in range(4)])
        self.attn = nn.ModuleList([_NanoAttention() for _ in range(2)])
        self.mlp = nn.ModuleList([nn.Sequential(nn.Linear(32, 128), nn.GELU(approximate="tanh"),
                                                nn.Linear(128, 32), nn.Dropout(0.1)) for _ in range(2)])
        self.ln_f, self.lm_head = nn.LayerNorm(32), nn.Linear(32, vocab, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying

    def forward(self, idx):
        b, t = idx.size()
        x = self.wte(idx) + self.wpe(torch.arange(0, t, dtype=torch.long, device=idx.device))
        for i in range(2):
            x = x + self.attn[i](self.ln[2 * i](x))
            x = x + self.mlp[i](self.ln[2 * i + 1](x))
        return self.lm_head(self.ln_f(x[:, [-1], :]))


def test_a_nanogpt_exports_as_written():
    torch.manual_seed(16)
    net = NanoGPT().eval()
    spec = convert(net, [mp.TensorType("idx", (8,), dtype="int32")], outputs=["logits"])
    ct.models.MLModel(spec)
    model = mp.load(spec, compute_units="cpu_only")
    ids = torch.randint(0, 50, (3, 8))
    with torch.no_grad():
        ref = net(ids).numpy()
    got = np.stack([o["logits"] for o in model.predict_batch([{"idx": r.numpy().astype(np.int32)} for r in ids])])
    assert got.shape == ref.shape == (3, 1, 50)
    assert np.abs(got - ref).max() <= 1e-5
    assert model.inference_plan().last_fallback_reason is None


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class LlamaBlock(nn.Module):
    """A LLaMA-style block: nn.RMSNorm, rotary position embeddings (cos/sin buffers, rotate-half
    by slicing, negation and cat), causal SDPA, a SwiGLU feed-forward."""

    def __init__(self, d=32, heads=4, length=8):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d, eps=1e-5)
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.w1, self.w2, self.w3 = nn.Linear(d, 64, bias=False), nn.Linear(64, d, bias=False), nn.Linear(d, 64, bias=False)
        self.heads = heads
        inv = 1.0 / (10000 ** (torch.arange(0, d // heads, 2).float() / (d // heads)))
        freqs = torch.outer(torch.arange(length).float(), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos())
        self.register_buffer("sin", emb.sin())

    def forward(self, x):
        b, length, d = x.shape
        y = self.norm1(x)
        q, k, v = (w(y).view(b, length, self.heads, d // self.heads).transpose(1, 2)
                   for w in (self.wq, self.wk, self.wv))
        q = q * self.cos + _rotate_half(q) * self.sin
        k = k * self.cos + _rotate_half(k) * self.sin
        x = x + self.wo(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, length, d))
        y = self.norm2(x)
        return x + self.w2(F.silu(self.w1(y)) * self.w3(y))


def test_a_llama_style_block_with_rmsnorm_rotary_and_swiglu_matches_torch():
    torch.manual_seed(17)
    net = LlamaBlock().eval()
    spec = convert(net, [mp.TensorType("x", (8, 32))], outputs=["y"])
    ct.models.MLModel(spec)
    model = mp.load(spec, compute_units="cpu_only")
    x = torch.randn(3, 8, 32)
    with torch.no_grad():
        ref = net(x).numpy()
    got = np.stack([o["y"] for o in model.predict_batch([{"x": a.numpy()} for a in x])])
    assert np.abs(got - ref).max() <= 1e-5
    assert model.inference_plan().last_fallback_reason is None


class EinsumAttention(nn.Module):
    """Attention written with torch.einsum (heads kept in place: 'bqhd,bkhd->bhqk'), and a
    Gram matrix of the tokens ('bld,bmd->blm')."""

    def __init__(self):
        super().__init__()
        self.qkv, self.heads = nn.Linear(8, 24), 2

    def forward(self, x):
        b, length, e = x.shape
        q, k, v = self.qkv(x).chunk(3, -1)
        q, k, v = (q.view(b, length, self.heads, e // self.heads), k.view(b, length, self.heads, e // self.heads),
                   v.view(b, length, self.heads, e // self.heads))
        att = torch.einsum("bqhd,bkhd->bhqk", q, k) / 2.0
        y = torch.einsum("bhqk,bkhd->bqhd", att.softmax(-1), v)
        return y.reshape(b, length, e) + torch.einsum("bld,bmd->blm", x, x)[:, :, :8]


def test_einsum_attention_matches_torch_and_other_einsums_are_refused():
    torch.manual_seed(18)
    net = EinsumAttention().eval()
    model = mp.load(convert(net, [mp.TensorType("x", (9, 8))], outputs=["y"]), compute_units="cpu_only")
    x = torch.randn(3, 9, 8)
    with torch.no_grad():
        ref = net(x).numpy()
    got = np.stack([o["y"] for o in model.predict_batch([{"x": a.numpy()} for a in x])])
    assert np.abs(got - ref).max() <= 1e-5
    assert model.inference_plan().last_fallback_reason is None

    class Trace(nn.Module):
        def forward(self, x):
            return torch.einsum("bii->bi", x)

    with pytest.raises(mp.UnsupportedLayerError, match="einsum"):
        convert(Trace(), [mp.TensorType("x", (4, 4))])


def test_a_rank5_only_op_in_an_nd_network_says_why_the_network_is_nd():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.shuffle, self.attn = nn.PixelShuffle(2), nn.MultiheadAttention(6, 2, batch_first=True)

        def forward(self, x):
            h = self.shuffle(x).flatten(1, 2)  # PixelShuffle has only a rank-5 form
            return self.attn(h, h, h)[0]

    with pytest.raises(mp.UnsupportedLayerError, match=r"module 'shuffle' \(PixelShuffle\) converts to iOS "
                                                       r"11-12 layers only.*because it holds module 'attn'"):
        convert(Mixed().eval(), [mp.TensorType("x", (4, 2, 3))])


class NormsAttendUpsample(nn.Module):
    """A small segmentation-style net: conv, GroupNorm, InstanceNorm (affine), pixels attending
    to each other, a 1 x 1 conv, nearest upsampling (F.interpolate)."""

    def __init__(self):
        super().__init__()
        self.stem, self.gn = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8)
        self.inorm = nn.InstanceNorm2d(8, affine=True)
        self.attn, self.out = nn.MultiheadAttention(8, 2, batch_first=True), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        h = self.inorm(F.relu(self.gn(self.stem(x))))
        b, c, height, width = h.shape
        t = h.flatten(2).transpose(1, 2)
        a, _ = self.attn(t, t, t)
        h = h + a.transpose(1, 2).reshape(b, c, height, width)
        return F.interpolate(self.out(h), scale_factor=2, mode="nearest")


def test_group_and_instance_norm_and_upsampling_in_an_nd_network_match_torch():
    torch.manual_seed(19)
    net = NormsAttendUpsample().eval()
    for m in (net.gn, net.inorm):
        m.weight.data.uniform_(0.5, 1.5)
        m.bias.data.normal_()
    spec = convert(net, [mp.TensorType("x", (3, 6, 6))], outputs=["y"])
    ct.models.MLModel(spec)
    model = mp.load(spec, compute_units="cpu_only")
    x = torch.randn(3, 3, 6, 6)
    with torch.no_grad():
        ref = net(x).numpy()
    got = np.stack([o["y"] for o in model.predict_batch([{"x": a.numpy()} for a in x])])
    assert got.shape == (3, 2, 12, 12) and np.abs(got - ref).max() <= 1e-5
    assert model.inference_plan().last_fallback_reason is None


def test_bilinear_upsampling_with_torchs_default_grid_exports_in_nd_mode():
    """F.interpolate(mode='bilinear') with align_corners=False has no rank-5 form; in ND mode it
    is Core ML 3's upsample in ALIGN_CORNERS_FALSE mode (runs through the eager network: its
    vmapped trace has no ONNX export), align_corners=True a resizeBilinear (through the plan)."""
    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.up = nn.MultiheadAttention(4, 2, batch_first=True), nn.Upsample(scale_factor=2, mode="bilinear")

        def forward(self, x):
            b, c, h, w = x.shape
            t = x.flatten(2).transpose(1, 2)
            y = self.attn(t, t, t)[0].transpose(1, 2).reshape(b, c, h, w)
            return torch.cat([self.up(y), F.interpolate(y, size=(10, 12), mode="bilinear", align_corners=True)], 1)

    torch.manual_seed(20)
    net = Up().eval()
    spec = convert(net, [mp.TensorType("x", (4, 5, 6))], outputs=["y"])
    modes = [l.upsample.linearUpsampleMode for l in spec.neuralNetwork.layers if l.WhichOneof("layer") == "upsample"]
    assert modes == [2]  # ALIGN_CORNERS_FALSE
    x = torch.randn(2, 4, 5, 6)
    with torch.no_grad():
        ref = net(x).numpy()
    got = np.stack([o["y"] for o in mp.load(spec).predict_batch([{"x": a.numpy()} for a in x])])
    assert np.abs(got - ref).max() <= 1e-5


@pytest.mark.parametrize("bias,kdim", [(False, None), (True, 6), (False, 6)])
def test_cross_attention_without_bias_or_with_other_key_sizes_matches_torch(bias, kdim):
    """nn.MultiheadAttention(bias=False) and kdim/vdim != embed_dim (separate q/k/v projection
    weights), two inputs of different lengths, per-head attention weights as an output."""
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True, bias=bias, kdim=kdim, vdim=kdim)

        def forward(self, q, kv):
            out, weights = self.attn(q, kv, kv, average_attn_weights=False)
            return out, weights

    torch.manual_seed(21)
    net, width = Cross().eval(), kdim or 8
    model = mp.load(convert(net, [mp.TensorType("q", (3, 8)), mp.TensorType("kv", (5, width))],
                            outputs=["out", "weights"]), compute_units="cpu_only")
    q, kv = torch.randn(2, 3, 8), torch.randn(2, 5, width)
    with torch.no_grad():
        ref_out, ref_w = net(q, kv)
    outs = model.predict_batch([{"q": a.numpy(), "kv": b.numpy()} for a, b in zip(q, kv)])
    assert np.abs(np.stack([o["out"] for o in outs]) - ref_out.numpy()).max() <= 1e-5
    assert np.abs(np.stack([o["weights"] for o in outs]) - ref_w.numpy()).max() <= 1e-6


class LstmAttention(nn.Module):
    """A 2-layer LSTM whose whole output sequence feeds attention (only an ND network can hold
    that), the attended mean beside the last layer's final state h_n[-1]."""

    def __init__(self, bidirectional=False):
        super().__init__()
        width = 16 if bidirectional else 8
        self.rnn = nn.LSTM(3, 8, num_layers=1 if bidirectional else 2, batch_first=True,
                           bidirectional=bidirectional)
        self.attn, self.head = nn.MultiheadAttention(width, 2, batch_first=True), nn.Linear(2 * width, 4)
        self.bidirectional = bidirectional

    def forward(self, x):
        out, (h, c) = self.rnn(x)
        a, _ = self.attn(out, out, out)
        last = torch.cat([h[-2], h[-1]], 1) if self.bidirectional else h[-1]
        return self.head(torch.cat([a.mean(1), last], 1))


class RnnAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.attn = nn.RNN(3, 8, batch_first=True), nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        out, h = self.rnn(x)
        return self.head(self.attn(out, out, out)[0][:, -1] + h[-1])


@pytest.mark.parametrize("make", [LstmAttention, lambda: LstmAttention(True), RnnAttention],
                         ids=["lstm_2_layers", "bidirectional_lstm", "rnn"])
def test_recurrent_sequences_feed_attention_in_nd_mode(make):
    """The recurrent layers read (L, 1, C, 1, 1) in ND mode; their sequence comes back as (L, H)
    for any op (these models predict through the torch network: a recurrent loop under vmap has
    no ONNX trace)."""
    torch.manual_seed(22)
    net = make().eval()
    spec = convert(net, [mp.TensorType("x", (10, 3))], outputs=["y"])
    assert spec.neuralNetwork.arrayInputShapeMapping == 1
    ct.models.MLModel(spec)
    x = torch.randn(3, 10, 3)
    with torch.no_grad():
        ref = net(x).numpy()
    model = mp.load(spec, compute_units="cpu_only")
    got = np.stack([o["y"] for o in model.predict_batch([{"x": a.numpy()} for a in x])])
    assert np.abs(got - ref).max() <= 1e-5
    # the batch runs in one vmapped pass (torch's fused LSTM has no batching rule: the runtime
    # takes its step-by-step form there), not example by example
    with torch.inference_mode():
        env = torch.func.vmap(model.net)(model.preprocess(model.to_blobs({"x": x})))
    assert np.abs(env["y"].numpy() - ref).max() <= 1e-5


def test_an_lstm_under_attention_personalizes_like_torch():
    torch.manual_seed(23)
    net = LstmAttention().eval()
    net.attn.requires_grad_(False)
    with pytest.warns(RuntimeWarning, match="cannot backpropagate"):
        spec = convert(net, [mp.TensorType("x", (10, 3))], classifier=ClassifierConfig(list("abcd")),
                       respect_trainable=True,
                       update=mp.UpdateConfig(optimizer=mp.SGD(learning_rate=0.1, mini_batch_size=4),
                                              epochs=2, shuffle=False))
    layers = {l.name: l for l in spec.neuralNetworkClassifier.layers}
    assert layers["rnn"].isUpdatable and layers["rnn@2"].isUpdatable and layers["head"].isUpdatable
    x, y = torch.randn(8, 10, 3), torch.arange(8) % 4
    trained = mp.load(spec, compute_units="cpu_only").update(
        [{"x": a.numpy(), "label": "abcd"[int(t)]} for a, t in zip(x, y)])
    _torch_sgd(net, x, y, lr=0.1, epochs=2)
    got = {l.name: l for l in trained.spec.neuralNetworkClassifier.layers}
    np.testing.assert_allclose(np.asarray(got["head"].innerProduct.weights.floatValue).reshape(4, 16),
                               net.head.weight.detach().numpy(), atol=1e-4)
    w = np.asarray(got["rnn"].uniDirectionalLSTM.weightParams.inputGateWeightMatrix.floatValue).reshape(8, 3)
    np.testing.assert_allclose(w, net.rnn.weight_ih_l0.detach().numpy()[:8], atol=1e-5)


class Functional(nn.Module):
    """The functional forms custom attention code uses: F.linear / F.layer_norm with parameters,
    torch.where with a number, torch.stack."""

    def __init__(self):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.randn(8, 6)), nn.Parameter(torch.randn(8))
        self.g, self.attn = nn.Parameter(torch.rand(8) + 0.5), nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        h = F.layer_norm(F.linear(x, self.w, self.b), (8,), self.g, None, 1e-6)
        a = self.attn(h, h, h)[0]
        return torch.stack([torch.where(a > 0, a, 0.1 * a), h], dim=1).mean(1)


def test_functional_linear_layer_norm_where_and_stack_match_torch():
    torch.manual_seed(24)
    net = Functional().eval()
    model = mp.load(convert(net, [mp.TensorType("x", (5, 6))], outputs=["y"]), compute_units="cpu_only")
    x = torch.randn(3, 5, 6)
    with torch.no_grad():
        ref = net(x).numpy()
    got = np.stack([o["y"] for o in model.predict_batch([{"x": a.numpy()} for a in x])])
    assert np.abs(got - ref).max() <= 1e-5
    assert model.inference_plan().last_fallback_reason is None
