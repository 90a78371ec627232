"""The runtime reads specs with coremltools' proto modules only: loading and predicting must not
import the coremltools package (converters, version checks: seconds at start-up on a device),
and a later `import coremltools` must reuse the same message classes."""

import subprocess
import sys
import textwrap


def test_runtime_does_not_import_coremltools_and_classes_stay_shared(tmp_path):
    code = textwrap.dedent("""
        import sys
        import numpy as np
        import mlpersonal as mp
        from mlpersonal.proto import Model_pb2, NeuralNetwork_pb2
        spec = Model_pb2.Model(specificationVersion=4)
        for name, io in (("x", spec.description.input), ("y", spec.description.output)):
            f = io.add(); f.name = name
            f.type.multiArrayType.shape.append(2)
            f.type.multiArrayType.dataType = Model_pb2.ArrayFeatureType.FLOAT32
        layer = spec.neuralNetwork.layers.add(name="relu", input=["x"], output=["y"])
        layer.activation.ReLU.SetInParent()
        out = mp.load(spec).predict({"x": np.array([-1.0, 2.0], np.float32)})["y"]
        assert out.tolist() == [0.0, 2.0], out
        assert "coremltools" not in sys.modules, "the runtime imported coremltools"
        import coremltools
        from coremltools.models.neural_network import NeuralNetworkBuilder
        from coremltools.models import datatypes
        b = NeuralNetworkBuilder([("x", datatypes.Array(2))], [("y", datatypes.Array(2))])
        assert isinstance(b.spec, Model_pb2.Model)
        assert coremltools.proto.Model_pb2 is Model_pb2
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]
