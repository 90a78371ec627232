"""CompiledModel: a spec compiled once into torch ops, and the model-kind registry."""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence

import torch

from mlpersonal.errors import InvalidModelError, MLPersonalError, UnsupportedLayerError
from mlpersonal.proto import Model_pb2
from mlpersonal.registry import registrar
from mlpersonal.specio import SpecLike, check_header, load_spec, save
from mlpersonal.validate import validate

from .device import precision, select_device, uses_low_precision
from .batch import ArrayBatchProvider
from .features import decode_outputs, describe, encode_inputs

#: What torch/numpy raise when a (validated) spec's layers do not fit together at run time;
#: reported as InvalidModelError. MemoryError: an allocation refused by the process limit.
_RUN_ERRORS = (RuntimeError, ValueError, LookupError, ZeroDivisionError, OverflowError, MemoryError)

#: spec Type oneof name -> class compiling it
MODEL_KINDS: dict[str, Callable[..., "CompiledModel"]] = {}


#: ``@register_model_kind("neuralNetwork", ...)``: the class compiling those spec kinds
register_model_kind = registrar(MODEL_KINDS)


class CompiledModel:
    """A loaded model: ``predict``, ``predict_batch``, ``save``; subclasses per spec kind."""

    def __init__(self, spec: Model_pb2.Model, device: torch.device, *,
                 compute_units: str = "all", path: Optional[str] = None,
                 allow_low_precision_accumulation_on_gpu: bool = False):
        self.spec = spec
        self.device = device
        self.compute_units = compute_units
        self.path = path
        self.allow_low_precision_accumulation_on_gpu = bool(allow_low_precision_accumulation_on_gpu)
        #: True when predictions run under float16 autocast (asked for, and on a GPU)
        self.low_precision = uses_low_precision(device, allow_low_precision_accumulation_on_gpu)

    # --- description -------------------------------------------------------------------
    @property
    def description(self):
        return self.spec.description

    @property
    def input_names(self) -> list[str]:
        return [f.name for f in self.spec.description.input]

    @property
    def output_names(self) -> list[str]:
        return [f.name for f in self.spec.description.output]

    @property
    def is_updatable(self) -> bool:
        return bool(self.spec.isUpdatable)

    def __repr__(self) -> str:
        kind = self.spec.WhichOneof("Type")
        return (f"<{type(self).__name__} {kind} inputs={self.input_names} "
                f"outputs={self.output_names} updatable={self.is_updatable} device={self.device}>")

    # --- prediction ----------------------------------------------------------------------
    def forward(self, feeds: dict[str, Any], n: int) -> dict[str, Any]:
        """Batched inputs (user layout, see runtime.features) -> batched outputs."""
        raise NotImplementedError

    def predict(self, features: dict) -> dict:
        """Predict one example: ``{input name: value}`` -> ``{output name: value}``."""
        return self.predict_batch([features])[0]

    def predict_batch(self, batch: Sequence[dict] | ArrayBatchProvider) -> list[dict] | ArrayBatchProvider:
        """Predict many examples in one batched pass (Core ML's ``predictions(from:)``).

        ``batch``: a list of feature dicts -> a list of output dicts; or an
        :class:`~runtime.batch.ArrayBatchProvider` of columns (e.g. one ``(B, ...)`` array per
        input) -> an ``ArrayBatchProvider`` of output columns, with no per-example dicts built.
        """
        columns = isinstance(batch, ArrayBatchProvider)
        if not columns and not isinstance(batch, dict):
            batch = list(batch)
        n = len(batch)
        io = self._described()
        if n == 0:  # nothing to predict (Core ML answers an empty batch provider)
            return ArrayBatchProvider._of({f.name: [] for f in io[1]}, 0) if columns else []
        feeds = encode_inputs(io[0], batch, self.device)
        try:
            out = self.forward_ready(feeds, n)
            if out is not None:
                return decode_outputs(io[1], out, n, columns)
            with torch.inference_mode(), self.precision():
                out = self.forward(feeds, n)
            return decode_outputs(io[1], out, n, columns)
        except MLPersonalError:
            raise
        except _RUN_ERRORS as e:
            raise InvalidModelError(
                f"the model failed while predicting ({type(e).__name__}: {e}); its layers do not "
                f"fit its declared inputs, so the model is corrupt or inconsistent{_sequence_hint(io[0], feeds)}"
            ) from e

    def _described(self) -> tuple:
        """(inputs, outputs) of the model description, read once (runtime.features.describe)."""
        io = self.__dict__.get("_io")
        if io is None:
            io = self._io = (describe(self.spec.description.input), describe(self.spec.description.output))
        return io

    def forward_ready(self, feeds: dict[str, Any], n: int) -> Optional[dict[str, Any]]:
        """Outputs from a ready fast path that needs no torch set-up (see
        ``NeuralNetworkModel``), or None: :meth:`forward` runs under inference mode."""
        return None

    def precision(self):
        """The model's arithmetic (runtime.device.precision): float16 autocast on its GPU when
        low precision is allowed, else float32 (TF32 off on cuda); a no-op on the cpu."""
        return precision(self.device, self.low_precision)

    # --- persistence ---------------------------------------------------------------------
    def save(self, path: str | os.PathLike):
        """Write the model's spec atomically."""
        return save(self.spec, path)

    # --- update --------------------------------------------------------------------------
    def update(self, training_data, **options) -> "CompiledModel":
        """Train synchronously (see :class:`runtime.update.UpdateTask`); returns the updated model."""
        from .update import UpdateTask

        ctx = UpdateTask(self, training_data, **options).run()  # in this thread
        if ctx.error is not None:
            raise ctx.error
        return ctx.model

    def make_updater(self):
        """An :class:`runtime.updating.Updater` training a private copy of this model."""
        raise UnsupportedLayerError(
            f"models of kind {self.spec.WhichOneof('Type')!r} cannot be updated on device"
        )

    def copy(self) -> "CompiledModel":
        """An independent model compiled from a copy of this spec."""
        spec = Model_pb2.Model()
        spec.CopyFrom(self.spec)
        low = self.allow_low_precision_accumulation_on_gpu
        return compile_spec(spec, self.compute_units, path=self.path, device=self.device,
                            allow_low_precision_accumulation_on_gpu=low)


_PREPROCESSING = ("it is a feature-preparation step: do it in your own code and feed the next "
                  "stage (e.g. the neural network of the pipeline) directly")
_CLASSIC = ("a classic (non-neural) model: retrain it as a small neural network (exporters."
            "convert) or run it with the library it came from (scikit-learn, XGBoost, ...)")
#: what to do about a model kind this runtime does not run
_OUT_OF_SCOPE = {
    **dict.fromkeys(("featureVectorizer", "oneHotEncoder", "imputer", "scaler", "normalizer",
                     "dictVectorizer", "categoricalMapping", "arrayFeatureExtractor",
                     "identity", "nonMaximumSuppression", "classConfidenceThresholding"),
                    _PREPROCESSING),
    **dict.fromkeys(("treeEnsembleClassifier", "treeEnsembleRegressor", "glmClassifier",
                     "glmRegressor", "supportVectorClassifier", "supportVectorRegressor",
                     "bayesianProbitRegressor"), _CLASSIC),
    **dict.fromkeys(("visionFeaturePrint", "audioFeaturePrint", "textClassifier", "wordTagger",
                     "wordEmbedding", "gazetteer", "soundAnalysisPreprocessing",
                     "itemSimilarityRecommender", "serializedModel"),
                    "it runs Apple's own system models or code, which exist only on Apple OSes"),
    "mlProgram": ("ML Programs (Core ML 5+) are not read: convert the source model with "
                  "coremltools.convert(..., convert_to='neuralnetwork') or exporters.convert"),
}
_OTHER_KINDS = "convert the source model to a neural network (exporters.convert)"


def compile_spec(spec: Model_pb2.Model, compute_units: str = "all", *,
                 path: Optional[str] = None, device: Optional[torch.device] = None,
                 allow_low_precision_accumulation_on_gpu: bool = False) -> CompiledModel:
    """Compile ``spec`` with the class registered for its kind (see runtime.device for the options)."""
    check_header(spec, path or "model")
    validate(spec)
    kind = spec.WhichOneof("Type")
    cls = MODEL_KINDS.get(kind)
    if cls is None:
        raise UnsupportedLayerError(
            f"model kind {kind!r} is not supported by the mlpersonal runtime (supported: "
            f"{', '.join(sorted(MODEL_KINDS))}); {_OUT_OF_SCOPE.get(kind, _OTHER_KINDS)}"
        )
    dev = device if device is not None else select_device(compute_units)
    try:
        return cls(spec, dev, compute_units=compute_units, path=path,
                   allow_low_precision_accumulation_on_gpu=allow_low_precision_accumulation_on_gpu)
    except MLPersonalError:
        raise
    except _RUN_ERRORS as e:
        raise InvalidModelError(
            f"{path or 'model'}: cannot be compiled ({type(e).__name__}: {e}); the model is "
            "corrupt or inconsistent"
        ) from e


def _sequence_hint(inputs, feeds: dict) -> str:
    """For a failed prediction: the vector inputs given as one vector that would also take a
    sequence (a rank-5 network's (C,) input), e.g. word indices for an embedding layer."""
    single = [f for f in inputs if getattr(f, "sequence", False)
              and isinstance(feeds.get(f.name), torch.Tensor) and feeds[f.name].dim() == 2]
    if not single:
        return ""
    names = ", ".join(f"{f.name!r} as (Seq, 1, {f.shape[0]})" for f in single)
    return (f"; unless the model reads a sequence where it declares one vector (e.g. word "
            f"indices for an embedding layer): then pass {names}")


def load(source: SpecLike | CompiledModel, compute_units: str = "all", *,
         allow_low_precision_accumulation_on_gpu: bool = False) -> CompiledModel:
    """Load and compile a model from a path, bytes or a ``Model_pb2.Model``.

    ``compute_units``: "cpu_only" | "cpu_and_gpu" | "all" (or coremltools' ComputeUnit names);
    ``allow_low_precision_accumulation_on_gpu``: float16 autocast when running on a GPU.
    """
    if isinstance(source, CompiledModel):
        return source
    path = None if isinstance(source, (bytes, bytearray, Model_pb2.Model)) else os.fspath(source)
    spec = load_spec(source)
    return compile_spec(spec, compute_units, path=path,
                        allow_low_precision_accumulation_on_gpu=allow_low_precision_accumulation_on_gpu)
