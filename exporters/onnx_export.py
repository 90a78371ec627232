"""torch module -> ONNX file with the same input names as the Core ML export.

Uses torch's TorchScript-based exporter (``dynamo=False``): it works offline with torch 2.13 and
needs no ``onnxscript`` (which the dynamo exporter requires and this environment lacks).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from mlpersonal.errors import ConversionError
from mlpersonal.features import ImageType, TensorType
from mlpersonal.fileio import atomic_write_bytes

from .probe import probe_inputs
from .recurrent import has_recurrent_module


def to_onnx(module: torch.nn.Module, inputs: Sequence[Union[ImageType, TensorType]],
            path: Union[str, os.PathLike], *, opset: int = 17,
            output_names: Optional[Sequence[str]] = None, dynamic_batch: bool = True) -> Path:
    """Export ``module`` (in eval mode) to ONNX at ``path`` (written atomically); returns the path.

    Inputs are named as declared; the batch axis is dynamic unless ``dynamic_batch=False``, and so
    is the sequence axis of a ``(Seq, C)`` input of a recurrent network (a rank-2 input of a
    network without one is a ``(C, L)`` feature map of fixed size).
    Image inputs take the preprocessed tensor (``pixel * scale + bias``), like the torch module.
    """
    if isinstance(inputs, (ImageType, TensorType)):
        inputs = [inputs]
    inputs = list(inputs)
    if not inputs or not all(isinstance(i, (ImageType, TensorType)) for i in inputs):
        raise ConversionError("to_onnx needs inputs=[mp.ImageType(...) or mp.TensorType(...)]")
    names = [i.name for i in inputs]
    examples = probe_inputs(module, [(1, *i.shape) for i in inputs], inputs=inputs)
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            out = module(*examples)
        recurrent = has_recurrent_module(module)  # (Seq, C) inputs then, else (C, L) maps
        sequences = [i.name for i in inputs if recurrent and isinstance(i, TensorType) and i.is_sequence]
        return _export(module, examples, names, out, path, opset, output_names, dynamic_batch,
                       sequences)
    finally:
        for m, training in modes:
            m.training = training


def _export(module, examples, names, out, path, opset, output_names, dynamic_batch,
            sequences=()) -> Path:
    n_out = len(out) if isinstance(out, (tuple, list)) else 1
    outs = list(output_names) if output_names else (["output"] if n_out == 1 else
                                                    [f"output_{i}" for i in range(n_out)])
    dynamic = {n: {0: "batch"} for n in names + outs} if dynamic_batch else {}
    for n in sequences:  # a (Seq, C) input takes sequences of any length, as in Core ML
        dynamic[n] = {**dynamic.get(n, {}), 1: "sequence"}
    dynamic = dynamic or None
    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_file = Path(tmp) / "model.onnx"
        try:
            with warnings.catch_warnings():  # torch's own modules (MultiheadAttention) check
                # python values while traced; the user's code keeps its warnings
                warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"torch\.")
                torch.onnx.export(module, examples, str(tmp_file), input_names=names, output_names=outs,
                                  opset_version=opset, dynamic_axes=dynamic, dynamo=False)
        except Exception as e:  # noqa: BLE001
            raise ConversionError(f"ONNX export of {type(module).__name__} failed: {e}") from e
        atomic_write_bytes(path, tmp_file.read_bytes())
    return path
