"""Input declarations for the exporter: ImageType and TensorType (coremltools-like)."""
