"""The ``mlpersonal`` command line: ``inspect`` and ``predict`` (other subcommands plug in here).

Each subcommand is an entry of :data:`COMMANDS`: ``name -> (add_args, run)``. ``add_args(parser)``
declares its arguments; ``run(args) -> int`` does the work and returns the exit status. The first
line of ``run``'s docstring is the short help, the rest (with an example) the ``--help`` epilog.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from .errors import MLPersonalError

AddArgs = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, tuple[AddArgs, Run]] = {}


def register_command(name: str, add_args: AddArgs, run: Run) -> None:
    """Add (or replace) subcommand ``name``."""
    COMMANDS[name] = (add_args, run)


# --- inspect ----------------------------------------------------------------------------------

_ARRAY_TYPES = {65568: "float32", 65600: "float64", 131104: "int32", 65552: "float16"}
_COLOR = {10: "grayscale", 20: "rgb", 30: "bgr"}


def describe_feature(fd) -> str:
    """'image 28x28 grayscale', 'multiArray float32 (1, 28, 28)', 'dictionary(string -> double)'."""
    t = fd.type
    kind = t.WhichOneof("Type")
    if kind == "imageType":
        it = t.imageType
        return f"image {it.width}x{it.height} {_COLOR.get(int(it.colorSpace), str(it.colorSpace))}"
    if kind == "multiArrayType":
        m = t.multiArrayType
        flex = m.WhichOneof("ShapeFlexibility")
        return (f"multiArray {_ARRAY_TYPES.get(int(m.dataType), m.dataType)} {tuple(m.shape)}"
                + (f" (flexible: {flex})" if flex else ""))
    if kind == "dictionaryType":
        key = t.dictionaryType.WhichOneof("KeyType") or "?"
        return f"dictionary({key.replace('KeyType', '')} -> double)"
    return (kind or "undefined").replace("Type", "")


def _weight_messages(msg):
    """Every WeightParams inside ``msg`` (a layer's params message), recursively."""
    for field, value in msg.ListFields():
        if field.message_type is None:
            continue
        values = [value] if hasattr(value, "ListFields") else value  # single or repeated
        for v in values:
            if field.message_type.name == "WeightParams":
                yield v
            elif hasattr(v, "ListFields"):
                yield from _weight_messages(v)


def layer_summary(layer) -> tuple[int, str]:
    """(parameter count, storage e.g. 'float32' or 'fp16+float32') of a NeuralNetworkLayer."""
    from .codecs import count_of, storage_of

    kind = layer.WhichOneof("layer")
    weights = [w for w in _weight_messages(getattr(layer, kind))] if kind else []
    weights = [w for w in weights if count_of(w)]
    storages = sorted({storage_of(w) for w in weights})
    return sum(count_of(w) for w in weights), "+".join(storages) or "-"


def _blob_shapes(spec) -> dict[str, tuple]:
    """Shapes (without batch) of every blob, by running the runtime on zero inputs; {} if it can't."""
    try:
        import torch

        from runtime import load
        from runtime.features import encode_inputs

        m = load(spec)
        if not hasattr(m, "net") or not hasattr(m, "to_blobs"):
            return {}
        example = {}
        for fd in spec.description.input:
            kind = fd.type.WhichOneof("Type")
            if kind == "imageType":
                it = fd.type.imageType
                c = 1 if int(it.colorSpace) == 10 else 3
                example[fd.name] = np.zeros((it.height, it.width) + ((c,) if c == 3 else ()), np.uint8)
            elif kind == "multiArrayType":
                example[fd.name] = np.zeros(tuple(fd.type.multiArrayType.shape), np.float32)
            else:
                example[fd.name] = 0
        feeds = encode_inputs(spec.description.input, [example], m.device)
        with torch.inference_mode():  # run_blobs: ND networks see one example at its shape
            env = m.run_blobs(m.to_blobs(feeds), 1) if hasattr(m, "run_blobs") else m.net(m.to_blobs(feeds))
        return {k: tuple(v.shape[1:]) for k, v in env.items() if hasattr(v, "shape")}
    except Exception:  # noqa: BLE001 -- shapes are a courtesy; inspect works without them
        return {}


def _fmt_shape(shapes, blob) -> str:
    s = shapes.get(blob)
    return f"{blob}{list(s)}" if s is not None else blob


def _clipped(text: str, limit: int = 160) -> str:
    """A metadata value on one line, cut to ``limit`` characters (some converters store whole
    JSON documents there)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else f"{flat[:limit]}... ({len(text)} characters)"


def _sequence_inputs(spec) -> set:
    """The (C,) inputs of a rank-5 network that a recurrent or embedding layer reads (they take
    sequences: of vectors, of word indices), also through a pipeline's stages."""
    from .validate import NN_KINDS, RECURRENT_LAYER_KINDS

    kind = spec.WhichOneof("Type")
    if kind in ("pipeline", "pipelineClassifier", "pipelineRegressor"):  # as its stages read them
        body = spec.pipeline if kind == "pipeline" else getattr(spec, kind).pipeline
        inputs = {f.name for f in spec.description.input}
        return {name for stage in body.models for name in _sequence_inputs(stage)} & inputs
    if kind not in NN_KINDS or int(getattr(spec, kind).arrayInputShapeMapping) != 0:
        return set()
    read = {layer.input[0] for layer in getattr(spec, kind).layers
            if layer.WhichOneof("layer") in (*RECURRENT_LAYER_KINDS, "embedding") and layer.input}
    return {f.name for f in spec.description.input if f.name in read
            and f.type.WhichOneof("Type") == "multiArrayType" and len(f.type.multiArrayType.shape) == 1}


def inspect_lines(spec, indent: str = "") -> list[str]:
    """The human-readable description of ``spec`` that ``mlpersonal inspect`` prints."""
    from .update_params import read_parameters

    kind = spec.WhichOneof("Type")
    d = spec.description
    out = [f"{indent}model: {kind}  spec v{spec.specificationVersion}  "
           f"updatable: {'yes' if spec.isUpdatable else 'no'}"]
    md = d.metadata
    meta = [(k, v) for k, v in (("author", md.author), ("license", md.license),
                                ("description", md.shortDescription), ("version", md.versionString))
            if v]
    meta += sorted(md.userDefined.items())
    if meta:
        out.append(f"{indent}metadata:")
        out += [f"{indent}  {k}: {_clipped(v)}" for k, v in meta]
    sequences = _sequence_inputs(spec)
    for title, feats in (("inputs", d.input), ("outputs", d.output), ("training inputs", d.trainingInput)):
        if not len(feats) and title == "training inputs":
            continue
        out.append(f"{indent}{title}:")
        out += [f"{indent}  {f.name}: {describe_feature(f)}"
                + (f", or a sequence (Seq, 1, {f.type.multiArrayType.shape[0]})" if f.name in sequences else "")
                for f in feats]
    if kind in ("neuralNetwork", "neuralNetworkClassifier", "neuralNetworkRegressor"):
        out += _nn_lines(spec, getattr(spec, kind), indent)
    elif kind in ("pipeline", "pipelineClassifier", "pipelineRegressor"):
        p = getattr(spec, kind)
        p = p.pipeline if kind != "pipeline" else p
        names = list(p.names) or [f"model{i}" for i in range(len(p.models))]
        out.append(f"{indent}sub-models ({len(p.models)}):")
        for name, sub in zip(names, p.models):
            out.append(f"{indent}  [{name}]")
            out += inspect_lines(sub, indent + "    ")
    elif kind == "kNearestNeighborsClassifier":
        k = spec.kNearestNeighborsClassifier
        idx = k.nearestNeighborsIndex
        labels = k.WhichOneof("ClassLabels")
        n_labels = len(getattr(k, labels).vector) if labels else 0
        out.append(f"{indent}k-NN: {idx.numberOfDimensions} dimensions, {len(idx.floatSamples)} "
                   f"samples, {n_labels} labels, k={k.numberOfNeighbors.defaultValue}, "
                   f"index={idx.WhichOneof('IndexType')}, "
                   f"weighting={k.WhichOneof('WeightingScheme')}")
    params = read_parameters(spec)
    if params:
        out.append(f"{indent}update parameters:")
        for name, p in params.items():
            allowed = (f"  range [{p.range[0]}, {p.range[1]}]" if p.range else
                       f"  set {list(p.set)}" if p.set else "")
            out.append(f"{indent}  {name} = {p.default}{allowed}")
    return out


def _nn_lines(spec, nn_spec, indent: str) -> list[str]:
    out = []
    is_classifier = spec.WhichOneof("Type") == "neuralNetworkClassifier"
    labels = nn_spec.WhichOneof("ClassLabels") if is_classifier else None
    if labels:
        vec = list(getattr(nn_spec, labels).vector)
        shown = ", ".join(map(str, vec[:20])) + (", ..." if len(vec) > 20 else "")
        out.append(f"{indent}class labels ({len(vec)}): {shown}")
    for pp in nn_spec.preprocessing:
        which = pp.WhichOneof("preprocessor")
        if which == "scaler":
            s = pp.scaler
            out.append(f"{indent}preprocessing {pp.featureName or '(first input)'}: scale "
                       f"{s.channelScale:g}, bias r/g/b {s.redBias:g}/{s.greenBias:g}/{s.blueBias:g} "
                       f"gray {s.grayBias:g}")
        elif which:
            out.append(f"{indent}preprocessing {pp.featureName}: {which}")
    shapes = _blob_shapes(spec)
    rows = []
    total = 0
    for layer in nn_spec.layers:
        count, storage = layer_summary(layer)
        total += count
        io = (", ".join(_fmt_shape(shapes, b) for b in layer.input) + " -> "
              + ", ".join(_fmt_shape(shapes, b) for b in layer.output))
        rows.append((layer.name, layer.WhichOneof("layer") or "?", io, str(count), storage,
                     "updatable" if layer.isUpdatable else ""))
    out.append(f"{indent}layers ({len(rows)}, {total} parameters):")
    if rows:
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        for r in rows:
            out.append(indent + "  " + "  ".join(
                [r[0].ljust(widths[0]), r[1].ljust(widths[1]), r[2].ljust(widths[2]),
                 r[3].rjust(widths[3]), r[4].ljust(widths[4]), r[5]]).rstrip())
    up = nn_spec.updateParams
    if len(up.lossLayers):
        for loss in up.lossLayers:
            which = loss.WhichOneof("LossLayerType")
            msg = getattr(loss, which) if which else None
            target = f" target {msg.target!r}" if msg is not None else ""
            out.append(f"{indent}loss: {loss.name} ({which}) input {getattr(msg, 'input', '')!r}{target}")
    if up.optimizer.WhichOneof("OptimizerType"):
        out.append(f"{indent}optimizer: {up.optimizer.WhichOneof('OptimizerType')}")
    return out


def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="path of a .mlmodel file")


def run_inspect(args) -> int:
    """Describe a model: inputs/outputs, metadata, layers (kind, shapes, parameters, storage).

    Example:
      mlpersonal inspect sticker.mlmodel
    """
    from .specio import load_spec

    spec = load_spec(args.model)
    print("\n".join(inspect_lines(spec)))
    return 0


# --- predict ----------------------------------------------------------------------------------

def _parse_value(fd, text: str):
    kind = fd.type.WhichOneof("Type")
    path = Path(text)
    if path.suffix == ".npy":
        if not path.is_file():
            raise MLPersonalError(f"input {fd.name!r}: file {path} does not exist")
        return np.load(path, allow_pickle=False)
    if kind == "imageType":
        return str(path)  # the runtime reads, resizes and colour-converts image files
    if kind in ("int64Type", "doubleType"):
        try:
            return int(text) if kind == "int64Type" else float(text)
        except ValueError:
            raise MLPersonalError(f"input {fd.name!r} must be a number, got {text!r}") from None
    if kind == "stringType":
        return text
    if path.suffix == ".txt" and path.is_file():
        return np.loadtxt(path, dtype=np.float32, ndmin=1)
    raise MLPersonalError(
        f"input {fd.name!r} ({describe_feature(fd)}) needs a .npy file (or .txt of numbers), got {text!r}"
    )


def _predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="path of a .mlmodel file")
    p.add_argument("--input", "-i", action="append", default=[], metavar="NAME=FILE",
                   help="a model input: image file, .npy array, or a number (repeat per input)")
    p.add_argument("--top", type=int, default=5, help="classifiers: how many probabilities to show")
    p.add_argument("--batch", action="store_true",
                   help="each .npy input holds many examples along axis 0 (images: uint8 "
                        "B x H x W[x3]); prints one line per example")
    p.add_argument("--compute-units", default="cpu_only",
                   choices=["cpu_only", "cpu_and_gpu", "all"], help="where to run")


def _format_value(v) -> str:
    if isinstance(v, np.ndarray):
        body = np.array2string(v, precision=5, threshold=20, separator=", ")
        return f"array{list(v.shape)} {body}"
    return str(v)


def run_predict(args) -> int:
    """Run a prediction and print the outputs (classifiers: label and top probabilities).

    Example:
      mlpersonal predict sticker.mlmodel --input image=star.png --top 3
      mlpersonal predict regressor.mlmodel --input features=x.npy
      mlpersonal predict sticker.mlmodel --input image=drawings.npy --batch
    """
    from runtime import load

    model = load(args.model, compute_units=args.compute_units)
    inputs = {f.name: f for f in model.spec.description.input}
    feeds = {}
    for item in args.input:
        name, sep, value = item.partition("=")
        if not sep:
            raise MLPersonalError(f"--input {item!r} must look like NAME=FILE")
        if name not in inputs:
            raise MLPersonalError(f"the model has no input {name!r}; its inputs are {list(inputs)}")
        feeds[name] = _parse_value(inputs[name], value)
    missing = [n for n, f in inputs.items() if n not in feeds and not f.type.isOptional]
    if missing:
        raise MLPersonalError(f"missing --input for {missing} (use --input NAME=FILE)")
    if args.batch:
        return _print_batch(model, feeds)
    out = model.predict(feeds)
    for name in model.output_names:
        value = out.get(name)
        if isinstance(value, dict):
            top = sorted(value.items(), key=lambda kv: -kv[1])[: max(args.top, 1)]
            print(f"{name}:")
            for k, p in top:
                print(f"  {k}: {p:.6f}")
        else:
            print(f"{name}: {_format_value(value)}")
    return 0


def _print_batch(model, feeds: dict) -> int:
    """``predict --batch``: every input a ``.npy`` array of examples; one line per example."""
    from runtime.batch import ArrayBatchProvider, DictionaryColumn

    for name, value in feeds.items():
        if not isinstance(value, np.ndarray) or value.ndim == 0:
            raise MLPersonalError(f"--batch: input {name!r} must be a .npy array with the examples "
                                  "along axis 0")
    out = model.predict_batch(ArrayBatchProvider(feeds))
    names = model.output_names
    label = model.spec.description.predictedFeatureName
    probs = model.spec.description.predictedProbabilitiesName
    classifier = model.spec.WhichOneof("Type").endswith("Classifier") and label in names
    for i in range(len(out)):
        parts = []
        if classifier:  # the label first, with its probability
            parts.append(str(out.column(label)[i]))
            if probs in names:
                col = out.column(probs)
                parts.append(f"p={col[i][out.column(label)[i]]:.6f}")
        for name in names:
            if classifier and name in (label, probs):
                continue
            col = out.column(name)
            parts.append(f"{name}={col[i] if isinstance(col, DictionaryColumn) else _format_value(col[i])}")
        print(f"{i}: " + "  ".join(parts))
    return 0


register_command("inspect", _inspect_args, run_inspect)
register_command("predict", _predict_args, run_predict)


def _register_more() -> None:
    """Subcommands that live next to the feature they drive."""
    from .quantization_cli import COMMANDS as quantization_commands

    from .personalize_cli import COMMANDS as personalize_commands

    for name, (add_args, run) in {**quantization_commands, **personalize_commands}.items():
        register_command(name, add_args, run)


_register_more()


# --- entry point ------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlpersonal", description="Inspect, run and personalize Core ML .mlmodel files.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (add_args, run) in COMMANDS.items():
        doc = textwrap.dedent(run.__doc__ or "").strip()
        head, _, rest = doc.partition("\n")
        rest = textwrap.dedent(rest).strip()
        p = sub.add_parser(name, help=head, description=head, epilog=rest or None,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_args(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except MLPersonalError as e:
        print(f"mlpersonal {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader stopped early (``mlpersonal inspect m | head``)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
