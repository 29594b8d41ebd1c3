# Each target sets up .venv itself (pip, pinned versions), then runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch==2.13.0 is pinned in the `test` extra: its CPU wheel (no multi-GB CUDA download).
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dreamr demo

# Lint first (pyproject.toml [tool.ruff]), then the suite. pytest exits 5 when it collects no
# test: that is a failure of the suite, not a pass.
test: $(STAMP)
	$(VENV)/bin/ruff check dreamr_jax tests scripts train infer
	$(PY) -m pytest -q tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests were collected"; fi; exit $$rc

bench: $(STAMP)
	$(PY) scripts/bench_decode.py --json out/bench_decode.json

clean:
	rm -rf $(VENV) out .pytest_cache
