"""Spec I/O: load_spec / save round trips and clear errors for bad files."""

import os

import pytest
from coremltools.models import datatypes
from coremltools.models.neural_network import NeuralNetworkBuilder

import mlpersonal as mp
import numpy as np


def _spec():
    b = NeuralNetworkBuilder([("x", datatypes.Array(4))], [("y", datatypes.Array(2))])
    b.add_inner_product("fc", np.arange(8, dtype=np.float32).reshape(2, 4), None, 4, 2, False, "x", "y")
    return b.spec


def test_roundtrip(tmp_path):
    spec = _spec()
    p = mp.save(spec, tmp_path / "m.mlmodel")
    again = mp.load_spec(p)
    assert again == spec
    assert mp.load_spec(p.read_bytes()) == spec
    out = mp.load(p).predict({"x": np.ones(4, np.float32)})["y"]
    np.testing.assert_allclose(out, [6.0, 22.0])


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"", "empty"),
        (b"\xff\xfe not a protobuf at all \x00\x01", "not a valid .mlmodel"),
    ],
)
def test_bad_bytes(tmp_path, content, needle):
    p = tmp_path / "bad.mlmodel"
    p.write_bytes(content)
    with pytest.raises(mp.InvalidModelError, match=needle):
        mp.load_spec(p)


def test_truncated_and_missing(tmp_path):
    data = _spec().SerializeToString()
    for cut in (len(data) // 3, len(data) - 7):
        p = tmp_path / f"t{cut}.mlmodel"
        p.write_bytes(data[:cut])
        with pytest.raises(mp.InvalidModelError):
            mp.load(p)
    with pytest.raises(mp.InvalidModelError, match="does not exist"):
        mp.load_spec(tmp_path / "nope.mlmodel")


def test_unknown_version():
    spec = _spec()
    spec.specificationVersion = 99
    with pytest.raises(mp.InvalidModelError, match="specificationVersion 99"):
        mp.load(spec.SerializeToString())


def test_missing_weights():
    spec = _spec()
    spec.neuralNetwork.layers[0].innerProduct.weights.ClearField("floatValue")
    with pytest.raises(mp.InvalidModelError, match="fc"):
        mp.load(spec)


def test_atomic_save_leaves_no_temp(tmp_path):
    p = tmp_path / "m.mlmodel"
    mp.save(_spec(), p)
    mp.save(_spec(), p)
    assert os.listdir(tmp_path) == ["m.mlmodel"]
