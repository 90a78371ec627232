"""Pipeline specs (``pipeline`` / ``pipelineClassifier`` / ``pipelineRegressor``) and linked models.

A pipeline runs its stages in order; each stage reads the pipeline inputs or earlier stages'
outputs by name. Core ML allows only the LAST stage to be updatable; the pipeline is then
updatable and its ``trainingInput`` lists the pipeline inputs plus the last stage's training
targets (e.g. ``label``) — the layout of Apple's updatable drawing-classifier sample.

A linked stage (:func:`linked_model`) stores only a file name and a search path; the runtime
loads that file next to the pipeline, so two pipelines can share one embedding network file.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence, Union

from mlpersonal.errors import ConversionError
from mlpersonal.proto import Model_pb2
from mlpersonal.specio import load_spec
from mlpersonal.validate import type_mismatch

#: Core ML 3: updatable models and linked models
LINKED_SPECIFICATION_VERSION = 4

CLASSIFIER_KINDS = {
    "neuralNetworkClassifier", "kNearestNeighborsClassifier", "pipelineClassifier",
    "glmClassifier", "supportVectorClassifier", "treeEnsembleClassifier",
}
REGRESSOR_KINDS = {
    "neuralNetworkRegressor", "pipelineRegressor", "glmRegressor", "supportVectorRegressor",
    "treeEnsembleRegressor", "bayesianProbitRegressor",
}

StageLike = Union[Model_pb2.Model, str, os.PathLike, bytes]


def _as_spec(stage) -> Model_pb2.Model:
    spec = getattr(stage, "spec", None)  # a runtime CompiledModel
    if isinstance(spec, Model_pb2.Model):
        stage = spec
    out = Model_pb2.Model()
    out.CopyFrom(load_spec(stage))
    return out


def linked_model(spec: StageLike, file_name: str, search_path: str = ".") -> Model_pb2.Model:
    """A stage that refers to ``file_name`` (found in ``search_path``, relative to the pipeline file).

    The stage's description (inputs/outputs) is copied from ``spec``, the model that file must
    hold. Save ``spec`` to ``<pipeline folder>/<search_path>/<file_name>`` yourself. Linked models
    are never updatable (Core ML refuses it), so link frozen stages such as a shared embedding.
    """
    src = _as_spec(spec)
    if not file_name or os.path.basename(file_name) != file_name or file_name in (".", ".."):
        raise ConversionError(f"linked file name must be a plain file name (no folders), got {file_name!r}")
    if os.path.isabs(search_path) or ".." in search_path.replace("\\", "/").split("/"):
        raise ConversionError(
            f"search path {search_path!r} must be relative to the pipeline's folder and stay inside it"
        )
    m = Model_pb2.Model()
    m.specificationVersion = max(src.specificationVersion, LINKED_SPECIFICATION_VERSION)
    m.description.CopyFrom(src.description)
    del m.description.trainingInput[:]
    f = m.linkedModel.linkedModelFile
    f.linkedModelFileName.defaultValue = file_name
    f.linkedModelSearchPath.defaultValue = search_path
    return m


def _kind_of(spec: Model_pb2.Model, sources: Mapping[int, Model_pb2.Model], i: int) -> str:
    return (sources.get(i) or spec).WhichOneof("Type")


def _copy(spec: Model_pb2.Model) -> Model_pb2.Model:
    out = Model_pb2.Model()
    out.CopyFrom(spec)
    return out


def _match_type(fd, given, stage: str) -> None:
    """Declare stage input ``fd`` as the earlier output ``given`` is declared: Core ML wants the
    two types equal (mlpersonal.validate.type_mismatch). Multi-arrays differing in their element
    type only (a float32 embedding read as double) are aligned; anything else is an error."""
    if fd.type.WhichOneof("Type") == given.type.WhichOneof("Type") == "multiArrayType":
        fd.type.multiArrayType.dataType = given.type.multiArrayType.dataType
    why = type_mismatch(fd, given)
    if why:
        raise ConversionError(f"stage {stage!r} reads {fd.name!r} declared unlike the earlier "
                              f"stage that gives it ({why}); Core ML wants one type")


def pipeline(specs: Sequence[StageLike], names: Optional[Sequence[str]] = None,
             linked: Optional[Mapping[Union[int, str], Union[str, tuple[str, str]]]] = None,
             ) -> Model_pb2.Model:
    """Chain ``specs`` into one pipeline spec (a classifier/regressor when the last stage is one).

    ``names`` name the stages (default: ``stage0``, ``stage1``, ...). ``linked`` maps a stage
    (index or name) to a file name or ``(file name, search path)``: that stage is written as a
    :func:`linked_model` reference instead of being embedded.
    """
    stages = [_copy(_as_spec(s)) for s in specs]  # stage descriptions may be aligned below
    if not stages:
        raise ConversionError("a pipeline needs at least one stage")
    names = list(names) if names is not None else [f"stage{i}" for i in range(len(stages))]
    if len(names) != len(stages):
        raise ConversionError(f"{len(stages)} stages but {len(names)} names")
    if len(set(names)) != len(names):
        raise ConversionError(f"stage names must be unique, got {names}")

    sources: dict[int, Model_pb2.Model] = {}
    for key, target in (linked or {}).items():
        i = names.index(key) if isinstance(key, str) else int(key)
        if not 0 <= i < len(stages):
            raise ConversionError(f"linked: no stage {key!r}")
        if stages[i].isUpdatable:
            raise ConversionError(f"stage {names[i]!r} is updatable; Core ML links only frozen stages")
        file_name, search = (target, ".") if isinstance(target, str) else target
        sources[i] = stages[i]
        stages[i] = linked_model(stages[i], file_name, search)

    updatable = [i for i, s in enumerate(stages) if s.isUpdatable]
    if updatable and updatable != [len(stages) - 1]:
        raise ConversionError(
            f"only the last stage of a pipeline can be updatable (Core ML's rule); updatable "
            f"stages: {[names[i] for i in updatable]}"
        )

    # inputs: features stages read that no earlier stage produced (in order of first use)
    produced: dict[str, object] = {}
    inputs = []
    for i, st in enumerate(stages):
        for fd in st.description.input:
            if fd.name not in produced:
                inputs.append(fd)
                produced[fd.name] = fd
            elif i not in sources:
                _match_type(fd, produced[fd.name], names[i])
        for fd in st.description.output:
            produced[fd.name] = fd
    last = stages[-1]
    kind = _kind_of(last, sources, len(stages) - 1)

    spec = Model_pb2.Model()
    if kind in CLASSIFIER_KINDS:
        body = spec.pipelineClassifier.pipeline
    elif kind in REGRESSOR_KINDS:
        body = spec.pipelineRegressor.pipeline
    else:
        body = spec.pipeline
    for st in stages:
        body.models.add().CopyFrom(st)
    body.names.extend(names)

    d = spec.description
    for fd in inputs:
        d.input.add().CopyFrom(fd)
    for fd in last.description.output:
        d.output.add().CopyFrom(fd)
    d.predictedFeatureName = last.description.predictedFeatureName
    d.predictedProbabilitiesName = last.description.predictedProbabilitiesName
    first_meta = next((s.description.metadata for s in stages if s.description.HasField("metadata")), None)
    if first_meta is not None:
        d.metadata.CopyFrom(first_meta)

    versions = [s.specificationVersion for s in stages] + list(
        src.specificationVersion for src in sources.values())
    if updatable or sources:
        versions.append(LINKED_SPECIFICATION_VERSION)
    spec.specificationVersion = max(versions)
    if updatable:
        spec.isUpdatable = True
        earlier = {fd.name for st in stages[:-1] for fd in st.description.output}
        names_in = {fd.name for fd in d.input}
        for fd in d.input:
            d.trainingInput.add().CopyFrom(fd)
        for fd in last.description.trainingInput:
            if fd.name not in earlier and fd.name not in names_in:
                d.trainingInput.add().CopyFrom(fd)
    return spec
