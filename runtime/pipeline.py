"""pipeline / pipelineClassifier / pipelineRegressor models, linked models, and the pipeline updater.

A pipeline runs its stages in order on the whole batch; every stage reads the pipeline inputs or
earlier stages' outputs by name, and the pipeline returns the outputs its description declares.

Linked models (``linkedModel.linkedModelFile``) are resolved safely: the file name must be a plain
name, every search-path entry (``:``-separated, default ``.``) is taken relative to the folder of
the pipeline file being loaded and must stay inside it, and the file found (after following
symlinks) must lie inside its search folder. Anything else, or a missing file, raises
:class:`LinkedModelError`. The linked file is only parsed as a protobuf spec; nothing in it or in
its name is imported or evaluated. A name ending in ``.mlmodelc`` (Core ML's compiled folder)
also finds the ``.mlmodel`` file with the same stem.

Updating a pipeline trains its last stage (Core ML allows only the last one to be updatable): the
training examples are run through the stages before it (batched, under ``inference_mode``), the
last stage's own updater trains on the transformed examples, and the result is a pipeline with
that stage's updated spec written back. Frozen linked stages stay links (the shared file is never
written); the updatable stage itself is always embedded (Core ML refuses updatable links).
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Optional

import torch

from mlpersonal.errors import InvalidInputError, InvalidModelError, LinkedModelError, UnsupportedLayerError
from mlpersonal.proto import Model_pb2
from mlpersonal.specio import load_spec

from .features import decode_outputs, describe, encode_inputs
from .model import CompiledModel, compile_spec, register_model_kind
from .updating import Updater

#: examples transformed per batch by the stages before the updatable one
TRANSFORM_BATCH = 256


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def resolve_linked_file(link, model_path: Optional[str]) -> str:
    """The real path of the file a ``LinkedModel`` refers to, or :class:`LinkedModelError`."""
    lf = link.linkedModelFile
    name = lf.linkedModelFileName.defaultValue
    search = lf.linkedModelSearchPath.defaultValue or "."
    if not name:
        raise LinkedModelError("linked model has an empty linkedModelFileName")
    if (name in (".", "..") or "/" in name or "\\" in name or "\x00" in name
            or os.path.basename(name) != name or os.path.isabs(name)):
        raise LinkedModelError(
            f"linked model file name {name!r} must be a plain file name inside the search path "
            "(no folders, '..' or absolute paths)"
        )
    if model_path is None:
        raise LinkedModelError(
            f"linked model {name!r} cannot be found: the pipeline was not loaded from a file; "
            "load it with mp.load(path) so linked files are looked up next to it"
        )
    base = os.path.realpath(os.path.dirname(os.path.abspath(os.fspath(model_path))))
    names = [name]
    if name.endswith(".mlmodelc"):
        names.append(name[: -len(".mlmodelc")] + ".mlmodel")
    folders = []
    for entry in search.split(":"):  # every entry is checked, even those after a match
        entry = entry or "."
        if os.path.isabs(entry) or "\x00" in entry:
            raise LinkedModelError(
                f"linked model search path entry {entry!r} is absolute; only folders relative to "
                "the pipeline file are allowed"
            )
        folder = os.path.realpath(os.path.join(base, entry))
        if not _inside(folder, base):
            raise LinkedModelError(
                f"linked model search path entry {entry!r} escapes the pipeline's folder {base}"
            )
        folders.append(folder)
    for folder in folders:
        for n in names:
            cand = os.path.join(folder, n)
            if not os.path.lexists(cand):
                continue
            real = os.path.realpath(cand)
            if not _inside(real, folder):
                raise LinkedModelError(
                    f"linked model file {cand} resolves to {real}, outside its search folder {folder}"
                )
            if not os.path.isfile(real):
                raise LinkedModelError(f"linked model {cand} is not a regular file")
            return real
    raise LinkedModelError(
        f"linked model file {name!r} not found in {folders}; put the shared model file there"
    )


@register_model_kind("linkedModel")
class LinkedModel(CompiledModel):
    """A stage stored in another file: resolved, loaded and compiled once; predictions delegate."""

    def __init__(self, spec, device, **kw):
        super().__init__(spec, device, **kw)
        if spec.linkedModel.WhichOneof("LinkType") != "linkedModelFile":
            raise LinkedModelError("linkedModel has no linkedModelFile")
        self.linked_path = resolve_linked_file(spec.linkedModel, self.path)
        try:
            inner = load_spec(self.linked_path)
        except InvalidModelError as e:
            raise LinkedModelError(f"linked model {self.linked_path}: {e}") from None
        if inner.WhichOneof("Type") == "linkedModel":
            raise LinkedModelError(f"linked model {self.linked_path} is itself a link; link the model file directly")
        self.inner = compile_spec(inner, self.compute_units, path=self.linked_path, device=device)
        have = set(self.inner.input_names)
        missing = [n for n in self.input_names if n not in have]
        outs = set(self.inner.output_names)
        missing += [n for n in self.output_names if n not in outs]
        if missing:
            raise LinkedModelError(
                f"linked model {self.linked_path} does not match its description in the pipeline "
                f"(features {missing} are missing from the file's model)"
            )

    def forward(self, feeds: dict[str, Any], n: int) -> dict[str, Any]:
        return self.inner.forward({k: feeds[k] for k in self.inner.input_names}, n)

    def _described(self) -> tuple:
        return self.inner._described()


def _body(spec):
    kind = spec.WhichOneof("Type")
    return spec.pipeline if kind == "pipeline" else getattr(spec, kind).pipeline


@register_model_kind("pipeline", "pipelineClassifier", "pipelineRegressor")
class PipelineModel(CompiledModel):
    """Stages compiled with :func:`compile_spec`; outputs flow to later stages by name."""

    def __init__(self, spec, device, *, stages: Optional[list] = None, **kw):
        super().__init__(spec, device, **kw)
        body = _body(spec)
        if not body.models:
            raise InvalidModelError("pipeline has no models")
        self.names = list(body.names) or [f"stage{i}" for i in range(len(body.models))]
        if len(self.names) != len(body.models):
            raise InvalidModelError(f"pipeline has {len(body.models)} models but {len(self.names)} names")
        if stages is None:
            stages = [self._compile_stage(m, i, name) for i, (m, name)
                      in enumerate(zip(body.models, self.names))]
        self.stages = stages
        available = set(self.input_names)
        for name, st in zip(self.names, self.stages):
            for fd in st.spec.description.input:
                if fd.name not in available:
                    raise InvalidModelError(
                        f"pipeline stage {name!r} reads {fd.name!r}, which neither the pipeline "
                        "inputs nor an earlier stage provide"
                    )
            available.update(st.output_names)
        missing = [n for n in self.output_names if n not in available]
        if missing:
            raise InvalidModelError(f"pipeline outputs {missing} are produced by no stage")

    def _compile_stage(self, m, index: int, name: str):
        if m.specificationVersion == 0:  # hand-assembled pipelines may leave it unset
            c = Model_pb2.Model()
            c.CopyFrom(m)
            c.specificationVersion = self.spec.specificationVersion
            m = c
        try:
            return compile_spec(m, self.compute_units, path=self.path, device=self.device)
        except UnsupportedLayerError as e:
            kind = self.spec.WhichOneof("Type")
            raise UnsupportedLayerError(f"{kind} stage {index} ({name!r}): {e}") from None

    def _described(self) -> tuple:
        """The pipeline's features; an input that a stage reads as a sequence (a rank-5
        network's ``(C,)`` input) takes sequences here too."""
        io = self.__dict__.get("_io")
        if io is None:
            io = (describe(self.spec.description.input), describe(self.spec.description.output))
            seqs = {f.name for st in self.stages for f in st._described()[0] if f.sequence}
            for f in io[0]:
                f.sequence = f.name in seqs
            self._io = io
        return io

    def run_stages(self, feeds: dict[str, Any], n: int, stop: Optional[int] = None) -> dict[str, Any]:
        """All features (inputs and stage outputs) after running stages ``[:stop]``."""
        env = dict(feeds)
        for st in self.stages[:stop]:
            env.update(st.forward({fd.name: env[fd.name] for fd in st.spec.description.input}, n))
        return env

    def forward(self, feeds: dict[str, Any], n: int) -> dict[str, Any]:
        env = self.run_stages(feeds, n)
        return {name: env[name] for name in self.output_names}

    def make_updater(self) -> "PipelineUpdater":
        return PipelineUpdater(self)


class PipelineUpdater(Updater):
    """Trains the last stage on examples transformed by the stages before it."""

    def __init__(self, model: PipelineModel):
        super().__init__(model)
        frozen = [n for n, st in zip(model.names[:-1], model.stages[:-1]) if st.is_updatable]
        if frozen:
            raise InvalidModelError(
                f"only the last stage of a pipeline can be updatable (Core ML's rule); stages "
                f"{frozen} are marked updatable too"
            )
        last = model.stages[-1]
        if not last.is_updatable:
            raise InvalidModelError(
                f"the pipeline is marked updatable but its last stage {model.names[-1]!r} is not"
            )
        self.stage_updater = last.make_updater()

    def parameters(self):
        return self.stage_updater.parameters()

    def prepare(self, training_data: list[dict], values: dict[str, Any]) -> None:
        if isinstance(training_data, dict) or not isinstance(training_data, (list, tuple)):
            raise InvalidInputError("training_data must be a list of dicts of features")
        for i, ex in enumerate(training_data):
            if not isinstance(ex, dict):
                raise InvalidInputError(f"example {i} must be a dict, got {type(ex).__name__}")
        m = self.model
        prefix = m.stages[:-1]
        needed = {fd.name for st in prefix for fd in st.spec.description.input}
        inputs = [f for f in m._described()[0] if f.name in needed]
        out_fds = [fd for st in prefix for fd in st.spec.description.output]
        examples = []
        for s in range(0, len(training_data), TRANSFORM_BATCH):
            chunk = list(training_data[s:s + TRANSFORM_BATCH])
            try:
                feeds = encode_inputs(inputs, chunk, m.device)
            except InvalidInputError as e:
                raise InvalidInputError(_shift_index(str(e), s)) from None
            with torch.inference_mode():
                env = m.run_stages(feeds, len(chunk), stop=len(prefix))
            env = {k: v for k, v in env.items() if k not in feeds}
            env = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in env.items()}
            decoded = decode_outputs(out_fds, env, len(chunk))
            examples += [{**ex, **d} for ex, d in zip(chunk, decoded)]
        self.stage_updater.prepare(examples, values)

    def num_epochs(self, values: dict[str, Any]) -> int:
        return self.stage_updater.num_epochs(values)

    def mini_batches(self, epoch: int, values: dict[str, Any]) -> Iterator[float]:
        return self.stage_updater.mini_batches(epoch, values)

    def result(self) -> PipelineModel:
        m = self.model
        updated = self.stage_updater.result()
        spec = Model_pb2.Model()
        spec.CopyFrom(m.spec)
        _body(spec).models[-1].CopyFrom(updated.spec)
        return PipelineModel(spec, m.device, compute_units=m.compute_units, path=m.path,
                             stages=list(m.stages[:-1]) + [updated])


def _shift_index(msg: str, offset: int) -> str:
    """Report example indices relative to the whole training set, not the chunk."""
    if offset and msg.startswith("example "):
        head, _, rest = msg[len("example "):].partition(":")
        if head.isdigit():
            return f"example {int(head) + offset}:{rest}"
    return msg
