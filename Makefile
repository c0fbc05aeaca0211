# One set-up for everything: a venv with torch 2.13.0 (CPU wheel) first, then every package editable.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PACKAGES := core $(patsubst %/pyproject.toml,%,$(wildcard adapters/*/pyproject.toml plugins/*/pyproject.toml))
PYPROJECTS := $(addsuffix /pyproject.toml,$(PACKAGES))
DEMO_OUT ?= demo-out

.PHONY: setup test demo lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: $(PYPROJECTS) requirements-dev.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: a bare "torch" requirement would otherwise pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements-dev.txt $(addprefix -e ./,$(PACKAGES))
	touch $@

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q

demo: setup
	$(VENV)/bin/esn demo --out $(DEMO_OUT)

lint: setup
	$(VENV)/bin/ruff check .

# CPU, tiny models: a smoke run of every benchmark. GPU numbers: see docs/performance.md.
bench: setup
	$(VENV)/bin/python benchmarks/bench_recording.py --size tiny
	$(VENV)/bin/python benchmarks/bench_steering.py --size tiny
	$(VENV)/bin/python benchmarks/bench_qwen_omni.py --size tiny --device cpu
	$(VENV)/bin/python benchmarks/bench_graph_decode.py --device cpu --size tiny --repeats 2 --steps 8

clean:
	rm -rf $(VENV) $(DEMO_OUT)
