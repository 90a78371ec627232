"""Hostile model files: mutate real specs and check every one loads fine or raises a clear error.

Run:  PYTHONPATH=$PWD python benchmarks/fuzz.py [--cases 2000] [--seed 0]

Cases are byte mutations of serialized specs built with coremltools' builders (an NN classifier,
an updatable NN, a kNN with samples, a pipeline NN -> kNN, recurrent layers, an updatable LSTM):
bit flips, truncation, duplicated chunks and fields, random bytes, huge varint lengths; and structural mutations of the parsed
protobuf (a random field set to an extreme value, repeated fields dropped/duplicated/reordered,
deep pipeline nesting). Each case: ``mlpersonal.load(bytes)``, then one ``predict`` on a valid
input when it loads, then, for an updatable model, an UpdateTask on 4 valid training examples,
cancelled at the end of its first epoch. The outcome must be success or an ``MLPersonalError``
subclass.

Cases run in a worker subprocess whose address space is capped (RLIMIT_AS = its size after
imports + ``--mem-mib``), so an allocation the declared sizes could force shows up as an escape,
a segfault as a crash (the worker is restarted after the case), and a case that produces no
answer within ``--timeout`` seconds as a hang.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------------------
# base specs (coremltools builders)


def base_specs() -> dict:
    """name -> Model_pb2.Model: small, valid, runnable models of the kinds the runtime reads."""
    import numpy as np
    from coremltools.models import datatypes
    from coremltools.models.nearest_neighbors import KNearestNeighborsClassifierBuilder
    from coremltools.models.neural_network import AdamParams, NeuralNetworkBuilder, SgdParams
    from coremltools.models.pipeline import PipelineClassifier

    rng = np.random.default_rng(0)
    f32 = np.float32

    # 1. NN classifier over an image: scaler preprocessing, conv, batchnorm, relu, pool, fc, softmax
    b = NeuralNetworkBuilder([("image", datatypes.Array(3, 8, 8))], [("probs", datatypes.Array(3))],
                             mode="classifier")
    b.add_convolution("conv", 3, 4, 3, 3, 1, 1, "same", 1, rng.normal(size=(3, 3, 3, 4)).astype(f32),
                      rng.normal(size=4).astype(f32), True, input_name="image", output_name="c")
    b.add_batchnorm("bn", 4, np.ones(4, f32), np.zeros(4, f32), np.zeros(4, f32), np.ones(4, f32),
                    input_name="c", output_name="n")
    b.add_activation("relu", "RELU", "n", "r")
    b.add_pooling("pool", 2, 2, 2, 2, "MAX", padding_type="VALID", input_name="r", output_name="p")
    b.add_flatten("flat", 0, "p", "f")
    b.add_inner_product("fc", rng.normal(size=(3, 64)).astype(f32), np.zeros(3, f32), 64, 3, True,
                        "f", "logits")
    b.add_softmax("sm", "logits", "probs")
    b.set_class_labels(["cat", "dog", "bird"], predicted_feature_name="label")
    image_spec = b.spec
    # make the input a real image feature with preprocessing
    inp = image_spec.description.input[0]
    inp.type.imageType.width, inp.type.imageType.height = 8, 8
    inp.type.imageType.colorSpace = 20  # RGB
    pp = image_spec.neuralNetworkClassifier.preprocessing.add()
    pp.featureName = "image"
    pp.scaler.channelScale = 1 / 255.0

    # 2. updatable NN classifier: fc -> relu -> fc -> softmax, CE loss, Adam
    u = NeuralNetworkBuilder([("x", datatypes.Array(6))], [("probs", datatypes.Array(2))],
                             mode="classifier")
    u.add_inner_product("fc1", rng.normal(size=(5, 6)).astype(f32), np.zeros(5, f32), 6, 5, True,
                        "x", "h")
    u.add_activation("relu", "RELU", "h", "hr")
    u.add_inner_product("fc2", rng.normal(size=(2, 5)).astype(f32), np.zeros(2, f32), 5, 2, True,
                        "hr", "logits")
    u.add_softmax("sm", "logits", "probs")
    u.set_class_labels(["no", "yes"], predicted_feature_name="label")
    u.make_updatable(["fc1", "fc2"])
    u.set_categorical_cross_entropy_loss("loss", input="probs")
    u.set_adam_optimizer(AdamParams(lr=0.01, batch=4))
    u.set_epochs(2)
    updatable = u.spec

    # 3. regressor with an SGD-updatable conv and MSE loss
    r = NeuralNetworkBuilder([("x", datatypes.Array(2, 4, 4))], [("y", datatypes.Array(1, 2, 2))])
    r.add_convolution("conv", 2, 1, 3, 3, 1, 1, "valid", 1, rng.normal(size=(3, 3, 2, 1)).astype(f32),
                      None, False, input_name="x", output_name="y")
    r.make_updatable(["conv"])
    r.set_mean_squared_error_loss("loss", input_feature=("y", datatypes.Array(1, 2, 2)))
    r.set_sgd_optimizer(SgdParams(lr=0.1, batch=2))
    r.set_epochs(1)
    regressor = r.spec

    # 4. kNN with samples
    k = KNearestNeighborsClassifierBuilder(input_name="features", output_name="label",
                                           number_of_dimensions=4, default_class_label="none",
                                           number_of_neighbors=3)
    k.add_samples(rng.normal(size=(6, 4)), ["a", "b", "a", "c", "b", "c"])
    k.set_number_of_neighbors_with_bounds(3, allowed_range=(1, 5))
    knn = k.spec

    # 5. pipeline: NN embedding (x -> features) then kNN
    e = NeuralNetworkBuilder([("x", datatypes.Array(6))], [("features", datatypes.Array(4))])
    e.add_inner_product("emb", rng.normal(size=(4, 6)).astype(f32), None, 6, 4, False, "x",
                        "features")
    p = PipelineClassifier([("x", datatypes.Array(6))], ["a", "b", "c"],
                           output_features=[("label", datatypes.String())])
    e.spec.description.output[0].type.CopyFrom(knn.description.input[0].type)  # Core ML: one type
    p.add_model(e.spec)
    p.add_model(knn)
    pipe = p.spec
    pipe.isUpdatable = True  # its last stage, the kNN, is (Core ML: only in an updatable pipeline)
    pipe.specificationVersion = max(pipe.specificationVersion, 4)
    for m in pipe.pipelineClassifier.pipeline.models:
        m.specificationVersion = max(m.specificationVersion, 4)
    pipe.pipelineClassifier.pipeline.names.extend(["embed", "knn"])
    pipe.description.output[0].type.stringType.SetInParent()
    # 6. NN with a custom layer (className + parameters map; unregistered, so it never runs)
    c = NeuralNetworkBuilder([("x", datatypes.Array(6))], [("y", datatypes.Array(4))])
    c.add_inner_product("fc", rng.normal(size=(4, 6)).astype(f32), None, 6, 4, False, "x", "h")
    layer = c.spec.neuralNetwork.layers.add()
    layer.name, layer.custom.className = "cust", "NotRegisteredLayer"
    layer.input.append("h")
    layer.output.append("y")
    layer.custom.parameters["alpha"].doubleValue = 0.5
    layer.custom.parameters["mode"].stringValue = "fast"
    w = layer.custom.weights.add()
    w.floatValue.extend([1.0, 2.0])
    custom = c.spec
    custom.specificationVersion = 4
    # 7. n-bit quantized NN classifier (coremltools quantize_weights: 4-bit linear, 3-bit LUT)
    from coremltools.models import MLModel
    from coremltools.models.neural_network.quantization_utils import quantize_weights

    q = NeuralNetworkBuilder([("x", datatypes.Array(6))], [("probs", datatypes.Array(3))],
                             mode="classifier")
    q.add_inner_product("fc1", rng.normal(size=(8, 6)).astype(f32), rng.normal(size=8).astype(f32),
                        6, 8, True, "x", "h")
    q.add_activation("relu", "RELU", "h", "hr")
    q.add_inner_product("fc2", rng.normal(size=(3, 8)).astype(f32), None, 8, 3, False, "hr", "l")
    q.add_softmax("sm", "l", "probs")
    q.set_class_labels(["x", "y", "z"], predicted_feature_name="label")
    quantized = quantize_weights(MLModel(q.spec), nbits=4, quantization_mode="linear").get_spec()
    lut = quantize_weights(MLModel(q.spec), nbits=3, quantization_mode="linear_lut").get_spec()
    quantized.neuralNetworkClassifier.layers[2].CopyFrom(lut.neuralNetworkClassifier.layers[2])
    # 8. recurrent: LSTM (optional state inputs, peepholes) -> GRU -> simple RNN -> bi-LSTM -> fc
    s = NeuralNetworkBuilder([("x", datatypes.Array(3)), ("h_in", datatypes.Array(4)),
                              ("c_in", datatypes.Array(4)), ("r_in", datatypes.Array(4))],
                             [("y", datatypes.Array(2)), ("h_out", datatypes.Array(4))])
    g = lambda *shape: [rng.normal(size=shape).astype(f32) for _ in range(4)]  # noqa: E731
    s.add_unilstm("lstm", g(4, 4), g(4, 3), g(4), 4, 3, ["x", "h_in", "c_in"],
                  ["l", "h_out", "c_out"], peep=g(4)[:3], output_all=True)
    s.add_gru("gru", g(4, 4)[:3], g(4, 4)[:3], g(4)[:3], 4, 4, ["l"], ["gr", "gr_h"], output_all=True)
    s.add_simple_rnn("rnn", rng.normal(size=(4, 4)).astype(f32), rng.normal(size=(4, 4)).astype(f32),
                     np.zeros(4, f32), 4, 4, "TANH", ["gr", "r_in"], ["rn", "rn_h"], output_all=True)
    s.add_bidirlstm("bi", g(2, 2), g(2, 4), g(2), g(2, 2), g(2, 4), g(2), 2, 4, ["rn"],
                    ["bo", "bo_hf", "bo_cf", "bo_hb", "bo_cb"])  # Core ML: every final state
    s.add_inner_product("fc", rng.normal(size=(2, 4)).astype(f32), None, 4, 2, False, "bo", "y")
    for fd in s.spec.description.input[1:]:
        fd.type.isOptional = True
    recurrent = s.spec

    # 9. updatable sequence classifier: LSTM (trained through time) -> fc -> softmax, CE, SGD
    t = NeuralNetworkBuilder([("x", datatypes.Array(3))], [("probs", datatypes.Array(2))],
                             mode="classifier")
    t.add_unilstm("lstm", g(4, 4), g(4, 3), g(4), 4, 3, ["x"], ["h", "h_last", "c_last"])
    t.add_inner_product("fc", rng.normal(size=(2, 4)).astype(f32), np.zeros(2, f32), 4, 2, True,
                        "h", "logits")
    t.add_softmax("sm", "logits", "probs")
    t.set_class_labels(["still", "moving"], predicted_feature_name="label")
    t.make_updatable(["fc"])
    lstm = t.spec.neuralNetworkClassifier.layers[0]
    lstm.isUpdatable = True
    for field in lstm.uniDirectionalLSTM.weightParams.DESCRIPTOR.fields:
        getattr(lstm.uniDirectionalLSTM.weightParams, field.name).isUpdatable = True
    t.set_categorical_cross_entropy_loss("loss", input="probs")
    t.set_sgd_optimizer(SgdParams(lr=0.1, batch=2))
    t.set_epochs(2)
    # 10. ND (EXACT_ARRAY_MAPPING) attention classifier: q/k/v projections, batched matmuls,
    # softmaxND, layer norm, mean over tokens, an updatable head on (1, C, 1, 1), classic softmax
    a = NeuralNetworkBuilder([("x", datatypes.Array(4, 6))], [("probs", datatypes.Array(3))],
                             mode="classifier", disable_rank5_shape_mapping=True)
    for part in "qkv":
        a.add_inner_product(part, rng.normal(size=(6, 6)).astype(f32), rng.normal(size=6).astype(f32),
                            6, 6, True, "x", part)
    a.add_batched_mat_mul("scores", ["q", "k"], "scores", transpose_b=True)
    a.add_softmax_nd("weights", "scores", "weights", -1)
    a.add_batched_mat_mul("context", ["weights", "v"], "context")
    a.add_layer_normalization("norm", "context", "normed", [6], np.ones(6, f32), np.zeros(6, f32))
    a.add_reduce_mean("pool", "normed", "pooled", axes=[0], keepdims=False)
    a.add_reshape_static("nchw", "pooled", "nchw", [1, 6, 1, 1])
    a.add_inner_product("head", rng.normal(size=(3, 6)).astype(f32), np.zeros(3, f32), 6, 3, True,
                        "nchw", "logits")
    a.add_softmax("sm", "logits", "probs")
    a.set_class_labels(["p", "q", "r"], predicted_feature_name="label")
    a.make_updatable(["head"])
    a.set_categorical_cross_entropy_loss("loss", input="probs")
    a.set_sgd_optimizer(SgdParams(lr=0.1, batch=2))
    a.set_epochs(2)
    return {"nn_image_classifier": image_spec, "updatable_nn": updatable,
            "updatable_regressor": regressor, "knn": knn, "pipeline": pipe,
            "custom_layer": custom, "quantized_nn": quantized, "recurrent": recurrent,
            "updatable_lstm": t.spec, "nd_attention": a.spec}


def valid_input(spec, rng) -> dict:
    """A valid example for ``spec``'s declared inputs (None if they are too large to build)."""
    import numpy as np

    ex = {}
    for fd in spec.description.input:
        kind = fd.type.WhichOneof("Type")
        if kind == "multiArrayType":
            shape = [int(s) for s in fd.type.multiArrayType.shape] or [1]
            if math.prod(shape) > 2**22:
                return None
            ex[fd.name] = rng.normal(size=shape).astype(np.float32)
        elif kind == "imageType":
            w, h = int(fd.type.imageType.width), int(fd.type.imageType.height)
            if w * h > 2**22:
                return None
            ex[fd.name] = rng.integers(0, 256, size=(max(h, 1), max(w, 1), 3), dtype=np.uint8)
        elif kind == "int64Type":
            ex[fd.name] = 1
        elif kind == "doubleType":
            ex[fd.name] = 0.5
        elif kind == "stringType":
            ex[fd.name] = "a"
        else:
            ex[fd.name] = {"a": 1.0}
    return ex


# --------------------------------------------------------------------------------------------
# mutations

#: name -> how many of the cases use it (weights)
BYTE_MUTATIONS = ("bit_flips", "truncate", "duplicate_chunk", "random_span", "insert_random",
                  "huge_varint", "duplicate_whole", "random_file")
STRUCT_MUTATIONS = ("extreme_field", "extreme_layer_field", "extreme_layer_field",
                    "repeated_edit", "deep_pipeline", "hostile_strings")

INT_EXTREMES = {
    "int32": (0, 1, -1, 2**31 - 1, -(2**31), 2**16, 3),
    "int64": (0, 1, -1, 2**63 - 1, -(2**63), 2**40, 2**31, 2**32 + 1),
    "uint32": (0, 1, 2**32 - 1, 2**31, 2**16 + 1),
    "uint64": (0, 1, 2**64 - 1, 2**63, 2**40, 2**32, 2**64 - 2),  # 2**64-1 == -1 as uint64
}
FLOAT_EXTREMES = (0.0, -0.0, float("nan"), float("inf"), float("-inf"), 1e38, -1e38, 1e-45, -1.0)
HOSTILE_STRINGS = ("", "__import__('os').system('touch PWNED')", "os.system", "../../etc/passwd",
                   "\x00", "x" * 4096, "probs", "x", "label", "é\u202e")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def mutate_bytes(data: bytes, r: random.Random, how: str) -> bytes:
    buf = bytearray(data)
    n = len(buf)
    if how == "bit_flips":
        for _ in range(r.choice((1, 1, 2, 3, 8))):
            i = r.randrange(n)
            buf[i] ^= 1 << r.randrange(8)
    elif how == "truncate":
        del buf[r.randrange(n):]
    elif how == "duplicate_chunk":
        a = r.randrange(n)
        b = min(n, a + r.randint(1, 64))
        c = r.randrange(n + 1)
        buf[c:c] = buf[a:b]
    elif how == "random_span":
        a = r.randrange(n)
        for i in range(a, min(n, a + r.randint(1, 16))):
            buf[i] = r.randrange(256)
    elif how == "insert_random":
        c = r.randrange(n + 1)
        buf[c:c] = bytes(r.randrange(256) for _ in range(r.randint(1, 32)))
    elif how == "huge_varint":
        # a length-delimited field (random field number) claiming a huge length, at a random point
        field = r.choice((1, 2, 3, 100, 200, 300, 400, 500, 555, r.randint(1, 2**29 - 1)))
        length = r.choice((2**31, 2**32 + 7, 2**63, 2**64 - 1, 2**35, n * 2))
        c = r.choice((0, n, r.randrange(n + 1)))
        buf[c:c] = _varint(field << 3 | 2) + _varint(length)
    elif how == "duplicate_whole":
        buf = buf + buf  # protobuf merge: every repeated field twice, scalars last-wins
    elif how == "random_file":
        buf = bytearray(r.randrange(256) for _ in range(r.randint(0, 512)))
    return bytes(buf)


def _fields(msg, path=()):
    """Every (message, field descriptor, path) under ``msg`` that is set (depth-first)."""
    out = []
    for fd, value in msg.ListFields():
        if fd.type == fd.TYPE_MESSAGE and fd.message_type.GetOptions().map_entry:
            vf = fd.message_type.fields_by_name["value"]
            if vf.type == vf.TYPE_MESSAGE:
                for item in list(value.values())[:64]:
                    out.extend(_fields(item, path + (fd.name,)))
            continue
        out.append((msg, fd, path + (fd.name,)))
        if fd.type == fd.TYPE_MESSAGE:
            items = value if _repeated(fd) else [value]
            for item in list(items)[:64]:
                out.extend(_fields(item, path + (fd.name,)))
    return out


def _repeated(fd) -> bool:
    rep = getattr(fd, "is_repeated", None)
    return bool(rep) if rep is not None else fd.label == fd.LABEL_REPEATED


def _extreme(fd, r: random.Random):
    t = fd.type
    if t in (fd.TYPE_INT32, fd.TYPE_SINT32, fd.TYPE_SFIXED32):
        return r.choice(INT_EXTREMES["int32"])
    if t in (fd.TYPE_INT64, fd.TYPE_SINT64, fd.TYPE_SFIXED64):
        return r.choice(INT_EXTREMES["int64"])
    if t in (fd.TYPE_UINT32, fd.TYPE_FIXED32):
        return r.choice(INT_EXTREMES["uint32"])
    if t in (fd.TYPE_UINT64, fd.TYPE_FIXED64):
        return r.choice(INT_EXTREMES["uint64"])
    if t in (fd.TYPE_FLOAT, fd.TYPE_DOUBLE):
        return r.choice(FLOAT_EXTREMES)
    if t == fd.TYPE_BOOL:
        return r.random() < 0.5
    if t == fd.TYPE_ENUM:
        return r.choice((0, 1, 2, 7, 99, 2**31 - 1, -1))
    if t == fd.TYPE_STRING:
        return r.choice(HOSTILE_STRINGS)
    if t == fd.TYPE_BYTES:
        return bytes(r.randrange(256) for _ in range(r.choice((0, 1, 3, 7, 16))))
    return None


def mutate_struct(spec, r: random.Random, how: str):
    """A mutated copy of ``spec`` (a Model_pb2.Model)."""
    from mlpersonal.proto import Model_pb2

    m = Model_pb2.Model()
    m.CopyFrom(spec)
    if how == "deep_pipeline":
        depth = r.choice((2, 5, 17, 40, 120))
        for _ in range(depth):
            outer = Model_pb2.Model()
            outer.specificationVersion = m.specificationVersion
            outer.description.CopyFrom(m.description)
            outer.pipeline.models.add().CopyFrom(m)
            m = outer
        return m
    for _ in range(r.randint(1, 3)):
        fields = [f for f in _fields(m) if f[1].type != f[1].TYPE_MESSAGE or _repeated(f[1])]
        if how == "extreme_layer_field":
            fields = [f for f in fields if "layers" in f[2] and f[1].name not in
                      ("floatValue", "float16Value", "rawValue")] or fields
        if not fields:
            break
        msg, fd, _path = r.choice(fields)
        if how == "repeated_edit" and _repeated(fd):
            seq = getattr(msg, fd.name)
            if not len(seq):
                continue
            op = r.choice(("drop", "dup", "swap", "clear"))
            i = r.randrange(len(seq))
            if op == "drop":
                del seq[i]
            elif op == "clear":
                del seq[:]
            elif op == "dup":
                if fd.type == fd.TYPE_MESSAGE:
                    seq.add().CopyFrom(seq[i])
                else:
                    seq.append(seq[i])
            elif len(seq) > 1:
                j = r.randrange(len(seq))
                if fd.type == fd.TYPE_MESSAGE:
                    a, b = type(seq[i])(), type(seq[j])()
                    a.CopyFrom(seq[i])
                    b.CopyFrom(seq[j])
                    seq[i].CopyFrom(b)
                    seq[j].CopyFrom(a)
                else:
                    seq[i], seq[j] = seq[j], seq[i]
            continue
        if fd.type == fd.TYPE_MESSAGE:
            continue
        if how == "hostile_strings" and fd.type != fd.TYPE_STRING:
            strings = [f for f in fields if f[1].type == f[1].TYPE_STRING]
            if strings:
                msg, fd, _path = r.choice(strings)
        value = _extreme(fd, r)
        try:
            if _repeated(fd):
                seq = getattr(msg, fd.name)
                if len(seq):
                    seq[r.randrange(len(seq))] = value
                else:
                    seq.append(value)
            else:
                setattr(msg, fd.name, value)
        except (ValueError, TypeError):
            pass  # value outside the field's wire type (e.g. bad UTF-8): not representable
    return m


def make_case(bases: dict, seed: int, i: int) -> tuple[str, bytes]:
    """Case ``i`` (deterministic): (description, bytes to load)."""
    r = random.Random(f"{seed}:{i}")
    names = sorted(bases)
    base = names[i % len(names)]
    spec = bases[base]
    if r.random() < 0.5:
        how = r.choice(BYTE_MUTATIONS)
        return f"{base}/{how}", mutate_bytes(spec.SerializeToString(), r, how)
    how = r.choice(STRUCT_MUTATIONS)
    return f"{base}/{how}", mutate_struct(spec, r, how).SerializeToString()


# --------------------------------------------------------------------------------------------
# running one case


class CaseTimeout(BaseException):
    """Raised by SIGALRM inside a case that ran past its time bound."""


def run_case(data: bytes, rng) -> tuple[str, str]:
    """('ok' | 'load_error' | 'predict_error' | 'update_error' | 'other', detail)."""
    import mlpersonal as mp

    try:
        m = mp.load(data)
    except mp.MLPersonalError as e:
        return "load_error", type(e).__name__
    except CaseTimeout:
        raise
    except BaseException as e:  # noqa: BLE001 - classify everything
        return "other", f"load: {type(e).__name__}: {str(e)[:300]}"
    try:
        ex = valid_input(m.spec, rng)
    except BaseException as e:  # noqa: BLE001
        return "other", f"harness input: {type(e).__name__}: {e}"
    if ex is None:
        return "ok", "loaded (input too large to build)"
    try:
        m.predict(ex)
    except mp.MLPersonalError as e:
        return "predict_error", type(e).__name__
    except CaseTimeout:
        raise
    except BaseException as e:  # noqa: BLE001
        return "other", f"predict: {type(e).__name__}: {str(e)[:300]}"
    if not m.spec.isUpdatable:
        return "ok", "predicted"
    try:
        data = [training_example(m, ex, rng) for _ in range(4)]
    except BaseException as e:  # noqa: BLE001
        return "other", f"harness training data: {type(e).__name__}: {e}"
    try:  # one epoch whatever the file asks for: cancelled at its end
        ctx = mp.UpdateTask(m, data, progress_handlers={"epoch_end": lambda c: c.task.cancel()}).run()
        err = ctx.error
    except CaseTimeout:
        raise
    except BaseException as e:  # noqa: BLE001
        err = e
    if err is None:
        return "ok", "updated"
    if isinstance(err, mp.MLPersonalError):
        return "update_error", type(err).__name__
    return "other", f"update: {type(err).__name__}: {str(err)[:300]}"


def training_example(model, ex: dict, rng) -> dict:
    """``ex`` plus a valid value of each training target the spec declares (a class label the
    model knows, or an array of the declared shape)."""
    import numpy as np

    out = dict(ex)
    inputs = {f.name for f in model.spec.description.input}
    labels = list(getattr(model, "class_labels", None) or [])
    for fd in model.spec.description.trainingInput:
        if fd.name in inputs:
            continue
        kind = fd.type.WhichOneof("Type")
        if kind == "multiArrayType":
            shape = [int(s) for s in fd.type.multiArrayType.shape] or [1]
            out[fd.name] = rng.normal(size=shape if math.prod(shape) <= 2**20 else [1]).astype(np.float32)
        elif kind == "int64Type":
            out[fd.name] = labels[0] if labels and isinstance(labels[0], int) else 0
        else:
            out[fd.name] = labels[0] if labels and isinstance(labels[0], str) else "a"
    return out


def _vm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1])
    return 0


def worker(seed: int, start: int, stop: int, timeout: float, mem_mib: int) -> None:
    """Run cases [start, stop) and print one JSON line per case (stdout)."""
    import resource

    out = os.fdopen(os.dup(1), "w")  # the protocol channel; anything else printed goes to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    import numpy as np
    import torch

    import mlpersonal  # noqa: F401
    import runtime  # noqa: F401

    torch.set_num_threads(1)
    bases = base_specs()
    # warm up every code path once before capping memory
    for spec in bases.values():
        run_case(spec.SerializeToString(), np.random.default_rng(0))
    limit = (_vm_kib() + mem_mib * 1024) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def on_alarm(signum, frame):
        raise CaseTimeout()

    signal.signal(signal.SIGALRM, on_alarm)
    # harness self-test: FUZZ_INJECT="3:crash,4:spin,5:hang,7:alloc" replaces those cases
    inject = dict(x.split(":") for x in os.environ.get("FUZZ_INJECT", "").split(",") if x)
    print(json.dumps({"ready": True}), file=out, flush=True)
    for i in range(start, stop):
        desc, data = make_case(bases, seed, i)
        t0 = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            what = inject.get(str(i))
            if what == "crash":
                os.kill(os.getpid(), signal.SIGSEGV)
            elif what == "hang":
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])
                time.sleep(timeout + 60)
            elif what == "spin":
                while True:  # a pure-python hang: broken by the per-case alarm
                    pass
            elif what == "alloc":
                np.ones(2**31, dtype=np.float32)  # 8 GiB: beyond the address-space cap
            outcome, detail = run_case(data, np.random.default_rng(i))
        except MemoryError as e:
            outcome, detail = "other", f"MemoryError: {e}"
        except CaseTimeout:
            outcome, detail = "hang", "SIGALRM"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss
        print(json.dumps({"i": i, "case": desc, "outcome": outcome, "detail": detail,
                          "s": round(time.perf_counter() - t0, 4), "rss_growth_kib": rss}),
              file=out, flush=True)


def run(cases: int, seed: int = 0, timeout: float = 5.0, mem_mib: int = 1024,
        log=None, inject: str = "") -> dict:
    """Run ``cases`` fuzz cases in worker subprocesses; return counts and the escapes."""
    counts = Counter()
    escapes = []
    by_mutation = Counter()
    max_rss = 0
    slowest = 0.0
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONWARNINGS="ignore", FUZZ_INJECT=inject)
    i = 0
    restarts = 0
    while i < cases:
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.fuzz", "--worker", "--seed", str(seed),
                 "--start", str(i), "--stop", str(cases), "--timeout", str(timeout),
                 "--mem-mib", str(mem_mib)],
                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err)
            ready = False
            buf = b""
            try:
                while i < cases:
                    wait = 120 if not ready else timeout + 3
                    rl, _, _ = select.select([proc.stdout], [], [], wait)
                    if not rl:  # silent past the bound: a hang the alarm could not break
                        counts["hang"] += 1
                        escapes.append({"i": i, "outcome": "hang", "detail": "no answer"})
                        i += 1
                        break
                    chunk = os.read(proc.stdout.fileno(), 65536)
                    if not chunk:  # the worker died: a crash in case i
                        proc.wait()
                        if not ready or proc.returncode >= 0:  # not a signal: a harness bug
                            err.seek(0)
                            raise RuntimeError(f"fuzz worker failed (case {i}):\n"
                                               + err.read().decode(errors="replace")[-3000:])
                        counts["crash"] += 1
                        escapes.append({"i": i, "outcome": "crash",
                                        "detail": f"worker exit {proc.returncode}"})
                        i += 1
                        break
                    buf += chunk
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        rec = json.loads(line)
                        if rec.get("ready"):
                            ready = True
                            continue
                        i = rec["i"] + 1
                        counts[rec["outcome"]] += 1
                        by_mutation[(rec["case"].split("/")[1], rec["outcome"])] += 1
                        max_rss = max(max_rss, rec["rss_growth_kib"])
                        slowest = max(slowest, rec["s"])
                        if rec["outcome"] in ("other", "hang"):
                            escapes.append(rec)
                        if log is not None:
                            log(rec)
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
        restarts += 1
    loaded = counts["ok"] + counts["predict_error"] + counts["update_error"]
    return {"cases": cases, "loaded": loaded, "predicted": counts["ok"] + counts["update_error"],
            "load_errors": counts["load_error"], "predict_errors": counts["predict_error"],
            "update_errors": counts["update_error"],
            "clear_errors": counts["load_error"] + counts["predict_error"] + counts["update_error"],
            "other": counts["other"], "hangs": counts["hang"], "crashes": counts["crash"],
            "workers": restarts, "max_rss_growth_mib": round(max_rss / 1024, 1),
            "slowest_case_s": slowest, "escapes": escapes, "by_mutation": by_mutation}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=5.0)
    ap.add_argument("--mem-mib", type=int, default=1024)
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--stop", type=int, default=0)
    a = ap.parse_args(argv)
    if a.worker:
        worker(a.seed, a.start, a.stop, a.timeout, a.mem_mib)
        return 0
    t0 = time.perf_counter()
    res = run(a.cases, a.seed, a.timeout, a.mem_mib)
    wall = time.perf_counter() - t0
    print(f"fuzz: {res['cases']} cases, seed {a.seed}, {wall:.1f} s, per-case bound {a.timeout} s, "
          f"address-space cap +{a.mem_mib} MiB")
    rows = [("cases run", res["cases"]), ("loaded fine", res["loaded"]),
            ("  of which predicted fine", res["predicted"]),
            ("clear errors (MLPersonalError)", res["clear_errors"]),
            ("  at load", res["load_errors"]), ("  at predict", res["predict_errors"]),
            ("  at update", res["update_errors"]),
            ("other exceptions", res["other"]), ("hangs", res["hangs"]),
            ("crashes", res["crashes"]), ("worker processes", res["workers"]),
            ("max RSS growth (MiB)", res["max_rss_growth_mib"]),
            ("slowest case (s)", res["slowest_case_s"])]
    for k, v in rows:
        print(f"  {k:<32} {v:>8}")
    print("  by mutation:")
    muts = sorted({m for m, _ in res["by_mutation"]})
    outs = ("ok", "load_error", "predict_error", "update_error", "other", "hang")
    print("    " + f"{'mutation':<18}" + "".join(f"{o:>15}" for o in outs))
    for m in muts:
        print("    " + f"{m:<18}" + "".join(f"{res['by_mutation'][(m, o)]:>15}" for o in outs))
    for e in res["escapes"][:20]:
        print("  ESCAPE", e)
    return 0 if not (res["other"] or res["hangs"] or res["crashes"]) else 1


if __name__ == "__main__":
    sys.exit(main())
