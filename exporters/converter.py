"""torch module -> Core ML NeuralNetwork spec (classic layers, rank-5 mapping).

The module is traced with ``torch.fx``; each node goes through the op registry in
:mod:`exporters.ops`. Layer names are module paths (``features.0``) so users find their layers in
the spec; function nodes get their fx node name (``add``, ``flatten_1``).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from mlpersonal.errors import ConversionError, MLPersonalError, UnsupportedLayerError
from mlpersonal.features import ImageType, TensorType
from mlpersonal.proto import Model_pb2
from mlpersonal.proto import NeuralNetwork_pb2

from . import ndops, ops, recurrent
from .probe import probe_inputs

_CONST = object()  # blob marker for get_attr nodes (constant tensors)
_BATCH = 2  # batch size used to trace shapes; any op changing it is refused


@dataclass(frozen=True)
class ClassifierConfig:
    """Makes the exported model a classifier: labels, label output, probabilities output."""

    labels: Sequence[Union[str, int]]
    predicted_feature_name: str = "label"
    probabilities_name: str = "labelProbs"

    def __post_init__(self):
        labels = list(self.labels)
        if not labels:
            raise ConversionError("ClassifierConfig needs at least one label")
        if all(isinstance(x, str) for x in labels):
            pass
        elif all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in labels):
            labels = [int(x) for x in labels]
        else:
            raise ConversionError("class labels must be all str or all int, got a mix: "
                                  f"{labels[:5]}...")
        if len(set(labels)) != len(labels):
            raise ConversionError("class labels must be unique")
        if not self.predicted_feature_name or not self.probabilities_name or \
                self.predicted_feature_name == self.probabilities_name:
            raise ConversionError("predicted_feature_name and probabilities_name must be two "
                                  "different non-empty names")
        object.__setattr__(self, "labels", tuple(labels))


class _Tracer(fx.Tracer):
    """Keeps every module type the registry (or a custom conversion) knows as one node."""

    def __init__(self, leaf_types: tuple):
        super().__init__()
        self.leaf_types = leaf_types
        # buffers read in forward are graph constants too, so shape-dependent slicing of one
        # (nanoGPT's ``self.bias[:, :, :T, :T]``) traces
        self.proxy_buffer_attributes = True

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, qualname)


#: what python size arithmetic in a traced forward may use (Context.value)
_SHAPE_ARITHMETIC = {operator.getitem: operator.getitem, operator.add: operator.add,
                     operator.sub: operator.sub, operator.mul: operator.mul,
                     operator.floordiv: operator.floordiv, operator.neg: operator.neg,
                     operator.truediv: operator.truediv, operator.pow: operator.pow,
                     # torch.fx wraps the math module's functions: 1 / math.sqrt(k.size(-1))
                     math.sqrt: math.sqrt, math.floor: math.floor, math.ceil: math.ceil,
                     math.log: math.log, math.exp: math.exp}


class Context:
    """What converters in :mod:`exporters.ops` use to read the graph and emit layers."""

    def __init__(self, gm: fx.GraphModule, builder, reserved: set[str], classifier_node=None,
                 nd: bool = False):
        self.gm = gm
        #: ND mode (EXACT_ARRAY_MAPPING, exporters.ndops): blobs have the per-example torch shape
        self.nd = nd
        self._constants: dict[fx.Node, torch.Tensor] = {}
        self.builder = builder
        self.blobs: dict[fx.Node, Any] = {}
        self.used_blobs: set[str] = set(reserved)
        self.used_layers: set[str] = set()
        self.layers_by_path: dict[str, list[str]] = {}
        self.classifier_node = classifier_node
        self.node: Optional[fx.Node] = None
        #: blobs holding a sequence (rank-5 [Seq, ...]): only recurrent layers may read them
        self.sequences: set[str] = set()
        #: model inputs that are a recurrent layer's initial state (optional in Core ML)
        self.state_inputs: set[str] = set()

    #: blob marker of nodes that hold no blob of their own (a recurrent module's output tuple)
    SKIP = _CONST

    # --- reading the graph ---
    def is_tensor(self, a) -> bool:
        return isinstance(a, fx.Node) and isinstance(a.meta.get("tensor_meta"), TensorMetadata)

    def shape(self, a) -> tuple[int, ...]:
        if not self.is_tensor(a):
            raise self.unsupported(self.node, f"a non-tensor operand {a!r}")
        return tuple(a.meta["tensor_meta"].shape)

    def node_dtype(self, a):
        """The torch dtype of tensor node ``a``."""
        return a.meta["tensor_meta"].dtype if self.is_tensor(a) else None

    def is_constant(self, a) -> bool:
        """Whether tensor node ``a`` was folded: a parameter/buffer, or computed from them alone."""
        return isinstance(a, fx.Node) and self.blobs.get(a) is _CONST

    def constant(self, a) -> torch.Tensor:
        """The value of folded tensor node ``a`` (evaluated once, from the module's tensors and the
        traced shapes)."""
        if a not in self._constants:
            if a.op == "get_attr":
                value = self.gm
                for part in a.target.split("."):
                    value = getattr(value, part)
            else:
                def ev(v):
                    if isinstance(v, (list, tuple)):
                        return type(v)(ev(x) for x in v)
                    if isinstance(v, slice):  # self.bias[:, :, :T, :T]
                        return slice(ev(v.start), ev(v.stop), ev(v.step))
                    if isinstance(v, fx.Node):
                        return self.constant(v) if self.is_tensor(v) else self.value(v)
                    return v

                args, kwargs = ev(tuple(a.args)), {k: ev(v) for k, v in a.kwargs.items()}
                with torch.no_grad():
                    if a.op == "call_module":
                        value = self.gm.get_submodule(a.target)(*args, **kwargs)
                    elif a.op == "call_method":
                        value = getattr(args[0], a.target)(*args[1:], **kwargs)
                    else:
                        value = a.target(*args, **kwargs)
            self._constants[a] = value.detach() if isinstance(value, torch.Tensor) else value
        return self._constants[a]

    def value(self, a):
        """A python argument whose parts may be computed from shapes in the graph
        (``F.pad(u, (0, s.shape[3] - u.shape[3]))``): evaluated from the traced shapes."""
        if isinstance(a, (list, tuple)):
            return type(a)(self.value(v) for v in a)
        if not isinstance(a, fx.Node) or self.is_tensor(a):
            return a
        args = [self.value(v) for v in a.args]
        if a.op == "call_function" and a.target is getattr and args[1] == "shape":
            return tuple(self.shape(a.args[0]))
        if a.op == "call_function" and a.target is getattr and args[1] == "dtype":
            return a.args[0].meta["tensor_meta"].dtype
        if a.op == "call_function" and a.target is getattr and args[1] == "device":
            return torch.device("cpu")  # folded constants are computed on the cpu
        if a.op == "call_method" and a.target == "size":
            shape = tuple(self.shape(a.args[0]))
            return shape if len(args) < 2 else shape[args[1]]
        if a.op == "call_function" and a.target in _SHAPE_ARITHMETIC:
            return _SHAPE_ARITHMETIC[a.target](*args)
        raise self.unsupported(self.node, f"an argument computed by {a.target} ({a.name})")

    @staticmethod
    def blob_shape(shape: Sequence[int]) -> tuple[int, int, int]:
        """Torch shape (N, C[, H], W) -> rank-5 blob (C, H, W)."""
        rest = tuple(shape[1:])
        if len(rest) == 1:
            return (rest[0], 1, 1)
        if len(rest) == 2:
            return (rest[0], 1, rest[1])
        return rest

    def inp(self, a) -> str:
        """The blob name holding fx argument ``a``."""
        blob = self.blobs.get(a) if isinstance(a, fx.Node) else None
        if blob is _CONST:
            raise self.unsupported(self.node, f"a constant tensor operand ({a.target})")
        if blob is None:
            raise self.unsupported(self.node, f"operand {a!r}, which is not a tensor of the graph")
        if blob in self.sequences:
            raise self.unsupported(self.node, f"a sequence operand ({a.name}); a sequence can only "
                                   "feed nn.LSTM / nn.RNN (exporters.recurrent)")
        return blob

    def sequence_blob(self, a, node) -> str:
        """The blob of ``a``, which must hold a sequence (a recurrent module's input)."""
        blob = self.blobs.get(a) if isinstance(a, fx.Node) else None
        if blob not in self.sequences:
            raise self.unsupported(node, "an input that is not a sequence: a recurrent module "
                                   "reads a model input declared (Seq, C) or another LSTM/RNN's output")
        return blob

    def classifier_output(self, node) -> bool:
        return node is self.classifier_node

    # --- emitting ---
    def new_blob(self, base: str) -> str:
        name, k = base, 1
        while name in self.used_blobs:
            k += 1
            name = f"{base}_{k}"
        self.used_blobs.add(name)
        return name

    def layer(self, node) -> tuple[str, str]:
        """(unique layer name, fresh output blob name) for ``node``; module paths for modules."""
        path = node.target if node.op == "call_module" else None
        name = self.unique_layer(path or node.name, path)
        return name, self.new_blob(name)

    def unique_layer(self, base: str, path: Optional[str] = None, blob: bool = False) -> str:
        """``base``, or ``base@2``, ... when taken (a module called more than once): a layer name,
        recorded under module ``path`` (what respect_trainable and QAT look up); ``blob``: also
        free and taken as a blob name (a layer writing the blob named after it)."""
        name, k = base, 1
        while name in self.used_layers or (blob and name in self.used_blobs):
            k += 1
            name = f"{base}@{k}"
        self.used_layers.add(name)
        if blob:
            self.used_blobs.add(name)
        if path is not None:
            self.layers_by_path.setdefault(path, []).append(name)
        return name

    def unsupported(self, node, what: str) -> UnsupportedLayerError:
        return UnsupportedLayerError(f"{describe(self.gm, node)}: unsupported: {what}")


def _op_name(fn) -> str:
    """'torch.exp', 'torch.nn.functional.gelu', 'operator.add' for a function."""
    name = getattr(fn, "__name__", None) or str(fn)
    mod = getattr(fn, "__module__", None) or "torch"
    mod = {"_operator": "operator"}.get(mod, "torch" if mod.startswith("torch._C") else mod)
    return f"{mod}.{name}"


def describe(gm: fx.GraphModule, node) -> str:
    """'module features.3 (MyOp)' or 'torch.roll (in module block.1)' for error messages."""
    if node is None:
        return "graph"
    if node.op == "call_module":
        return f"module {node.target!r} ({type(gm.get_submodule(node.target)).__name__})"
    op = node.target if isinstance(node.target, str) else _op_name(node.target)
    kind = "method" if node.op == "call_method" else "op"
    stack = node.meta.get("nn_module_stack") or {}
    paths = [v[0] if isinstance(v, tuple) else str(k) for k, v in stack.items()]
    where = f" in module {paths[-1]!r}" if paths and paths[-1] else " in the top-level forward"
    return f"{kind} {op!r} (node {node.name!r}{where})"


def _validate_inputs(inputs) -> list:
    if isinstance(inputs, (ImageType, TensorType)):
        inputs = [inputs]
    inputs = list(inputs or [])
    if not inputs:
        raise ConversionError("convert needs inputs=[mp.ImageType(...) or mp.TensorType(...)]")
    for i in inputs:
        if not isinstance(i, (ImageType, TensorType)):
            raise ConversionError(f"inputs must be mp.ImageType / mp.TensorType, got {type(i).__name__}")
    names = [i.name for i in inputs]
    if len(set(names)) != len(names):
        raise ConversionError(f"input names must be unique, got {names}")
    return inputs


def _trace(module, inputs, custom) -> fx.GraphModule:
    leaf = tuple(ops.MODULES) + tuple(t for t in custom if isinstance(t, type))
    try:
        graph = _Tracer(leaf).trace(module)
    except Exception as e:  # noqa: BLE001 -- fx raises many kinds
        raise ConversionError(
            f"torch.fx could not trace {type(module).__name__}: {type(e).__name__}: {e}. "
            "Data-dependent control flow cannot be exported; move it out of forward()."
        ) from e
    gm = fx.GraphModule(module, graph)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(inputs):
        raise ConversionError(
            f"{type(module).__name__}.forward takes {len(placeholders)} input(s) "
            f"({[p.target for p in placeholders]}), but inputs= declares {len(inputs)}"
        )
    examples = probe_inputs(module, [(_BATCH, *i.shape) for i in inputs], inputs=inputs)
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*examples)
    except Exception as e:  # noqa: BLE001
        raise ConversionError(
            f"running {type(module).__name__} on inputs of shape "
            f"{[tuple(x.shape[1:]) for x in examples]} (without the batch axis) failed: {e}"
        ) from e
    return gm


def _graph_outputs(gm) -> list[fx.Node]:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    val = out.args[0]
    vals = list(val) if isinstance(val, (tuple, list)) else [val]
    for v in vals:
        if not (isinstance(v, fx.Node) and isinstance(v.meta.get("tensor_meta"), TensorMetadata)):
            raise ConversionError("forward() must return a tensor or a tuple of tensors")
    return vals


def _output_names(n: int, classifier, regressor, outputs) -> list[str]:
    if classifier is not None:
        if regressor is not None or outputs is not None:
            raise ConversionError("give classifier= or regressor=/outputs=, not both")
        if n != 1:
            raise ConversionError(f"a classifier must return one tensor, forward() returns {n}")
        return [classifier.probabilities_name]
    if regressor is not None and outputs is not None:
        raise ConversionError("give regressor= or outputs=, not both")
    names = regressor if regressor is not None else outputs
    if names is None:
        names = ["output"] if n == 1 else [f"output_{i}" for i in range(n)]
    names = [names] if isinstance(names, str) else list(names)
    if len(names) != n or len(set(names)) != n or not all(isinstance(x, str) and x for x in names):
        raise ConversionError(f"forward() returns {n} tensor(s); give {n} unique output name(s), got {names}")
    return names


def _rename_blob(nn_spec, old: str, new: str) -> None:
    for layer in nn_spec.layers:
        for field in (layer.input, layer.output):
            for i, b in enumerate(field):
                if b == old:
                    field[i] = new


def _producer(nn_spec, blob: str):
    for layer in reversed(nn_spec.layers):
        if blob in layer.output:
            return layer
    return None


def _custom_layer(ctx: Context, node, target, fn) -> str:
    desc = fn(target)
    if not isinstance(desc, dict) or not isinstance(desc.get("className"), str) or not desc["className"]:
        raise ConversionError(f"custom conversion for {describe(ctx.gm, node)} must return a dict "
                              "with a non-empty 'className' (and optional description, parameters, "
                              "weights)")
    from .custom_layers import custom_layer_params

    params = custom_layer_params(desc)
    tensors = [a for a in node.all_input_nodes if ctx.is_tensor(a)]
    name, out = ctx.layer(node)
    ctx.builder.add_custom(name, [ctx.inp(t) for t in tensors], [out], params)
    return out


def _emit(ctx: Context, gm, inputs, custom) -> None:
    declared = iter(inputs)
    for node in gm.graph.nodes:
        ctx.node = node
        if node.op == "placeholder":
            i = next(declared)
            ctx.blobs[node] = i.name
            if ctx.nd and isinstance(i, ImageType):  # RANK4_IMAGE_MAPPING: (1, C, H, W) -> (C, H, W)
                blob = ctx.new_blob(f"{i.name}_chw")
                ctx.used_layers.add(blob)
                ctx.builder.add_squeeze(blob, i.name, blob, axes=[0])
                ctx.blobs[node] = blob
            continue
        if node in ctx.blobs:  # given its blob by the converter of a node it reads from
            continue
        if recurrent.state_source(gm, node) is not None:
            continue  # h0.unsqueeze(0) for a recurrent module: it reads h0's blob itself
        if node.op == "get_attr":
            ctx.blobs[node] = _CONST
            continue
        if node.op == "output":
            continue
        target = gm.get_submodule(node.target) if node.op == "call_module" else node.target
        if node.op != "call_module" and not ctx.is_tensor(node) and not (ctx.nd and _tensors(node)):
            continue  # python values (x.size(0), shapes): only feed reshape targets
        fn = custom.get(type(target)) if node.op == "call_module" else custom.get(target)
        if ctx.nd and fn is None and ctx.is_tensor(node) and _folds(ctx, node):
            ctx.blobs[node] = _CONST  # computed from constants alone: operands read its value
            continue
        if ctx.is_tensor(node):
            shape = ctx.shape(node)
            if not shape or shape[0] != _BATCH:
                raise ctx.unsupported(node, f"an op that changes the batch axis (gives {shape})"
                                      + recurrent.state_hint(gm, node))
            low, high = (2, 6) if ctx.nd else (2, 4)
            if not low <= len(shape) <= high:
                raise ctx.unsupported(node, f"a tensor of rank {len(shape)} ({low} to {high} supported)")
        if fn is not None:
            ctx.blobs[node] = _custom_layer(ctx, node, target, fn)
            continue
        conv = _lookup(ctx, node, target)
        if conv is None and ctx.nd and ops.lookup(node, target) is not None:
            why = _nd_node(gm)
            raise UnsupportedLayerError(
                f"{describe(gm, node)} converts to iOS 11-12 layers only, and this network is "
                "exported in ND mode (EXACT_ARRAY_MAPPING)"
                + (f" because it holds {describe(gm, why)}" if why is not None else "")
                + "; replace the op, or pass custom_conversion_functions={type_or_op: fn}")
        if conv is None:
            raise UnsupportedLayerError(
                f"{describe(gm, node)} has no Core ML conversion; add one to exporters.ops "
                "(exporters.ndops in ND mode) or pass custom_conversion_functions={type_or_op: fn}"
                + recurrent.state_hint(gm, node)
            )
        try:
            ctx.blobs[node] = conv(ctx, node, target)
        except MLPersonalError:
            raise
        except Exception as e:  # noqa: BLE001 -- a builder/argument problem: say where
            raise ConversionError(f"{describe(gm, node)}: conversion failed: {type(e).__name__}: {e}") from e


def _folds(ctx: Context, node) -> bool:
    """Whether ``node`` reads no graph input, only constants (and python values)."""
    return all(ctx.is_constant(a) if ctx.is_tensor(a) else not _tensors(a) for a in node.all_input_nodes)


def _tensors(node) -> bool:
    """Whether ``node`` gives several tensors (torch.chunk / split)."""
    meta = node.meta.get("tensor_meta")
    return isinstance(meta, (tuple, list)) and any(isinstance(m, TensorMetadata) for m in meta)


def _lookup(ctx: Context, node, target):
    """The converter of ``node`` in the network's mode."""
    return ndops.lookup(node, target) if ctx.nd else ops.lookup(node, target)


def needs_nd(gm: fx.GraphModule) -> bool:
    """Whether the graph holds an op only ND mode expresses (attention, a product of two
    activations): :func:`convert` then writes an EXACT_ARRAY_MAPPING network."""
    return _nd_node(gm) is not None


def _nd_node(gm: fx.GraphModule):
    """The first node only ND mode expresses, or None."""
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), ndops.ND_ONLY_MODULES):
            return node
        if node.op == "call_function" and node.target in ndops.ND_ONLY_FUNCTIONS:
            return node
        if node.op == "call_method" and node.target in ndops.ND_ONLY_METHODS:
            return node
    return None


def _sequence_inputs(gm, inputs) -> set[str]:
    """Names of the inputs a recurrent module reads: declared ``(Seq, C)``, read only by such
    modules; the Core ML input is ``(C,)`` and takes ``(Seq, 1, C)`` (exporters.recurrent)."""
    names = set()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    recurrent_net = recurrent.has_recurrent_module(gm)
    for node, i in zip(placeholders, inputs):
        readers = [u for u in node.users if recurrent.is_sequence_consumer(gm, u)]
        sequence = isinstance(i, TensorType) and i.is_sequence
        if not readers and not sequence:
            continue
        if not readers and not recurrent_net:
            continue  # rank 2 in a network without recurrent modules: a (C, L) feature map
        if not sequence:
            raise ConversionError(f"input {i.name!r} feeds a recurrent module, so it is a sequence: "
                                  "declare it mp.TensorType(name, (Seq, C)) (the Seq of the trace)")
        if len(readers) != len(node.users) or any(u.args[0] is not node for u in readers):
            raise ConversionError(f"input {i.name!r} is a sequence (declared (Seq, C) or read by a "
                                  "recurrent module); in Core ML only nn.LSTM / nn.RNN may read it")
        names.add(i.name)
    return names


def _nd_class_probabilities(ctx: Context, nn_spec, scores: str, prod, probs: str, classes: int) -> None:
    """An ND classifier's probabilities: a classic softmax (the only loss input Core ML's update
    validator accepts; in ND mode it wants rank >= 3 and normalizes axis -3). A final Linear on a
    ``(E,)`` vector reads it as ``(1, E, 1, 1)`` instead, so its innerProduct gives ``(1, C, 1, 1)``
    and the path from it to the loss holds only layers Core ML backpropagates through; other
    scores are reshaped to ``(C, 1, 1)``. The module's own final softmax(ND) is replaced."""
    def readers(blob):
        return [layer for layer in nn_spec.layers if blob in layer.input]

    if prod is not None and prod.WhichOneof("layer") == "softmaxND" and not readers(scores):
        nn_spec.layers.remove(prod)
        scores = prod.input[0]
        prod = _producer(nn_spec, scores)
    shapes = {blob: tuple(ctx.shape(node)[1:]) for node, blob in ctx.blobs.items()
              if isinstance(blob, str) and ctx.is_tensor(node)}
    if (prod is not None and prod.WhichOneof("layer") == "innerProduct" and len(readers(scores)) == 0
            and len(shapes.get(prod.input[0], ())) == 1 and len(readers(prod.input[0])) == 1):
        src, width = prod.input[0], shapes[prod.input[0]][0]
        column = ctx.new_blob(f"{src}_nchw")
        ctx.used_layers.add(column)
        ctx.builder.add_reshape_static(column, src, column, [1, width, 1, 1])
        layers = list(nn_spec.layers)
        moved = layers.pop()  # the reshape, just appended: run it right before the Linear
        layers.insert(next(i for i, layer in enumerate(layers) if layer.name == prod.name), moved)
        del nn_spec.layers[:]
        nn_spec.layers.extend(layers)
        _producer(nn_spec, scores).input[0] = column
    else:
        column = ctx.new_blob(f"{scores}_column")
        ctx.used_layers.add(column)
        ctx.builder.add_reshape_static(column, scores, column, [classes, 1, 1])
        scores = column
    name = ctx.new_blob("softmax")
    ctx.used_layers.add(name)
    ctx.builder.add_softmax(name, scores, probs)


def _check_nd_inputs(gm, inputs) -> None:
    """ND mode takes multi-array inputs of fixed shapes, read by no recurrent module."""
    for i in inputs:
        if i.is_flexible:
            raise ConversionError(f"input {i.name!r}: flexible shapes in a network with attention "
                                  "(ND mode) are not supported yet; export one fixed shape")


def _set_int_inputs(spec, inputs) -> None:
    """Token-id inputs (``TensorType(dtype="int32")``) are INT32 multi-arrays."""
    for fd in spec.description.input:
        if any(i.name == fd.name and getattr(i, "dtype", "float32") == "int32" for i in inputs):
            fd.type.multiArrayType.dataType = fd.type.multiArrayType.INT32


def _core_ml_shape(i, seq_inputs: set) -> tuple:
    """The declared Core ML shape of an input: ``(C,)`` for a sequence, ``(C, 1, L)`` for a
    ``(C, L)`` feature map (the rank-5 blob torch's ``(N, C, L)`` maps to), else its own."""
    if i.name in seq_inputs:
        return tuple(i.shape[-1:])
    if len(i.shape) == 2:
        return (i.shape[0], 1, i.shape[1])
    return tuple(i.shape)


def _set_metadata(spec, metadata: Optional[dict]) -> None:
    if not metadata:
        return
    fields = {"author": "author", "license": "license", "description": "shortDescription",
              "version": "versionString"}
    for key, value in metadata.items():
        if key in fields:
            setattr(spec.description.metadata, fields[key], str(value))
        elif key == "user_defined":
            for k, v in dict(value).items():
                spec.description.metadata.userDefined[str(k)] = str(v)
        else:
            raise ConversionError(f"unknown metadata key {key!r}; use {sorted(fields)} or "
                                  "'user_defined' (a dict of str -> str)")


def _updatable_layers(module, ctx: Context) -> list[str]:
    """Layer names of Conv1d/Conv2d/Linear/LSTM modules that require grad (or are marked
    updatable); a Conv1d is a convolution layer with a 1 x k kernel."""
    names: list[str] = []
    for path, m in module.named_modules():
        own = list(m.parameters(recurse=False))
        marked = bool(getattr(m, "_mlpersonal_updatable", False))
        trainable = any(p.requires_grad for p in own)
        if not (marked or trainable):
            continue
        if not isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear, torch.nn.LSTM)):
            raise ConversionError(
                f"module {path!r} ({type(m).__name__}) has trainable parameters, but only Conv1d, "
                f"Conv2d, Linear and LSTM layers can be updatable in Core ML; freeze it with "
                f"model.{path}.requires_grad_(False) (or trainers.freeze) before exporting"
            )
        layers = ctx.layers_by_path.get(path, [])
        if isinstance(m, torch.nn.LSTM) and len(layers) == m.num_layers:
            names.extend(layers)  # one uniDirectionalLSTM per torch layer
            continue
        if len(layers) != 1:
            raise ConversionError(
                f"module {path!r} is updatable but appears {len(layers)} times in the exported "
                "graph; an updatable layer must be used exactly once"
            )
        names.extend(layers)
    if not names:
        raise ConversionError("respect_trainable=True but no Conv2d/Linear/LSTM parameter requires grad; "
                              "unfreeze (or trainers.mark_updatable) the layers to personalize")
    return names


class _Root(torch.nn.Module):
    """Holds a bare leaf module (``convert(nn.Linear(3, 2), ...)``) so it traces as one layer."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.name = type(module).__name__.lower()
        self.add_module(self.name, module)

    def forward(self, x):
        return getattr(self, self.name)(x)


def _apply_qat(spec, root: torch.nn.Module, ctx: Context) -> None:
    """Store the n-bit weights of modules prepared by ``trainers.prepare_qat`` (exactly what
    their eval forward uses) instead of the float values the op converters wrote."""
    from .quantized import apply_qat_weights, is_qat

    names = {}
    for path, m in root.named_modules():
        if path and is_qat(m):
            layers = ctx.layers_by_path.get(path, [])
            if len(layers) != 1:
                raise ConversionError(f"QAT module {path!r} appears {len(layers)} times in the "
                                      "exported graph; a quantized layer must be used exactly once")
            names[path] = layers[0]
    if names:
        apply_qat_weights(spec, root, names)


def _module_modes(module):
    return [(m, m.training) for m in module.modules()]


def _set_flexible_inputs(spec, module, inputs) -> None:
    """Write the enumerated sizes/shapes or ranges the inputs declare (exporters.flexible)."""
    from . import flexible

    flex = [i for i in inputs if i.is_flexible]
    if not flex:
        return
    report = flexible.is_flexible(module, (1, *flex[0].shape) if len(inputs) == 1 else None)
    if not report:
        raise ConversionError(f"input {flex[0].name!r} asks for flexible shapes, but the network "
                              f"is not fully convolutional: {report.reason}")
    for i in flex:
        if isinstance(i, ImageType):
            if i.enumerated_sizes is not None:
                flexible.set_enumerated_image_sizes(spec, i.name, i.enumerated_sizes)
            else:
                flexible.set_image_size_range(spec, i.name, *i.size_range)
        elif i.enumerated_shapes is not None:
            flexible.set_enumerated_shapes(spec, i.name, i.enumerated_shapes)
        else:
            flexible.set_shape_range(spec, i.name, i.shape_range)


def convert(module: torch.nn.Module, inputs: Sequence[Union[ImageType, TensorType]], *,
            classifier: Optional[ClassifierConfig] = None,
            regressor: Union[None, str, Sequence[str]] = None,
            outputs: Optional[Sequence[str]] = None,
            respect_trainable: bool = False, update=None, metadata: Optional[dict] = None,
            minimum_spec_version: int = 4,
            custom_conversion_functions: Optional[dict[Any, Callable]] = None,
            exact_shapes: Optional[bool] = None) -> Model_pb2.Model:
    """Export ``module`` (in eval mode) as a Core ML NeuralNetwork spec.

    ``custom_conversion_functions`` maps a module type (or a function) to ``fn(module_or_fn)``
    returning ``{"className", "description", "parameters": {...}, "weights": [arrays]}``, written
    as a custom layer. With ``respect_trainable`` the Conv2d/Linear layers whose parameters require
    grad become updatable (``update``: an :class:`exporters.updatable.UpdateConfig`). Layers
    prepared by ``trainers.prepare_qat`` are stored with their learned n-bit weights
    (:func:`exporters.quantized.apply_qat_weights`), so the spec predicts what the module does.

    ``exact_shapes``: None (default) writes iOS 11-12 layers on rank-5 blobs unless the module
    holds attention or a product of two activations, which only Core ML 3's ND layers express
    (EXACT_ARRAY_MAPPING: each blob has its torch shape without the batch axis,
    :mod:`exporters.ndops`); True / False force one mode.
    """
    from coremltools.models import datatypes
    from coremltools.models.neural_network import NeuralNetworkBuilder

    if not isinstance(module, torch.nn.Module):
        raise ConversionError(f"convert expects a torch.nn.Module, got {type(module).__name__}")
    if classifier is not None and not isinstance(classifier, ClassifierConfig):
        raise ConversionError("classifier= must be an mp.ClassifierConfig(labels=[...])")
    if update is not None and not respect_trainable:
        raise ConversionError("update= needs respect_trainable=True (which layers to update)")
    if not isinstance(minimum_spec_version, int) or minimum_spec_version < 1:
        raise ConversionError(f"minimum_spec_version must be an int >= 1, got {minimum_spec_version!r}")
    inputs = _validate_inputs(inputs)
    custom = dict(custom_conversion_functions or {})

    modes = _module_modes(module)
    module.eval()
    root = module
    if isinstance(module, tuple(ops.MODULES) + tuple(t for t in custom if isinstance(t, type))):
        root = _Root(module)  # layer named after the class, e.g. "linear"
    try:
        gm = _trace(root, inputs, custom)
        nd = needs_nd(gm) if exact_shapes is None else bool(exact_shapes)
        ints = [i.name for i in inputs if getattr(i, "dtype", "float32") == "int32"]
        if ints and not nd:
            raise ConversionError(f"token-id inputs {ints} are read in ND mode only (nn.Embedding); "
                                  "leave exact_shapes unset or True")
        out_nodes = _graph_outputs(gm)
        out_names = _output_names(len(out_nodes), classifier, regressor, outputs)
        if nd:
            _check_nd_inputs(gm, inputs)
            seq_inputs: set[str] = set()
            in_features = [(i.name, datatypes.Array(*i.shape)) for i in inputs]
        else:
            seq_inputs = _sequence_inputs(gm, inputs)
            in_features = [(i.name, datatypes.Array(*_core_ml_shape(i, seq_inputs))) for i in inputs]
        if classifier is not None:
            scores = tuple(out_nodes[0].meta["tensor_meta"].shape[1:])
            n = int(np.prod(scores))
            if n != len(classifier.labels):
                raise ConversionError(f"the module gives {n} class scores but ClassifierConfig has "
                                      f"{len(classifier.labels)} labels")
            if nd and len(scores) != 1:
                raise ConversionError(f"a classifier's scores must be (N, classes); the module gives "
                                      f"{(_BATCH, *scores)}: flatten them")
            out_features = [(classifier.probabilities_name, datatypes.Array(n))]
            mode = "classifier"
        else:
            out_features = [(name, datatypes.Array(*(node.meta["tensor_meta"].shape[-1:]
                                                     if not nd and recurrent.is_sequence_output(gm, node)
                                                     else node.meta["tensor_meta"].shape[1:])))
                            for name, node in zip(out_names, out_nodes)]
            mode = "regressor" if regressor is not None else None
        names = [i.name for i in inputs] + out_names
        if classifier is not None:
            names.append(classifier.predicted_feature_name)
        if len(set(names)) != len(names):
            raise ConversionError(f"input and output names must all differ, got {names}")
        reserved = set(names)
        builder = NeuralNetworkBuilder(in_features, out_features, mode=mode, use_float_arraytype=True,
                                       disable_rank5_shape_mapping=nd)
        if nd:  # images arrive as (1, C, H, W) (exporters.ndops: squeezed to the torch shape)
            builder.nn_spec.imageInputShapeMapping = NeuralNetwork_pb2.RANK4_IMAGE_MAPPING
        ctx = Context(gm, builder, reserved, out_nodes[0] if classifier is not None else None, nd=nd)
        ctx.sequences.update(seq_inputs)
        _emit(ctx, gm, inputs, custom)
    finally:
        for m, training in modes:
            m.training = training

    nn_spec = builder.nn_spec
    out_blobs = [ctx.blobs[n] for n in out_nodes]
    if classifier is not None:
        blob = out_blobs[0]
        prod = _producer(nn_spec, blob)
        if nd:
            _nd_class_probabilities(ctx, nn_spec, blob, prod, classifier.probabilities_name,
                                    len(classifier.labels))
        elif prod is not None and prod.WhichOneof("layer") == "softmax":
            _rename_blob(nn_spec, blob, classifier.probabilities_name)
        else:
            name = ctx.new_blob("softmax")
            ctx.used_layers.add(name)
            builder.add_softmax(name, blob, classifier.probabilities_name)
        builder.set_class_labels(list(classifier.labels), classifier.predicted_feature_name,
                                 classifier.probabilities_name)
    else:
        if regressor is not None:  # Core ML: a regressor names its prediction
            builder.spec.description.predictedFeatureName = out_names[0]
        renamed: dict[str, str] = {}  # blob -> the output name it now has
        input_names = {i.name for i in inputs}
        for blob, name in zip(out_blobs, out_names):
            if blob in input_names or blob in renamed or _producer(nn_spec, blob) is None:
                builder.add_activation(ctx.new_blob(f"{name}_identity"), "LINEAR",
                                       renamed.get(blob, blob), name, params=[1.0, 0.0])
            else:
                _rename_blob(nn_spec, blob, name)
                renamed[blob] = name

    images = [i for i in inputs if isinstance(i, ImageType)]
    if images:
        kw = {"red_bias": {}, "green_bias": {}, "blue_bias": {}, "gray_bias": {}, "image_scale": {},
              "is_bgr": {}}
        for im in images:
            kw["image_scale"][im.name] = im.scale
            kw["is_bgr"][im.name] = im.color == "bgr"
            if im.color == "grayscale":
                kw["gray_bias"][im.name] = im.bias[0]
            else:
                r, g, b = im.bias if im.color == "rgb" else im.bias[::-1]
                kw["red_bias"][im.name], kw["green_bias"][im.name], kw["blue_bias"][im.name] = r, g, b
        builder.set_pre_processing_parameters(image_input_names=[i.name for i in images], **kw)

    spec = builder.spec
    spec.specificationVersion = max(int(spec.specificationVersion), minimum_spec_version, 4)
    _set_int_inputs(spec, inputs)
    for fd in spec.description.input:
        if fd.name in ctx.state_inputs:
            fd.type.isOptional = True
    _set_flexible_inputs(spec, module, inputs)
    _set_metadata(spec, metadata)
    _apply_qat(spec, root, ctx)
    if respect_trainable:
        layer_names = _updatable_layers(root, ctx)
        try:
            from exporters.updatable import make_updatable
        except ImportError as e:
            raise ConversionError(f"updatable export is not available: {e}") from e
        make_updatable(spec, layer_names, update)
    return spec
