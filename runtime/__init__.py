"""mlpersonal runtime: load any .mlmodel, predict, and run on-device update tasks with torch.

The runtime depends only on the ``mlpersonal`` core, never on trainers or exporters.
"""

from .batch import ArrayBatchProvider, DictionaryColumn
from .custom import register_custom_layer, register_custom_model
from .model import CompiledModel, compile_spec, load

# model kinds register themselves on import
from . import custom_model, knn, neural_network, pipeline  # noqa: F401,E402

__all__ = ["ArrayBatchProvider", "DictionaryColumn", "CompiledModel", "compile_spec", "load", "register_custom_layer", "register_custom_model"]
