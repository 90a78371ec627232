"""No code from data: strings in a model file are never imported, evaluated, unpickled or opened.

Hostile payloads (Python expressions, dotted callables, a pickle that would run ``touch``) are put
in class names of custom layers/models, linked-model file names, metadata, class labels and
layer/stage names. An audit hook (PEP 578) records every import, exec/compile, unpickling, process
start and file open while such files are loaded and run: none may happen, no marker file may
appear, ``sys.modules`` gains nothing, and where the model can't run the error is a clear
MLPersonalError (an unregistered custom class is a registry miss).
"""

import os
import pickle
import sys

import numpy as np
import pytest

import mlpersonal as mp
import runtime
from benchmarks.fuzz import base_specs, valid_input
from mlpersonal.proto import Model_pb2
from runtime.custom import CUSTOM_LAYERS, CUSTOM_MODELS
from runtime.layers import LAYERS

FORBIDDEN = ("import", "exec", "compile", "pickle.find_class", "marshal.loads", "os.system",
             "subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
             "ctypes.dlopen", "open", "os.listdir", "os.scandir", "glob.glob", "shutil")

_events: list = []
_recording = [False]


def _hook(event, args):
    if _recording[0] and event.startswith(FORBIDDEN):
        _events.append((event, repr(args)[:200]))


sys.addaudithook(_hook)


class _Touch:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.fixture(scope="module")
def bases():
    return base_specs()


def _payloads(marker):
    blob = pickle.dumps(_Touch(marker), protocol=0).decode("latin-1")
    return [f"__import__('os').system('touch {marker}')", "os.system", "subprocess.Popen",
            f"eval(\"open('{marker}', 'w')\")", "pickle.loads", blob, "builtins.exec",
            "runtime.custom.register_custom_layer"]


def _run_recorded(data):
    """mp.load(bytes) + one predict, with the audit hook recording: (outcome, events)."""
    modules = set(sys.modules)
    _events.clear()
    _recording[0] = True
    try:
        try:
            m = mp.load(data)
            ex = valid_input(m.spec, np.random.default_rng(0))
            out = ("ok", m.predict(ex))
        except mp.MLPersonalError as e:
            out = ("error", e)
    finally:
        _recording[0] = False
    assert set(sys.modules) == modules, set(sys.modules) - modules
    return out, list(_events)


@pytest.fixture(autouse=True)
def _warm(bases):
    # import everything the runtime imports lazily, so that the recording sees only the payloads
    for name in ("nn_image_classifier", "updatable_nn"):
        m = mp.load(bases[name].SerializeToString())
        m.predict(valid_input(m.spec, np.random.default_rng(0)))
    for spec in (_custom_layer_spec("Warm"), _custom_model_spec("Warm"), _linked_spec("w.mlmodel")):
        with pytest.raises(mp.MLPersonalError):
            mp.load(spec.SerializeToString())


def _custom_layer_spec(class_name):
    from coremltools.models import datatypes
    from coremltools.models.neural_network import NeuralNetworkBuilder

    b = NeuralNetworkBuilder([("x", datatypes.Array(4))], [("y", datatypes.Array(4))])
    layer = b.spec.neuralNetwork.layers.add()
    layer.name = "evil"
    layer.input.append("x")
    layer.output.append("y")
    layer.custom.className = class_name
    layer.custom.description = class_name
    layer.custom.parameters["code"].stringValue = class_name
    b.spec.specificationVersion = 4
    return b.spec


def _custom_model_spec(class_name):
    spec = Model_pb2.Model()
    spec.specificationVersion = 4
    for group in (spec.description.input, spec.description.output):
        f = group.add()
        f.name = "x" if group is spec.description.input else "y"
        f.type.multiArrayType.shape.append(4)
        f.type.multiArrayType.dataType = f.type.multiArrayType.FLOAT32
    spec.customModel.className = class_name
    spec.customModel.parameters["code"].stringValue = class_name
    return spec


def _linked_spec(file_name):
    spec = _custom_model_spec("unused")
    spec.linkedModel.linkedModelFile.linkedModelFileName.defaultValue = file_name
    spec.linkedModel.linkedModelFile.linkedModelSearchPath.defaultValue = "$BUNDLE_MAIN/models"
    return spec


def _assert_clean(events, marker):
    assert events == []
    assert not os.path.exists(marker)


def test_payloads_in_metadata_labels_and_names_are_plain_data(bases, tmp_path):
    marker = str(tmp_path / "PWNED")
    payloads = _payloads(marker)
    spec = Model_pb2.Model()
    spec.CopyFrom(bases["nn_image_classifier"])
    md = spec.description.metadata
    md.author, md.license, md.shortDescription, md.versionString = payloads[:4]
    for i, p in enumerate(payloads):
        md.userDefined[f"k{i}"] = p
    md.userDefined[payloads[0]] = payloads[5]  # the pickle, keyed by an expression
    labels = spec.neuralNetworkClassifier.stringClassLabels.vector
    labels[:] = [payloads[0], payloads[5], "os.system"]
    spec.neuralNetworkClassifier.layers[2].name = payloads[1]
    (kind, out), events = _run_recorded(spec.SerializeToString())
    _assert_clean(events, marker)
    assert kind == "ok"
    assert out["label"] in labels and set(out["probs"]) == set(labels)  # returned verbatim
    again = mp.load(spec.SerializeToString()).spec.description.metadata
    assert dict(again.userDefined) == dict(md.userDefined)


@pytest.mark.parametrize("i", range(8))
def test_hostile_custom_layer_class_name_is_a_registry_miss(tmp_path, i):
    marker = str(tmp_path / "PWNED")
    name = _payloads(marker)[i]
    before = dict(CUSTOM_LAYERS)
    (kind, err), events = _run_recorded(_custom_layer_spec(name).SerializeToString())
    _assert_clean(events, marker)
    assert kind == "error"
    # with the custom-layer builder present (runtime/layers/custom.py) the miss is a
    # CustomLayerError; without it the 'custom' kind itself is unsupported
    expected = mp.CustomLayerError if "custom" in LAYERS else mp.UnsupportedLayerError
    assert isinstance(err, expected), err
    assert dict(CUSTOM_LAYERS) == before


@pytest.mark.parametrize("i", range(8))
def test_hostile_custom_model_class_name_is_a_registry_miss(tmp_path, i):
    marker = str(tmp_path / "PWNED")
    name = _payloads(marker)[i]
    before = dict(CUSTOM_MODELS)
    (kind, err), events = _run_recorded(_custom_model_spec(name).SerializeToString())
    _assert_clean(events, marker)
    assert kind == "error"
    expected = (mp.CustomLayerError if "customModel" in runtime.model.MODEL_KINDS
                else mp.UnsupportedLayerError)
    assert isinstance(err, expected), err
    assert dict(CUSTOM_MODELS) == before


def _linked_expected():
    # with linked-model support (runtime/pipeline.py) a bad name is a LinkedModelError; without
    # it the 'linkedModel' kind itself is unsupported
    return (mp.LinkedModelError if "linkedModel" in runtime.model.MODEL_KINDS
            else mp.UnsupportedLayerError)


@pytest.mark.parametrize("file_name", ["../../../etc/passwd", "/etc/passwd", "a/../../b.mlmodel",
                                       "..\\..\\x.mlmodel", ""])
def test_linked_model_names_outside_the_search_path_are_refused(tmp_path, file_name):
    marker = str(tmp_path / "PWNED")
    (kind, err), events = _run_recorded(_linked_spec(file_name).SerializeToString())
    _assert_clean(events, marker)
    assert kind == "error" and isinstance(err, _linked_expected()), err


@pytest.mark.parametrize("i", range(8))
def test_linked_model_payload_names_open_nothing(tmp_path, i):
    marker = str(tmp_path / "PWNED")
    name = _payloads(marker)[i]
    (kind, err), events = _run_recorded(_linked_spec(name).SerializeToString())
    _assert_clean(events, marker)
    assert kind == "error" and isinstance(err, mp.MLPersonalError)


def test_audit_hook_sees_what_it_guards(tmp_path):
    """Control: the recorder does catch an unpickle, an eval and an open when they happen."""
    marker = str(tmp_path / "PWNED")
    _events.clear()
    _recording[0] = True
    try:
        pickle.loads(pickle.dumps(_Touch(marker), protocol=0))
        eval("1 + 1")
    finally:
        _recording[0] = False
    kinds = {e for e, _ in _events}
    assert {"pickle.find_class", "exec", "os.system"} <= kinds
    assert os.path.exists(marker)  # and the payload itself is real
