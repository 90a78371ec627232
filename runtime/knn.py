"""k-nearest-neighbors classifier models (kNearestNeighborsClassifier). See issue 4."""
