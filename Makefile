# Two commands do all the set-up on a fresh machine:
#   make demo   -- baseline vs fastdiff on the embedded default model, prints a table
#   make test   -- the whole test suite (CPU, offline, < 20 min on 2 cores)
# Each creates .venv on first use. CPU machines get the pinned CPU torch wheel; on a GPU machine run
#   make TORCH="torch" test
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: demo test setup clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) examples/demo.py

# pytest exits 5 when it collected no test: that is a failure here, never a silent pass.
test: $(VENV)/.installed
	$(PY) -m pytest tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV)
