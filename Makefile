# `make demo` runs the sticker-classifier example; `make test` runs the tests.
# Both create/reuse ./.venv. torch 2.13.0 (CPU wheel) is installed first when no torch is
# present: an unpinned torch would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mlpersonal-installed

.PHONY: demo test bench bench-ort-training venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/sticker_classifier/demo.py

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

# benchmarks/update.py beside onnxruntime-training, which cannot share a venv with onnxruntime
# (same module name): a second venv holds it and runs the benchmark's child process.
ORT_VENV := .venv-ort-training
bench-ort-training: $(STAMP)
	test -x $(ORT_VENV)/bin/python || $(PYTHON) -m venv $(ORT_VENV)
	$(ORT_VENV)/bin/python -c "import onnxruntime.training, onnx, torch" 2>/dev/null || \
		$(ORT_VENV)/bin/python -m pip install "torch==2.13.0" numpy onnx "onnxruntime-training==1.19.2"
	MLPERSONAL_ORT_PYTHON=$(ORT_VENV)/bin/python $(PY) benchmarks/update.py

clean:
	rm -rf $(VENV) $(ORT_VENV) build *.egg-info
