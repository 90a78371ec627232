"""Specs built with coremltools' NeuralNetworkBuilder, one small spec per layer kind or variant,
run in our runtime and compared with a torch/numpy reference computed from the very weights given
to the builder (float32, max abs diff <= 1e-5)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mlpersonal

logging.getLogger("coremltools").setLevel(logging.ERROR)
ct = pytest.importorskip("coremltools")
from coremltools.models import datatypes  # noqa: E402
from coremltools.models.neural_network import NeuralNetworkBuilder  # noqa: E402

ATOL = 1e-5
CASES: dict[str, tuple] = {}


def case(name, nd=False, **shapes):
    """Register ``fn(builder, rng) -> reference(**inputs) -> array`` for inputs of ``shapes``."""

    def deco(fn):
        CASES[name] = (fn, shapes or {"x": (4, 6, 6)}, nd)
        return fn

    return deco


def t(a):
    return torch.as_tensor(np.asarray(a, dtype=np.float32))


def r(rng, *shape, lo=-1.0, hi=1.0):
    return rng.uniform(lo, hi, size=shape).astype(np.float32)


def batched(fn):
    """Apply a (1, C, H, W) torch op to a (C, H, W) example."""
    return lambda x: fn(t(x)[None])[0]


def build_spec(fn, shapes, nd, rng):
    feats = [(n, datatypes.Array(*s)) for n, s in shapes.items()]
    b = NeuralNetworkBuilder(feats, [("out", None)], disable_rank5_shape_mapping=nd)
    ref = fn(b, rng)
    return b.spec, ref


def run_case(name, seed=0):
    fn, shapes, nd = CASES[name]
    rng = np.random.default_rng(seed)
    spec, ref = build_spec(fn, shapes, nd, rng)
    inputs = {n: r(rng, *s) for n, s in shapes.items()}
    inputs = getattr(ref, "inputs", lambda i: i)(inputs)
    return mlpersonal.load(spec), inputs, ref


# ---------------------------------------------------------------- convolution -----------------
def _conv_w(rng, cout, cin_per_group, kh, kw):
    """Builder layout (kh, kw, cin/groups, cout) and the torch layout (cout, cin/groups, kh, kw)."""
    w = r(rng, kh, kw, cin_per_group, cout)
    return w, t(w.transpose(3, 2, 0, 1))


@case("conv_valid_stride_dilation_groups")
def _(b, rng):
    w, wt = _conv_w(rng, 6, 2, 3, 3)
    bias = r(rng, 6)
    b.add_convolution("conv", 2, 6, 3, 3, 1, 1, "valid", 2, w, bias, True, input_name="x",
                      output_name="out", dilation_factors=[2, 1])
    return batched(lambda x: F.conv2d(x, wt, t(bias), 1, 0, (2, 1), 2))


@case("conv_strided_valid_asymmetric_padding")
def _(b, rng):
    w, wt = _conv_w(rng, 3, 4, 3, 2)
    b.add_convolution("conv", 4, 3, 3, 2, 2, 1, "valid", 1, w, None, False, input_name="x",
                      output_name="out", padding_top=1, padding_bottom=2, padding_left=0,
                      padding_right=1)
    return batched(lambda x: F.conv2d(F.pad(x, (0, 1, 1, 2)), wt, None, (2, 1)))


@case("conv_same_bottom_right_heavy")
def _(b, rng):
    w, wt = _conv_w(rng, 5, 4, 3, 3)
    b.add_convolution("conv", 4, 5, 3, 3, 2, 2, "same", 1, w, None, False, input_name="x",
                      output_name="out")
    # 6 -> ceil(6 / 2) = 3 outputs; total padding (3-1)*2 + 3 - 6 = 1, all of it after.
    return batched(lambda x: F.conv2d(F.pad(x, (0, 1, 0, 1)), wt, None, 2))


@case("conv_same_top_left_heavy")
def _(b, rng):
    w, wt = _conv_w(rng, 5, 4, 2, 2)
    b.add_convolution("conv", 4, 5, 2, 2, 1, 1, "same", 1, w, None, False, input_name="x",
                      output_name="out", same_padding_asymmetry_mode="TOP_LEFT_HEAVY")
    return batched(lambda x: F.conv2d(F.pad(x, (1, 0, 1, 0)), wt, None, 1))


def _deconv_w(rng, cin, cout_per_group, kh, kw):
    """Builder layout (kh, kw, cin, cout/groups) and torch's (cin, cout/groups, kh, kw)."""
    w = r(rng, kh, kw, cin, cout_per_group)
    return w, t(w.transpose(2, 3, 0, 1))


@case("deconv_valid_padding_groups")
def _(b, rng):
    w, wt = _deconv_w(rng, 4, 3, 3, 3)
    bias = r(rng, 6)
    b.add_convolution("deconv", 4, 6, 3, 3, 2, 2, "valid", 2, w, bias, True, is_deconv=True,
                      input_name="x", output_name="out", padding_top=1, padding_bottom=1,
                      padding_left=1, padding_right=1)
    return batched(lambda x: F.conv_transpose2d(x, wt, t(bias), 2, 1, groups=2))


@case("deconv_output_shape")
def _(b, rng):
    w, wt = _deconv_w(rng, 4, 2, 3, 3)
    bias = r(rng, 2)
    # torch's output_padding=1: one more row/column than the padding alone gives (6*2 = 12).
    b.add_convolution("deconv", 4, 2, 3, 3, 2, 2, "valid", 1, w, bias, True, is_deconv=True,
                      output_shape=(12, 12), input_name="x", output_name="out", padding_top=1,
                      padding_bottom=1, padding_left=1, padding_right=1)
    return batched(lambda x: F.conv_transpose2d(x, wt, t(bias), 2, 1, output_padding=1))


@case("deconv_same")
def _(b, rng):
    w, wt = _deconv_w(rng, 4, 2, 4, 4)
    b.add_convolution("deconv", 4, 2, 4, 4, 2, 2, "same", 1, w, None, False, is_deconv=True,
                      input_name="x", output_name="out")
    # full output (6-1)*2 + 4 = 14, 'same' keeps H*stride = 12: one row/column off each side.
    return batched(lambda x: F.conv_transpose2d(x, wt, None, 2, 1))


# ---------------------------------------------------------------- pooling ---------------------
def pool_reference(x, kind, k, s, pads, exclude_pad, ceil=False):
    """Straightforward loops: Caffe/Core ML pooling over a (C, H, W) numpy array."""
    x = np.asarray(x, np.float64)
    c, h, w = x.shape
    (pt, pb, pl, pr) = pads

    def count(n, pa, pb_, kk, ss):
        span = n + pa + pb_ - kk
        out = (-(-span // ss) if ceil else span // ss) + 1
        if ceil and pa > 0 and (out - 1) * ss >= n + pa:
            out -= 1
        return out

    oh, ow = count(h, pt, pb, k[0], s[0]), count(w, pl, pr, k[1], s[1])
    y = np.zeros((c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            h0, w0 = i * s[0] - pt, j * s[1] - pl
            h1, w1 = min(h0 + k[0], h + pb), min(w0 + k[1], w + pr)
            padded_area = (h1 - h0) * (w1 - w0)
            hs, ws = max(h0, 0), max(w0, 0)
            he, we = min(h1, h), min(w1, w)
            win = x[:, hs:he, ws:we].reshape(c, -1)
            if kind == "MAX":
                y[:, i, j] = win.max(1)
            elif kind == "AVERAGE":
                y[:, i, j] = win.sum(1) / (win.shape[1] if exclude_pad else padded_area)
            else:
                y[:, i, j] = np.sqrt((win ** 2).sum(1))
    return y


def _pool_case(name, kind, k, s, padding, pads=(0, 0, 0, 0), exclude=True, ref_pads=None,
               ceil=False, shape=(3, 7, 7)):
    @case(name, x=shape)
    def _(b, rng):
        b.add_pooling("pool", k[0], k[1], s[0], s[1], kind, padding, "x", "out",
                      exclude_pad_area=exclude, padding_top=pads[0], padding_bottom=pads[1],
                      padding_left=pads[2], padding_right=pads[3])
        return lambda x: pool_reference(x, kind, k, s, ref_pads or pads, exclude, ceil)


_pool_case("pool_max_valid", "MAX", (2, 2), (2, 2), "VALID")
_pool_case("pool_max_valid_padded", "MAX", (3, 3), (2, 2), "VALID", pads=(1, 2, 0, 1))
_pool_case("pool_avg_valid_padded_include", "AVERAGE", (3, 3), (2, 2), "VALID", pads=(1, 1, 1, 1),
           exclude=False)
_pool_case("pool_avg_same_exclude_padding", "AVERAGE", (3, 3), (2, 2), "SAME", exclude=True,
           ref_pads=(1, 1, 1, 1))
_pool_case("pool_avg_same_include_padding", "AVERAGE", (2, 2), (1, 1), "SAME", exclude=False,
           ref_pads=(0, 1, 0, 1))
_pool_case("pool_l2_valid", "L2", (2, 3), (1, 2), "VALID")
_pool_case("pool_max_include_last_pixel", "MAX", (3, 3), (2, 2), "INCLUDE_LAST_PIXEL",
           pads=(1, 1, 1, 1), ceil=True, shape=(3, 8, 8))
_pool_case("pool_avg_include_last_pixel", "AVERAGE", (3, 3), (2, 2), "INCLUDE_LAST_PIXEL",
           pads=(1, 1, 1, 1), exclude=False, ceil=True, shape=(3, 8, 8))


@case("pool_global_max_avg")
def _(b, rng):
    b.add_pooling("gmax", 0, 0, 1, 1, "MAX", "VALID", "x", "m", is_global=True)
    b.add_pooling("gavg", 0, 0, 1, 1, "AVERAGE", "VALID", "x", "a", is_global=True)
    b.add_elementwise("cat", ["m", "a"], "out", "CONCAT")
    return lambda x: np.concatenate([x.max((1, 2), keepdims=True), x.mean((1, 2), keepdims=True)])


# ---------------------------------------------------------------- activations -----------------
ACTIVATIONS = {
    "RELU": (None, F.relu),
    "LEAKYRELU": ([0.2], lambda x: F.leaky_relu(x, 0.2)),
    "TANH": (None, torch.tanh),
    "SCALED_TANH": ([1.7, 0.6], lambda x: 1.7 * torch.tanh(0.6 * x)),
    "SIGMOID": (None, torch.sigmoid),
    "SIGMOID_HARD": ([0.3, 0.4], lambda x: torch.clamp(0.3 * x + 0.4, 0, 1)),
    "LINEAR": ([1.5, -0.25], lambda x: 1.5 * x - 0.25),
    "ELU": (0.7, lambda x: F.elu(x, 0.7)),
    "THRESHOLDEDRELU": (0.25, lambda x: torch.where(x >= 0.25, x, 0 * x)),
    "SOFTSIGN": (None, F.softsign),
    "SOFTPLUS": (None, F.softplus),
    "PRELU": ("per_channel", None),
    "PARAMETRICSOFTPLUS": ("per_channel", None),
}

for _act, (_params, _ref) in ACTIVATIONS.items():
    def _make(act=_act, params=_params, ref=_ref):
        @case(f"activation_{act.lower()}")
        def _(b, rng):
            if act == "PRELU":
                alpha = r(rng, 4, lo=0.0, hi=0.5)
                b.add_activation("act", act, "x", "out", params=alpha)
                return lambda x: torch.where(t(x) >= 0, t(x), t(x) * t(alpha)[:, None, None])
            if act == "PARAMETRICSOFTPLUS":
                al, be = r(rng, 4, lo=0.5, hi=1.5), r(rng, 4, lo=0.5, hi=1.5)
                b.add_activation("act", act, "x", "out", params=[al, be])
                return lambda x: t(al)[:, None, None] * torch.log1p(torch.exp(t(be)[:, None, None] * t(x)))
            b.add_activation("act", act, "x", "out", params=params)
            return lambda x: ref(t(x) * 3)

    _make()


def _scaled_input(name):  # activations see x * 3 to leave the linear ranges
    fn, shapes, nd = CASES[name]

    def wrapped(b, rng):
        b.add_elementwise("pre", ["x"], "x3", "MULTIPLY", alpha=3.0)
        layer_ref = fn(b, rng)
        b.spec.neuralNetwork.layers[-1].input[0] = "x3"
        return layer_ref

    CASES[name] = (wrapped, shapes, nd)


for _act in ACTIVATIONS:
    if _act not in ("PRELU", "PARAMETRICSOFTPLUS"):
        _scaled_input(f"activation_{_act.lower()}")


# ---------------------------------------------------------------- dense -----------------------
@case("inner_product", x=(12, 1, 1))
def _(b, rng):
    w, bias = r(rng, 5, 12), r(rng, 5)
    b.add_inner_product("fc", w, bias, 12, 5, True, "x", "out")
    return lambda x: (t(w) @ t(x).reshape(12) + t(bias)).reshape(5, 1, 1)


@case("inner_product_after_flatten", x=(3, 2, 2))
def _(b, rng):
    w = r(rng, 4, 12)
    b.add_flatten("flat", 0, "x", "f")
    b.add_inner_product("fc", w, None, 12, 4, False, "f", "out")
    return lambda x: (t(w) @ t(x).reshape(12)).reshape(4, 1, 1)


@case("embedding", x=(1, 1, 1))
def _(b, rng):
    w, bias = r(rng, 6, 10), r(rng, 6)  # [outputChannels, inputDim]
    b.add_embedding("emb", w, bias, 10, 6, True, "x", "out")

    def ref(x):
        return (t(w)[:, int(x.reshape(-1)[0])] + t(bias)).reshape(6, 1, 1)

    ref.inputs = lambda i: {"x": np.array([[[7.0]]], np.float32)}
    return ref


# ---------------------------------------------------------------- normalization ---------------
@case("batchnorm")
def _(b, rng):
    g, be, m, v = r(rng, 4), r(rng, 4), r(rng, 4), r(rng, 4, lo=0.5, hi=2.0)
    b.add_batchnorm("bn", 4, g, be, m, v, "x", "out", epsilon=1e-3)
    return batched(lambda x: F.batch_norm(x, t(m), t(v), t(g), t(be), False, 0.0, 1e-3))


@case("batchnorm_instance_norm")
def _(b, rng):
    g, be = r(rng, 4), r(rng, 4)
    b.add_batchnorm("bn", 4, g, be, None, None, "x", "out", compute_mean_var=True,
                    instance_normalization=True, epsilon=1e-5)
    return batched(lambda x: F.instance_norm(x, weight=t(g), bias=t(be), eps=1e-5))


@case("l2normalize")
def _(b, rng):
    b.add_l2_normalize("l2", "x", "out", epsilon=1e-6)
    return lambda x: x / np.sqrt((x.astype(np.float64) ** 2).sum() + 1e-6)


@case("lrn", x=(6, 3, 3))
def _(b, rng):
    b.add_lrn("lrn", "x", "out", alpha=0.5, beta=0.75, local_size=3, k=2.0)
    return batched(lambda x: F.local_response_norm(x, 3, alpha=0.5, beta=0.75, k=2.0))


@case("mvn_across_channels")
def _(b, rng):
    b.add_mvn("mvn", "x", "out", across_channels=True, normalize_variance=True, epsilon=1e-5)
    return lambda x: (x - x.mean()) / np.sqrt(x.var() + 1e-5)


@case("mvn_per_channel_mean_only")
def _(b, rng):
    b.add_mvn("mvn", "x", "out", across_channels=False, normalize_variance=False)
    return lambda x: x - x.mean((1, 2), keepdims=True)


@case("softmax")
def _(b, rng):
    b.add_softmax("sm", "x", "out")
    return lambda x: torch.softmax(t(x), 0)


# ---------------------------------------------------------------- shape -----------------------
@case("flatten_channel_first", x=(3, 2, 4))
def _(b, rng):
    b.add_flatten("flat", 0, "x", "out")
    return lambda x: x.reshape(-1, 1, 1)


@case("flatten_channel_last", x=(3, 2, 4))
def _(b, rng):
    b.add_flatten("flat", 1, "x", "out")
    return lambda x: x.transpose(1, 2, 0).reshape(-1, 1, 1)


@case("reshape_channel_first", x=(3, 2, 4))
def _(b, rng):
    b.add_reshape("rs", "x", "out", (4, 3, 2), 0)
    return lambda x: x.reshape(4, 3, 2)


@case("reshape_channel_last", x=(3, 2, 4))
def _(b, rng):
    b.add_reshape("rs", "x", "out", (4, 3, 2), 1)
    # flatten in (H, W, C) order, read as (H_out, W_out, C_out), permute to (C_out, H_out, W_out)
    return lambda x: x.transpose(1, 2, 0).reshape(3, 2, 4).transpose(2, 0, 1)


@case("permute", x=(3, 2, 4))
def _(b, rng):
    b.add_permute("perm", (0, 3, 1, 2), "x", "out")  # [Seq, C, H, W] -> [Seq, W, C, H]
    return lambda x: x.transpose(2, 0, 1)


@case("concat_channels", x=(2, 3, 3), y=(3, 3, 3))
def _(b, rng):
    b.add_elementwise("cat", ["x", "y"], "out", "CONCAT")
    return lambda x, y: np.concatenate([x, y], 0)


@case("split_then_subtract")
def _(b, rng):
    b.add_split("split", "x", ["a", "b"])
    b.add_elementwise("neg", ["b"], "nb", "MULTIPLY", alpha=-1.0)
    b.add_elementwise("sub", ["a", "nb"], "out", "ADD")
    return lambda x: x[:2] - x[2:]


@case("slice_channel_stride")
def _(b, rng):
    b.add_slice("sl", "x", "out", "channel", start_index=1, end_index=4, stride=2)
    return lambda x: x[1:4:2]


@case("slice_width_negative_end")
def _(b, rng):
    b.add_slice("sl", "x", "out", "width", start_index=1, end_index=-1, stride=1)
    return lambda x: x[:, :, 1:-1]


@case("crop_amounts")
def _(b, rng):
    b.add_crop("crop", 1, 2, 0, 1, [0, 0], ["x"], "out")  # left, right, top, bottom
    return lambda x: x[:, 0:5, 1:4]


@case("crop_like_offset", x=(4, 6, 6), y=(4, 3, 2))
def _(b, rng):
    b.add_crop("crop", 0, 0, 0, 0, [2, 1], ["x", "y"], "out")
    return lambda x, y: x[:, 2:5, 1:3]


@case("padding_constant")
def _(b, rng):
    b.add_padding("pad", left=1, right=2, top=0, bottom=1, value=0.5, input_name="x",
                  output_name="out", padding_type="constant")
    return lambda x: np.pad(x, ((0, 0), (0, 1), (1, 2)), constant_values=0.5)


@case("padding_reflection")
def _(b, rng):
    b.add_padding("pad", left=2, right=0, top=1, bottom=2, input_name="x", output_name="out",
                  padding_type="reflection")
    return lambda x: np.pad(x, ((0, 0), (1, 2), (2, 0)), mode="reflect")


@case("padding_replication")
def _(b, rng):
    b.add_padding("pad", left=0, right=1, top=2, bottom=1, input_name="x", output_name="out",
                  padding_type="replication")
    return lambda x: np.pad(x, ((0, 0), (2, 1), (0, 1)), mode="edge")


@case("sequence_repeat", x=(2, 2, 3))
def _(b, rng):
    b.add_sequence_repeat("rep", 3, "x", "out")
    return lambda x: np.stack([x] * 3)


@case("reorganize_space_to_depth", x=(2, 4, 6))
def _(b, rng):
    b.add_reorganize_data("s2d", "x", "out", "SPACE_TO_DEPTH", 2)

    def ref(x):  # out[(i*2 + j)*C + c, h, w] = in[c, 2h + i, 2w + j]
        c, h, w = x.shape
        y = np.zeros((4 * c, h // 2, w // 2), np.float32)
        for i in range(2):
            for j in range(2):
                y[(i * 2 + j) * c:(i * 2 + j + 1) * c] = x[:, i::2, j::2]
        return y

    return ref


@case("reorganize_depth_to_space_proto_example", x=(8, 1, 2))
def _(b, rng):
    b.add_reorganize_data("d2s", "x", "out", "DEPTH_TO_SPACE", 2)
    ref = lambda x: np.array([[[1, 5, 2, 6], [9, 13, 10, 14]],  # noqa: E731
                              [[3, 7, 4, 8], [11, 15, 12, 16]]], np.float32)
    ref.inputs = lambda i: {"x": np.arange(1, 17, dtype=np.float32).reshape(8, 1, 2)}
    return ref


@case("reorganize_pixel_shuffle", nd=True, x=(8, 2, 3))  # an iOS 13 mode: ND networks only
def _(b, rng):
    b.add_reorganize_data("ps", "x", "out", "PIXEL_SHUFFLE", 2)
    return batched(lambda x: F.pixel_shuffle(x, 2))


# ---------------------------------------------------------------- resize ----------------------
@case("upsample_nearest", x=(2, 3, 4))
def _(b, rng):
    b.add_upsample("up", 2, 3, "x", "out", mode="NN")
    return lambda x: x.repeat(2, axis=1).repeat(3, axis=2)


@case("upsample_bilinear_align_corners_true", nd=True, x=(2, 3, 4))  # iOS 13 modes: ND only
def _(b, rng):
    b.add_upsample("up", 2, 3, "x", "out", mode="BILINEAR", linear_upsample_mode="ALIGN_CORNERS_TRUE")
    return batched(lambda x: F.interpolate(x, scale_factor=(2, 3), mode="bilinear", align_corners=True))


@case("upsample_bilinear_align_corners_false", nd=True, x=(2, 3, 4))
def _(b, rng):
    b.add_upsample("up", 2, 3, "x", "out", mode="BILINEAR", linear_upsample_mode="ALIGN_CORNERS_FALSE")
    return batched(lambda x: F.interpolate(x, scale_factor=(2, 3), mode="bilinear", align_corners=False))


@case("upsample_bilinear_default_coremltools_example", x=(1, 1, 3))
def _(b, rng):
    b.add_upsample("up", 2, 3, "x", "out", mode="BILINEAR")
    # expected values from coremltools' own test_tiny_upsample_linear_mode
    row = [1, 4 / 3, 5 / 3, 2, 7 / 3, 8 / 3, 3, 3, 3]
    ref = lambda x: np.array([[row, row]], np.float32)  # noqa: E731
    ref.inputs = lambda i: {"x": np.array([[[1.0, 2.0, 3.0]]], np.float32)}
    return ref


@case("resize_bilinear_strict_align_endpoints", x=(2, 3, 4))
def _(b, rng):
    b.add_resize_bilinear("rs", "x", "out", 5, 7, mode="STRICT_ALIGN_ENDPOINTS_MODE")
    return batched(lambda x: F.interpolate(x, size=(5, 7), mode="bilinear", align_corners=True))


# ---------------------------------------------------------------- element-wise ----------------
@case("add_three_inputs_and_scalar", x=(3, 2, 2), y=(3, 2, 2), z=(1, 2, 2))
def _(b, rng):
    b.add_elementwise("sum", ["x", "y", "z"], "s", "ADD")
    b.add_elementwise("plus", ["s"], "out", "ADD", alpha=0.75)
    return lambda x, y, z: x + y + z + 0.75


@case("multiply_broadcast_channel", x=(3, 2, 2), y=(3, 1, 1))
def _(b, rng):
    b.add_elementwise("mul", ["x", "y"], "out", "MULTIPLY")
    return lambda x, y: x * y


@case("average_max_min", x=(3, 2, 2), y=(3, 2, 2))
def _(b, rng):
    b.add_elementwise("avg", ["x", "y"], "a", "AVE")
    b.add_elementwise("max", ["x", "y"], "m", "MAX")
    b.add_elementwise("min", ["x", "y"], "n", "MIN")
    b.add_elementwise("cat", ["a", "m", "n"], "out", "CONCAT")
    return lambda x, y: np.concatenate([(x + y) / 2, np.maximum(x, y), np.minimum(x, y)])


@case("dot_and_cosine", x=(5, 1, 1), y=(5, 1, 1))
def _(b, rng):
    b.add_elementwise("dot", ["x", "y"], "d", "DOT")
    b.add_elementwise("cos", ["x", "y"], "c", "COS")
    b.add_elementwise("cat", ["d", "c"], "out", "CONCAT")

    def ref(x, y):
        x, y = x.reshape(-1), y.reshape(-1)
        return np.array([x @ y, x @ y / np.linalg.norm(x) / np.linalg.norm(y)]).reshape(2, 1, 1)

    return ref


@case("scale_per_channel_with_bias")
def _(b, rng):
    s, bias = r(rng, 4), r(rng, 4)
    b.add_scale("scale", s, bias, True, "x", "out", shape_scale=[4], shape_bias=[4])
    return lambda x: x * s[:, None, None] + bias[:, None, None]


@case("bias_chw")
def _(b, rng):
    bias = r(rng, 4, 6, 6)
    b.add_bias("bias", bias, "x", "out", shape_bias=[4, 6, 6])
    return lambda x: x + bias


@case("load_constant_plus_input", x=(2, 3, 3))
def _(b, rng):
    c = r(rng, 2, 3, 3)
    b.add_load_constant("const", "c", c, [2, 3, 3])
    b.add_elementwise("add", ["x", "c"], "out", "ADD")
    return lambda x: x + c


# ---------------------------------------------------------------- unary / reduce --------------
UNARY = {
    "sqrt": (dict(shift=2.0), lambda x: np.sqrt(x + 2.0)),
    "rsqrt": (dict(shift=2.0, epsilon=1e-3), lambda x: 1 / np.sqrt(x + 2.0 + 1e-3)),
    "inverse": (dict(scale=2.0, shift=3.0), lambda x: 1 / (2 * x + 3 + 1e-4)),  # builder eps
    "power": (dict(alpha=3.0, scale=0.5), lambda x: (0.5 * x) ** 3),
    "exp": (dict(scale=1.5), lambda x: np.exp(1.5 * x)),
    "log": (dict(shift=1.5), lambda x: np.log(x + 1.5)),
    "abs": (dict(shift=-0.25), lambda x: np.abs(x - 0.25)),
    "threshold": (dict(alpha=0.1), lambda x: np.maximum(x, 0.1)),
}

for _mode, (_kw, _ref) in UNARY.items():
    def _make_unary(mode=_mode, kw=_kw, ref=_ref):
        @case(f"unary_{mode}")
        def _(b, rng):
            b.add_unary("u", "x", "out", mode, **kw)
            return lambda x: ref(x.astype(np.float64))

    _make_unary()


REDUCE = {
    ("CHW", "sum"): lambda x: x.sum((0, 1, 2), keepdims=True),
    ("HW", "avg"): lambda x: x.mean((1, 2), keepdims=True),
    ("C", "prod"): lambda x: x.prod(0, keepdims=True),
    ("H", "max"): lambda x: x.max(1, keepdims=True),
    ("W", "min"): lambda x: x.min(2, keepdims=True),
    ("HW", "sumsquare"): lambda x: (x ** 2).sum((1, 2), keepdims=True),
    ("C", "L1"): lambda x: np.abs(x).sum(0, keepdims=True),
    ("CHW", "L2"): lambda x: np.sqrt((x ** 2).sum((0, 1, 2), keepdims=True)),
    ("W", "logsum"): lambda x: np.log(np.abs(x) + 1e-6).sum(2, keepdims=True),
    ("C", "argmax"): lambda x: x.argmax(0)[None].astype(np.float32),
}

for (_axis, _mode), _ref in REDUCE.items():
    def _make_reduce(axis=_axis, mode=_mode, ref=_ref):
        @case(f"reduce_{mode}_{axis}")
        def _(b, rng):
            src = "x"
            if mode == "logsum":
                b.add_unary("abs", "x", "ax", "abs")
                src = "ax"
            b.add_reduce("red", src, "out", axis, mode)
            return lambda x: ref(x.astype(np.float64))

    _make_reduce()


# ---------------------------------------------------------------- ND kinds --------------------
@case("nd_batched_matmul_weights_reshape_softmax", nd=True, x=(1, 3, 6))
def _(b, rng):
    w, bias = r(rng, 6, 4), r(rng, 4)
    b.add_batched_mat_mul("mm", ["x"], "h", weight_matrix_rows=6, weight_matrix_columns=4, W=w,
                          bias=bias)
    b.add_reshape_static("rs", "h", "h2", (1, 12))
    b.add_softmax_nd("sm", "h2", "out", axis=-1)
    return lambda x: torch.softmax((t(x) @ t(w) + t(bias)).reshape(1, 12), -1)


@case("nd_batched_matmul_two_inputs_transpose", nd=True, x=(2, 3, 4), y=(2, 5, 4))
def _(b, rng):
    b.add_batched_mat_mul("mm", ["x", "y"], "out", transpose_b=True)
    return lambda x, y: x @ y.transpose(0, 2, 1)


@case("nd_transpose_concat_squeeze_expand", nd=True, x=(1, 2, 3, 4))
def _(b, rng):
    b.add_transpose("tr", (0, 3, 1, 2), "x", "a")  # (1, 4, 2, 3)
    b.add_squeeze("sq", "a", "s", axes=[0])  # (4, 2, 3)
    b.add_expand_dims("ex", "s", "e", axes=[-1])  # (4, 2, 3, 1)
    b.add_concat_nd("cat", ["e", "e"], "out", axis=-1)  # (4, 2, 3, 2)
    return lambda x: np.concatenate([x.transpose(0, 3, 1, 2)[0, ..., None]] * 2, -1)


@case("nd_broadcastable_arithmetic_constant", nd=True, x=(1, 3, 4))
def _(b, rng):
    c = r(rng, 3, 1)
    b.add_load_constant_nd("c", "c", c, (3, 1))
    b.add_add_broadcastable("add", ["x", "c"], "a")
    b.add_multiply_broadcastable("mul", ["a", "x"], "m")
    b.add_subtract_broadcastable("sub", ["m", "c"], "s")
    b.add_divide_broadcastable("div", ["s", "c"], "out")
    return lambda x: (((x + c) * x) - c) / c


@case("nd_flatten_to_2d_slice_static_split", nd=True, x=(1, 4, 3, 2))
def _(b, rng):
    b.add_flatten_to_2d("fl", "x", "f", axis=2)  # (4, 6)
    b.add_slice_static("sl", "f", "s", begin_ids=[1, 0], end_ids=[4, 6], strides=[2, 2],
                       begin_masks=[False, True], end_masks=[False, True])  # (2, 3)
    b.add_split_nd("sp", "s", ["p", "q"], axis=0, num_splits=2)
    b.add_add_broadcastable("add", ["p", "q"], "out")
    return lambda x: x.reshape(4, 6)[1:4:2, ::2][0:1] + x.reshape(4, 6)[1:4:2, ::2][1:2]


@case("nd_reduce_clip_gelu", nd=True, x=(2, 3, 5))
def _(b, rng):
    b.add_reduce_mean("mean", "x", "m", axes=[-1], keepdims=True)
    b.add_subtract_broadcastable("sub", ["x", "m"], "c")
    b.add_clip("clip", "c", "cl", min_value=-0.3, max_value=0.4)
    b.add_gelu("gelu", "cl", "g")
    b.add_reduce_sum("sum", "g", "out", axes=[1], keepdims=False)
    return lambda x: F.gelu(torch.clamp(t(x) - t(x).mean(-1, keepdim=True), -0.3, 0.4)).sum(1)


@case("nd_embedding", nd=True, x=(1, 4, 1))
def _(b, rng):
    w = r(rng, 5, 9)  # [embeddingSize, vocabSize]
    b.add_embedding_nd("emb", "x", "out", 9, 5, w)
    idx = np.array([3, 0, 8, 3])
    ref = lambda x: w.T[idx][None]  # noqa: E731
    ref.inputs = lambda i: {"x": idx.reshape(1, 4, 1).astype(np.float32)}
    return ref


@case("nd_greater_than_where", nd=True, x=(2, 5), y=(2, 5))
def _(b, rng):
    b.add_greater_than("gt", ["x", "y"], "g")
    b.add_where_broadcastable("where", ["g", "x", "y"], "out")
    return lambda x, y: np.maximum(x, y)


@case("nd_rank_preserving_reshape_tile_stack_reverse", nd=True, x=(2, 3, 4))
def _(b, rng):
    b.add_rank_preserving_reshape("rp", "x", "a", (0, 4, -1))  # (2, 4, 3)
    b.add_tile("tile", "a", "t", reps=[1, 1, 2])  # (2, 4, 6)
    b.add_reverse("rev", "t", "r", reverse_dim=[False, True, False])
    b.add_stack("stack", ["t", "r"], "out", axis=1)  # (2, 2, 4, 6)
    def ref(x):
        tt = np.tile(x.reshape(2, 4, 3), (1, 1, 2))
        return np.stack([tt, tt[:, ::-1]], 1)
    return ref


@case("nd_layer_norm_clamped_relu_rounding", nd=True, x=(3, 6))
def _(b, rng):
    g, be = r(rng, 6), r(rng, 6)
    b.add_layer_normalization("ln", "x", "n", normalized_shape=[6], gamma=g, beta=be, eps=1e-5)
    b.add_clamped_relu("crelu", "n", "c", alpha=0.1, beta=0.8)
    b.add_elementwise("x4", ["c"], "c4", "MULTIPLY", alpha=4.0)
    b.add_floor("floor", "c4", "f")
    b.add_ceil("ceil", "c4", "ce")
    b.add_sign("sign", "n", "s")
    b.add_concat_nd("cat", ["c", "f", "ce", "s"], "out", axis=0)
    def ref(x):
        n = F.layer_norm(t(x), (6,), t(g), t(be), 1e-5)
        c = torch.clamp(torch.where(n >= 0, n, 0.1 * n), max=0.8)
        return torch.cat([c, torch.floor(4 * c), torch.ceil(4 * c), torch.sign(n)], 0)
    return ref


@case("nd_split_sizes_argmin_logsumexp", nd=True, x=(4, 5))
def _(b, rng):
    b.add_split_nd("sp", "x", ["p", "q"], axis=1, split_sizes=[2, 3])
    b.add_argmin("am", "q", "a", axis=1, keepdims=True)
    b.add_reduce_logsumexp("lse", "p", "l", axes=[1], keepdims=True)
    b.add_concat_nd("cat", ["a", "l"], "out", axis=1)
    return lambda x: np.concatenate([x[:, 2:].argmin(1)[:, None],
                                     np.log(np.exp(x[:, :2].astype(np.float64)).sum(1))[:, None]], 1)


@case("sequence_concat", x=(2, 2, 3), y=(2, 2, 3))
def _(b, rng):
    b.add_elementwise("cat", ["x", "y"], "out", "SEQUENCE_CONCAT")
    return lambda x, y: np.stack([x, y])


ND_UNARY = {"sin": np.sin, "cos": np.cos, "tan": np.tan, "asin": np.arcsin, "acos": np.arccos,
            "atan": np.arctan, "sinh": np.sinh, "cosh": np.cosh, "tanh": np.tanh,
            "asinh": np.arcsinh, "atanh": np.arctanh, "exp2": np.exp2, "round": np.round}


@case("nd_unary_math_kinds", nd=True, x=(2, 5))
def _(b, rng):
    outs = []
    for kind in ND_UNARY:
        getattr(b, f"add_{kind}")(kind, "x", kind)
        outs.append(kind)
    b.add_elementwise("x3", ["x"], "x3", "ADD", alpha=3.0)  # acosh needs x >= 1
    b.add_acosh("acosh", "x3", "acosh")
    b.add_concat_nd("cat", outs + ["acosh"], "out", axis=0)
    return lambda x: np.concatenate([f(x.astype(np.float64)) for f in ND_UNARY.values()]
                                    + [np.arccosh(x + 3.0)], 0)


ND_REDUCE = {"sum": np.sum, "prod": np.prod, "mean": np.mean, "max": np.max, "min": np.min,
             "l1": lambda x, axis, keepdims: np.abs(x).sum(axis, keepdims=keepdims),
             "l2": lambda x, axis, keepdims: np.sqrt((x ** 2).sum(axis, keepdims=keepdims)),
             "sumsquare": lambda x, axis, keepdims: (x ** 2).sum(axis, keepdims=keepdims),
             "logsum": lambda x, axis, keepdims: np.log(np.abs(x).sum(axis, keepdims=keepdims))}


@case("nd_reduce_kinds", nd=True, x=(2, 3, 4))
def _(b, rng):
    b.add_unary("abs", "x", "ax", "abs")
    outs = []
    for kind in ND_REDUCE:
        getattr(b, f"add_reduce_{kind}")(kind, "ax" if kind == "logsum" else "x", kind,
                                         axes=[0, 2], keepdims=False)
        outs.append(kind)
    b.add_stack("stack", outs, "out", axis=0)
    return lambda x: np.stack([f(x.astype(np.float64), axis=(0, 2), keepdims=False)
                               for f in ND_REDUCE.values()])


ND_BINARY = {"max": np.maximum, "min": np.minimum, "pow": lambda a, c: np.abs(a) ** c,
             "floor_div": lambda a, c: np.floor(a / c), "mod": np.mod}


@case("nd_binary_compare_logical_kinds", nd=True, x=(3, 4), y=(1, 4))
def _(b, rng):
    b.add_unary("abs", "x", "ax", "abs")
    outs = []
    for kind in ND_BINARY:
        src = "ax" if kind == "pow" else "x"
        getattr(b, f"add_{kind}_broadcastable")(kind, [src, "y"], kind)
        outs.append(kind)
    for kind, fn in [("greater_than", "gt"), ("less_than", "lt"), ("equal", "eq"), ("not_equal", "ne")]:
        getattr(b, f"add_{kind}")(kind, ["x", "y"], kind)
        outs.append(kind)
    b.add_greater_than("ge0", ["x"], "ge0", alpha=0.0, use_greater_than_equal=True)
    b.add_less_than("le0", ["y"], "le0", alpha=0.0, use_less_than_equal=True)
    b.add_logical("and", ["ge0", "le0"], "and", "AND")
    b.add_logical("or", ["ge0", "le0"], "or", "OR")
    b.add_logical("xor", ["ge0", "le0"], "xor", "XOR")
    b.add_logical("not", ["ge0"], "not", "NOT")
    b.add_concat_nd("cat", outs + ["ge0", "and", "or", "xor", "not"], "out", axis=0)

    def ref(x, y):
        x, y = x.astype(np.float64), y.astype(np.float64) + 0 * x
        ge, le = x >= 0, y <= 0
        parts = [f(x, y) for f in ND_BINARY.values()]
        parts += [x > y, x < y, x == y, x != y, ge, ge & le, ge | le, ge ^ le, ~ge]
        return np.concatenate([np.asarray(p, np.float64) for p in parts], 0)

    ref.inputs = lambda i: {"x": i["x"], "y": np.where(np.arange(4) == 1, i["x"][0, 1], i["y"] + 1.5)
                            .astype(np.float32).reshape(1, 4)}
    return ref


# ---------------------------------------------------------------- running the cases -----------
@pytest.mark.parametrize("name", list(CASES))
def test_layer_matches_reference(name):
    model, inputs, ref = run_case(name)
    got = model.predict(inputs)["out"]
    want = np.asarray(ref(**inputs), dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    assert got.size == want.size, f"{name}: got shape {got.shape}, want {want.shape}"
    np.testing.assert_allclose(got.reshape(want.shape), want, atol=ATOL, rtol=0)


def test_covers_at_least_twenty_kinds():
    kinds = set()
    for name, (fn, shapes, nd) in CASES.items():
        spec, _ = build_spec(fn, shapes, nd, np.random.default_rng(0))
        kinds.update(layer.WhichOneof("layer") for layer in spec.neuralNetwork.layers)
    assert len(kinds) >= 20, sorted(kinds)


@pytest.mark.parametrize("name", ["deconv_output_shape", "pool_avg_same_exclude_padding",
                                  "batchnorm_instance_norm", "nd_reduce_clip_gelu",
                                  "nd_batched_matmul_weights_reshape_softmax", "sequence_repeat"])
def test_predict_batch_equals_per_sample_predict(name):
    model, inputs, _ = run_case(name)
    rng = np.random.default_rng(1)
    examples = [{k: r(rng, *v.shape) for k, v in inputs.items()} for _ in range(5)]
    batch = model.predict_batch(examples)
    for ex, got in zip(examples, batch):
        # same values up to float32 summation order (batched kernels may block differently)
        np.testing.assert_allclose(got["out"], model.predict(ex)["out"], atol=1e-6, rtol=0)


def test_cnn_spec_with_several_kinds_batches(rng):
    """conv -> batchnorm -> relu -> pool -> flatten -> innerProduct -> softmax, batch of 7."""
    w = rng.standard_normal((3, 3, 1, 4)).astype(np.float32)
    fc = rng.standard_normal((3, 4 * 3 * 3)).astype(np.float32)
    g, be, m, v = (rng.uniform(0.5, 1.5, 4).astype(np.float32) for _ in range(4))
    b = NeuralNetworkBuilder([("x", datatypes.Array(1, 9, 9))], [("out", None)])
    b.add_convolution("conv", 1, 4, 3, 3, 1, 1, "same", 1, w, None, False, input_name="x", output_name="c")
    b.add_batchnorm("bn", 4, g, be, m, v, "c", "n")
    b.add_activation("relu", "RELU", "n", "a")
    b.add_pooling("pool", 3, 3, 3, 3, "MAX", "VALID", "a", "p")
    b.add_flatten("flat", 0, "p", "f")
    b.add_inner_product("fc", fc, None, 36, 3, False, "f", "l")
    b.add_softmax("sm", "l", "out")
    model = mlpersonal.load(b.spec)
    xs = rng.standard_normal((7, 1, 9, 9)).astype(np.float32)
    wt = t(w.transpose(3, 2, 0, 1))
    with torch.no_grad():
        y = F.conv2d(t(xs), wt, None, 1, 1)
        y = F.batch_norm(y, t(m), t(v), t(g), t(be), False, 0.0, 1e-5)
        y = F.max_pool2d(F.relu(y), 3)
        ref = torch.softmax(y.flatten(1) @ t(fc).T, 1).numpy()
    got = model.predict_batch([{"x": x} for x in xs])
    np.testing.assert_allclose(np.stack([g_["out"].reshape(-1) for g_ in got]), ref, atol=ATOL)


def test_unsupported_layer_kind_names_the_layer():
    b = NeuralNetworkBuilder([("x", datatypes.Array(2, 3))], [("out", None)],
                             disable_rank5_shape_mapping=True)
    b.add_random_normal_like("noise_layer", "x", "out")
    with pytest.raises(mlpersonal.UnsupportedLayerError, match="noise_layer.*randomNormalLike"):
        mlpersonal.load(b.spec)


def test_keras_word_embedding_model_takes_a_sequence_of_indices_and_says_so():
    """The Keras converter's text models declare one (1,) input but read a sequence of word
    indices (embedding -> permute -> channel-last flatten -> dense): a sequence (Seq, 1, 1)
    predicts like numpy; a single index fails with a message that names the sequence form, and
    ``mlpersonal inspect`` shows it."""
    from mlpersonal.cli import inspect_lines

    rng = np.random.default_rng(5)
    emb, w, bias = rng.standard_normal((3, 6)), rng.standard_normal((2, 12)), rng.standard_normal(2)
    b = NeuralNetworkBuilder([("words", datatypes.Array(1))], [("score", None)])
    b.add_embedding("embed", emb.astype(np.float32), None, 6, 3, False, "words", "e")
    b.add_permute("permute", (2, 1, 0, 3), "e", "p")
    b.add_flatten("flat", 1, "p", "f")
    b.add_inner_product("dense", w.astype(np.float32), bias.astype(np.float32), 12, 2, True, "f", "score")
    model = mlpersonal.load(b.spec)
    idx = np.array([4, 0, 5, 2])
    got = model.predict({"words": idx.astype(np.float32).reshape(4, 1, 1)})["score"]
    np.testing.assert_allclose(got.reshape(-1), w @ emb.T[idx].reshape(-1) + bias, rtol=1e-5, atol=1e-5)
    with pytest.raises(mlpersonal.InvalidModelError, match=r"pass 'words' as \(Seq, 1, 1\)"):
        model.predict({"words": np.array([4.0], np.float32)})
    assert "  words: multiArray float64 (1,), or a sequence (Seq, 1, 1)" in inspect_lines(b.spec)
