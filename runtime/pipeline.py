"""pipeline / pipelineClassifier / pipelineRegressor models and linked models. See issue 4."""
