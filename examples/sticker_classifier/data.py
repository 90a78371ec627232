"""Procedural sticker sketches: the example's embedded data set (no downloads).

Each class is a small function that returns hand-drawn-looking strokes in a normalised
[-1, 1] box (x right, y down) with its control points jittered per sample.  A sample then gets a
random affine map (rotation, scale, aspect, shear, shift), a smooth wobble along every stroke and
a random pen width; it is drawn with Pillow at 112x112 and box-filtered down to 28x28 grayscale
uint8, white strokes on black (MNIST-like).  Everything is driven by one numpy Generator, so a
seed gives the same images on every machine.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

SIZE = 28
_CANVAS = 112  # drawn at 4x, then box-filtered down
_HALF = _CANVAS / 2
_SPAN = 0.40 * _CANVAS  # normalised 1.0 -> pixels

Stroke = np.ndarray  # (n, 2) polyline; n == 1 means a filled dot
_SHAPES: dict[str, Callable[["_Pen"], list[Stroke]]] = {}


def _shape(name: str):
    def deco(fn):
        _SHAPES[name] = fn
        return fn
    return deco


class _Pen:
    """Jittered geometry helpers bound to one sample's random generator."""

    def __init__(self, rng: np.random.Generator, jitter: float = 0.045):
        self.rng, self.j = rng, jitter

    def u(self, lo: float, hi: float) -> float:
        return float(self.rng.uniform(lo, hi))

    def pts(self, *xy: float, jitter: float | None = None) -> Stroke:
        p = np.asarray(xy, np.float64).reshape(-1, 2)
        return p + self.rng.normal(0.0, self.j if jitter is None else jitter, p.shape)

    def arc(self, cx, cy, rx, ry, a0, a1, n=24, jitter=None) -> Stroke:
        """Ellipse arc from angle a0 to a1 (degrees, clockwise on screen since y is down)."""
        jit = self.j if jitter is None else jitter
        cx, cy = cx + self.rng.normal(0, jit), cy + self.rng.normal(0, jit)
        rx, ry = rx * (1 + self.rng.normal(0, jit)), ry * (1 + self.rng.normal(0, jit))
        a0, a1 = a0 + self.rng.normal(0, 6), a1 + self.rng.normal(0, 6)
        t = np.radians(np.linspace(a0, a1, n))
        return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1)

    def circle(self, cx, cy, r, n=28, jitter=None) -> Stroke:
        start = self.u(0, 360)
        return self.arc(cx, cy, r, r, start, start + 360 + self.u(0, 25), n, jitter)

    def dot(self, cx, cy) -> Stroke:
        return self.pts(cx, cy, jitter=self.j * 0.6)

    def closed(self, *xy: float) -> Stroke:
        p = self.pts(*xy)
        return np.vstack([p, p[:1]])


# ---------------------------------------------------------------- the sticker shapes
@_shape("heart")
def _heart(p: _Pen):
    t = np.linspace(0, 2 * np.pi, 40)
    k = 1 + p.rng.normal(0, 0.15, 3)
    x = np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * k[0] * np.cos(2 * t) - 2 * k[1] * np.cos(3 * t) - k[2] * np.cos(4 * t)) / 16
    return [np.stack([x * p.u(0.85, 1.05), y + 0.1], 1) + p.rng.normal(0, 0.015, (40, 2))]


@_shape("star")
def _star(p: _Pen):
    a = np.radians(-90 + 144 * np.arange(6) + p.rng.normal(0, 4, 6))
    r = 0.95 * (1 + p.rng.normal(0, 0.06, 6))
    s = np.stack([r * np.cos(a), r * np.sin(a) + 0.08], 1)
    s[-1] = s[0] + p.rng.normal(0, 0.03, 2)
    return [s]


@_shape("smiley")
def _smiley(p: _Pen):
    return [p.circle(0, 0, 0.9), p.dot(-0.32, -0.25), p.dot(0.32, -0.25),
            p.arc(0, 0.05, 0.5, 0.42, 20, 160, 16)]


@_shape("arrow")
def _arrow(p: _Pen):
    return [p.pts(-0.9, 0, 0.85, 0), p.pts(0.4, -0.45, 0.88, 0.0, 0.4, 0.45)]


@_shape("lightning")
def _lightning(p: _Pen):
    return [p.pts(0.35, -0.95, -0.35, 0.1, 0.25, 0.0, -0.3, 0.95)]


@_shape("sun")
def _sun(p: _Pen):
    r0 = p.u(0.35, 0.45)
    strokes = [p.circle(0, 0, r0)]
    off = p.u(0, 45)
    for k in range(8):
        a = np.radians(off + 45 * k + p.rng.normal(0, 5))
        c, s = np.cos(a), np.sin(a)
        strokes.append(p.pts(c * (r0 + 0.15), s * (r0 + 0.15), c * 0.92, s * 0.92, jitter=0.03))
    return strokes


@_shape("house")
def _house(p: _Pen):
    return [p.closed(-0.65, -0.05, -0.65, 0.9, 0.65, 0.9, 0.65, -0.05),
            p.pts(-0.85, 0.0, 0.0, -0.85, 0.85, 0.0),
            p.pts(-0.15, 0.9, -0.15, 0.4, 0.15, 0.4, 0.15, 0.9)]


@_shape("moon")
def _moon(p: _Pen):
    a = p.u(35, 55)
    outer = p.arc(0, 0, 0.9, 0.9, a, 360 - a, 28, jitter=0.02)
    inner = p.arc(0.45, 0, 0.65, 0.72, 360 - a - 40, a + 40, 20, jitter=0.02)
    return [np.vstack([outer, inner, outer[:1]])]


@_shape("cloud")
def _cloud(p: _Pen):
    return [np.vstack([p.pts(-0.8, 0.45), p.arc(-0.55, 0.15, 0.33, 0.32, 110, 250, 10),
                       p.arc(-0.15, -0.2, 0.42, 0.42, 190, 330, 12),
                       p.arc(0.45, 0.0, 0.38, 0.38, 240, 420, 12), p.pts(0.8, 0.45, -0.8, 0.45)])]


@_shape("tree")
def _tree(p: _Pen):
    return [p.pts(-0.15, 0.95, -0.15, 0.6, -0.75, 0.6, -0.3, 0.1, -0.6, 0.1, -0.2, -0.4, -0.42, -0.4,
                  0.0, -0.95, 0.42, -0.4, 0.2, -0.4, 0.6, 0.1, 0.3, 0.1, 0.75, 0.6, 0.15, 0.6, 0.15, 0.95)]


@_shape("fish")
def _fish(p: _Pen):
    body = p.arc(-0.15, 0, 0.65, 0.42, 0, 360, 30)
    tail = p.closed(0.45, 0.0, 0.95, -0.4, 0.95, 0.4)
    return [body, tail, p.dot(-0.5, -0.08)]


@_shape("cat face")
def _cat(p: _Pen):
    return [p.arc(0, 0.15, 0.75, 0.65, -30, 210, 24), p.pts(-0.65, -0.15, -0.6, -0.9, -0.2, -0.48),
            p.pts(0.65, -0.15, 0.6, -0.9, 0.2, -0.48), p.pts(-0.2, -0.48, 0.2, -0.48),
            p.dot(-0.3, 0.05), p.dot(0.3, 0.05),
            p.pts(-0.15, 0.35, -0.9, 0.25), p.pts(0.15, 0.35, 0.9, 0.25),
            p.pts(-0.15, 0.42, -0.85, 0.55), p.pts(0.15, 0.42, 0.85, 0.55)]


@_shape("flower")
def _flower(p: _Pen):
    strokes = [p.circle(0, -0.3, 0.18), p.pts(0.0, -0.05, 0.05, 0.95)]
    off = p.u(0, 72)
    for k in range(5):
        a = np.radians(off + 72 * k)
        c, s = np.cos(a), np.sin(a)
        cx, cy = 0.42 * c, -0.3 + 0.42 * s
        t = np.radians(np.linspace(0, 360, 14))
        pet = np.stack([0.25 * np.cos(t), 0.14 * np.sin(t)], 1)
        rot = np.array([[c, s], [-s, c]])
        strokes.append(pet @ rot + [cx, cy] + p.rng.normal(0, 0.02, 2))
    return strokes


@_shape("umbrella")
def _umbrella(p: _Pen):
    canopy = p.arc(0, 0.0, 0.95, 0.75, 180, 360, 20)
    scallops = np.vstack([p.arc(0.95 - 0.32 * (2 * k + 1), 0.0, 0.32, 0.16, 0, 180, 8, jitter=0.02)
                          for k in range(3)])
    handle = np.vstack([p.pts(0.0, -0.05, 0.0, 0.7), p.arc(-0.18, 0.7, 0.18, 0.2, 0, 180, 8)])
    return [np.vstack([canopy, scallops]), handle]


@_shape("key")
def _key(p: _Pen):
    return [p.circle(-0.6, 0, 0.32), p.pts(-0.28, 0, 0.9, 0),
            p.pts(0.9, 0.0, 0.9, 0.3), p.pts(0.6, 0.0, 0.6, 0.25)]


@_shape("bell")
def _bell(p: _Pen):
    left = p.pts(-0.15, -0.8, -0.45, -0.6, -0.52, 0.0, -0.6, 0.4, -0.85, 0.6)
    right = left[::-1] * [-1, 1] + p.rng.normal(0, 0.03, left.shape)
    return [np.vstack([left, right, p.pts(0.0, -0.88), left[:1]]),
            p.arc(0, 0.68, 0.18, 0.14, 0, 360, 12), p.circle(0, -0.9, 0.1, 10)]


@_shape("cup")
def _cup(p: _Pen):
    return [p.pts(-0.75, -0.6, -0.65, 0.55, -0.5, 0.75, 0.3, 0.75, 0.45, 0.55, 0.5, -0.6),
            p.pts(-0.75, -0.6, 0.5, -0.6), p.arc(0.5, 0.0, 0.35, 0.3, -80, 90, 12),
            p.pts(-0.5, -0.75, -0.4, -0.95), p.pts(-0.1, -0.75, 0.0, -0.95)]


@_shape("note")
def _note(p: _Pen):
    head = p.arc(-0.3, 0.6, 0.3, 0.2, 0, 360, 16)
    head = np.vstack([head, head * 0.6 + head.mean(0) * 0.4])  # scribbled fill
    return [head, p.pts(-0.02, 0.6, 0.0, -0.85), p.pts(0.0, -0.85, 0.25, -0.6, 0.55, -0.45, 0.45, -0.1)]


@_shape("envelope")
def _envelope(p: _Pen):
    return [p.closed(-0.9, -0.55, 0.9, -0.55, 0.9, 0.6, -0.9, 0.6), p.pts(-0.9, -0.55, 0.0, 0.1, 0.9, -0.55)]


@_shape("crown")
def _crown(p: _Pen):
    return [p.closed(-0.8, 0.55, -0.9, -0.6, -0.45, -0.05, 0.0, -0.75, 0.45, -0.05, 0.9, -0.6, 0.8, 0.55),
            p.pts(-0.8, 0.3, 0.8, 0.3, jitter=0.03)]


@_shape("diamond")
def _diamond(p: _Pen):
    return [p.closed(-0.45, -0.6, 0.45, -0.6, 0.9, -0.15, 0.0, 0.9, -0.9, -0.15),
            p.pts(-0.9, -0.15, 0.9, -0.15), p.pts(-0.2, -0.6, 0.0, 0.9, 0.2, -0.6)]


@_shape("spiral")
def _spiral(p: _Pen):
    turns = p.u(2.2, 2.9)
    t = np.linspace(0, 2 * np.pi * turns, 70)
    r = 0.95 * t / t[-1]
    ph = p.u(0, 2 * np.pi)
    return [np.stack([r * np.cos(t + ph), r * np.sin(t + ph)], 1)]


@_shape("checkmark")
def _check(p: _Pen):
    return [p.pts(-0.8, 0.0, -0.3, 0.6, 0.85, -0.75)]


@_shape("plus")
def _plus(p: _Pen):
    return [p.pts(0, -0.9, 0, 0.9), p.pts(-0.9, 0, 0.9, 0)]


@_shape("cross")
def _cross(p: _Pen):
    return [p.pts(-0.75, -0.75, 0.75, 0.75), p.pts(0.75, -0.75, -0.75, 0.75)]


@_shape("triangle")
def _triangle(p: _Pen):
    return [p.closed(0.0, -0.85, 0.9, 0.7, -0.9, 0.7)]


@_shape("mushroom")
def _mushroom(p: _Pen):
    cap = np.vstack([p.arc(0, 0.05, 0.9, 0.75, 180, 360, 20), p.pts(0.9, 0.05, -0.9, 0.05)])
    return [cap, p.pts(-0.25, 0.05, -0.3, 0.85, 0.3, 0.85, 0.25, 0.05), p.dot(-0.35, -0.3), p.dot(0.3, -0.4)]


@_shape("balloon")
def _balloon(p: _Pen):
    string = np.stack([0.08 * np.sin(np.linspace(0, 3 * np.pi, 14) + p.u(0, 3)),
                       np.linspace(0.42, 0.98, 14)], 1)
    return [p.arc(0, -0.35, 0.5, 0.62, 0, 360, 26), p.closed(0, 0.27, -0.1, 0.42, 0.1, 0.42), string]


@_shape("ice cream")
def _icecream(p: _Pen):
    drip = np.stack([np.linspace(-0.6, 0.6, 16), -0.1 + 0.07 * np.sin(np.linspace(0, 5 * np.pi, 16))], 1)
    return [p.pts(-0.45, -0.05, 0.0, 0.95, 0.45, -0.05), p.arc(0, -0.4, 0.6, 0.5, 165, 375, 20),
            drip + p.rng.normal(0, 0.03, 2), p.pts(-0.25, 0.45, 0.2, 0.0, jitter=0.03),
            p.pts(0.25, 0.45, -0.2, 0.0, jitter=0.03)]


@_shape("anchor")
def _anchor(p: _Pen):
    return [p.circle(0, -0.75, 0.17, 12), p.pts(0, -0.58, 0, 0.85), p.pts(-0.4, -0.3, 0.4, -0.3),
            p.arc(0, 0.25, 0.7, 0.6, 0, 180, 18), p.pts(0.55, 0.2, 0.72, 0.3, 0.85, 0.15),
            p.pts(-0.55, 0.2, -0.72, 0.3, -0.85, 0.15)]


@_shape("candle")
def _candle(p: _Pen):
    return [p.closed(-0.3, -0.2, 0.3, -0.2, 0.3, 0.95, -0.3, 0.95), p.pts(0.0, -0.2, 0.0, -0.4),
            p.pts(0.0, -0.45, -0.18, -0.65, 0.0, -0.98, 0.18, -0.65, 0.0, -0.45)]


@_shape("glasses")
def _glasses(p: _Pen):
    return [p.circle(-0.5, 0.1, 0.34), p.circle(0.5, 0.1, 0.34), p.arc(0, 0.05, 0.16, 0.1, 200, 340, 6),
            p.pts(-0.84, 0.05, -0.95, -0.35), p.pts(0.84, 0.05, 0.95, -0.35)]


@_shape("leaf")
def _leaf(p: _Pen):
    top = p.arc(0.0, 0.6, 0.9, 1.2, 215, 325, 14)
    return [np.vstack([top, p.arc(0.0, -0.6, 0.9, 1.2, 35, 145, 14), top[:1]]),
            p.pts(-0.8, 0.0, 0.98, 0.0), p.pts(-0.95, 0.0, -1.0, 0.25)]


@_shape("sailboat")
def _sailboat(p: _Pen):
    return [p.closed(-0.9, 0.45, 0.9, 0.45, 0.55, 0.85, -0.55, 0.85), p.pts(0.0, 0.45, 0.0, -0.95),
            p.pts(0.0, -0.9, 0.7, 0.3, 0.0, 0.3)]


@_shape("snowman")
def _snowman(p: _Pen):
    return [p.circle(0, 0.45, 0.48), p.circle(0, -0.35, 0.33, 22), p.circle(0, -0.8, 0.2, 14),
            p.dot(0, 0.25), p.dot(0, 0.55)]


@_shape("lollipop")
def _lollipop(p: _Pen):
    return [p.circle(0, -0.4, 0.5), p.arc(0, -0.4, 0.25, 0.25, 0, 300, 12), p.pts(0.0, 0.1, 0.0, 0.98)]


CLASSES: list[str] = list(_SHAPES)
NEW_STICKERS: list[str] = ["anchor", "crown", "glasses", "sailboat", "umbrella"]
BASE_STICKERS: list[str] = [c for c in CLASSES if c not in NEW_STICKERS]


# ---------------------------------------------------------------- rendering
def _resample(s: Stroke, step: float = 0.04) -> tuple[Stroke, np.ndarray]:
    seg = np.linalg.norm(np.diff(s, axis=0), axis=1)
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    n = max(2, int(arc[-1] / step) + 1)
    t = np.linspace(0.0, arc[-1], n)
    return np.stack([np.interp(t, arc, s[:, 0]), np.interp(t, arc, s[:, 1])], 1), t


def _wobble(s: Stroke, rng: np.random.Generator, amp: float) -> Stroke:
    s, t = _resample(s)
    f = rng.uniform(0.5, 2.0, (2, 2))  # cycles per unit length, two sines per axis
    ph = rng.uniform(0, 2 * np.pi, (2, 2))
    a = rng.normal(0, amp, (2, 2))
    d = (a[:, :, None] * np.sin(2 * np.pi * f[:, :, None] * t + ph[:, :, None])).sum(1)
    return s + d.T


def _corners(s: Stroke, min_turn: float = 0.35) -> np.ndarray:
    """Indices of a polyline's two ends and of its vertices turning by more than ~20 degrees."""
    v = np.diff(s, axis=0)
    v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-9)
    turn = 1.0 - (v[1:] * v[:-1]).sum(1)  # 1 - cos(angle)
    return np.concatenate([[0], np.flatnonzero(turn > 1 - np.cos(min_turn)) + 1, [len(s) - 1]])


def draw_sticker(name: str, rng: np.random.Generator) -> np.ndarray:
    """One random drawing of sticker ``name``: uint8 array (28, 28), white strokes on black."""
    strokes = _SHAPES[name](_Pen(rng))
    th = np.radians(rng.uniform(-15, 15))
    sc = rng.uniform(0.7, 1.0)
    asp = rng.uniform(0.85, 1.15)
    sh = rng.uniform(-0.15, 0.15)
    m = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]]) @ np.array(
        [[sc * asp, sh * sc], [0.0, sc / asp]])
    shift = rng.uniform(-0.12, 0.12, 2)
    width = rng.uniform(6.0, 11.0)
    wob = rng.uniform(0.005, 0.025)
    img = Image.new("L", (_CANVAS, _CANVAS), 0)
    d = ImageDraw.Draw(img)
    w = int(round(width))
    r = (w - 1) / 2
    for s in strokes:
        if len(s) == 1:
            c = (s[0] @ m.T + shift) * _SPAN + _HALF
            rd = width * rng.uniform(0.6, 1.0)
            d.ellipse([c[0] - rd, c[1] - rd, c[0] + rd, c[1] + rd], fill=255)
            continue
        s = (_wobble(s, rng, wob) @ m.T + shift) * _SPAN + _HALF
        d.line([tuple(q) for q in s.tolist()], fill=255, width=w)
        for c in s[_corners(s)].tolist():  # round pen at ends and sharp turns (cheaper than joint="curve")
            d.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], fill=255)
    return np.asarray(img.reduce(_CANVAS // SIZE), dtype=np.uint8)


def make_dataset(classes: Sequence[str], per_class: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """``per_class`` drawings of each class: (images uint8 [N, 28, 28], labels), class-interleaved.

    Deterministic for a seed; each (class, index) sample draws from its own stream, so the same
    seed gives the same drawing of a class whatever other classes are requested.
    """
    unknown = [c for c in classes if c not in _SHAPES]
    if unknown:
        raise ValueError(f"unknown sticker class(es) {unknown}; choose from {CLASSES}")
    images = np.empty((len(classes) * per_class, SIZE, SIZE), np.uint8)
    labels: list[str] = []
    k = 0
    for i in range(per_class):
        for c in classes:
            rng = np.random.default_rng([seed, CLASSES.index(c), i])
            images[k] = draw_sticker(c, rng)
            labels.append(c)
            k += 1
    return images, labels


def save_grid(path: str, classes: Sequence[str], per_class: int = 8, seed: int = 0, scale: int = 3) -> None:
    """Write a PNG with one row of drawings per class (for eyeballing the generator)."""
    images, _ = make_dataset(classes, per_class, seed)
    grid = images.reshape(per_class, len(classes), SIZE, SIZE).transpose(1, 2, 0, 3)
    grid = grid.reshape(len(classes) * SIZE, per_class * SIZE)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


if __name__ == "__main__":
    import time

    t = time.perf_counter()
    x, y = make_dataset(CLASSES, 100, 0)
    dt = time.perf_counter() - t
    print(f"{len(CLASSES)} classes ({len(BASE_STICKERS)} base, {len(NEW_STICKERS)} new); "
          f"{len(y)} images in {dt:.2f} s ({len(y) / dt:.0f}/s)")
    save_grid("/tmp/stickers.png", CLASSES, 10, 0)
