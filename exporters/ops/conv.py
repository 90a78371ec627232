"""Convolutions, transposed convolutions and fully-connected layers."""

from __future__ import annotations

import numpy as np
import torch.nn as nn

from . import check_rank, helper_layer, pair, register_module


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
        check_rank(ctx, node, 3, "Conv1d")
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
    check_rank(ctx, node, 3 if one_d else 4, type(m).__name__)
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
    front = helper_layer(ctx, node, "to_channels")
    ctx.builder.add_permute(front, _SWAP_C_W, ctx.inp(node.args[0]), front)
    mixed = helper_layer(ctx, node, "pointwise")
    name, out = ctx.layer(node)  # the convolution carries the module's name (and can be updatable)
    ctx.builder.add_convolution(
        name, kernel_channels=w.shape[1], output_channels=w.shape[0], height=1, width=1,
        stride_height=1, stride_width=1, border_mode="valid", groups=1,
        W=np.ascontiguousarray(w.T.reshape(1, 1, w.shape[1], w.shape[0])), b=b,
        has_bias=b is not None, input_name=front, output_name=mixed)
    ctx.builder.add_permute(helper_layer(ctx, node, "back"), _SWAP_C_W, mixed, out)
    return out
