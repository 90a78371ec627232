"""The error hierarchy: every failure a user can cause raises a subclass of MLPersonalError.

Messages say what is wrong and what to do about it.
"""


class MLPersonalError(Exception):
    """Base class of every error mlpersonal raises on bad input."""


class InvalidModelError(MLPersonalError, ValueError):
    """A model file or spec is malformed, truncated, inconsistent or of an unknown version."""


class UnsupportedLayerError(MLPersonalError, NotImplementedError):
    """A layer/op kind the exporter or runtime cannot handle."""


class InvalidInputError(MLPersonalError, ValueError):
    """A feature value (prediction input or training example) is missing, mis-shaped or invalid."""


class UpdateParameterError(MLPersonalError, ValueError):
    """An update parameter is unknown or outside the range/set the model allows."""


class TrainingError(MLPersonalError, RuntimeError):
    """An update task failed while training (e.g. the loss became NaN)."""


class ConversionError(MLPersonalError, ValueError):
    """A torch module cannot be converted as asked (bad options, untraceable code, ...)."""


class CustomLayerError(InvalidModelError):
    """A custom layer/model class name has no registered implementation."""


class LinkedModelError(InvalidModelError):
    """A linked model file is missing or its name escapes the search path."""
