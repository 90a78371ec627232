"""exporters.converter: torch modules -> specs that coremltools accepts and the runtime runs exactly
like torch (oracle: the torch module itself, in eval mode)."""

import copy
import sys
import types
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mlpersonal as mp
from exporters.converter import ClassifierConfig, convert

ct = pytest.importorskip("coremltools")


# --- architectures ----------------------------------------------------------------------------

class Sticker(nn.Module):
    """The sticker CNN: 3x [conv3x3 + ReLU + maxpool2], 576 -> 128 -> 10."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(576, 128), nn.ReLU(),
                                        nn.Dropout(0.5), nn.Linear(128, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 5)

    def forward(self, x):
        return torch.sigmoid(self.fc2(self.act(self.fc1(x))))


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 6)
        self.bn1 = nn.BatchNorm1d(6)
        self.bn_plain = nn.BatchNorm2d(8, affine=False)

    def forward(self, x):
        x = F.relu(self.bn_plain(self.bn(self.conv(x))))
        return self.bn1(self.fc(x.view(x.size(0), -1)))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                   nn.Conv2d(8, 8, 3, padding="same"), nn.BatchNorm2d(8))
        self.relu = nn.ReLU()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.relu(self.stem(x))
        y = self.block(x)
        x = self.relu(x + y)
        x = torch.add(x, self.block(x))  # the block again: a module used twice
        return self.head(x)


class GlobalPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(24, 3)

    def forward(self, x):
        x = F.relu(self.conv(x))
        a = torch.flatten(self.pool(x), 1)
        b = x.mean((2, 3))
        return self.fc(torch.cat([a, b * 2.0], dim=1))


class Branches(nn.Module):
    def __init__(self):
        super().__init__()
        self.left = nn.Conv2d(3, 4, 1)
        self.right = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Sigmoid())
        self.gate = nn.Conv2d(3, 10, 1)
        self.pool = nn.AvgPool2d(3, stride=2, padding=1)

    def forward(self, x):
        y = torch.cat([self.left(x), self.right(x)], 1)
        y = y * torch.sigmoid(self.gate(x))
        return (self.pool(y) + 1.5 - y.mean((2, 3)).view(-1, 10, 1, 1)) / 4 - 0.25 * 2


class Mix(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.a1 = nn.Linear(12, 16), nn.LeakyReLU(0.2)
        self.fc2, self.a2 = nn.Linear(16, 16), nn.ELU(0.7)
        self.fc3, self.a3 = nn.Linear(16, 8), nn.Tanh()
        self.out = nn.Linear(8, 4)
        self.softmax = nn.Softmax(dim=1)

    def forward(self, x):
        x = self.a1(self.fc1(x))
        x = F.leaky_relu(self.a2(self.fc2(x)), 0.05) + F.elu(x)
        x = self.a3(self.fc3(x - x * 0.5)) - torch.sigmoid(self.fc3(x))
        return self.softmax(self.out(x))


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, stride=2, padding=2, dilation=2, groups=2)
        self.dw = nn.Conv2d(8, 8, (3, 5), padding=(1, 2), groups=8)
        self.pw = nn.Conv2d(8, 6, 1)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = self.pool(F.relu(self.dw(x)))
        return self.pw(x).reshape(x.shape[0], -1)


class RGBNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 5, stride=3)
        self.fc = nn.Linear(5 * 5 * 5, 3)
        self.logsm = nn.LogSoftmax(dim=1)

    def forward(self, x):
        return self.logsm(self.fc(F.max_pool2d(F.relu(self.conv(x)), 2).flatten(1)))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand, ReLU6, 3x3 depthwise, ReLU6, 1x1 project, + input."""

    def __init__(self, c: int, act=nn.ReLU6, se: nn.Module | None = None):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c, 3 * c, 1, bias=False), nn.BatchNorm2d(3 * c), act(),
            nn.Conv2d(3 * c, 3 * c, 3, padding=1, groups=3 * c, bias=False), nn.BatchNorm2d(3 * c),
            act(), *([se] if se is not None else []),
            nn.Conv2d(3 * c, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.body(x)


class SqueezeExcite(nn.Module):
    """Channel attention: global pool -> 1x1 conv -> ReLU -> 1x1 conv -> gate, times the input."""

    def __init__(self, c: int, gate):
        super().__init__()
        self.pool, self.reduce, self.expand = nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)
        self.gate = gate

    def forward(self, x):
        return x * self.gate(self.expand(F.relu(self.reduce(self.pool(x)))))


class MobileNetV2ish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.blocks = nn.Sequential(InvertedResidual(8), InvertedResidual(8))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))

    def forward(self, x):
        return self.head(F.relu6(self.blocks(self.stem(x))))


class MobileNetV3ish(nn.Module):
    """Hardswish, squeeze-excitation with a hard sigmoid gate, functional hardswish too."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Hardswish())
        self.block = InvertedResidual(8, nn.Hardswish, SqueezeExcite(24, nn.Hardsigmoid()))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.hardswish(self.block(self.stem(x)))
        return self.fc(F.hardsigmoid(x).mean((2, 3)))


class EfficientNetish(nn.Module):
    """SiLU (module and function), squeeze-excitation with a sigmoid gate."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU())
        self.block = InvertedResidual(8, nn.SiLU, SqueezeExcite(24, nn.Sigmoid()))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.silu(self.block(self.stem(x))), 1), 1))


class MoreActivations(nn.Module):
    """PReLU (per channel and shared), Softplus, Hardtanh, and upsampling: nearest, bilinear
    with aligned corners (module and function)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.prelu, self.prelu1 = nn.PReLU(6, init=0.1), nn.PReLU(init=-0.3)
        self.softplus, self.softplus2 = nn.Softplus(), nn.Softplus(beta=2.0)
        self.hardtanh = nn.Hardtanh(-0.5, 0.8)
        self.up, self.up_aligned = nn.Upsample(scale_factor=2), nn.UpsamplingBilinear2d(scale_factor=2)
        with torch.no_grad():
            self.prelu.weight.copy_(torch.linspace(-0.5, 0.5, 6))

    def forward(self, x):
        x = self.conv(x)
        a = self.prelu1(self.prelu(x)) + self.softplus(x) - self.softplus2(x)
        b = F.hardtanh(self.hardtanh(x) * 3.0, -1.0, 2.0)
        y = self.up(a) + self.up_aligned(b) + F.interpolate(b, scale_factor=2, mode="bilinear",
                                                            align_corners=True)
        return F.relu6(F.interpolate(y, size=(y.shape[2] * 3, y.shape[3] * 2), mode="nearest") * 4.0)


def _random_affine(*norms: nn.LayerNorm) -> None:
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in norms:
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)


class TransformerMLP(nn.Module):
    """A transformer block's MLP on a feature vector: LayerNorm, exact and tanh GELU (module and
    function), a residual."""

    def __init__(self):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(24), nn.Linear(24, 48), nn.Linear(48, 24)
        self.act, self.head = nn.GELU(), nn.Linear(24, 6)
        _random_affine(self.norm)

    def forward(self, x):
        h = x + self.fc2(F.gelu(self.act(self.fc1(self.norm(x))) * 2.0, approximate="tanh"))
        return self.head(h)


class ConvLayerNorm(nn.Module):
    """LayerNorm over a whole (C, H, W) feature map (with and without affine parameters), GELU."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)
        self.norm = nn.LayerNorm((8, 7, 6), eps=1e-3)
        self.plain = nn.LayerNorm((4, 7, 6), elementwise_affine=False)
        self.act = nn.GELU(approximate="tanh")
        _random_affine(self.norm)

    def forward(self, x):
        return self.plain(self.conv2(self.act(self.norm(self.conv1(x)))))


class NormsAndPads(nn.Module):
    """GroupNorm (affine, and one group without), InstanceNorm2d (affine; with running
    statistics), zero / reflection / replication / constant padding (modules and F.pad)."""

    def __init__(self):
        super().__init__()
        self.conv, self.gn, self.gn1 = nn.Conv2d(3, 8, 3), nn.GroupNorm(4, 8), nn.GroupNorm(1, 8, affine=False)
        self.inn, self.inr = nn.InstanceNorm2d(8, affine=True), nn.InstanceNorm2d(8, track_running_stats=True)
        self.zero, self.reflect = nn.ZeroPad2d((1, 2, 0, 3)), nn.ReflectionPad2d(2)
        self.replicate = nn.ReplicationPad2d((2, 1, 1, 0))
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for m in (self.gn, self.inn):
                m.weight.copy_(torch.rand(8, generator=g) + 0.5)
                m.bias.copy_(torch.randn(8, generator=g) * 0.5)
            self.inr.running_mean.copy_(torch.randn(8, generator=g))
            self.inr.running_var.copy_(torch.rand(8, generator=g) + 0.5)

    def forward(self, x):
        h = self.inn(self.reflect(self.gn(self.conv(self.zero(x)))))
        return F.pad(self.gn1(self.inr(self.replicate(h))), (1, 1, 2, 2), value=0.5)


class ElementwiseMath(nn.Module):
    """exp, log, sqrt, rsqrt, abs (function, method, builtin), reciprocal, number / tensor,
    powers, clamp / clip with one or two bounds, F.normalize of the result."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        h = self.fc(x)
        a = torch.exp(h.clamp(max=3.0)) + h.abs().sqrt() + torch.log(h.abs() + 1.0)
        b = 2.0 / (h.abs() + 1.0) + torch.rsqrt(h * h + 1.0) + abs(h) ** 1.5 + torch.reciprocal(h.clamp(1.0, 4.0))
        c = torch.clamp(h, min=-0.5) + h.clip(-1.0, 1.0) + h.pow(2)
        return F.normalize(a + b + c, dim=1)


class Transposed(nn.Module):
    """ConvTranspose2d: stride + padding + output_padding, groups, dilation without bias, and
    output_padding past the full result (rows holding the bias only); ConvTranspose1d."""

    def __init__(self):
        super().__init__()
        self.d1 = nn.ConvTranspose2d(3, 8, 3, stride=2, padding=1, output_padding=1)
        self.d2 = nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1, groups=2)
        self.d3 = nn.ConvTranspose2d(4, 2, 3, padding=0, dilation=2, bias=False)
        self.d4 = nn.ConvTranspose2d(2, 2, 2, stride=3, output_padding=2)

    def forward(self, x):
        return self.d4(self.d3(torch.relu(self.d2(torch.relu(self.d1(x))))))


class Transposed1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.d = nn.ConvTranspose1d(3, 5, 5, stride=2, padding=2, output_padding=1)

    def forward(self, x):
        return self.d(x)


class SuperResolution(nn.Module):
    """ESPCN-style upsampling: PixelShuffle / F.pixel_shuffle and PixelUnshuffle /
    F.pixel_unshuffle (factors 2 and 3) between convolutions."""

    def __init__(self):
        super().__init__()
        self.conv, self.shuffle = nn.Conv2d(3, 12, 3, padding=1), nn.PixelShuffle(2)
        self.unshuffle, self.mix = nn.PixelUnshuffle(2), nn.Conv2d(12, 18, 1)

    def forward(self, x):
        h = self.shuffle(self.conv(x))
        h = self.mix(self.unshuffle(h) + F.pixel_unshuffle(torch.relu(h), 2))
        return F.pixel_shuffle(h, 3)


class ConvNeXtBlock(nn.Module):
    """A ConvNeXt block: depthwise 7 x 7, then channels-last (permute) LayerNorm, Linear, GELU,
    Linear, permuted back, residual."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.dw, self.norm = nn.Conv2d(c, c, 7, padding=3, groups=c), nn.LayerNorm(c, eps=1e-6)
        self.pw1, self.act, self.pw2 = nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c)
        _random_affine(self.norm)

    def forward(self, x):
        h = self.dw(x).permute(0, 2, 3, 1)
        return x + self.pw2(self.act(self.pw1(self.norm(h)))).permute(0, 3, 1, 2)


class Mixer(nn.Module):
    """An MLP-Mixer layer on (N, L, C) tokens: token mixing through transpose(1, 2), channel
    mixing on the last axis, LayerNorm per token (with and without affine parameters); a head."""

    def __init__(self, tokens: int = 6, channels: int = 5, classes: int = 4):
        super().__init__()
        self.norm1, self.tok = nn.LayerNorm(channels), nn.Linear(tokens, tokens)
        self.norm2, self.ch = nn.LayerNorm(channels, elementwise_affine=False), nn.Linear(channels, channels)
        self.head = nn.Linear(tokens * channels, classes)
        _random_affine(self.norm1)

    def forward(self, x):
        x = x + self.tok(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        x = x + self.ch(self.norm2(x))
        return self.head(x.flatten(1))


class Reductions(nn.Module):
    """CBAM-style spatial attention (channel mean / amax with keepdim) and sums, means, amax,
    amin over channels, height, width and their combinations, with and without keepdim."""

    def __init__(self):
        super().__init__()
        self.conv, self.spatial = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(2, 1, 7, padding=3)

    def forward(self, x):
        h = self.conv(x)
        h = h * torch.sigmoid(self.spatial(torch.cat([h.mean(1, keepdim=True), h.amax(1, keepdim=True)], 1)))
        a = h.sum((2, 3)) + h.amin(dim=(2, 3)) + h.mean((1, 2, 3), keepdim=True).flatten(1)
        return torch.cat([a, torch.sum(h, 1).mean(2), h.amax(3).sum(2)], 1)


class SlicesAndChunks(nn.Module):
    """torch.chunk (a GLU), torch.split with unequal sections, slices with steps and negative
    bounds over channels, height and width, chunk of the input along W, slicing a vector."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 12, 3, padding=1), nn.Linear(10, 4)

    def forward(self, x):
        h = self.conv(x)
        a, b = torch.chunk(h, 2, dim=1)
        p, q, r = h.split([2, 4, 6], 1)
        crop = torch.cat([p, r[:, 1:3], q[:, ::2]], 1)[:, :, 1:-1, 2:]
        glu = (a * torch.sigmoid(b))[:, :, ::2, 1::3].mean((2, 3))
        return torch.cat([crop.mean((2, 3)), glu, self.fc(x.chunk(3, dim=3)[1].flatten(1)[:, :10])], 1)


class TinyUNet(nn.Module):
    """A U-Net: conv blocks with BatchNorm, max-pool down, ConvTranspose2d up, F.pad to the skip
    connection's size (odd input sizes), channel concatenation, a 1 x 1 head."""

    def __init__(self):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

        self.down1, self.down2, self.pool = block(3, 8), block(8, 16), nn.MaxPool2d(2)
        self.bottom, self.up1 = block(16, 16), nn.ConvTranspose2d(16, 16, 2, stride=2)
        self.dec1, self.up2 = block(32, 8), nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.dec2, self.head = block(16, 8), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        s1 = self.down1(x)
        s2 = self.down2(self.pool(s1))
        u = self.up1(self.bottom(self.pool(s2)))
        u = F.pad(u, (0, s2.shape[3] - u.shape[3], 0, s2.shape[2] - u.shape[2]))
        u = self.up2(self.dec1(torch.cat([u, s2], 1)))
        u = F.pad(u, (0, s1.shape[3] - u.shape[3], 0, s1.shape[2] - u.shape[2]))
        return self.head(self.dec2(torch.cat([u, s1], 1)))


class Decoder(nn.Module):
    """An autoencoder's decoder: Linear -> Unflatten to a feature map -> ConvTranspose2d; then
    reshapes across ranks (view / reshape / unflatten / flatten)."""

    def __init__(self):
        super().__init__()
        self.fc, self.unflatten = nn.Linear(10, 60), nn.Unflatten(1, (4, 3, 5))
        self.up = nn.ConvTranspose2d(4, 2, 2, stride=2)

    def forward(self, z):
        h = self.up(torch.relu(self.unflatten(self.fc(z))))
        t = h.reshape(h.shape[0], 12, 10)
        return torch.cat([t.view(-1, 6, 4, 5).flatten(1), t.unflatten(1, (3, 4)).flatten(1)], 1)


class Extremes(nn.Module):
    """torch.max / min(x, dim)[0] (values, keepdim or not), elementwise torch.maximum /
    torch.min(a, b), negation."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)

    def forward(self, x):
        h = self.conv(x)
        pooled = torch.max(h, dim=1, keepdim=True)[0] + h.min(1, keepdim=True)[0]
        rows = torch.max(h, 3)[0].amax(2, keepdim=True)  # (N, C, H) -> (N, C, 1)
        return torch.cat([pooled.flatten(1), rows.flatten(1), F.adaptive_max_pool2d(h, (5, 3)).flatten(1),
                          (torch.maximum(h, -h) + torch.min(h, h * 0.5)).mean((2, 3))], 1)


class Shrinks(nn.Module):
    """Softsign, Mish, Hardshrink, Softshrink, Tanhshrink (modules and functions)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.acts = nn.ModuleList([nn.Softsign(), nn.Mish(), nn.Hardshrink(0.3), nn.Softshrink(0.4),
                                   nn.Tanhshrink()])

    def forward(self, x):
        h = self.fc(x) * 3.0
        return torch.cat([a(h) for a in self.acts] + [F.mish(h), F.hardshrink(h), F.softshrink(h, 0.2)], 1)


class Broadcasts(nn.Module):
    """expand / expand_as over height and width, repeat along the channels, argmax over the
    channels (a segmentation class map) and over the height, .float()."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        h = self.conv(x)
        s = h.mean((2, 3), keepdim=True)
        r = torch.cat([h.repeat(1, 2, 1, 1), s.expand_as(h) * h + s.expand(-1, -1, 5, 6)], 1)
        classes = torch.argmax(r, dim=1, keepdim=True).float()
        return torch.cat([r, classes, r.argmax(2).float().unsqueeze(2).expand(-1, -1, 5, -1)], 1)


def _torch_sgd(net, x, y, lr: float, epochs: int, batch: int = 4) -> None:
    """The reference: torch.optim.SGD on ``net``'s trainable parameters, cross-entropy,
    mini-batches in order (the update tasks here run unshuffled)."""
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=lr)
    for _ in range(epochs):
        for s in range(0, len(x), batch):
            loss = F.cross_entropy(net(x[s:s + batch]), y[s:s + batch])
            opt.zero_grad()
            loss.backward()
            opt.step()


def _randomize(module):
    """Random non-trivial BatchNorm statistics/affine params; eval mode."""
    g = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.randn(m.num_features, generator=g))
                m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return module.eval()


def _nn(spec):
    return getattr(spec, spec.WhichOneof("Type"))


def _roundtrip(spec, tmp_path):
    ct.models.MLModel(spec)  # coremltools accepts it
    path = tmp_path / "m.mlmodel"
    mp.save(spec, path)
    back = mp.load_spec(path)
    assert back == spec
    return back


def _array_case(module, shape, tmp_path, n=5, **kw):
    module = _randomize(module)
    spec = convert(module, [mp.TensorType("x", shape)], **kw)
    spec = _roundtrip(spec, tmp_path)
    x = torch.randn(n, *shape)
    with torch.no_grad():
        ref = module(x)
    outs = mp.load(spec).predict_batch([{"x": a.numpy()} for a in x])
    return spec, ref, outs


ARRAY_CASES = {
    "mlp": (MLP, (20,)),
    "batchnorm": (BNNet, (3, 8, 8)),
    "residual": (Residual, (3, 9, 7)),
    "global_pool": (GlobalPool, (3, 10, 10)),
    "branches": (Branches, (3, 11, 9)),
    "grouped_conv": (Grouped, (4, 16, 15)),
    "mobilenet_v2_blocks": (MobileNetV2ish, (3, 16, 16)),
    "mobilenet_v3_blocks": (MobileNetV3ish, (3, 16, 16)),
    "efficientnet_blocks": (EfficientNetish, (3, 12, 12)),
    "more_activations": (MoreActivations, (3, 5, 4)),
    "transformer_mlp": (TransformerMLP, (24,)),
    "conv_layernorm": (ConvLayerNorm, (3, 7, 6)),
    "norms_and_pads": (NormsAndPads, (3, 9, 10)),
    "elementwise_math": (ElementwiseMath, (6,)),
    "transposed_convs": (Transposed, (3, 5, 6)),
    "transposed_conv1d": (Transposed1d, (3, 11)),
    "pixel_shuffle": (SuperResolution, (3, 4, 5)),
    "convnext_block": (ConvNeXtBlock, (8, 9, 10)),
    "mlp_mixer": (Mixer, (6, 5)),
    "reductions": (Reductions, (3, 6, 7)),
    "slices_and_chunks": (SlicesAndChunks, (3, 8, 9)),
    "unet": (TinyUNet, (3, 13, 11)),
    "decoder_reshapes": (Decoder, (10,)),
    "extremes": (Extremes, (3, 5, 6)),
    "shrinks": (Shrinks, (8,)),
    "broadcasts": (Broadcasts, (3, 5, 6)),
}


@pytest.mark.parametrize("case", sorted(ARRAY_CASES))
def test_array_models_match_torch(case, tmp_path):
    cls, shape = ARRAY_CASES[case]
    spec, ref, outs = _array_case(cls(), shape, tmp_path, regressor="y")
    assert spec.WhichOneof("Type") == "neuralNetworkRegressor"
    assert spec.specificationVersion >= 4
    got = np.stack([o["y"] for o in outs])
    assert got.shape == tuple(ref.shape)
    names = {layer.name for layer in _nn(spec).layers}
    weighted = [p for p, m in cls().named_modules()
                if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm,
                                  nn.ConvTranspose2d, nn.ConvTranspose1d))]
    assert weighted and set(weighted) <= names  # every weighted module is the layer of its path
    assert np.abs(got - ref.numpy()).max() <= 1e-5


def test_layer_names_are_module_paths(tmp_path):
    spec, _, _ = _array_case(Residual(), (3, 9, 7), tmp_path)
    names = [layer.name for layer in _nn(spec).layers]
    assert names == ["stem", "relu", "block.0", "block.1", "block.2", "block.3", "block.4", "add",
                     "relu@2", "block.0@2", "block.1@2", "block.2@2", "block.3@2", "block.4@2",
                     "add_1", "head"]
    kinds = [layer.WhichOneof("layer") for layer in _nn(spec).layers]
    assert kinds[:4] == ["convolution", "activation", "convolution", "batchnorm"]
    assert kinds[7] == "add"
    # the model's one output is the last layer's blob
    assert _nn(spec).layers[-1].output[0] == "output"


def test_sticker_classifier_with_image_input(tmp_path):
    m = _randomize(Sticker())
    labels = ["heart", "star", "sun", "house", "cat", "dog", "tree", "car", "moon", "fish"]
    spec = convert(m, [mp.ImageType("image", (1, 28, 28), color="grayscale", scale=1 / 255.0)],
                   classifier=ClassifierConfig(labels=labels),
                   metadata={"author": "me", "license": "MIT", "description": "stickers",
                             "version": "1.2", "user_defined": {"k": "v"}})
    spec = _roundtrip(spec, tmp_path)
    nn_spec = spec.neuralNetworkClassifier
    assert [la.name for la in nn_spec.layers] == [
        "features.0", "features.1", "features.2", "features.3", "features.4", "features.5",
        "features.6", "features.7", "features.8", "classifier.0", "classifier.1", "classifier.2",
        "classifier.4", "softmax"]
    assert nn_spec.layers[-1].WhichOneof("layer") == "softmax"
    assert list(nn_spec.stringClassLabels.vector) == labels
    assert spec.description.predictedFeatureName == "label"
    assert spec.description.predictedProbabilitiesName == "labelProbs"
    assert spec.description.input[0].type.imageType.colorSpace == 10  # GRAYSCALE
    assert nn_spec.preprocessing[0].scaler.channelScale == pytest.approx(1 / 255.0)
    md = spec.description.metadata
    assert (md.author, md.license, md.shortDescription, md.versionString) == ("me", "MIT", "stickers", "1.2")
    assert dict(md.userDefined) == {"k": "v"}

    pixels = np.random.default_rng(0).integers(0, 256, (6, 28, 28)).astype(np.uint8)
    outs = mp.load(spec).predict_batch([{"image": p} for p in pixels])
    with torch.no_grad():
        ref = torch.softmax(m(torch.from_numpy(pixels[:, None] / 255.0).float()), 1).numpy()
    got = np.array([[o["labelProbs"][k] for k in labels] for o in outs])
    assert np.abs(got - ref).max() <= 1e-5
    assert [o["label"] for o in outs] == [labels[i] for i in ref.argmax(1)]


@pytest.mark.parametrize("color", ["rgb", "bgr"])
def test_color_classifier_scale_bias_logsoftmax(color, tmp_path):
    m = _randomize(RGBNet())
    bias = [-0.5, 0.1, 0.25]  # in the model's colour order
    spec = convert(m, [mp.ImageType("photo", (3, 32, 32), color=color, scale=0.02, bias=bias)],
                   classifier=ClassifierConfig(labels=[3, 7, 11], predicted_feature_name="cls",
                                               probabilities_name="p"))
    spec = _roundtrip(spec, tmp_path)
    nn_spec = spec.neuralNetworkClassifier
    assert list(nn_spec.int64ClassLabels.vector) == [3, 7, 11]
    kinds = [la.WhichOneof("layer") for la in nn_spec.layers]
    assert kinds[-1] == "softmax" and nn_spec.layers[-1].name == "logsm"  # LogSoftmax -> softmax
    rgb = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3)).astype(np.uint8)
    outs = mp.load(spec).predict_batch([{"photo": a} for a in rgb])
    chw = rgb.transpose(0, 3, 1, 2).astype(np.float32)
    if color == "bgr":
        chw = chw[:, ::-1]
    x = torch.from_numpy(chw * 0.02 + np.array(bias, np.float32).reshape(1, 3, 1, 1))
    with torch.no_grad():
        ref = torch.exp(m(x)).numpy()
    got = np.array([[o["p"][k] for k in (3, 7, 11)] for o in outs])
    assert np.abs(got - ref).max() <= 1e-5
    assert [o["cls"] for o in outs] == [[3, 7, 11][i] for i in ref.argmax(1)]


def test_activation_mix_classifier_keeps_its_softmax(tmp_path):
    m = _randomize(Mix())
    spec = convert(m, [mp.TensorType("x", (12,))], classifier=ClassifierConfig(labels=list("abcd")))
    spec = _roundtrip(spec, tmp_path)
    layers = spec.neuralNetworkClassifier.layers
    assert layers[-1].name == "softmax" and layers[-1].output[0] == "labelProbs"
    assert sum(la.WhichOneof("layer") == "softmax" for la in layers) == 1
    acts = {la.name: la.activation.WhichOneof("NonlinearityType") for la in layers
            if la.WhichOneof("layer") == "activation"}
    assert acts["a1"] == "leakyReLU" and acts["a2"] == "ELU" and acts["a3"] == "tanh"
    x = torch.randn(7, 12)
    outs = mp.load(spec).predict_batch([{"x": a.numpy()} for a in x])
    with torch.no_grad():
        ref = m(x).numpy()
    got = np.array([[o["labelProbs"][k] for k in "abcd"] for o in outs])
    assert np.abs(got - ref).max() <= 1e-5


def test_multiple_outputs_and_identity_output(tmp_path):
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.drop = nn.Dropout()

        def forward(self, x):
            h = self.fc(x)
            return h, torch.relu(h), self.drop(x), h

    m = Two().eval()
    keys = ["h", "r", "same", "h2"]
    spec = convert(m, [mp.TensorType("x", (4,))], outputs=keys)
    spec = _roundtrip(spec, tmp_path)
    assert [o.name for o in spec.description.output] == keys
    x = torch.randn(3, 4)
    outs = mp.load(spec).predict_batch([{"x": a.numpy()} for a in x])
    with torch.no_grad():
        refs = m(x)
    for key, ref in zip(keys, refs):
        assert np.abs(np.stack([o[key] for o in outs]) - ref.numpy()).max() <= 1e-6


def test_unsupported_module_names_op_and_path():
    m = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.Threshold(0.1, 20.0)))
    with pytest.raises(mp.UnsupportedLayerError, match=r"'1\.1'.*Threshold"):
        convert(m, [mp.TensorType("x", (4,))])


def test_unsupported_function_names_op():
    class Erf(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return torch.erf(self.fc(x))

    with pytest.raises(mp.UnsupportedLayerError, match="erf"):
        convert(Erf(), [mp.TensorType("x", (4,))])


def test_unsupported_arguments_are_refused():
    with pytest.raises(mp.UnsupportedLayerError, match="dim=1"):
        convert(nn.Sequential(nn.Conv2d(1, 2, 1), nn.Softmax(dim=2)), [mp.TensorType("x", (1, 4, 4))])
    with pytest.raises(mp.UnsupportedLayerError, match="LogSoftmax"):
        convert(nn.Sequential(nn.Linear(3, 3), nn.LogSoftmax(1)), [mp.TensorType("x", (3,))])


@pytest.mark.parametrize("module,what", [
    (nn.Softplus(threshold=5.0), "threshold 5.0 < 15"),
    (nn.Upsample(scale_factor=1.5), "whole upsampling factors only"),
    (nn.Upsample(scale_factor=2, mode="bicubic"), "mode 'bicubic'"),
    (nn.Upsample(scale_factor=2, mode="bilinear"), "align_corners=False"),
])
def test_activations_and_resizes_core_ml_cannot_match_are_refused(module, what):
    with pytest.raises(mp.UnsupportedLayerError, match=what):
        convert(nn.Sequential(nn.Conv2d(3, 4, 1), module), [mp.TensorType("x", (3, 4, 4))])


def test_bad_arguments_raise_conversion_error():
    with pytest.raises(mp.ConversionError, match="channel"):
        mp.ImageType("img", (3, 8, 8), color="grayscale")
    with pytest.raises(mp.ConversionError, match="bias"):
        mp.ImageType("img", (3, 8, 8), bias=[1, 2])
    with pytest.raises(mp.ConversionError, match="color"):
        mp.ImageType("img", (3, 8, 8), color="cmyk")
    with pytest.raises(mp.ConversionError, match="shape"):
        mp.TensorType("x", (3, 4, 5, 6))
    with pytest.raises(mp.ConversionError, match="labels"):
        convert(MLP(), [mp.TensorType("x", (20,))], classifier=ClassifierConfig(labels=list("abc")))
    with pytest.raises(mp.ConversionError, match="declares 2"):
        convert(MLP(), [mp.TensorType("x", (20,)), mp.TensorType("z", (20,))])
    with pytest.raises(mp.ConversionError, match="metadata"):
        convert(MLP(), [mp.TensorType("x", (20,))], metadata={"autor": "typo"})


def test_training_mode_module_is_exported_in_eval_and_restored():
    m = BNNet()
    _randomize(m).train()
    spec = convert(m, [mp.TensorType("x", (3, 8, 8))])
    assert m.training and m.bn.training
    x = torch.randn(2, 3, 8, 8)
    m.eval()
    with torch.no_grad():
        ref = m(x).numpy()
    got = np.stack([o["output"] for o in mp.load(spec).predict_batch([{"x": a.numpy()} for a in x])])
    assert np.abs(got - ref).max() <= 1e-5


def test_respect_trainable_refuses_trainable_batchnorm():
    m = _randomize(BNNet())
    m.conv.requires_grad_(False)
    with pytest.raises(mp.ConversionError, match=r"'bn'.*requires_grad_\(False\)"):
        convert(m, [mp.TensorType("x", (3, 8, 8))], respect_trainable=True)


def test_respect_trainable_passes_updatable_layers(monkeypatch):
    calls = []
    fake = types.ModuleType("exporters.updatable")
    fake.make_updatable = lambda spec, names, update: calls.append((spec, names, update))
    monkeypatch.setitem(sys.modules, "exporters.updatable", fake)
    m = Sticker().eval()
    m.requires_grad_(False)
    m.classifier[4].requires_grad_(True)
    m.features[6]._mlpersonal_updatable = True
    cfg = object()
    spec = convert(m, [mp.TensorType("x", (1, 28, 28))], classifier=ClassifierConfig(labels=list("0123456789")),
                   respect_trainable=True, update=cfg)
    assert len(calls) == 1 and calls[0][0] is spec
    assert calls[0][1] == ["features.6", "classifier.4"] and calls[0][2] is cfg
    # without respect_trainable nothing is updatable and the hook is not called
    spec = convert(m, [mp.TensorType("x", (1, 28, 28))], classifier=ClassifierConfig(labels=list("0123456789")))
    assert len(calls) == 1 and not spec.isUpdatable


def test_custom_conversion_function_writes_custom_layer(tmp_path):
    class Swish(nn.Module):
        def __init__(self):
            super().__init__()
            self.beta = nn.Parameter(torch.tensor([1.5, 2.0]))

        def forward(self, x):
            return x * torch.sigmoid(self.beta[0] * x)

    m = nn.Sequential(nn.Linear(3, 3), Swish(), nn.Linear(3, 2))

    def swish(mod):
        return {"className": "Swish", "description": "x * sigmoid(beta x)",
                "parameters": {"beta": 1.5, "n": 2, "tag": "s", "on": True}, "weights": [mod.beta]}

    spec = convert(m, [mp.TensorType("x", (3,))], custom_conversion_functions={Swish: swish})
    ct.models.MLModel(spec)
    layer = spec.neuralNetwork.layers[1]
    assert layer.name == "1" and layer.WhichOneof("layer") == "custom"
    c = layer.custom
    assert c.className == "Swish" and c.description == "x * sigmoid(beta x)"
    assert c.parameters["beta"].doubleValue == 1.5 and c.parameters["n"].intValue == 2  # int32 fits: intValue, as coremltools writes
    assert c.parameters["tag"].stringValue == "s" and c.parameters["on"].boolValue
    assert list(c.weights[0].floatValue) == [1.5, 2.0]
    assert list(layer.input) == [spec.neuralNetwork.layers[0].output[0]]


def test_two_inputs_concat_and_regressor_list(tmp_path):
    class TwoIn(nn.Module):
        def __init__(self):
            super().__init__()
            self.img = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten())
            self.fc = nn.Linear(4 + 5, 2)

        def forward(self, image, extra):
            h = self.fc(torch.cat([self.img(image), extra], 1))
            return h, torch.tanh(h)

    m = TwoIn().eval()
    spec = convert(m, [mp.TensorType("image", (3, 6, 6)), mp.TensorType("extra", (5,))],
                   regressor=["a", "b"])
    spec = _roundtrip(spec, tmp_path)
    assert [f.name for f in spec.description.input] == ["image", "extra"]
    # the flatten of (N, 4, 1, 1) keeps the blob: no layer
    assert [la.name for la in spec.neuralNetworkRegressor.layers][:5] == ["img.0", "img.1", "img.2", "cat", "fc"]
    img, extra = torch.randn(4, 3, 6, 6), torch.randn(4, 5)
    outs = mp.load(spec).predict_batch([{"image": a.numpy(), "extra": b.numpy()} for a, b in zip(img, extra)])
    with torch.no_grad():
        ra, rb = m(img, extra)
    assert np.abs(np.stack([o["a"] for o in outs]) - ra.numpy()).max() <= 1e-5
    assert np.abs(np.stack([o["b"] for o in outs]) - rb.numpy()).max() <= 1e-5


def test_public_names_resolve_to_functions():
    import exporters.converter as module  # importing the submodule must not shadow mp.convert

    assert mp.convert is module.convert and callable(mp.convert)
    assert mp.ClassifierConfig is ClassifierConfig
    from mlpersonal.features import ImageType, TensorType

    assert mp.ImageType is ImageType and mp.TensorType is TensorType


def test_bare_leaf_module_is_one_layer(tmp_path):
    m = nn.Conv2d(2, 3, 3, padding=1).eval()
    spec = _roundtrip(convert(m, [mp.TensorType("x", (2, 5, 5))]), tmp_path)
    assert [la.name for la in spec.neuralNetwork.layers] == ["conv2d"]
    x = torch.randn(2, 2, 5, 5)
    got = np.stack([o["output"] for o in mp.load(spec).predict_batch([{"x": a.numpy()} for a in x])])
    with torch.no_grad():
        assert np.abs(got - m(x).numpy()).max() <= 1e-5


def test_mobilenet_style_features_under_a_personalized_head_train_like_torch(tmp_path):
    """The on-device pattern with a mobile architecture: frozen MobileNetV3-style features
    (hardswish, squeeze-excitation, depthwise convs), an updatable head; the update equals
    torch.optim.SGD on the head, and the same module exported to ONNX runs like torch."""
    from exporters.onnx_export import to_onnx

    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(3)
    net = _randomize(MobileNetV3ish())
    net.requires_grad_(False)
    net.fc.requires_grad_(True)
    labels = list("abcde")
    spec = convert(net, [mp.TensorType("x", (3, 16, 16))], classifier=ClassifierConfig(labels),
                   respect_trainable=True,
                   update=mp.UpdateConfig(optimizer=mp.SGD(learning_rate=0.5, mini_batch_size=4),
                                          epochs=3, shuffle=False))
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8) % 5
    trained = mp.load(spec).update([{"x": a.numpy(), "label": labels[int(t)]} for a, t in zip(x, y)])
    _torch_sgd(net, x, y, lr=0.5, epochs=3)
    fc = next(l for l in _nn(trained.spec).layers if l.name == "fc")
    assert fc.isUpdatable and sum(l.isUpdatable for l in _nn(trained.spec).layers) == 1
    np.testing.assert_allclose(np.asarray(fc.innerProduct.weights.floatValue).reshape(5, 8),
                               net.fc.weight.detach().numpy(), atol=1e-5)
    path = to_onnx(net, [mp.TensorType("x", (3, 16, 16))], tmp_path / "m.onnx")
    (got,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, net(x).numpy(), atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_a_module_trained_on_the_gpu_exports_where_it_is(tmp_path):
    """convert, to_onnx and is_flexible run a cuda module on cuda examples; the written model
    predicts like the module; the module stays on its device."""
    import onnxruntime as ort

    from exporters.flexible import is_flexible

    m = _randomize(Sticker()).cuda()
    labels = [f"c{i}" for i in range(10)]
    inputs = [mp.ImageType("image", (1, 28, 28), color="grayscale", scale=1 / 255.0)]
    spec = _roundtrip(convert(m, inputs, classifier=ClassifierConfig(labels=labels)), tmp_path)
    onnx_path = mp.to_onnx(m, inputs, tmp_path / "m.onnx")
    assert next(m.parameters()).is_cuda and is_flexible(m, (1, 28, 28)) is not None
    pixels = np.random.default_rng(0).integers(0, 256, (6, 28, 28)).astype(np.uint8)
    x = torch.from_numpy(pixels[:, None] / 255.0).float()
    with torch.no_grad():  # reference on the cpu (cuDNN may run TF32)
        logits = copy.deepcopy(m).cpu()(x)
    outs = mp.load(spec, compute_units="cpu_only").predict_batch([{"image": p} for p in pixels])
    got = np.array([[o["labelProbs"][k] for k in labels] for o in outs])
    np.testing.assert_allclose(got, torch.softmax(logits, 1).numpy(), atol=1e-5)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"image": x.numpy()})[0], logits.numpy(), atol=1e-4)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_from_classic_layers_is_torchs_over_a_wide_range(approximate):
    """Exact GELU through an erf approximation (A&S 7.1.26) and tanh GELU by its formula, from
    iOS 11 layers only (valid in any network); through the plan and the eager network."""
    spec = convert(nn.GELU(approximate=approximate), [mp.TensorType("x", (2001,))], regressor="y")
    assert all(layer.WhichOneof("layer") in ("activation", "unary", "multiply", "add")
               for layer in _nn(spec).layers)
    z = np.linspace(-12, 12, 2001, dtype=np.float32)
    with torch.no_grad():
        want = F.gelu(torch.from_numpy(z), approximate=approximate).numpy()
    for plan in (True, False):
        m = mp.load(spec, compute_units="cpu_only")
        m.use_plan = plan
        got = m.predict({"x": z})["y"]
        assert (np.abs(got - want) / np.maximum(1.0, np.abs(z))).max() <= 1e-6


def test_layernorm_over_some_but_not_all_or_the_last_axis_is_refused_with_the_reason():
    class LastAxis(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm((5, 6))

        def forward(self, x):
            return self.norm(x)

    with pytest.raises(mp.UnsupportedLayerError, match=r"norm.*LayerNorm over \(5, 6\) of a \(3, 5, 6\)"):
        convert(LastAxis(), [mp.TensorType("x", (3, 5, 6))])


def test_updatable_layers_before_gelu_and_layernorm_train_like_torch():
    """Core ML cannot backpropagate through the layers GELU and LayerNorm export to (the exporter
    says so); this runtime does: every Linear updatable, SGD, equals torch.optim.SGD."""
    torch.manual_seed(4)
    net = TransformerMLP().eval()
    for p in net.norm.parameters():
        p.requires_grad_(False)
    labels = list("abcdef")
    with pytest.warns(RuntimeWarning, match="cannot backpropagate"):
        spec = convert(net, [mp.TensorType("x", (24,))], classifier=ClassifierConfig(labels),
                       respect_trainable=True,
                       update=mp.UpdateConfig(optimizer=mp.SGD(learning_rate=0.1, mini_batch_size=4),
                                              epochs=2, shuffle=False))
    x, y = torch.randn(8, 24), torch.arange(8) % 6
    trained = mp.load(spec, compute_units="cpu_only").update(
        [{"x": a.numpy(), "label": labels[int(t)]} for a, t in zip(x, y)])
    _torch_sgd(net, x, y, lr=0.1, epochs=2)
    layers = {l.name: l for l in _nn(trained.spec).layers}
    for name in ("fc1", "fc2", "head"):
        mod = getattr(net, name)
        np.testing.assert_allclose(np.asarray(layers[name].innerProduct.weights.floatValue).reshape(mod.weight.shape),
                                   mod.weight.detach().numpy(), atol=1e-5)


class Motion1D(nn.Module):
    """A 1-D CNN over (3 axes, 50 steps) sensor windows: Conv1d (padding, 'same' with an even
    kernel, stride + dilation + groups), BatchNorm1d, Max/AvgPool1d, adaptive and mean pooling
    over time. (torch exports 'same' with dilation as an auto_pad that onnxruntime refuses.)"""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.c1, self.bn = nn.Conv1d(3, 16, 5, padding=2), nn.BatchNorm1d(16)
        self.p1, self.c2 = nn.MaxPool1d(2), nn.Conv1d(16, 32, 4, padding="same")
        self.c3 = nn.Conv1d(32, 32, 3, stride=2, padding=2, dilation=2, groups=4)
        self.p2 = nn.AvgPool1d(3, stride=1, padding=1)
        self.gap, self.fc = nn.AdaptiveAvgPool1d(1), nn.Linear(32, classes)

    def forward(self, x):
        h = self.p1(F.relu(self.bn(self.c1(x))))
        h = self.p2(F.relu(self.c3(F.relu(self.c2(h)))))
        return self.fc(self.gap(h).flatten(1))


def test_a_1d_cnn_over_sensor_windows_exports_and_personalizes_like_torch(tmp_path):
    """A (C, L) input read by Conv1d (no recurrent module) is a 1-D feature map: Core ML input
    (C, 1, L); predictions equal torch's through the plan and the eager network; every conv and
    the head updatable: the update equals torch.optim.SGD; to_onnx gives a fixed (C, L) input."""
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(5)
    net = _randomize(Motion1D())
    net.bn.requires_grad_(False)
    labels = ["walk", "run", "sit"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # Core ML can backpropagate through all
        spec = convert(net, [mp.TensorType("motion", (3, 50))], classifier=ClassifierConfig(labels),
                       respect_trainable=True,
                       update=mp.UpdateConfig(optimizer=mp.SGD(learning_rate=0.05, mini_batch_size=4),
                                              epochs=2, shuffle=False))
    spec = _roundtrip(spec, tmp_path)
    assert list(spec.description.input[0].type.multiArrayType.shape) == [3, 1, 50]
    x, y = torch.randn(8, 3, 50), torch.arange(8) % 3
    with torch.no_grad():
        ref = torch.softmax(net(x), 1).numpy()
    for plan in (True, False):
        m = mp.load(spec, compute_units="cpu_only")
        m.use_plan = plan
        got = m.predict_batch(mp.ArrayBatchProvider({"motion": x.numpy()[:, :, None]}))
        np.testing.assert_allclose(got.column("labelProbs").values, ref, atol=1e-5)
    trained = mp.load(spec, compute_units="cpu_only").update(
        [{"motion": a.numpy()[:, None], "label": labels[int(t)]} for a, t in zip(x, y)])
    _torch_sgd(net, x, y, lr=0.05, epochs=2)
    layers = {l.name: l for l in _nn(trained.spec).layers}
    for name in ("c1", "c2", "c3"):
        want = getattr(net, name).weight.detach().numpy()  # (Cout, Cin/g, k) = Core ML's (Cout, Cin/g, 1, k)
        np.testing.assert_allclose(np.asarray(layers[name].convolution.weights.floatValue).reshape(want.shape),
                                   want, atol=1e-5)
    path = mp.to_onnx(net, [mp.TensorType("motion", (3, 50))], tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape[1:] == [3, 50]
    with torch.no_grad():
        np.testing.assert_allclose(sess.run(None, {"motion": x.numpy()})[0], net(x).numpy(), atol=1e-5)


def test_1d_padding_mean_over_time_and_adaptive_max_pool1d_match_torch(tmp_path):
    class Pools(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.amp = nn.Conv1d(4, 6, 3), nn.AdaptiveMaxPool1d(4)
            self.pad = nn.ReflectionPad1d((2, 1))

        def forward(self, x):
            h = torch.relu(self.conv(F.pad(self.pad(x), (1, 0), mode="replicate")))
            pooled = F.max_pool1d(h, 3, 2, 1) + F.avg_pool1d(h, 3, 2, 1, count_include_pad=False)
            return torch.cat([h.mean(2), self.amp(h).flatten(1), h.mean(-1, keepdim=True).flatten(1),
                              pooled.flatten(1)], 1)

    spec, ref, outs = _array_case(Pools(), (4, 18), tmp_path, regressor="y")
    got = np.stack([o["y"] for o in outs])
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-5)


@pytest.mark.parametrize("pad,mode", [((1, 1, 1, 1, 1, 1), "constant"), ((1, 1, 1, 1), "circular"),
                                      ((-1, 0), "constant")])
def test_padding_core_ml_has_no_layer_for_is_refused_with_the_reason(pad, mode):
    class Pad(nn.Module):
        def forward(self, x):
            return F.pad(x, pad, mode=mode)

    with pytest.raises(mp.UnsupportedLayerError, match=r"padding .* in mode"):
        convert(Pad(), [mp.TensorType("x", (3, 6, 6))])


@pytest.mark.parametrize("fn,what", [
    (lambda x: F.normalize(x, dim=1), r"normalize with p=2.*\(3, 4, 4\)"),  # per pixel
    (lambda x: torch.clamp(x, min=x.mean()), "changes the batch axis"),  # x.mean(): a 0-d tensor
    (lambda x: torch.clamp(x, min=x * 0.5), "clamp except with number bounds"),
    (lambda x: 2 ** x, "power except tensor \\*\\* number"),
    (lambda x: x.sum((1, 3)), r"sum over dims \[1, 3\]"),
    (lambda x: x[:, 0], "only slices of the non-batch axes"),
    (lambda x: x[1:], "changes the batch axis"),
])
def test_math_reductions_and_indexing_core_ml_cannot_match_are_refused(fn, what):
    class F1(nn.Module):
        def forward(self, x):
            return fn(x)

    with pytest.raises(mp.UnsupportedLayerError, match=what):
        convert(F1(), [mp.TensorType("x", (3, 4, 4))])


def test_linear_layers_on_the_last_axis_of_tokens_train_like_torch():
    """Linear on (N, L, C) tokens exports as a 1 x 1 convolution between two permutes; the
    convolution carries the module's name, so it can be updatable: Mixer's token and channel
    mixing and its head, SGD, equal torch.optim.SGD."""
    torch.manual_seed(6)
    net = Mixer().eval()
    net.norm1.requires_grad_(False)
    labels = list("abcd")
    with pytest.warns(RuntimeWarning, match="cannot backpropagate"):  # permute, mvn, add
        spec = convert(net, [mp.TensorType("x", (6, 5))], classifier=ClassifierConfig(labels),
                       respect_trainable=True,
                       update=mp.UpdateConfig(optimizer=mp.SGD(learning_rate=0.1, mini_batch_size=4),
                                              epochs=2, shuffle=False))
    layers = {l.name: l for l in _nn(spec).layers}
    assert layers["tok"].WhichOneof("layer") == "convolution" and layers["tok"].isUpdatable
    x, y = torch.randn(8, 6, 5), torch.arange(8) % 4
    trained = mp.load(spec, compute_units="cpu_only").update(
        [{"x": a.numpy(), "label": labels[int(t)]} for a, t in zip(x, y)])
    _torch_sgd(net, x, y, lr=0.1, epochs=2)
    layers = {l.name: l for l in _nn(trained.spec).layers}
    for name in ("tok", "ch"):
        want = getattr(net, name).weight.detach().numpy()
        np.testing.assert_allclose(np.asarray(layers[name].convolution.weights.floatValue).reshape(want.shape),
                                   want, atol=1e-5)
    np.testing.assert_allclose(np.asarray(layers["head"].innerProduct.weights.floatValue).reshape(4, 30),
                               net.head.weight.detach().numpy(), atol=1e-5)
