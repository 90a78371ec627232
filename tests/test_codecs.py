"""WeightParams codecs against coremltools' quantizer (the oracle for Core ML's format)."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mlpersonal as mp
from mlpersonal import codecs
from mlpersonal.errors import InvalidModelError
from mlpersonal.proto import NeuralNetwork_pb2

ct = pytest.importorskip("coremltools")
from coremltools.models import datatypes  # noqa: E402
from coremltools.models.neural_network import NeuralNetworkBuilder  # noqa: E402
from coremltools.models.neural_network import quantization_utils as qu  # noqa: E402


def build_spec(seed=0):
    """conv (3->6) -> relu -> deconv (6->4, axis-1 channels) -> flatten -> fc (4*16*16 -> 5)."""
    rng = np.random.default_rng(seed)
    b = NeuralNetworkBuilder([("x", datatypes.Array(3, 8, 8))], [("y", None)])
    b.add_convolution("conv", kernel_channels=3, output_channels=6, height=3, width=3,
                      stride_height=1, stride_width=1, border_mode="same", groups=1,
                      W=rng.normal(size=(3, 3, 3, 6)).astype(np.float32),
                      b=rng.normal(size=6).astype(np.float32), has_bias=True,
                      input_name="x", output_name="c")
    b.add_activation("relu", "RELU", "c", "r")
    b.add_convolution("deconv", kernel_channels=6, output_channels=4, height=2, width=2,
                      stride_height=2, stride_width=2, border_mode="valid", groups=1,
                      W=rng.normal(size=(2, 2, 6, 4)).astype(np.float32), b=None,
                      has_bias=False, is_deconv=True, output_shape=(16, 16),
                      input_name="r", output_name="d")
    b.add_flatten("flat", 0, "d", "f")
    b.add_inner_product("fc", W=(rng.normal(size=(5, 1024)) * 0.05).astype(np.float32),
                        b=rng.normal(size=5).astype(np.float32), input_channels=1024,
                        output_channels=5, has_bias=True, input_name="f", output_name="y")
    return b.spec


# (layer index, field, stored shape, coremltools' quantization axis)
BLOBS = [(0, "weights", (6, 3, 3, 3), 0), (2, "weights", (6, 4, 2, 2), 1),
         (4, "weights", (5, 1024), 0)]


def wp_of(spec, i, field="weights"):
    layer = spec.neuralNetwork.layers[i]
    return getattr(getattr(layer, layer.WhichOneof("layer")), field)


def ct_quantize(spec, nbits, mode, **kw):
    model = ct.models.MLModel(copy.deepcopy(spec), skip_model_load=True)
    return qu.quantize_weights(model, nbits, mode, **kw).get_spec()


def bits_python(raw: bytes, count: int, nbits: int) -> np.ndarray:
    """Independent unpack: a plain MSB-first bit loop."""
    bits = []
    for byte in raw:
        bits.extend((byte >> (7 - k)) & 1 for k in range(8))
    return np.array([int("".join(map(str, bits[i * nbits:(i + 1) * nbits])), 2)
                     for i in range(count)])


def ct_dequantized(wp, shape, axis):
    """coremltools' own dequantization of a WeightParams, as float32 of ``shape``."""
    w = NeuralNetwork_pb2.WeightParams()
    w.CopyFrom(wp)
    if len(w.float16Value):
        return np.frombuffer(w.float16Value, "<f2").astype(np.float32).reshape(shape)
    qu._dequantize_wp(w, shape, axis)
    return np.asarray(w.floatValue, np.float32).reshape(shape)


def our_decoded(wp, shape, axis):
    if axis == 1:
        return codecs.decode(wp, int(np.prod(shape)), channels=shape[1],
                             inner=int(np.prod(shape[2:]))).reshape(shape)
    return codecs.decode(wp, int(np.prod(shape)), channels=shape[0]).reshape(shape)


def custom_lut(nbits, w):
    """A custom table: signed powers of two (a user's lut_function, coremltools' signature)."""
    k = 1 << nbits
    lut = np.sort(np.concatenate([-(2.0 ** -np.arange(k // 2)), 2.0 ** -np.arange(k - k // 2)]))
    q = np.abs(w.reshape(-1, 1) - lut[None]).argmin(1)
    return lut, q


CASES = [("linear", 8), ("linear", 4), ("linear", 3), ("linear", 2), ("linear", 1),
         ("linear_lut", 8), ("linear_lut", 4), ("linear_lut", 2), ("linear_lut", 1),
         ("linear_symmetric", 8), ("custom_lut", 4), ("custom_lut", 2), ("linear", 16)]


@pytest.mark.parametrize("mode,nbits", CASES)
def test_coremltools_quantized_decode_and_our_encoder_matches(mode, nbits):
    spec = build_spec()
    kw = {"lut_function": custom_lut} if mode == "custom_lut" else {}
    theirs = ct_quantize(spec, nbits, mode, **kw)
    ours = mp.quantize_weights(spec, nbits, mode, **kw)
    assert spec.neuralNetwork.layers[0].convolution.weights.floatValue  # input untouched
    for i, field, shape, axis in BLOBS:
        wt, wo = wp_of(theirs, i, field), wp_of(ours, i, field)
        assert codecs.storage_of(wt) == codecs.storage_of(wo) != "float32"
        ref = ct_dequantized(wt, shape, axis)
        np.testing.assert_allclose(our_decoded(wt, shape, axis), ref, rtol=1e-6, atol=1e-6)
        # our encoder: same bytes and parameters where the algorithm is the same
        assert wo.rawValue == wt.rawValue and wo.float16Value == wt.float16Value
        assert wo.quantization == wt.quantization
        np.testing.assert_allclose(our_decoded(wo, shape, axis), ref, rtol=1e-6, atol=1e-6)
        if nbits < 16:
            n = int(np.prod(shape))
            q = bits_python(wt.rawValue[:64], min(n, 64 * 8 // nbits), nbits)
            np.testing.assert_array_equal(codecs.unpack_bits(wt.rawValue, n, nbits)[:q.size], q)
    assert ours.specificationVersion >= (2 if nbits == 16 else 3)


def torch_reference(spec, x):
    """The network of build_spec in torch, on weights dequantized by coremltools' math."""
    def w(i, shape, axis):
        return torch.from_numpy(ct_dequantized(wp_of(spec, i), shape, axis))

    def fbias(i):
        return torch.from_numpy(codecs.decode(wp_of(spec, i, "bias")))  # float32 or fp16 biases

    y = F.relu(F.conv2d(x, w(0, (6, 3, 3, 3), 0), fbias(0), padding=1))
    y = F.conv_transpose2d(y, w(2, (6, 4, 2, 2), 1), stride=2)
    return F.linear(y.reshape(len(x), -1), w(4, (5, 1024), 0), fbias(4))


@pytest.mark.parametrize("mode,nbits", [("linear", 4), ("linear_lut", 2), ("linear", 16)])
def test_runtime_on_coremltools_quantized_spec_matches_torch(mode, nbits, rng):
    q = ct_quantize(build_spec(), nbits, mode)
    # n-bit weights keep float biases, so that the torch reference reads them plainly; fp16
    # weights keep their fp16 biases (Core ML refuses fp16 weights beside float32 biases)
    for i in (0, 4) if nbits < 16 else ():
        wp_of(q, i, "bias").CopyFrom(wp_of(build_spec(), i, "bias"))
    m = mp.load(q)
    xs = rng.normal(size=(4, 3, 8, 8)).astype(np.float32)
    got = np.stack([o["y"].reshape(-1) for o in m.predict_batch([{"x": x} for x in xs])])
    want = torch_reference(q, torch.from_numpy(xs)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("nbits", range(1, 9))
def test_pack_roundtrip_and_size(nbits, rng):
    for count in (1, 7, 8, 9, 1001):
        q = rng.integers(0, 1 << nbits, size=count)
        raw = codecs.pack_bits(q, nbits)
        assert len(raw) == codecs.packed_size(count, nbits) == -(-count * nbits // 8)
        np.testing.assert_array_equal(codecs.unpack_bits(raw, count, nbits), q)
        np.testing.assert_array_equal(bits_python(raw, count, nbits), q)


def test_per_channel_lut_decode():
    wp = NeuralNetwork_pb2.WeightParams()
    lut = np.arange(8, dtype=np.float32).reshape(2, 4) * 10  # two 2-bit tables
    q = np.array([0, 1, 2, 3, 3, 2, 1, 0])
    codecs.encode_lut(wp, q, 2, lut)
    np.testing.assert_array_equal(codecs.decode(wp, 8, channels=2),
                                  [0, 10, 20, 30, 70, 60, 50, 40])


def _linear_wp(nbits=4, count=6, scale=(1.0,), bias=(0.0,)):
    wp = NeuralNetwork_pb2.WeightParams()
    codecs.encode_linear(wp, np.zeros(count, int), nbits, scale, bias)
    return wp


@pytest.mark.parametrize("mutate,field", [
    (lambda wp: setattr(wp, "rawValue", wp.rawValue + b"\0"), "rawValue"),
    (lambda wp: wp.quantization.linearQuantization.scale.extend([1.0, 2.0]), "scale"),
    (lambda wp: wp.quantization.linearQuantization.bias.extend([1.0, 2.0]), "bias"),
    (lambda wp: setattr(wp.quantization, "numberOfBits", 9), "numberOfBits"),
    (lambda wp: setattr(wp.quantization, "numberOfBits", 0), "numberOfBits"),
    (lambda wp: wp.quantization.lookupTableQuantization.floatValue.extend([0.0] * 15),
     "lookupTableQuantization.floatValue"),
])
def test_invalid_quantized_weights_name_the_field(mutate, field):
    wp = _linear_wp()
    mutate(wp)
    with pytest.raises(InvalidModelError, match=field.replace(".", r"\.")):
        codecs.decode(wp, 6, "layer 'fc' (weights)", channels=2)


def test_invalid_weights_in_a_model_fail_at_load():
    spec = mp.quantize_weights(build_spec(), 4, "linear")
    wp_of(spec, 4).rawValue = wp_of(spec, 4).rawValue[:-1]
    with pytest.raises(InvalidModelError, match="'fc'.*rawValue"):
        mp.load(spec)


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=150, deadline=None)
@given(nbits=st.integers(0, 12), raw=st.binary(max_size=40), nscale=st.integers(0, 4),
       nbias=st.integers(0, 4), nlut=st.integers(-1, 40), count=st.integers(0, 60),
       channels=st.integers(1, 4))
def test_decode_fuzz_returns_count_values_or_invalid_model_error(nbits, raw, nscale, nbias,
                                                                  nlut, count, channels):
    wp = NeuralNetwork_pb2.WeightParams()
    wp.rawValue = raw
    wp.quantization.numberOfBits = nbits
    if nlut >= 0:
        wp.quantization.lookupTableQuantization.floatValue.extend([0.5] * nlut)
    else:
        wp.quantization.linearQuantization.scale.extend([2.0] * nscale)
        wp.quantization.linearQuantization.bias.extend([1.0] * nbias)
    try:
        out = codecs.decode(wp, count, channels=channels)
    except InvalidModelError:
        return
    assert out.shape == (count,) and out.dtype == np.float32
