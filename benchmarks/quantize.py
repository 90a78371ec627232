"""Quantization benchmark on a sticker-like CNN: float vs 8/4/2/1-bit linear and LUT, PTQ and QAT.

Prints, per variant: file size, its ratio to the theoretical size, top-1 accuracy and agreement
with the float model (all predictions by the mlpersonal runtime on the saved .mlmodel files).

Theoretical size = float file - 4 B x quantized weights + n/8 B x quantized weights + 4 B x table
values (scale/bias or LUT): what n-bit storage costs with no overhead; "x n/32" is the plain
size / float-file ratio next to n/32. Targets: size <= 1.03x theoretical, 8-bit PTQ agreement
>= 99.5 %, 4-bit QAT accuracy within 1.0 pt of float.

Data: ``--data synthetic`` (default: 10 procedurally drawn shape classes, generated here) or
``--data sticker`` (examples.sticker_classifier.data, when that example is present).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mlpersonal as mp  # noqa: E402
from examples.sticker_classifier.model import StickerNet  # noqa: E402
from exporters.quantized import apply_qat_weights  # noqa: E402
from mlpersonal import codecs  # noqa: E402
from mlpersonal.quantization import weight_slots  # noqa: E402
from trainers.qat import prepare_qat  # noqa: E402

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
SHAPES = ["circle", "square", "triangle", "plus", "cross", "ring", "diamond", "bars", "star",
          "arrow"]


# --- data ---------------------------------------------------------------------------------------
def _draw(kind: str, rng: np.random.Generator) -> np.ndarray:
    S = 84
    img = Image.new("L", (S, S), 0)
    d = ImageDraw.Draw(img)
    c = np.array([S / 2, S / 2]) + rng.normal(0, 5, 2)
    r = rng.uniform(16, 30)
    w = int(rng.integers(4, 9))
    a = rng.uniform(0, 2 * np.pi) if kind not in ("plus", "cross", "bars", "arrow") \
        else rng.normal(0, 0.25)

    def rot(pts):
        pts = np.asarray(pts, float) * r
        R = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        return [tuple(p) for p in (pts @ R.T + c + rng.normal(0, 1.5, pts.shape))]

    if kind == "circle":
        d.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], fill=255)
    elif kind == "ring":
        d.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], outline=255, width=w)
    elif kind == "square":
        d.polygon(rot([[-0.8, -0.8], [0.8, -0.8], [0.8, 0.8], [-0.8, 0.8]]), outline=255, width=w)
    elif kind == "diamond":
        d.polygon(rot([[0, -1], [0.6, 0], [0, 1], [-0.6, 0]]), fill=255)
    elif kind == "triangle":
        d.polygon(rot([[0, -1], [0.9, 0.7], [-0.9, 0.7]]), outline=255, width=w)
    elif kind in ("plus", "cross"):
        b = np.pi / 4 if kind == "cross" else 0.0
        for t in (b, b + np.pi / 2):
            p = rot([[np.cos(t), np.sin(t)], [-np.cos(t), -np.sin(t)]])
            d.line(p, fill=255, width=w)
    elif kind == "bars":
        for y in (-0.6, 0.0, 0.6):
            d.line(rot([[-0.9, y], [0.9, y]]), fill=255, width=w)
    elif kind == "star":
        t = np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        d.polygon(rot(np.stack([rad * np.cos(t), -rad * np.sin(t)], 1)), fill=255)
    elif kind == "arrow":
        d.line(rot([[-0.9, 0], [0.9, 0]]), fill=255, width=w)
        d.line(rot([[0.3, -0.5], [0.9, 0], [0.3, 0.5]]), fill=255, width=w)
    small = np.asarray(img.resize((28, 28), Image.BOX), np.float32)
    small = small + rng.normal(0, 12, small.shape)          # sensor-ish noise
    return np.clip(small, 0, 255).astype(np.uint8)


def synthetic(n_per_class: int, seed: int):
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for i in range(n_per_class):
        for k, s in enumerate(SHAPES):
            xs.append(_draw(s, rng))
            ys.append(k)
    return np.stack(xs), np.array(ys)


def sticker(n_per_class: int, seed: int):
    from examples.sticker_classifier.data import CLASSES, make_dataset

    classes = list(CLASSES)[:10]
    x, labels = make_dataset(classes, n_per_class, seed)
    return x, np.array([classes.index(c) for c in labels])


def float_weight(m):
    p = getattr(m, "parametrizations", None)
    return (p.weight.original if p is not None else m.weight).detach().cpu().numpy()


def build_spec(net: StickerNet, labels):
    """Classifier spec with float weights, layers named by module path (image input, 1/255)."""
    from coremltools.models import datatypes
    from coremltools.models.neural_network import NeuralNetworkBuilder

    b = NeuralNetworkBuilder([("image", datatypes.Array(1, 28, 28))], [("probs", None)],
                             mode="classifier")
    blob = "image"
    for i, cin in enumerate([1, 16, 32], 1):
        conv = getattr(net.features, f"conv{i}")
        b.add_convolution(f"features.conv{i}", kernel_channels=cin,
                          output_channels=conv.out_channels, height=3, width=3, stride_height=1,
                          stride_width=1, border_mode="same", groups=1,
                          W=float_weight(conv).transpose(2, 3, 1, 0),
                          b=conv.bias.detach().numpy(), has_bias=True, input_name=blob,
                          output_name=f"c{i}")
        b.add_activation(f"features.relu{i}", "RELU", f"c{i}", f"r{i}")
        b.add_pooling(f"features.pool{i}", 2, 2, 2, 2, "MAX", padding_type="VALID",
                      input_name=f"r{i}", output_name=f"p{i}")
        blob = f"p{i}"
    b.add_flatten("embedding.flatten", 0, blob, "flat")
    fc = net.embedding.fc
    b.add_inner_product("embedding.fc", W=float_weight(fc), b=fc.bias.detach().numpy(),
                        input_channels=576, output_channels=128, has_bias=True,
                        input_name="flat", output_name="fc")
    b.add_activation("embedding.relu", "RELU", "fc", "emb")
    cl = net.classifier
    b.add_inner_product("classifier", W=float_weight(cl), b=cl.bias.detach().numpy(),
                        input_channels=128, output_channels=len(labels), has_bias=True,
                        input_name="emb", output_name="logits")
    b.add_softmax("softmax", "logits", "probs")
    b.set_class_labels(labels, predicted_feature_name="label", prediction_blob="probs")
    b.set_pre_processing_parameters(image_input_names=["image"], is_bgr=False,
                                    image_scale=1 / 255.0)
    return b.spec


def train(net, x, y, epochs, lr, batch=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * ((len(x) + batch - 1) // batch))
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()
    net.eval()
    return net


# --- measurement --------------------------------------------------------------------------------
def theoretical(float_size: int, spec) -> tuple[int, int]:
    """(theoretical bytes of spec's storage, quantized value count)."""
    size, nq = float_size, 0
    for layer in spec.neuralNetworkClassifier.layers:
        for s in weight_slots(layer):
            wp = s.wp
            if len(wp.rawValue) and wp.HasField("quantization"):
                n = int(np.prod(s.shape))
                nb = wp.quantization.numberOfBits
                tables = codecs.stored_bytes(wp) - len(wp.rawValue)
                size += -4 * n + n * nb / 8 + tables
                nq += n
    return int(np.ceil(size)), nq


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=["synthetic", "sticker"], default="synthetic")
    ap.add_argument("--train-per-class", type=int, default=300)
    ap.add_argument("--test-per-class", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--qat-epochs", type=int, default=1)
    ap.add_argument("--bits", default="8,4,2,1")
    args = ap.parse_args(argv)
    t0 = time.time()
    make = synthetic if args.data == "synthetic" else sticker
    xtr, ytr = make(args.train_per_class, seed=1)
    xte, yte = make(args.test_per_class, seed=2)
    labels = SHAPES if args.data == "synthetic" else [str(i) for i in range(10)]
    Xtr = torch.from_numpy(xtr).float().div(255).unsqueeze(1)
    Ytr = torch.from_numpy(ytr).long()
    Xte = torch.from_numpy(xte).float().div(255).unsqueeze(1)
    torch.manual_seed(0)
    net = train(StickerNet(len(labels)), Xtr, Ytr, args.epochs, 3e-3)
    t_train = time.time() - t0
    samples = [{"image": im} for im in xte]
    tmp = tempfile.mkdtemp(prefix="mp-quant-bench-")

    def evaluate(spec, name):
        path = os.path.join(tmp, f"{name}.mlmodel")
        mp.save(spec, path)
        m = mp.load(path)
        pred = np.array([labels.index(o["label"]) for o in m.predict_batch(samples)])
        return path, os.path.getsize(path), pred

    fspec = build_spec(net, labels)
    _, fsize, fpred = evaluate(fspec, "float")
    with torch.no_grad():
        tpred = net(Xte).argmax(1).numpy()
    assert (tpred == fpred).mean() > 0.999, "runtime float model disagrees with torch"
    facc = (fpred == yte).mean() * 100
    rows = [("float", "-", 32, fsize, fsize, 0, facc, 100.0, "")]
    bits = [int(b) for b in args.bits.split(",")]
    t1 = time.time()
    for nb in bits:
        for mode, label in (("linear", "linear"), ("kmeans", "LUT")):
            q = mp.quantize_weights(fspec, nb, mode)
            _, size, pred = evaluate(q, f"ptq-{mode}-{nb}")
            th, _ = theoretical(fsize, q)
            rows.append((f"PTQ {label}", nb, nb, size, th, 0, (pred == yte).mean() * 100,
                         (pred == fpred).mean() * 100, ""))
    t_ptq = time.time() - t1
    t2 = time.time()
    for nb in bits:
        for mode, label in (("linear", "linear"), ("palettize", "LUT")):
            qnet = prepare_qat(copy.deepcopy(net), nb, mode)
            train(qnet, Xtr, Ytr, args.qat_epochs, 5e-4, seed=nb)
            q = apply_qat_weights(build_spec(qnet, labels), qnet)
            _, size, pred = evaluate(q, f"qat-{mode}-{nb}")
            th, _ = theoretical(fsize, q)
            with torch.no_grad():
                logits = qnet(Xte[:256])
            got = np.array([[o["probs"][k] for k in labels]
                            for o in mp.load(q).predict_batch(samples[:256])])
            diff = np.abs(got - torch.softmax(logits, 1).numpy()).max()
            rows.append((f"QAT {label}", nb, nb, size, th, 0, (pred == yte).mean() * 100,
                         (pred == fpred).mean() * 100, f"{diff:.1e}"))
    # control: the float model fine-tuned with the same schedule as QAT (QAT's extra epochs)
    ctl = train(copy.deepcopy(net), Xtr, Ytr, args.qat_epochs, 5e-4, seed=99)
    _, _, cpred = evaluate(build_spec(ctl, labels), "float-finetuned")
    cacc = (cpred == yte).mean() * 100
    rows.insert(1, (f"float+{args.qat_epochs}ep", "-", 32, fsize, fsize, 0, cacc,
                    (cpred == fpred).mean() * 100, ""))
    t_qat = time.time() - t2

    print(f"\nquantize benchmark: {args.data} data, {len(xtr)} train / {len(xte)} test images, "
          f"StickerNet ({sum(p.numel() for p in net.parameters())} params)")
    print(f"{'variant':<11} {'bits':>4} {'size B':>8} {'theory B':>9} {'ratio':>6} "
          f"{'x float':>8} {'n/32':>6} {'top-1 %':>8} {'agree %':>8} {'|spec-QAT|':>10}")
    for name, nb, n, size, th, _, acc, agree, diff in rows:  # noqa: B007
        print(f"{name:<11} {nb!s:>4} {size:>8} {th:>9} {size / th:>6.3f} {size / fsize:>8.4f} "
              f"{n / 32:>6.4f} {acc:>8.2f} {agree:>8.2f} {diff:>10}")
    by = {(r[0], r[1]): r for r in rows}
    print("\ntargets:")
    worst = max(r[3] / r[4] for r in rows[1:])
    print(f"  size <= 1.03x theoretical (+tables): worst {worst:.4f} -> "
          f"{'OK' if worst <= 1.03 else 'MISSED'}")
    a8 = by[("PTQ linear", 8)][7] if ("PTQ linear", 8) in by else float("nan")
    l8 = by[("PTQ LUT", 8)][7] if ("PTQ LUT", 8) in by else float("nan")
    print(f"  8-bit PTQ agreement >= 99.5 %: linear {a8:.2f} %, LUT {l8:.2f} % -> "
          f"{'OK' if min(a8, l8) >= 99.5 else 'MISSED'}")
    if ("QAT linear", 4) in by:
        for kind in ("linear", "LUT"):
            qa, pa = by[(f"QAT {kind}", 4)][6], by[(f"PTQ {kind}", 4)][6]
            print(f"  4-bit {kind:<6} QAT accuracy {qa:.2f} % vs float {facc:.2f} % "
                  f"(gap {facc - qa:+.2f} pt; vs float fine-tuned as long {cacc:.2f} %: "
                  f"{cacc - qa:+.2f} pt; PTQ {pa:.2f} %) -> "
                  f"{'OK' if max(facc, cacc) - qa <= 1.0 else 'MISSED'}")
    print(f"  QAT export == QAT module (probabilities, 256 images): worst "
          f"{max(float(r[8]) for r in rows if r[8]):.1e}")
    print(f"\ntime: data+float training {t_train:.1f} s, PTQ {t_ptq:.1f} s, QAT {t_qat:.1f} s, "
          f"total {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
