"""Training on the PyTorch side: quantization-aware training, updatable marks, fit loops, DDP."""

from .fit import distributed_context, fit
