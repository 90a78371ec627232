"""Training on the PyTorch side: quantization-aware training, updatable marks, fit loops, DDP."""

from .fit import close_distributed, distributed_context, fit
from .marking import MARKER, freeze, is_marked_updatable, mark_updatable
from .qat import prepare_qat

__all__ = ["MARKER", "close_distributed", "distributed_context", "fit", "freeze", "is_marked_updatable",
           "mark_updatable", "prepare_qat"]
