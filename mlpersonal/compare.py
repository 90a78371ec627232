"""compare_models: how far a quantized model's predictions are from the full-precision model's.

Mirrors coremltools' ``compare_models``, but runs anywhere (on the mlpersonal runtime) and
returns the numbers: top-1 agreement for classifiers, and max/mean absolute difference and SNR
(dB) for every numeric output.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from .errors import InvalidInputError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass
class OutputComparison:
    """Differences on one output, pooled over every sample (reference = the full model)."""

    name: str
    max_abs_diff: float
    mean_abs_diff: float
    snr_db: float         # 10 log10(sum ref^2 / sum (ref - q)^2); inf when identical
    psnr_db: float        # 10 log10(max ref^2 / mean (ref - q)^2)


@dataclass
class ComparisonReport:
    """What :func:`compare_models` measured."""

    num_samples: int
    outputs: dict = field(default_factory=dict)      # name -> OutputComparison
    top1_agreement: Optional[float] = None           # classifiers: share of equal labels
    label_name: Optional[str] = None

    @property
    def max_abs_diff(self) -> float:
        return max((o.max_abs_diff for o in self.outputs.values()), default=0.0)

    @property
    def mean_abs_diff(self) -> float:
        return max((o.mean_abs_diff for o in self.outputs.values()), default=0.0)

    @property
    def snr_db(self) -> float:
        """The lowest SNR over the numeric outputs."""
        return min((o.snr_db for o in self.outputs.values()), default=math.inf)

    def __str__(self) -> str:
        lines = [f"compared on {self.num_samples} samples"]
        if self.top1_agreement is not None:
            lines.append(f"top-1 agreement ({self.label_name}): {100 * self.top1_agreement:.2f} %")
        lines.append(f"{'output':<20} {'max |diff|':>12} {'mean |diff|':>12} {'SNR dB':>9} "
                     f"{'PSNR dB':>9}")
        for o in self.outputs.values():
            lines.append(f"{o.name:<20} {o.max_abs_diff:>12.4g} {o.mean_abs_diff:>12.4g} "
                         f"{o.snr_db:>9.2f} {o.psnr_db:>9.2f}")
        return "\n".join(lines)


def _as_model(m):
    if hasattr(m, "predict_batch"):
        return m
    from runtime import load  # the runtime is where models run; imported only when used

    return load(m)


def _samples(model, sample_data) -> list[dict]:
    if isinstance(sample_data, (str, os.PathLike)):
        folder = Path(sample_data)
        if not folder.is_dir():
            raise InvalidInputError(
                f"sample_data {folder} is not a folder; pass a folder of images or a list of "
                "feature dicts")
        inputs = list(model.spec.description.input)
        images = [fd.name for fd in inputs if fd.type.WhichOneof("Type") == "imageType"]
        if len(inputs) != 1 or len(images) != 1:
            raise InvalidInputError(
                "a folder of images needs a model with exactly one image input; this one has "
                f"inputs {[fd.name for fd in inputs]}. Pass a list of feature dicts instead")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise InvalidInputError(f"no image files ({sorted(IMAGE_EXTENSIONS)}) in {folder}")
        return [{images[0]: str(p)} for p in files]
    if isinstance(sample_data, dict):
        sample_data = [sample_data]
    samples = list(sample_data)
    if not samples or not all(isinstance(s, dict) for s in samples):
        raise InvalidInputError("sample_data must be a non-empty list of feature dicts or a folder")
    return samples


def _numeric(value) -> Optional[np.ndarray]:
    if isinstance(value, dict):
        return np.asarray([value[k] for k in sorted(value, key=str)], dtype=np.float64)
    if isinstance(value, (str, bytes)):
        return None
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr.ravel()


def compare_models(full, quantized, sample_data: Union[str, os.PathLike, Sequence[dict]],
                   *, batch_size: int = 64) -> ComparisonReport:
    """Run both models on ``sample_data`` and compare the quantized outputs with the full ones.

    ``full``/``quantized``: loaded models, specs or paths. ``sample_data``: a list of feature
    dicts, or a folder of images fed to the model's single image input.
    """
    a, b = _as_model(full), _as_model(quantized)
    samples = _samples(a, sample_data)
    outs_a: list[dict] = []
    outs_b: list[dict] = []
    for i in range(0, len(samples), max(1, int(batch_size))):
        chunk = samples[i:i + batch_size]
        outs_a.extend(a.predict_batch(chunk))
        outs_b.extend(b.predict_batch(chunk))
    label = a.spec.description.predictedFeatureName or None  # set for classifiers
    report = ComparisonReport(num_samples=len(samples), label_name=label)
    if label and label in outs_a[0] and label in outs_b[0]:
        same = [ra[label] == rb[label] for ra, rb in zip(outs_a, outs_b)]
        report.top1_agreement = float(np.mean(same))
    for name in outs_a[0]:
        if name == label or name not in outs_b[0]:
            continue
        ra = [_numeric(r[name]) for r in outs_a]
        rb = [_numeric(r[name]) for r in outs_b]
        if any(x is None for x in ra + rb):
            continue
        ref, q = np.concatenate(ra), np.concatenate(rb)
        if ref.shape != q.shape:
            raise InvalidInputError(
                f"output {name!r} has {ref.size} values in the full model but {q.size} in the "
                "quantized one; the models do not match")
        d = ref - q
        noise = float(np.sum(d * d))
        signal = float(np.sum(ref * ref))
        snr = math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-300) / noise)
        peak = float(np.max(ref * ref)) if ref.size else 0.0
        psnr = math.inf if noise == 0 else 10 * math.log10(max(peak, 1e-300) / (noise / d.size))
        report.outputs[name] = OutputComparison(
            name, float(np.max(np.abs(d))) if d.size else 0.0,
            float(np.mean(np.abs(d))) if d.size else 0.0, snr, psnr)
    return report
