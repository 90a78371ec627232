"""The op-mapping registry: one small converter per torch module type, function or method.

A converter ``fn(ctx, node, target)`` emits classic (rank-5 mapping) NeuralNetwork layers for one
``torch.fx`` node through ``ctx`` (see :class:`exporters.converter.Context`) and returns the name of
the blob holding the node's value. ``target`` is the module instance for ``call_module`` nodes and
the function / method name otherwise. Ops that only relabel a blob (dropout, a no-op view) return
their input blob and emit nothing.

Blob layout: a torch tensor ``(N, C)`` is the blob ``(C, 1, 1)``, ``(N, C, L)`` is ``(C, 1, L)``
and ``(N, C, H, W)`` is ``(C, H, W)``; channels are axis 1 in torch and -3 in the blob.
"""

from __future__ import annotations

import math
import operator
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


Converter = Callable[..., str]
MODULES: dict[type, Converter] = {}
FUNCTIONS: dict[object, Converter] = {}
METHODS: dict[str, Converter] = {}


def register_module(*types: type):
    def deco(fn):
        for t in types:
            MODULES[t] = fn
        return fn
    return deco


def register_function(*fns):
    def deco(fn):
        for f in fns:
            FUNCTIONS[f] = fn
        return fn
    return deco


def register_method(*names: str):
    def deco(fn):
        for n in names:
            METHODS[n] = fn
        return fn
    return deco


def lookup(node, target) -> Converter | None:
    """The converter for an fx node (``target``: module instance, function or method name)."""
    if node.op == "call_module":
        for cls in type(target).__mro__:
            if cls in MODULES:
                return MODULES[cls]
        return None
    if node.op == "call_method":
        return METHODS.get(target)
    return FUNCTIONS.get(target)


# --- argument helpers --------------------------------------------------------------------------

def arg(node, i: int, name: str, default=None):
    """Positional argument ``i`` or keyword ``name`` of an fx node."""
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def pair(v) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[1])) if len(v) > 1 else (int(v[0]), int(v[0]))
    return int(v), int(v)


def channel_dim(ctx, node, dim) -> None:
    """Raise unless ``dim`` is torch's channel axis (1) for the node's input."""
    rank = len(ctx.shape(node.args[0]))
    if dim is None or (int(dim) % rank) != 1:
        raise ctx.unsupported(node, f"only over the channel axis (dim=1), got dim={dim}")


# --- convolution / dense ------------------------------------------------------------------------

def _conv_padding(ctx, node, m) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) zero padding of a Conv2d, or of a Conv1d as a 1 x k one."""
    if m.padding_mode != "zeros":
        raise ctx.unsupported(node, f"padding_mode={m.padding_mode!r} (only 'zeros')")
    one_d = isinstance(m, nn.Conv1d)
    kh, kw = (1, m.kernel_size[0]) if one_d else m.kernel_size
    dh, dw = (1, m.dilation[0]) if one_d else m.dilation
    if m.padding == "same":
        th, tw = dh * (kh - 1), dw * (kw - 1)
        return th // 2, th - th // 2, tw // 2, tw - tw // 2
    if m.padding == "valid":
        return 0, 0, 0, 0
    ph, pw = (0, int(m.padding[0])) if one_d else pair(m.padding)
    return ph, ph, pw, pw


@register_module(nn.Conv2d, nn.Conv1d)
def conv2d(ctx, node, m) -> str:
    """Conv2d; Conv1d over (N, C, L) is the same layer with a 1 x k kernel on the (C, 1, L) blob."""
    one_d = isinstance(m, nn.Conv1d)
    if one_d:
        _check_rank(ctx, node, 3, "Conv1d")
    top, bottom, left, right = _conv_padding(ctx, node, m)
    w = m.weight.detach().cpu().numpy()  # (Cout, Cin/groups, kh, kw) or (Cout, Cin/groups, k)
    stride, dilation = list(m.stride), list(m.dilation)
    if one_d:
        w, stride, dilation = w[:, :, None, :], [1, stride[0]], [1, dilation[0]]
    b = None if m.bias is None else m.bias.detach().cpu().numpy()
    name, out = ctx.layer(node)
    ctx.builder.add_convolution(
        name, kernel_channels=w.shape[1], output_channels=w.shape[0],
        height=w.shape[2], width=w.shape[3], stride_height=stride[0], stride_width=stride[1],
        border_mode="valid", groups=m.groups, W=np.ascontiguousarray(w.transpose(2, 3, 1, 0)),
        b=b, has_bias=b is not None, input_name=ctx.inp(node.args[0]), output_name=out,
        dilation_factors=dilation, padding_top=top, padding_bottom=bottom,
        padding_left=left, padding_right=right,
    )
    return out


@register_module(nn.ConvTranspose2d, nn.ConvTranspose1d)
def conv_transpose(ctx, node, m) -> str:
    """A transposed convolution is Core ML's deconvolution: the full result cropped from
    ``padding`` on, ``outputShape`` rows and columns long (torch's size, output_padding
    included: rows past the full result hold the bias, as in torch). ConvTranspose1d: 1 x k."""
    if m.padding_mode != "zeros":
        raise ctx.unsupported(node, f"padding_mode={m.padding_mode!r} (only 'zeros')")
    one_d = isinstance(m, nn.ConvTranspose1d)
    _check_rank(ctx, node, 3 if one_d else 4, type(m).__name__)
    w = m.weight.detach().cpu().numpy()  # (Cin, Cout/groups, kh, kw) or (Cin, Cout/groups, k)
    stride, dilation, padding = list(m.stride), list(m.dilation), list(m.padding)
    if one_d:
        w, stride, dilation, padding = w[:, :, None, :], [1, stride[0]], [1, dilation[0]], [0, padding[0]]
    out_hw = ctx.shape(node)[2:]
    out_hw = (1, out_hw[0]) if one_d else tuple(out_hw)
    b = None if m.bias is None else m.bias.detach().cpu().numpy()
    name, out = ctx.layer(node)
    ctx.builder.add_convolution(
        name, kernel_channels=w.shape[0], output_channels=w.shape[1] * m.groups,
        height=w.shape[2], width=w.shape[3], stride_height=stride[0], stride_width=stride[1],
        border_mode="valid", groups=m.groups, W=np.ascontiguousarray(w.transpose(2, 3, 0, 1)),
        b=b, has_bias=b is not None, is_deconv=True, output_shape=[int(v) for v in out_hw],
        input_name=ctx.inp(node.args[0]), output_name=out, dilation_factors=dilation,
        padding_top=padding[0], padding_bottom=padding[0], padding_left=padding[1],
        padding_right=padding[1],
    )
    return out


#: Core ML permute axes swapping the blob's C and W axes (torch's axis 1 and last axis)
_SWAP_C_W = (0, 3, 2, 1)


@register_module(nn.Linear)
def linear(ctx, node, m: nn.Linear) -> str:
    """Linear of (N, C) vectors: innerProduct. Of the last axis of (N, L, C) tokens or
    (N, H, W, C) channels-last maps (whose blobs hold C on the W axis): the features swapped
    onto the channel axis, a 1 x 1 convolution, swapped back."""
    rank = len(ctx.shape(node.args[0]))
    w = m.weight.detach().cpu().numpy()
    b = None if m.bias is None else m.bias.detach().cpu().numpy()
    if rank == 2:
        name, out = ctx.layer(node)
        ctx.builder.add_inner_product(name, W=w, b=b, input_channels=w.shape[1],
                                      output_channels=w.shape[0], has_bias=b is not None,
                                      input_name=ctx.inp(node.args[0]), output_name=out)
        return out
    if rank not in (3, 4):
        raise ctx.unsupported(node, f"Linear on a tensor of rank {rank} (2, or the last axis of 3 or 4)")
    front = _helper_layer(ctx, node, "to_channels")
    ctx.builder.add_permute(front, _SWAP_C_W, ctx.inp(node.args[0]), front)
    mixed = _helper_layer(ctx, node, "pointwise")
    name, out = ctx.layer(node)  # the convolution carries the module's name (and can be updatable)
    ctx.builder.add_convolution(
        name, kernel_channels=w.shape[1], output_channels=w.shape[0], height=1, width=1,
        stride_height=1, stride_width=1, border_mode="valid", groups=1,
        W=np.ascontiguousarray(w.T.reshape(1, 1, w.shape[1], w.shape[0])), b=b,
        has_bias=b is not None, input_name=front, output_name=mixed)
    ctx.builder.add_permute(_helper_layer(ctx, node, "back"), _SWAP_C_W, mixed, out)
    return out


# --- activations ------------------------------------------------------------------------------

def _activation(ctx, node, kind: str, params=None) -> str:
    name, out = ctx.layer(node)
    ctx.builder.add_activation(name, kind, ctx.inp(node.args[0]), out, params=params)
    return out


@register_module(nn.ReLU)
@register_function(F.relu, torch.relu, torch.relu_, F.relu_)
@register_method("relu", "relu_")
def relu(ctx, node, target) -> str:
    return _activation(ctx, node, "RELU")


@register_module(nn.Sigmoid)
@register_function(torch.sigmoid, F.sigmoid)
@register_method("sigmoid")
def sigmoid(ctx, node, target) -> str:
    return _activation(ctx, node, "SIGMOID")


@register_module(nn.Tanh)
@register_function(torch.tanh, F.tanh)
@register_method("tanh")
def tanh(ctx, node, target) -> str:
    return _activation(ctx, node, "TANH")


@register_module(nn.LeakyReLU)
@register_function(F.leaky_relu)
def leaky_relu(ctx, node, target) -> str:
    slope = target.negative_slope if isinstance(target, nn.Module) else arg(node, 1, "negative_slope", 0.01)
    return _activation(ctx, node, "LEAKYRELU", [float(slope)])


@register_module(nn.ELU)
@register_function(F.elu)
def elu(ctx, node, target) -> str:
    alpha = target.alpha if isinstance(target, nn.Module) else arg(node, 1, "alpha", 1.0)
    return _activation(ctx, node, "ELU", float(alpha))


def _helper_layer(ctx, node, suffix: str) -> str:
    """A fresh name for an extra layer of ``node`` and its output blob (the same string)."""
    name = ctx.new_blob(f"{node.name}_{suffix}")
    ctx.used_layers.add(name)
    return name


def _gated(ctx, node, kind: str, params=None) -> str:
    """``x * act(x)`` (SiLU: sigmoid, Hardswish: hard sigmoid): the gate, then a multiply."""
    x = ctx.inp(node.args[0])
    gate = _helper_layer(ctx, node, "gate")
    ctx.builder.add_activation(gate, kind, x, gate, params=params)
    name, out = ctx.layer(node)
    ctx.builder.add_elementwise(name, [x, gate], out, "MULTIPLY")
    return out


#: torch's hard sigmoid, relu6(x + 3) / 6, as Core ML's sigmoidHard min(max(a x + b, 0), 1)
_HARD_SIGMOID = [1.0 / 6.0, 0.5]


@register_module(nn.Hardtanh)  # nn.ReLU6 too (a Hardtanh from 0 to 6)
@register_function(F.hardtanh, F.hardtanh_, F.relu6)
def hardtanh(ctx, node, target) -> str:
    """``clamp(x, lo, hi)`` (ReLU6: 0..6) as ``lo + (hi - lo) * sigmoidHard((x - lo) / (hi - lo))``:
    two classic activations (Core ML's clip layer needs ND mode)."""
    if isinstance(target, nn.Module):
        lo, hi = float(target.min_val), float(target.max_val)
    elif target is F.relu6:
        lo, hi = 0.0, 6.0
    else:
        lo, hi = float(arg(node, 1, "min_val", -1.0)), float(arg(node, 2, "max_val", 1.0))
    if not hi > lo:
        raise ctx.unsupported(node, f"hardtanh with max_val {hi} <= min_val {lo}")
    unit = _helper_layer(ctx, node, "unit")
    ctx.builder.add_activation(unit, "SIGMOID_HARD", ctx.inp(node.args[0]), unit,
                               params=[1.0 / (hi - lo), -lo / (hi - lo)])
    name, out = ctx.layer(node)
    ctx.builder.add_activation(name, "LINEAR", unit, out, params=[hi - lo, lo])
    return out


@register_module(nn.Hardsigmoid)
@register_function(F.hardsigmoid)
def hardsigmoid(ctx, node, target) -> str:
    return _activation(ctx, node, "SIGMOID_HARD", _HARD_SIGMOID)


@register_module(nn.Hardswish)
@register_function(F.hardswish)
def hardswish(ctx, node, target) -> str:
    return _gated(ctx, node, "SIGMOID_HARD", _HARD_SIGMOID)


@register_module(nn.SiLU)
@register_function(F.silu)
def silu(ctx, node, target) -> str:
    return _gated(ctx, node, "SIGMOID")


@register_module(nn.PReLU)
def prelu(ctx, node, m: nn.PReLU) -> str:
    """One slope per channel (a single learned slope is repeated over the channels)."""
    channels = _channels(ctx, node)
    alpha = m.weight.detach().cpu().numpy().astype(np.float32).reshape(-1)
    if alpha.size not in (1, channels):
        raise ctx.unsupported(node, f"PReLU with {alpha.size} slopes for {channels} channels")
    return _activation(ctx, node, "PRELU", np.resize(alpha, channels))


@register_module(nn.Softplus)
@register_function(F.softplus)
def softplus(ctx, node, target) -> str:
    """``log(1 + exp(beta x)) / beta``; torch returns ``x`` where ``beta x`` exceeds its
    threshold, which Core ML has no parameter for: thresholds below 15 are refused (above it
    the two differ by less than exp(-15))."""
    if isinstance(target, nn.Module):
        beta, threshold = float(target.beta), float(target.threshold)
    else:
        beta, threshold = float(arg(node, 1, "beta", 1.0)), float(arg(node, 2, "threshold", 20.0))
    if threshold < 15:
        raise ctx.unsupported(node, f"Softplus with threshold {threshold} < 15 (Core ML's "
                                    "softplus has no threshold)")
    if beta == 1.0:
        return _activation(ctx, node, "SOFTPLUS")
    channels = _channels(ctx, node)
    return _activation(ctx, node, "PARAMETRICSOFTPLUS",
                       [np.full(channels, 1.0 / beta, np.float32), np.full(channels, beta, np.float32)])


#: Abramowitz & Stegun 7.1.26: erf(z) = 1 - t (a1 + t (a2 + ... + t a5)) exp(-z^2),
#: t = 1 / (1 + p z), z >= 0; |error| <= 1.5e-7
_ERF_P = 0.3275911
_ERF_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


@register_module(nn.GELU)
@register_function(F.gelu)
def gelu(ctx, node, target) -> str:
    """GELU from classic layers (Core ML's gelu layer is an iOS 14 layer, which rank-5 networks
    with multi-array inputs cannot hold). ``approximate='tanh'``: torch's formula exactly,
    ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``. Exact GELU: ``0.5 x + 0.5 |x| erf(|x| /
    sqrt(2))`` (erf is odd) with erf to 1.5e-7 (A&S 7.1.26), so the output is within ~1e-7 |x|."""
    approx = target.approximate if isinstance(target, nn.Module) else arg(node, 1, "approximate", "none")
    if approx not in ("none", "tanh"):
        raise ctx.unsupported(node, f"GELU with approximate={approx!r}")
    b, x = ctx.builder, ctx.inp(node.args[0])

    def helper(suffix):
        return _helper_layer(ctx, node, suffix)

    def mul(a, c, suffix):
        out = helper(suffix)
        b.add_elementwise(out, [a, c], out, "MULTIPLY")
        return out

    def linear(a, alpha, beta, suffix):
        out = helper(suffix)
        b.add_activation(out, "LINEAR", a, out, params=[float(alpha), float(beta)])
        return out

    if approx == "tanh":
        x3 = mul(mul(x, x, "x2"), x, "x3")
        inner = helper("inner")
        b.add_elementwise(inner, [x, linear(x3, 0.044715, 0.0, "cubic")], inner, "ADD")
        th = helper("tanh")
        b.add_activation(th, "SCALED_TANH", inner, th, params=[1.0, float(np.sqrt(2.0 / np.pi))])
        name, out = ctx.layer(node)
        b.add_elementwise(name, [x, linear(th, 0.5, 0.5, "gate")], out, "MULTIPLY")
        return out
    a = helper("abs")
    b.add_unary(a, x, a, "abs")
    t = helper("t")  # 1 / (1 + p |x| / sqrt(2))
    b.add_unary(t, a, t, "inverse", scale=_ERF_P / np.sqrt(2.0), shift=1.0, epsilon=1e-45)
    h = linear(t, _ERF_A[4], _ERF_A[3], "h4")
    for k in (2, 1, 0):
        h = linear(mul(h, t, f"ht{k}"), 1.0, _ERF_A[k], f"h{k}")
    e = helper("exp")  # exp(-x^2 / 2)
    b.add_unary(e, mul(x, x, "x2"), e, "exp", scale=-0.5)
    erf = linear(mul(mul(h, t, "poly"), e, "tail"), -1.0, 1.0, "erf")
    s = helper("sum")
    b.add_elementwise(s, [x, mul(a, erf, "odd")], s, "ADD")
    name, out = ctx.layer(node)
    b.add_activation(name, "LINEAR", s, out, params=[0.5, 0.0])
    return out


def _channels(ctx, node) -> int:
    """The channel count (blob axis -3) of the node's input."""
    return int(ctx.blob_shape(ctx.shape(node.args[0]))[0])


def _softmax_dim(node, target):
    if isinstance(target, nn.Module):
        return target.dim
    return arg(node, 1, "dim")


@register_module(nn.Softmax)
@register_function(F.softmax, torch.softmax)
@register_method("softmax")
def softmax(ctx, node, target) -> str:
    channel_dim(ctx, node, _softmax_dim(node, target))
    name, out = ctx.layer(node)
    ctx.builder.add_softmax(name, ctx.inp(node.args[0]), out)
    return out


@register_module(nn.LogSoftmax)
@register_function(F.log_softmax, torch.log_softmax)
@register_method("log_softmax")
def log_softmax(ctx, node, target) -> str:
    """Only as a classifier's last op, where Core ML wants the probabilities: becomes softmax."""
    if not ctx.classifier_output(node):
        raise ctx.unsupported(node, "LogSoftmax except as the last op of a classifier "
                                    "(where it becomes the softmax giving the probabilities)")
    return softmax(ctx, node, target)


# --- resizing ---------------------------------------------------------------------------------

@register_module(nn.Upsample)  # UpsamplingNearest2d / UpsamplingBilinear2d too
@register_function(F.interpolate, F.upsample)
def upsample(ctx, node, target) -> str:
    """Nearest upsampling of (N, C, H, W) by whole factors (from ``scale_factor`` or ``size``):
    Core ML's upsample layer; bilinear with ``align_corners=True``: its resizeBilinear layer
    (strict end-point alignment). torch's default bilinear grid (``align_corners=False``) exists
    in Core ML only as an iOS 13 upsample mode, which a rank-5 network with multi-array inputs
    cannot hold (Core ML refuses the model): refused."""
    if isinstance(target, nn.Module):
        mode, align = target.mode, bool(target.align_corners)
    else:
        mode, align = arg(node, 3, "mode", "nearest"), bool(arg(node, 4, "align_corners", False))
    _check_4d(ctx, node, "upsampling")
    (h, w), (oh, ow) = ctx.shape(node.args[0])[2:], ctx.shape(node)[2:]
    if mode not in ("nearest", "bilinear"):
        raise ctx.unsupported(node, f"upsampling mode {mode!r} (nearest and bilinear convert)")
    if mode == "bilinear" and not align:
        raise ctx.unsupported(node, "bilinear upsampling with align_corners=False (Core ML has "
                              "that grid only in ND networks); pass align_corners=True, or use "
                              "nearest")
    if oh % h or ow % w or oh < h or ow < w:
        raise ctx.unsupported(node, f"resizing {h}x{w} to {oh}x{ow} (whole upsampling factors only)")
    name, out = ctx.layer(node)
    if mode == "nearest":
        ctx.builder.add_upsample(name, oh // h, ow // w, ctx.inp(node.args[0]), out, mode="NN")
    else:
        ctx.builder.add_resize_bilinear(name, ctx.inp(node.args[0]), out, oh, ow,
                                        mode="STRICT_ALIGN_ENDPOINTS_MODE")
    return out


# --- pooling ----------------------------------------------------------------------------------

def _pool(ctx, node, kind, kernel, stride, padding, ceil_mode=False, count_include_pad=True) -> str:
    kh, kw = pair(kernel)
    sh, sw = pair(stride if stride not in (None, ()) else kernel)
    ph, pw = pair(padding)
    name, out = ctx.layer(node)
    ctx.builder.add_pooling(
        name, height=kh, width=kw, stride_height=sh, stride_width=sw, layer_type=kind,
        padding_type="INCLUDE_LAST_PIXEL" if ceil_mode else "VALID",
        input_name=ctx.inp(node.args[0]), output_name=out,
        exclude_pad_area=not count_include_pad,
        padding_top=ph, padding_bottom=ph, padding_left=pw, padding_right=pw,
    )
    return out


def _check_rank(ctx, node, rank: int, what: str):
    if len(ctx.shape(node.args[0])) != rank:
        layout = "(N, C, H, W)" if rank == 4 else "(N, C, L)"
        raise ctx.unsupported(node, f"{what} of a tensor that is not {layout}")


def _check_4d(ctx, node, what: str = "2-D pooling"):
    _check_rank(ctx, node, 4, what)


def _one_d(v) -> int:
    """The one value of a 1-D pooling argument (an int or a 1-tuple)."""
    return int(v[0]) if isinstance(v, (tuple, list)) else int(v)


@register_module(nn.MaxPool1d, nn.AvgPool1d)
def pool1d(ctx, node, m) -> str:
    """1-D pooling over (N, C, L): a 1 x k pooling of the (C, 1, L) blob."""
    _check_rank(ctx, node, 3, type(m).__name__)
    if isinstance(m, nn.MaxPool1d) and (_one_d(m.dilation) != 1 or m.return_indices):
        raise ctx.unsupported(node, "MaxPool1d with dilation or return_indices")
    k = _one_d(m.kernel_size)
    s = _one_d(m.stride) if m.stride not in (None, ()) else k
    kind = "MAX" if isinstance(m, nn.MaxPool1d) else "AVERAGE"
    return _pool(ctx, node, kind, (1, k), (1, s), (0, _one_d(m.padding)), m.ceil_mode,
                 getattr(m, "count_include_pad", True))


@register_module(nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d)
def adaptive_pool1d(ctx, node, m) -> str:
    _check_rank(ctx, node, 3, type(m).__name__)
    kind = "AVERAGE" if isinstance(m, nn.AdaptiveAvgPool1d) else "MAX"
    length, size = ctx.shape(node.args[0])[2], _one_d(m.output_size)
    if size == 1:
        name, out = ctx.layer(node)
        ctx.builder.add_pooling(name, 1, 1, 1, 1, kind, "VALID", ctx.inp(node.args[0]), out,
                                is_global=True)
        return out
    if length % size:
        raise ctx.unsupported(node, f"adaptive pooling from length {length} to {size} (sizes must divide)")
    return _pool(ctx, node, kind, (1, length // size), (1, length // size), 0)


@register_module(nn.MaxPool2d)
def max_pool2d(ctx, node, m: nn.MaxPool2d) -> str:
    _check_4d(ctx, node)
    if pair(m.dilation) != (1, 1) or m.return_indices:
        raise ctx.unsupported(node, "MaxPool2d with dilation or return_indices")
    return _pool(ctx, node, "MAX", m.kernel_size, m.stride, m.padding, m.ceil_mode)


@register_function(F.max_pool2d, torch.max_pool2d)
def max_pool2d_fn(ctx, node, target) -> str:
    _check_4d(ctx, node)
    if pair(arg(node, 4, "dilation", 1)) != (1, 1) or arg(node, 6, "return_indices", False):
        raise ctx.unsupported(node, "max_pool2d with dilation or return_indices")
    k = arg(node, 1, "kernel_size")
    return _pool(ctx, node, "MAX", k, arg(node, 2, "stride", None), arg(node, 3, "padding", 0),
                 arg(node, 5, "ceil_mode", False))


@register_module(nn.AvgPool2d)
def avg_pool2d(ctx, node, m: nn.AvgPool2d) -> str:
    _check_4d(ctx, node)
    if m.divisor_override:
        raise ctx.unsupported(node, "AvgPool2d with divisor_override")
    return _pool(ctx, node, "AVERAGE", m.kernel_size, m.stride, m.padding, m.ceil_mode,
                 m.count_include_pad)


@register_function(F.avg_pool2d, torch._C._nn.avg_pool2d)
def avg_pool2d_fn(ctx, node, target) -> str:
    _check_4d(ctx, node)
    if arg(node, 6, "divisor_override", None):
        raise ctx.unsupported(node, "avg_pool2d with divisor_override")
    return _pool(ctx, node, "AVERAGE", arg(node, 1, "kernel_size"), arg(node, 2, "stride", None),
                 arg(node, 3, "padding", 0), arg(node, 4, "ceil_mode", False),
                 arg(node, 5, "count_include_pad", True))


def _adaptive(ctx, node, kind: str, output_size) -> str:
    _check_4d(ctx, node)
    h, w = ctx.shape(node.args[0])[2:]
    oh, ow = pair(output_size)
    oh, ow = oh or h, ow or w
    if (oh, ow) == (1, 1):
        name, out = ctx.layer(node)
        ctx.builder.add_pooling(name, 1, 1, 1, 1, kind, "VALID", ctx.inp(node.args[0]), out,
                                is_global=True)
        return out
    if h % oh or w % ow:
        raise ctx.unsupported(node, f"adaptive pooling from {h}x{w} to {oh}x{ow} (sizes must divide)")
    k = (h // oh, w // ow)
    return _pool(ctx, node, kind, k, k, 0)


@register_module(nn.AdaptiveAvgPool2d)
def adaptive_avg_pool2d(ctx, node, m) -> str:
    return _adaptive(ctx, node, "AVERAGE", m.output_size)


@register_module(nn.AdaptiveMaxPool2d)
def adaptive_max_pool2d(ctx, node, m) -> str:
    if m.return_indices:
        raise ctx.unsupported(node, "AdaptiveMaxPool2d with return_indices")
    return _adaptive(ctx, node, "MAX", m.output_size)


@register_function(F.adaptive_avg_pool2d)
def adaptive_avg_pool2d_fn(ctx, node, target) -> str:
    return _adaptive(ctx, node, "AVERAGE", arg(node, 1, "output_size"))


@register_function(torch.mean)
@register_method("mean")
def mean(ctx, node, target) -> str:
    """``x.mean((2, 3))`` over the spatial axes of (N, C, H, W), ``x.mean(2)`` over the length of
    (N, C, L): global average pooling (Core ML backpropagates through it); other axes: a reduce."""
    dims = arg(node, 1, "dim")
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    rank = len(ctx.shape(node.args[0]))
    spatial = {4: [2, 3], 3: [2]}.get(rank)
    if spatial is None or sorted(d % rank for d in dims) != spatial:
        return _reduce(ctx, node, "AVG")
    name, out = ctx.layer(node)
    ctx.builder.add_pooling(name, 1, 1, 1, 1, "AVERAGE", "VALID", ctx.inp(node.args[0]), out,
                            is_global=True)
    return out


#: torch axes (without the batch axis) of a rank-2/3/4 tensor -> Core ML's reduce axis
_REDUCE_AXES = {
    2: {(1,): "C"},
    3: {(1,): "C", (2,): "W", (1, 2): "CHW"},
    4: {(1,): "C", (2,): "H", (3,): "W", (2, 3): "HW", (1, 2, 3): "CHW"},
}


def _reduce(ctx, node, mode: str) -> str:
    """sum / mean / amax / amin over non-batch axes: Core ML's reduce layer (reduced axes kept as
    1), reshaped to the blob of torch's result when ``keepdim=False`` drops axes."""
    shape = ctx.shape(node.args[0])
    rank, dims = len(shape), arg(node, 1, "dim")
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    axis = _REDUCE_AXES.get(rank, {}).get(tuple(sorted({int(d) % rank for d in dims})))
    if axis is None:
        raise ctx.unsupported(node, f"{mode.lower()} over dims {dims} of a rank-{rank} tensor (the "
                                    "non-batch axes: channels, height, width or their spatial / "
                                    "all combinations)")
    kept = list(ctx.blob_shape(shape))
    for i, a in enumerate("CHW"):
        kept[i] = 1 if a in axis else kept[i]
    want = ctx.blob_shape(ctx.shape(node))
    reshape = tuple(kept) != tuple(want)
    name, out = ctx.layer(node)
    mid = _helper_layer(ctx, node, "kept") if reshape else out
    ctx.builder.add_reduce(name if not reshape else mid, ctx.inp(node.args[0]), mid, axis, mode)
    if reshape:
        ctx.builder.add_reshape(name, mid, out, tuple(want), 0)
    return out


@register_function(torch.sum)
@register_method("sum")
def reduce_sum(ctx, node, target) -> str:
    return _reduce(ctx, node, "SUM")


@register_function(torch.amax)
@register_method("amax")
def reduce_max(ctx, node, target) -> str:
    return _reduce(ctx, node, "MAX")


@register_function(torch.amin)
@register_method("amin")
def reduce_min(ctx, node, target) -> str:
    return _reduce(ctx, node, "MIN")


# --- normalization ----------------------------------------------------------------------------

@register_module(nn.BatchNorm1d, nn.BatchNorm2d)
def batchnorm(ctx, node, m) -> str:
    if m.training:
        raise ctx.unsupported(node, "BatchNorm in training mode (call module.eval() first)")
    if not m.track_running_stats or m.running_mean is None:
        raise ctx.unsupported(node, "BatchNorm without running statistics")
    c = m.num_features
    gamma = m.weight.detach().cpu().numpy() if m.affine else np.ones(c, np.float32)
    beta = m.bias.detach().cpu().numpy() if m.affine else np.zeros(c, np.float32)
    name, out = ctx.layer(node)
    ctx.builder.add_batchnorm(name, c, gamma, beta, m.running_mean.detach().cpu().numpy(),
                              m.running_var.detach().cpu().numpy(), ctx.inp(node.args[0]), out,
                              epsilon=float(m.eps))
    return out


@register_module(nn.LayerNorm)
def layer_norm(ctx, node, m: nn.LayerNorm) -> str:
    """LayerNorm over every per-example axis (an MLP's (C,), a (C, L) or (C, H, W) feature map):
    Core ML's mvn across channels (mean and variance over the whole blob, ``/ sqrt(var + eps)``),
    then a scale layer with the elementwise gamma and beta in the blob's shape. Over the last
    axis of tokens / channels-last maps: :func:`_layer_norm_last_axis`."""
    shape = ctx.shape(node.args[0])
    norm = tuple(int(s) for s in m.normalized_shape)
    if len(norm) == 1 and len(shape) in (3, 4) and norm[0] == shape[-1]:
        return _layer_norm_last_axis(ctx, node, m, shape)
    if norm != tuple(shape[1:]) or len(norm) > 3:
        raise ctx.unsupported(node, f"LayerNorm over {norm} of a {tuple(shape[1:])} tensor per example "
                                    "(only over all of its axes, or over the last one of (N, L, C) "
                                    "tokens / channels-last (N, H, W, C) maps)")
    blob = ctx.blob_shape(shape)
    b, x = ctx.builder, ctx.inp(node.args[0])
    affine = m.weight is not None
    mvn = _helper_layer(ctx, node, "mvn") if affine else None
    name, out = ctx.layer(node)
    b.add_mvn(mvn or name, x, mvn or out, across_channels=True, normalize_variance=True,
              epsilon=float(m.eps))
    if not affine:
        return out
    gamma = m.weight.detach().cpu().float().numpy().reshape(blob)
    beta = None if m.bias is None else m.bias.detach().cpu().float().numpy().reshape(blob)
    b.add_scale(name, gamma, beta, beta is not None, mvn, out, shape_scale=list(blob),
                shape_bias=list(blob) if beta is not None else None)
    return out


def _channel_affine(ctx, node, m, src: str) -> str:
    """The node's output: ``src`` scaled by ``m.weight`` and shifted by ``m.bias`` per channel
    (a scale layer), or ``src`` itself without affine parameters."""
    if m.weight is None:
        return src
    c = m.weight.numel()
    beta = None if m.bias is None else m.bias.detach().cpu().float().numpy()
    name, out = ctx.layer(node)
    ctx.builder.add_scale(name, m.weight.detach().cpu().float().numpy(), beta, beta is not None, src, out,
                          shape_scale=[c], shape_bias=[c] if beta is not None else None)
    return out


def _layer_norm_last_axis(ctx, node, m: nn.LayerNorm, shape) -> str:
    """LayerNorm of each token of (N, L, C) / each pixel of channels-last (N, H, W, C): the blob
    holds C on its W axis, so an mvn per (Core ML) channel over (H, W) normalizes each row (a
    (H, W, C) blob is first reshaped to (H * W, 1, C)); gamma/beta scale along W."""
    b, src = ctx.builder, ctx.inp(node.args[0])
    blob = ctx.blob_shape(shape)
    c = blob[2]
    if len(shape) == 4:
        rows = _helper_layer(ctx, node, "rows")
        b.add_reshape(rows, src, rows, (blob[0] * blob[1], 1, c), 0)
        src = rows
    affine = m.weight is not None
    last = len(shape) == 3 and not affine
    normed = ctx.layer(node) if last else (_helper_layer(ctx, node, "mvn"),) * 2
    b.add_mvn(normed[0], src, normed[1], across_channels=False, normalize_variance=True,
              epsilon=float(m.eps))
    out = normed[1]
    if affine:
        beta = None if m.bias is None else m.bias.detach().cpu().float().numpy().reshape(1, 1, c)
        name, scaled = ctx.layer(node) if len(shape) == 3 else (_helper_layer(ctx, node, "affine"),) * 2
        b.add_scale(name, m.weight.detach().cpu().float().numpy().reshape(1, 1, c), beta, beta is not None,
                    out, scaled, shape_scale=[1, 1, c], shape_bias=[1, 1, c] if beta is not None else None)
        out = scaled
    if len(shape) == 4:
        name, back = ctx.layer(node)
        b.add_reshape(name, out, back, tuple(blob), 0)
        out = back
    return out


@register_module(nn.GroupNorm)
def group_norm(ctx, node, m: nn.GroupNorm) -> str:
    """GroupNorm of (N, C[, H], W): the (C, H, W) blob reshaped to (G, C/G * H, W), an mvn per
    (new) channel normalizes each group, reshaped back, then gamma/beta per channel."""
    shape = ctx.shape(node.args[0])
    if len(shape) < 3:
        raise ctx.unsupported(node, "GroupNorm of a tensor without spatial axes (N, C)")
    c, h, w = ctx.blob_shape(shape)
    g = m.num_groups
    src = ctx.inp(node.args[0])
    grouped = _helper_layer(ctx, node, "groups")
    ctx.builder.add_reshape(grouped, src, grouped, (g, c // g * h, w), 0)
    normed = _helper_layer(ctx, node, "mvn")
    ctx.builder.add_mvn(normed, grouped, normed, across_channels=False, normalize_variance=True,
                        epsilon=float(m.eps))
    if not m.affine:
        name, out = ctx.layer(node)
        ctx.builder.add_reshape(name, normed, out, (c, h, w), 0)
        return out
    back = _helper_layer(ctx, node, "chw")
    ctx.builder.add_reshape(back, normed, back, (c, h, w), 0)
    return _channel_affine(ctx, node, m, back)


@register_module(nn.InstanceNorm1d, nn.InstanceNorm2d)
def instance_norm(ctx, node, m) -> str:
    """InstanceNorm: an mvn per channel over (H, W), then gamma/beta; with running statistics
    (track_running_stats, eval) it normalizes like BatchNorm and is one."""
    if m.track_running_stats and m.running_mean is not None:
        if m.training:
            raise ctx.unsupported(node, "InstanceNorm with running statistics in training mode")
        return batchnorm(ctx, node, m)
    normed = _helper_layer(ctx, node, "mvn") if m.affine else None
    name, out = ctx.layer(node)
    ctx.builder.add_mvn(normed or name, ctx.inp(node.args[0]), normed or out, across_channels=False,
                        normalize_variance=True, epsilon=float(m.eps))
    return _channel_affine(ctx, node, m, normed) if m.affine else out


_PAD_MODES = {"constant": "constant", "reflect": "reflection", "replicate": "replication"}


def _pad(ctx, node, amounts, mode: str, value: float) -> str:
    """Core ML's padding layer: (left, right[, top, bottom]) of the last axes; a (N, C, L)
    tensor pads its length only."""
    amounts = [int(a) for a in amounts]
    rank = len(ctx.shape(node.args[0]))
    if mode not in _PAD_MODES or len(amounts) not in (2, 4) or min(amounts) < 0 or rank not in (3, 4) \
            or (rank == 3 and len(amounts) != 2):
        raise ctx.unsupported(node, f"padding {amounts} in mode {mode!r} of a rank-{rank} tensor "
                                    "(the last one or two axes of (N, C, L) / (N, C, H, W), "
                                    "not negative; constant, reflect or replicate)")
    left, right = amounts[:2]
    top, bottom = amounts[2:] if len(amounts) == 4 else (0, 0)
    name, out = ctx.layer(node)
    ctx.builder.add_padding(name, left=left, right=right, top=top, bottom=bottom, value=float(value),
                            input_name=ctx.inp(node.args[0]), output_name=out,
                            padding_type=_PAD_MODES[mode])
    return out


@register_module(nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d,
                 nn.ConstantPad1d, nn.ReflectionPad1d, nn.ReplicationPad1d)
def pad_module(ctx, node, m) -> str:
    name = type(m).__name__
    mode = "reflect" if "Reflection" in name else "replicate" if "Replication" in name else "constant"
    return _pad(ctx, node, m.padding, mode, getattr(m, "value", 0.0))


@register_function(F.pad)
def pad_function(ctx, node, target) -> str:
    return _pad(ctx, node, arg(node, 1, "pad"), arg(node, 2, "mode", "constant"),
                arg(node, 3, "value", None) or 0.0)


def _swap_channel_blocks(ctx, node, src: str, first: int, second: int, hw: tuple,
                         last: Optional[tuple] = None) -> str:
    """Channels ordered (first, second) -> (second, first), as classic layers: reshape to
    (first, second, H * W), swap the first two axes (permute), reshape back (as the layer and
    blob ``last`` when given)."""
    b = ctx.builder
    split = _helper_layer(ctx, node, "split")
    b.add_reshape(split, src, split, (first, second, hw[0] * hw[1]), 0)
    swapped = _helper_layer(ctx, node, "swap")
    b.add_permute(swapped, (0, 2, 1, 3), split, swapped)
    name, out = last or (_helper_layer(ctx, node, "order"),) * 2
    b.add_reshape(name, swapped, out, (first * second, *hw), 0)
    return out


@register_module(nn.PixelShuffle, nn.PixelUnshuffle)
@register_function(F.pixel_shuffle, F.pixel_unshuffle)
def pixel_shuffle(ctx, node, target) -> str:
    """torch orders the channels (C, r, r) where Core ML's iOS 11 DEPTH_TO_SPACE (its iOS 14
    PIXEL_SHUFFLE cannot sit in every network) orders them (r, r, C): the channel blocks are
    swapped around it with reshape/permute layers (no arithmetic, so exact)."""
    shuffle = isinstance(target, nn.PixelShuffle) or target is F.pixel_shuffle
    r = int(target.upscale_factor if isinstance(target, nn.PixelShuffle) else
            target.downscale_factor if isinstance(target, nn.PixelUnshuffle) else arg(node, 1, "factor"))
    _check_4d(ctx, node, "pixel shuffling")
    c, h, w = ctx.blob_shape(ctx.shape(node.args[0]))
    src, b = ctx.inp(node.args[0]), ctx.builder
    if shuffle:
        src = _swap_channel_blocks(ctx, node, src, c // (r * r), r * r, (h, w))
        name, out = ctx.layer(node)
        b.add_reorganize_data(name, src, out, "DEPTH_TO_SPACE", r)
        return out
    moved = _helper_layer(ctx, node, "s2d")
    b.add_reorganize_data(moved, src, moved, "SPACE_TO_DEPTH", r)
    return _swap_channel_blocks(ctx, node, moved, r * r, c, (h // r, w // r), last=ctx.layer(node))


# --- shape ------------------------------------------------------------------------------------

@register_module(nn.Dropout, nn.Dropout2d, nn.AlphaDropout, nn.Identity)
@register_function(F.dropout, F.dropout2d, torch.dropout)
@register_method("contiguous")
def identity(ctx, node, target) -> str:
    """Dropped at inference: the node's value is its input's blob."""
    return ctx.inp(node.args[0])


@register_module(nn.Flatten)
@register_function(torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze)
@register_method("view", "reshape", "flatten", "squeeze", "unsqueeze")
def reshape(ctx, node, target) -> str:
    """A reshape that keeps the blob (C, H, W) is free; (N, C, H, W) -> (N, -1) is flatten."""
    src = node.args[0]
    before, after = ctx.shape(src), ctx.shape(node)
    if ctx.blob_shape(before) == ctx.blob_shape(after):
        return ctx.inp(src)
    if len(after) == 2 and len(before) > 2:
        name, out = ctx.layer(node)
        ctx.builder.add_flatten(name, 0, ctx.inp(src), out)  # CHANNEL_FIRST: torch order
        return out
    raise ctx.unsupported(node, f"reshape from {tuple(before)} to {tuple(after)}")


def _blob_axes(rank: int) -> list:
    """Torch axis of an (N, ...) tensor -> its axis in Core ML's (Seq, C, H, W): (N, C, L) has
    C on 1 and L on W (3); (N, C, H, W) maps one to one."""
    return [0, 1, 3] if rank == 3 else [0, 1, 2, 3]


@register_function(torch.permute, torch.transpose)
@register_method("permute", "transpose")
def permute(ctx, node, target) -> str:
    """A permutation of the non-batch axes of a rank-3 or rank-4 tensor: Core ML's permute layer
    (e.g. NCHW <-> NHWC around channels-last LayerNorm / Linear)."""
    rank = len(ctx.shape(node.args[0]))
    if target in (torch.transpose, "transpose"):
        perm = list(range(rank))
        d0, d1 = (int(d) % rank for d in (arg(node, 1, "dim0"), arg(node, 2, "dim1")))
        perm[d0], perm[d1] = perm[d1], perm[d0]
    else:
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) \
            else node.args[1:] or arg(node, 1, "dims")
        perm = [int(d) % rank for d in dims]
    if rank not in (3, 4) or perm[0] != 0:
        raise ctx.unsupported(node, f"permutation {perm} of a rank-{rank} tensor (the batch axis "
                                    "stays first; ranks 3 and 4)")
    if perm == list(range(rank)):
        return ctx.inp(node.args[0])
    axes, core = _blob_axes(rank), [0, 1, 2, 3]
    for out_axis, in_axis in enumerate(perm):
        core[axes[out_axis]] = axes[in_axis]
    name, out = ctx.layer(node)
    ctx.builder.add_permute(name, tuple(core), ctx.inp(node.args[0]), out)
    return out


@register_function(torch.cat, torch.concat)
def cat(ctx, node, target) -> str:
    tensors = list(arg(node, 0, "tensors"))
    dim = arg(node, 1, "dim", 0)
    rank = len(ctx.shape(node))
    if any(len(ctx.shape(t)) != rank for t in tensors) or dim % rank != 1:
        raise ctx.unsupported(node, f"concatenation along dim={dim} (only channels, dim=1)")
    name, out = ctx.layer(node)
    ctx.builder.add_elementwise(name, [ctx.inp(t) for t in tensors], out, "CONCAT")
    return out


# --- elementwise ------------------------------------------------------------------------------

def _elementwise(ctx, node, mode: str) -> str:
    a, b = node.args[0], node.args[1]
    if node.kwargs.get("alpha", 1) != 1:
        raise ctx.unsupported(node, "add with alpha != 1")
    tensors = [x for x in (a, b) if ctx.is_tensor(x)]
    scalars = [x for x in (a, b) if not ctx.is_tensor(x)]
    if scalars and not isinstance(scalars[0], (int, float)):
        raise ctx.unsupported(node, f"{mode.lower()} with an operand of type {type(scalars[0]).__name__}")
    rank = len(ctx.shape(node))
    if any(len(ctx.shape(t)) != rank for t in tensors):
        raise ctx.unsupported(node, "broadcasting between tensors of different ranks")
    name, out = ctx.layer(node)
    if scalars:
        alpha = float(scalars[0])
        ctx.builder.add_elementwise(name, [ctx.inp(tensors[0])], out, mode, alpha=alpha)
    else:
        ctx.builder.add_elementwise(name, [ctx.inp(t) for t in tensors], out, mode)
    return out


@register_function(operator.add, operator.iadd, torch.add)
@register_method("add", "add_")
def add(ctx, node, target) -> str:
    return _elementwise(ctx, node, "ADD")


@register_function(operator.mul, operator.imul, torch.mul)
@register_method("mul", "mul_")
def mul(ctx, node, target) -> str:
    return _elementwise(ctx, node, "MULTIPLY")


def _scaled(ctx, node, blob: str, alpha: float, suffix: str) -> str:
    """An extra ``multiply`` layer computing ``alpha * blob`` (named after the node)."""
    name = _helper_layer(ctx, node, suffix)
    ctx.builder.add_elementwise(name, [blob], name, "MULTIPLY", alpha=alpha)
    return name


@register_function(operator.sub, operator.isub, torch.sub)
@register_method("sub", "sub_")
def sub(ctx, node, target) -> str:
    """``a - b``: ``add(a, -1 * b)``; a scalar operand becomes the add's alpha."""
    a, b = node.args[0], node.args[1]
    if node.kwargs.get("alpha", 1) != 1:
        raise ctx.unsupported(node, "sub with alpha != 1")
    if ctx.is_tensor(a) and ctx.is_tensor(b):
        if len(ctx.shape(a)) != len(ctx.shape(b)):
            raise ctx.unsupported(node, "broadcasting between tensors of different ranks")
        neg = _scaled(ctx, node, ctx.inp(b), -1.0, "neg")
        name, out = ctx.layer(node)
        ctx.builder.add_elementwise(name, [ctx.inp(a), neg], out, "ADD")
        return out
    if ctx.is_tensor(a) and isinstance(b, (int, float)):
        name, out = ctx.layer(node)
        ctx.builder.add_elementwise(name, [ctx.inp(a)], out, "ADD", alpha=-float(b))
        return out
    if ctx.is_tensor(b) and isinstance(a, (int, float)):
        neg = _scaled(ctx, node, ctx.inp(b), -1.0, "neg")
        name, out = ctx.layer(node)
        ctx.builder.add_elementwise(name, [neg], out, "ADD", alpha=float(a))
        return out
    raise ctx.unsupported(node, "sub of these operand types")


@register_function(operator.truediv, operator.itruediv, torch.div)
@register_method("div", "div_")
def div(ctx, node, target) -> str:
    """``x / c`` for a number ``c``: multiply by ``1 / c``; ``c / x``: ``c`` times Core ML's
    inverse."""
    a, b = node.args[0], node.args[1]
    if node.kwargs.get("rounding_mode"):
        raise ctx.unsupported(node, "division with a rounding_mode")
    if ctx.is_tensor(b) and isinstance(a, (int, float)) and not ctx.is_tensor(a):
        return _unary(ctx, node, "inverse", b, times=float(a))
    if not (ctx.is_tensor(a) and isinstance(b, (int, float)) and b != 0):
        raise ctx.unsupported(node, "division except tensor / non-zero number or number / tensor")
    name, out = ctx.layer(node)
    ctx.builder.add_elementwise(name, [ctx.inp(a)], out, "MULTIPLY", alpha=1.0 / float(b))
    return out


# --- elementwise math -------------------------------------------------------------------------

#: Core ML's unary layer computes f(x + epsilon) for these; 1e-45 (the smallest float32) makes
#: that torch's f(x) (the builder's own choice for log)
_UNARY_EPS = {"log": 1e-45, "rsqrt": 1e-45, "inverse": 1e-45}


def _unary(ctx, node, mode: str, x=None, alpha: float = 1.0, times: float = 1.0) -> str:
    """Core ML's unary layer ``f(x)`` (``alpha``: POWER's exponent), scaled by ``times``."""
    src = ctx.inp(node.args[0] if x is None else x)
    scaled = _helper_layer(ctx, node, mode) if times != 1.0 else None
    name, out = ctx.layer(node)
    ctx.builder.add_unary(scaled or name, src, scaled or out, mode, alpha=float(alpha),
                          epsilon=_UNARY_EPS.get(mode, 1e-6))
    if scaled:
        ctx.builder.add_elementwise(name, [scaled], out, "MULTIPLY", alpha=times)
    return out


def _math(mode: str):
    def convert(ctx, node, target) -> str:
        return _unary(ctx, node, mode)
    return convert


for _mode, _fns, _methods in (("exp", (torch.exp,), ("exp",)), ("log", (torch.log,), ("log",)),
                              ("sqrt", (torch.sqrt,), ("sqrt",)), ("rsqrt", (torch.rsqrt,), ("rsqrt",)),
                              ("abs", (torch.abs, operator.abs), ("abs",)),
                              ("inverse", (torch.reciprocal,), ("reciprocal",))):
    register_method(*_methods)(register_function(*_fns)(_math(_mode)))


@register_function(torch.pow, operator.pow)
@register_method("pow")
def power(ctx, node, target) -> str:
    """``x ** p`` for a number ``p`` (Core ML's unary power)."""
    x, p = node.args[0], arg(node, 1, "exponent")
    if not ctx.is_tensor(x) or ctx.is_tensor(p) or not isinstance(p, (int, float)):
        raise ctx.unsupported(node, "power except tensor ** number")
    return _unary(ctx, node, "power", alpha=float(p))


@register_function(torch.clamp, torch.clip)
@register_method("clamp", "clip", "clamp_", "clip_")
def clamp(ctx, node, target) -> str:
    """``clamp(x, lo, hi)`` from classic layers (Core ML's clip layer needs ND mode): ``max(x, lo)``
    is the unary threshold; ``min(., hi) = -max(-., -hi)``."""
    lo, hi = arg(node, 1, "min"), arg(node, 2, "max")
    if any(ctx.is_tensor(v) or not (v is None or isinstance(v, (int, float))) for v in (lo, hi)) \
            or (lo is None and hi is None):
        raise ctx.unsupported(node, "clamp except with number bounds")
    b, src = ctx.builder, ctx.inp(node.args[0])
    if hi is None:
        name, out = ctx.layer(node)
        b.add_unary(name, src, out, "threshold", alpha=float(lo))
        return out
    if lo is not None:
        floor = _helper_layer(ctx, node, "min")
        b.add_unary(floor, src, floor, "threshold", alpha=float(lo))
        src = floor
    neg = _helper_layer(ctx, node, "neg")
    b.add_activation(neg, "LINEAR", src, neg, params=[-1.0, 0.0])
    cap = _helper_layer(ctx, node, "cap")
    b.add_unary(cap, neg, cap, "threshold", alpha=-float(hi))
    name, out = ctx.layer(node)
    b.add_activation(name, "LINEAR", cap, out, params=[-1.0, 0.0])
    return out


@register_function(F.normalize)
def normalize(ctx, node, target) -> str:
    """``F.normalize(x, dim=1)`` of (N, C) vectors: Core ML's l2normalize (over the whole blob,
    which is the vector here), ``x / sqrt(sum x^2 + 1e-24)`` = torch's ``x / max(|x|, 1e-12)``
    away from zero vectors."""
    p, dim = arg(node, 1, "p", 2.0), arg(node, 2, "dim", 1)
    shape = ctx.shape(node.args[0])
    if float(p) != 2.0 or int(dim) % len(shape) != 1 or math.prod(ctx.blob_shape(shape)[1:]) != 1:
        raise ctx.unsupported(node, f"normalize with p={p}, dim={dim} of a {tuple(shape[1:])} tensor "
                                    "per example (only p=2 over the channels of (N, C) vectors)")
    name, out = ctx.layer(node)
    ctx.builder.add_l2_normalize(name, ctx.inp(node.args[0]), out, epsilon=1e-24)
    return out
