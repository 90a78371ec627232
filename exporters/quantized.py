"""Export quantization-aware-trained weights as Core ML n-bit ``WeightParams``.

A QAT module (``trainers.prepare_qat``) carries, for each fake-quantized Conv2d/Linear, the exact
integers and scale/bias or table its forward uses. :func:`quantized_weight_params` encodes them
with :mod:`mlpersonal.codecs`; :func:`apply_qat_weights` is a post-pass over a converted spec
whose layers are named by module path, replacing each QAT layer's float weights with them, so the
spec's output equals the QAT module's eval output (no re-quantization).
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from mlpersonal import codecs
from mlpersonal.errors import ConversionError
from mlpersonal.proto import Model_pb2, NeuralNetwork_pb2
from mlpersonal.quantization import MIN_QUANTIZED_SPEC_VERSION

_NN_KINDS = ("neuralNetwork", "neuralNetworkClassifier", "neuralNetworkRegressor")


def _fake_quant(module: nn.Module):
    params = getattr(module, "parametrizations", None)
    if params is None or "weight" not in params:
        return None
    for p in params.weight:
        if hasattr(p, "export_params"):
            return p
    return None


def is_qat(module: nn.Module) -> bool:
    """True when ``module``'s weight is fake-quantized by ``trainers.prepare_qat``."""
    return _fake_quant(module) is not None


def quantized_weight_params(module: nn.Module):
    """``(WeightParams with the n-bit weights, float32 bias array or None)`` of a QAT layer."""
    fq = _fake_quant(module)
    if fq is None:
        raise ConversionError(f"{type(module).__name__} is not prepared for QAT (prepare_qat)")
    w = module.parametrizations.weight.original.detach()
    p = fq.export_params(w)
    wp = NeuralNetwork_pb2.WeightParams()
    if p["kind"] == "linear":
        codecs.encode_linear(wp, p["q"], p["nbits"], p["scale"], p["bias"])
    else:
        codecs.encode_lut(wp, p["q"], p["nbits"], p["lut"])
    bias = getattr(module, "bias", None)
    b = None if bias is None else bias.detach().float().cpu().numpy().reshape(-1)
    return wp, b


def _layers_by_name(spec) -> dict:
    out = {}
    kind = spec.WhichOneof("Type")
    if kind in _NN_KINDS:
        for layer in getattr(spec, kind).layers:
            out[layer.name] = (layer, spec)
    elif kind in ("pipeline", "pipelineClassifier", "pipelineRegressor"):
        pipe = spec.pipeline if kind == "pipeline" else getattr(spec, kind).pipeline
        for sub in pipe.models:
            out.update(_layers_by_name(sub))
    return out


def _check_layer(name: str, layer, module: nn.Module) -> None:
    kind = layer.WhichOneof("layer")
    w = module.parametrizations.weight.original
    if isinstance(module, nn.Linear):
        p = layer.innerProduct
        ok = kind == "innerProduct" and (int(p.outputChannels), int(p.inputChannels)) == tuple(w.shape)
    elif isinstance(module, nn.Conv2d):
        p = layer.convolution
        ok = (kind == "convolution" and not p.isDeconvolution
              and (int(p.outputChannels), int(p.kernelChannels), *[int(k) for k in p.kernelSize])
              == tuple(w.shape))
    else:
        ok = False
    if not ok:
        raise ConversionError(
            f"layer {name!r} ({kind}) does not match QAT module {type(module).__name__} with "
            f"weight shape {tuple(w.shape)}")
    if layer.isUpdatable:
        raise ConversionError(
            f"layer {name!r} is updatable; Core ML requires updatable weights to stay float32, so "
            "a QAT layer cannot be updatable (leave it out of prepare_qat's modules)")


def apply_qat_weights(spec: Model_pb2.Model, module: nn.Module,
                      names: Optional[dict] = None) -> Model_pb2.Model:
    """Replace, in ``spec`` (in place; returned), each QAT layer's weights by its n-bit form.

    Layers are found by module path (``names`` maps module path -> layer name where they
    differ). Biases are written as float32 from the module.
    """
    names = names or {}
    layers = _layers_by_name(spec)
    touched = []
    for path, m in module.named_modules():
        if not is_qat(m):
            continue
        lname = names.get(path, path)
        if lname not in layers:
            raise ConversionError(
                f"QAT module {path!r} has no layer named {lname!r} in the spec (layers: "
                f"{sorted(layers)[:20]}); pass names={{module path: layer name}}")
        layer, owner = layers[lname]
        _check_layer(lname, layer, m)
        wp, bias = quantized_weight_params(m)
        p = layer.innerProduct if isinstance(m, nn.Linear) else layer.convolution
        p.weights.CopyFrom(wp)
        if bias is not None:
            p.hasBias = True
            codecs.encode_float(p.bias, bias)
        owner.specificationVersion = max(int(owner.specificationVersion),
                                         MIN_QUANTIZED_SPEC_VERSION)
        touched.append(lname)
    if not touched:
        raise ConversionError("the module holds no QAT layer (prepare_qat was not applied)")
    spec.specificationVersion = max(int(spec.specificationVersion), MIN_QUANTIZED_SPEC_VERSION)
    return spec


__all__ = ["apply_qat_weights", "is_qat", "quantized_weight_params"]
