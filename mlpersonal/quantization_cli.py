"""CLI subcommands ``mlpersonal quantize`` and ``mlpersonal compare``.

Each subcommand is a pair (``add_*_args(parser)``, ``run_*(args) -> exit code``), listed in
:data:`COMMANDS`, which ``mlpersonal.cli`` adds to its subcommand table. The first line of a
``run_*`` docstring is the short help; the rest (with an example) is the ``--help`` epilog.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from .errors import InvalidInputError


def add_quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="input .mlmodel")
    p.add_argument("output", help="output .mlmodel")
    p.add_argument("--nbits", type=int, default=8, help="1..8, or 16 for fp16 (default 8)")
    p.add_argument("--mode", default="linear",
                   choices=["linear", "linear_symmetric", "linear_lut", "kmeans"],
                   help="quantization mode (default linear)")
    p.add_argument("--per-layer", action="store_true",
                   help="one linear scale/bias per layer instead of per output channel")
    p.add_argument("--layers", default=None, help="comma-separated layer names to quantize")
    p.add_argument("--quantize-bias", action="store_true", help="quantize biases too")
    p.add_argument("--refuse-updatable", action="store_true",
                   help="fail instead of skipping updatable layers")
    p.add_argument("--compare", default=None, metavar="IMAGES",
                   help="a folder of images: print compare_models(original, quantized) on it")


def run_quantize(args) -> int:
    """Quantize a model's weights (fp16, linear or LUT n-bit); updatable layers stay float32.

    Example:
      mlpersonal quantize stickers.mlmodel stickers-4bit.mlmodel --nbits 4 --mode kmeans
      mlpersonal quantize stickers.mlmodel stickers-fp16.mlmodel --nbits 16 --compare drawings/
    """
    from . import save
    from .quantization import quantize_weights

    layers = [s for s in args.layers.split(",") if s] if args.layers else None
    spec, report = quantize_weights(args.model, args.nbits, args.mode,
                                    per_channel=not args.per_layer, layers=layers,
                                    quantize_bias=args.quantize_bias,
                                    skip_updatable=not args.refuse_updatable, return_report=True)
    save(spec, args.output)
    print(report)
    a, b = os.path.getsize(args.model), os.path.getsize(args.output)
    print(f"\n{args.model}: {a} bytes -> {args.output}: {b} bytes ({b / a:.3f}x)")
    if args.compare:
        from .compare import compare_models

        print()
        print(compare_models(args.model, args.output, args.compare))
    return 0


def add_compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("full", help="full-precision .mlmodel")
    p.add_argument("quantized", help="quantized .mlmodel")
    p.add_argument("data", help="a folder of images (single image input), or an .npz whose "
                                "arrays are named after the inputs (first axis: samples)")


def load_samples(path: str) -> list[dict] | str:
    """A folder stays a folder (images); an ``.npz`` becomes a list of feature dicts."""
    p = Path(path)
    if p.is_dir():
        return str(p)
    if p.suffix == ".npz" and p.is_file():
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        sizes = {len(v) for v in arrays.values()}
        if len(sizes) != 1:
            raise InvalidInputError(f"{p}: arrays have different sample counts {sorted(sizes)}")
        n = sizes.pop()
        return [{k: v[i] for k, v in arrays.items()} for i in range(n)]
    raise InvalidInputError(f"{path}: pass a folder of images or an .npz of input arrays")


def run_compare(args) -> int:
    """Compare a quantized model with the full one: top-1 agreement, max/mean |diff|, SNR.

    Example:
      mlpersonal compare stickers.mlmodel stickers-4bit.mlmodel drawings/
    """
    from .compare import compare_models

    print(compare_models(args.full, args.quantized, load_samples(args.data)))
    return 0


COMMANDS = {
    "quantize": (add_quantize_args, run_quantize),
    "compare": (add_compare_args, run_compare),
}
