"""BatchNorm, LayerNorm, GroupNorm, InstanceNorm."""

from __future__ import annotations

import numpy as np
import torch.nn as nn

from . import helper_layer, register_module


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
    mvn = helper_layer(ctx, node, "mvn") if affine else None
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
        rows = helper_layer(ctx, node, "rows")
        b.add_reshape(rows, src, rows, (blob[0] * blob[1], 1, c), 0)
        src = rows
    affine = m.weight is not None
    last = len(shape) == 3 and not affine
    normed = ctx.layer(node) if last else (helper_layer(ctx, node, "mvn"),) * 2
    b.add_mvn(normed[0], src, normed[1], across_channels=False, normalize_variance=True,
              epsilon=float(m.eps))
    out = normed[1]
    if affine:
        beta = None if m.bias is None else m.bias.detach().cpu().float().numpy().reshape(1, 1, c)
        name, scaled = ctx.layer(node) if len(shape) == 3 else (helper_layer(ctx, node, "affine"),) * 2
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
    grouped = helper_layer(ctx, node, "groups")
    ctx.builder.add_reshape(grouped, src, grouped, (g, c // g * h, w), 0)
    normed = helper_layer(ctx, node, "mvn")
    ctx.builder.add_mvn(normed, grouped, normed, across_channels=False, normalize_variance=True,
                        epsilon=float(m.eps))
    if not m.affine:
        name, out = ctx.layer(node)
        ctx.builder.add_reshape(name, normed, out, (c, h, w), 0)
        return out
    back = helper_layer(ctx, node, "chw")
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
    normed = helper_layer(ctx, node, "mvn") if m.affine else None
    name, out = ctx.layer(node)
    ctx.builder.add_mvn(normed or name, ctx.inp(node.args[0]), normed or out, across_channels=False,
                        normalize_variance=True, epsilon=float(m.eps))
    return _channel_affine(ctx, node, m, normed) if m.affine else out
