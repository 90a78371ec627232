"""``mlpersonal personalize``: train an updatable model on folders of examples, as an app would.

``DIR`` holds one subfolder per label, each with image files (``.png``, ``.jpg``, ``.jpeg``,
``.bmp``) for a model whose training input is an image, or NumPy ``.npy`` arrays for one whose
training input is a multi-array (a feature vector, or a ``(Seq, C)`` sequence for a recurrent
model; read with ``allow_pickle=False``: a data file never unpickles); the model's input and its
training target are read from the spec's ``trainingInput``. The update runs through
:class:`runtime.update.UpdateTask` with tqdm progress bars (:class:`TqdmProgress`), top-1
accuracy is printed before and after, and the updated model is written atomically.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import InvalidInputError, InvalidModelError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
ARRAY_SUFFIXES = (".npy",)


class TqdmProgress:
    """Progress handlers for an UpdateTask: an epoch bar and a mini-batch bar, plus loss records.

    ``handlers`` is the dict to pass as ``progress_handlers``; ``mini_batch_losses`` holds
    ``(epoch, mini_batch, loss)`` and ``epoch_losses`` the mean loss of each epoch.
    """

    def __init__(self, n_examples: int, desc: str = "update", leave: bool = True, disable: bool = False):
        self.n, self.desc, self.leave, self.disable = n_examples, desc, leave, disable
        self.mini_batch_losses: list[tuple[int, int, float]] = []
        self.epoch_losses: list[float] = []
        self._epochs = self._batches = None
        self.handlers = {"training_began": self.began, "mini_batch_end": self.mini_batch_end,
                         "epoch_end": self.epoch_end}

    def _per_epoch(self, params: dict) -> int:
        bs = int(params.get("mini_batch_size") or self.n or 1)
        return max(1, -(-self.n // bs))

    def began(self, ctx) -> None:
        from tqdm.auto import tqdm

        epochs = int(ctx.parameters.get("epochs", 1))
        self._epochs = tqdm(total=epochs, desc=f"{self.desc} epochs", unit="epoch", leave=self.leave,
                            disable=self.disable)
        self._batches = tqdm(total=self._per_epoch(ctx.parameters), desc=f"{self.desc} mini-batches",
                             unit="batch", leave=False, disable=self.disable)

    def mini_batch_end(self, ctx) -> None:
        m = ctx.metrics
        self.mini_batch_losses.append((m["epoch_index"], m["mini_batch_index"], float(m["loss"])))
        self._batches.update(1)
        self._batches.set_postfix(loss=f"{m['loss']:.4f}")

    def epoch_end(self, ctx) -> None:
        self.epoch_losses.append(float(ctx.metrics["loss"]))
        self._epochs.update(1)
        self._epochs.set_postfix(loss=f"{ctx.metrics['loss']:.4f}")
        self._batches.reset(total=self._per_epoch(ctx.parameters))

    def close(self) -> None:
        for bar in (self._batches, self._epochs):
            if bar is not None:
                bar.close()


def update_with_progress(model, data: list, parameters: Optional[dict] = None, desc: str = "update",
                         *, leave: bool = True, disable: bool = False, **task_options):
    """Run an UpdateTask with :class:`TqdmProgress` bars, as an app would.

    Returns ``(updated model, seconds, progress)``; raises the task's error if it failed.
    """
    from runtime.update import UpdateTask

    bars = TqdmProgress(len(data), desc, leave=leave, disable=disable)
    task = UpdateTask(model, data, parameters=parameters, progress_handlers=bars.handlers,
                      **task_options)
    t = time.perf_counter()
    ctx = task.run()  # in this thread: an app's background thread would use resume()
    seconds = time.perf_counter() - t
    bars.close()
    if ctx.error is not None:
        raise ctx.error
    return ctx.model, seconds, bars


def read_labelled_folder(folder, suffixes: tuple = IMAGE_SUFFIXES) -> list[tuple[str, str]]:
    """``[(file path, label)]`` from ``folder/<label>/*<suffix>``; clear errors for anything else."""
    root = Path(folder)
    what = "arrays" if suffixes == ARRAY_SUFFIXES else "drawings"
    if not root.is_dir():
        raise InvalidInputError(f"{folder}: not a folder; pass a folder with one subfolder of "
                                f"{what} per label (e.g. data/star/1{suffixes[0]}, data/heart/1{suffixes[0]})")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        raise InvalidInputError(f"{folder}: has no subfolders; put the {what} of each label in "
                                f"a subfolder named after the label (e.g. {folder}/star/1{suffixes[0]})")
    out = []
    for d in subdirs:
        files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
        if not files:
            kind = "image files" if suffixes == IMAGE_SUFFIXES else "arrays"
            raise InvalidInputError(f"{d}: holds no {kind} ({', '.join(suffixes)}); every label "
                                    f"folder needs at least one")
        out += [(str(f), d.name) for f in files]
    return out


def load_array(path) -> np.ndarray:
    """A ``.npy`` file's array (never unpickled: an object array is refused)."""
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InvalidInputError(f"{path}: not a numeric .npy array ({e}); save examples with "
                                "numpy.save(path, array)") from None


def training_features(spec) -> tuple[str, str, str, str]:
    """``(input name, 'image'|'array', target name, target kind 'string'|'int64')`` from
    ``trainingInput``."""
    if not spec.isUpdatable:
        raise InvalidModelError("this model is not updatable (isUpdatable is false); export it "
                                "with respect_trainable=True and an UpdateConfig, or use an updatable kNN")
    inputs = {f.name for f in spec.description.input}
    training = list(spec.description.trainingInput)
    if not training:
        raise InvalidModelError("the model declares no trainingInput; it cannot be personalized")
    kinds = {"imageType": "image", "multiArrayType": "array"}
    examples = [f for f in training if f.name in inputs and f.type.WhichOneof("Type") in kinds]
    targets = [f for f in training if f.name not in inputs]
    if len(examples) != 1 or len(training) - len(targets) != 1:
        raise InvalidModelError(
            f"personalize needs exactly one image or multi-array training input; the model's "
            f"training inputs are {[f.name for f in training]}")
    if len(targets) != 1 or targets[0].type.WhichOneof("Type") not in ("stringType", "int64Type"):
        raise InvalidModelError(
            f"personalize needs one class-label training target (string or int64); the model has "
            f"{[(f.name, f.type.WhichOneof('Type')) for f in targets]}")
    kind = "string" if targets[0].type.WhichOneof("Type") == "stringType" else "int64"
    return examples[0].name, kinds[examples[0].type.WhichOneof("Type")], targets[0].name, kind


def _labels(items, kind: str, folder) -> list:
    if kind == "string":
        return [lab for _, lab in items]
    try:
        return [int(lab) for _, lab in items]
    except ValueError:
        raise InvalidInputError(f"{folder}: this model has int64 class labels; name the label "
                                "subfolders with integers (e.g. 0/, 1/)") from None


def top1(model, examples: list, labels: list, input_name: str, batch: int = 256) -> float:
    """Top-1 accuracy of ``model`` (its predicted feature) on ``examples`` (images, paths or
    arrays; arrays of different shapes, e.g. sequences of different lengths, are fine)."""
    name = model.spec.description.predictedFeatureName
    if not name:
        raise InvalidModelError("the model declares no predicted feature (class label output)")
    from runtime.batch import ArrayBatchProvider

    hits = 0
    for i in range(0, len(examples), batch):
        got = model.predict_batch(ArrayBatchProvider({input_name: examples[i:i + batch]})).column(name)
        hits += sum(p == y for p, y in zip(got, labels[i:i + batch]))
    return hits / max(len(examples), 1)


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="updatable .mlmodel (NN classifier, kNN, or a pipeline ending in one)")
    p.add_argument("--data", required=True, metavar="DIR",
                   help="one subfolder of examples per label: images, or .npy arrays for an array input")
    p.add_argument("--out", required=True, help="where to write the personalized .mlmodel")
    p.add_argument("--eval", default=None, metavar="DIR", help="optional held-out examples (same layout)")
    p.add_argument("--epochs", type=int, default=None, help="override the model's epochs")
    p.add_argument("--learning-rate", type=float, default=None, help="override the learning rate")
    p.add_argument("--mini-batch-size", type=int, default=None, help="override the mini-batch size")
    p.add_argument("--number-of-neighbors", type=int, default=None, help="kNN: override k")
    p.add_argument("--seed", type=int, default=None, help="override the shuffling seed")
    p.add_argument("--compute-units", default="cpu_only", choices=["cpu_only", "cpu_and_gpu", "all"])
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_personalize(args) -> int:
    """Personalize an updatable model on folders of examples (DIR/<label>/*.png or *.npy) and save it.

    Runs an update task exactly as an app would (progress bars per epoch and mini-batch), prints
    top-1 on the given examples (and on --eval) before and after, writes --out atomically. Image
    inputs read image files; multi-array inputs (feature vectors, sequences) read .npy arrays.
    The model's allowed values apply to the overrides (see `mlpersonal inspect`). A
    neural-network classifier trained on new labels only forgets the others: add a few examples
    of them.

    Example:
      mlpersonal personalize stickers.mlmodel --data my_drawings/ --out my_stickers.mlmodel \\
          --epochs 20 --learning-rate 0.01 --eval more_drawings/
      (my_drawings/anchor/1.png ... my_drawings/crown/5.png; activity/walk/1.npy for a sequence model)
    """
    from runtime import load

    model = load(args.model, compute_units=args.compute_units)
    input_name, input_kind, target_name, kind = training_features(model.spec)
    suffixes = IMAGE_SUFFIXES if input_kind == "image" else ARRAY_SUFFIXES

    def read(folder) -> tuple[list, list]:
        items = read_labelled_folder(folder, suffixes)
        paths = [path for path, _ in items]
        return (paths if input_kind == "image" else [load_array(p) for p in paths]), _labels(items, kind, folder)

    examples, labels = read(args.data)
    ev = read(args.eval) if args.eval else None
    params = {k: v for k, v in (("epochs", args.epochs), ("learning_rate", args.learning_rate),
                                ("mini_batch_size", args.mini_batch_size),
                                ("number_of_neighbors", args.number_of_neighbors), ("seed", args.seed))
              if v is not None}

    before = top1(model, examples, labels, input_name)
    before_ev = top1(model, *ev, input_name) if ev else None
    what = "drawings" if input_kind == "image" else "arrays"
    print(f"{len(examples)} {what} of {len(set(labels))} labels from {args.data}; "
          f"training input {input_name!r}, target {target_name!r}")
    data = [{input_name: e, target_name: y} for e, y in zip(examples, labels)]
    updated, seconds, bars = update_with_progress(model, data, params, "personalize",
                                                  disable=args.no_progress)
    after = top1(updated, examples, labels, input_name)
    updated.save(args.out)
    print(f"update: {seconds:.2f} s, {len(bars.mini_batch_losses)} mini-batches"
          + (f", final loss {bars.epoch_losses[-1]:.4f}" if bars.epoch_losses else ""))
    print(f"top-1 on --data: {100 * before:.1f}% -> {100 * after:.1f}%")
    if ev:
        print(f"top-1 on --eval: {100 * before_ev:.1f}% -> {100 * top1(updated, *ev, input_name):.1f}%")
    print(f"wrote {args.out}")
    return 0


COMMANDS = {"personalize": (_add_args, run_personalize)}
