"""The Core ML spec types: coremltools' generated protobuf modules, re-exported in one place."""

import importlib as _importlib
import importlib.util as _ilu
import logging as _logging
import os as _os
import re as _re
import sys as _sys

# coremltools logs harmless warnings at import on Linux (no native runtime, untested torch).
_logging.getLogger("coremltools").setLevel(_logging.ERROR)

def _register_proto_package() -> None:
    """Make ``coremltools.proto`` importable without running ``coremltools/__init__`` (converters,
    version checks: ~2.5 s, which a device runtime does not need).

    The package and its modules are registered under their real names, so a later
    ``import coremltools`` reuses them: there is one set of message classes either way. Each
    module's ``from . import X`` dependencies are loaded (and set on the package) before it,
    because a relative import of a missing attribute would import the top-level package.
    """
    if "coremltools" in _sys.modules or "coremltools.proto" in _sys.modules:
        return
    spec = _ilu.find_spec("coremltools")
    if spec is None or not spec.submodule_search_locations:
        return
    folder = _os.path.join(list(spec.submodule_search_locations)[0], "proto")
    pspec = _ilu.spec_from_file_location("coremltools.proto", _os.path.join(folder, "__init__.py"),
                                         submodule_search_locations=[folder])
    if pspec is None:
        return
    package = _ilu.module_from_spec(pspec)  # its __init__ only imports some of the modules
    _sys.modules["coremltools.proto"] = package

    def load(name: str) -> None:
        if hasattr(package, name):
            return
        with open(_os.path.join(folder, name + ".py"), encoding="utf-8") as f:
            deps = _re.findall(r"^from \. import (\w+)", f.read(), flags=_re.M)
        for dep in deps:
            load(dep)
        setattr(package, name, _importlib.import_module(f"coremltools.proto.{name}"))

    try:
        # what coremltools/proto/__init__.py imports, and what we re-export (with their deps)
        for name in ("FeatureTypes_pb2", "MIL_pb2", "Model_pb2", "NeuralNetwork_pb2",
                     "NearestNeighbors_pb2", "Parameters_pb2", "DataStructures_pb2"):
            load(name)
    except BaseException:
        for name in [n for n in _sys.modules if n.startswith("coremltools.proto")]:
            del _sys.modules[name]
        raise


_register_proto_package()

from coremltools.proto import (  # noqa: E402
    DataStructures_pb2,
    FeatureTypes_pb2,
    Model_pb2,
    NearestNeighbors_pb2,
    NeuralNetwork_pb2,
    Parameters_pb2,
)

Model = Model_pb2.Model

__all__ = [
    "DataStructures_pb2",
    "FeatureTypes_pb2",
    "Model",
    "Model_pb2",
    "NearestNeighbors_pb2",
    "NeuralNetwork_pb2",
    "Parameters_pb2",
]
