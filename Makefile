# One set-up for everything: a venv with torch (the CPU build by default) first, then every package editable.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PACKAGES := core $(patsubst %/pyproject.toml,%,$(wildcard adapters/*/pyproject.toml plugins/*/pyproject.toml))
PYPROJECTS := $(addsuffix /pyproject.toml,$(PACKAGES))
DEMO_OUT ?= demo-out
# Test files run in parallel processes (pytest-xdist), each file whole in one process so that its
# module fixtures are built once (the suite took 12 min so on the 2-core machine). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
DIST ?= dist
BUILD_VENV ?= .build-venv
SITE ?= site
# Which torch, explicitly: PyPI's Linux torch wheels are CUDA builds (several GB), so a bare "torch"
# requirement pulls one. The +cpu label refuses any other build; the PyTorch index serves it (a wheel
# already on disk through pip's find-links is used first, without the network). Another build, e.g.:
#   make setup TORCH_SPEC=torch==2.13.0 TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH_SPEC ?= torch==2.13.0+cpu
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: setup torch test demo lint docs dist bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: $(PYPROJECTS) requirements-dev.txt Makefile
	$(MAKE) --no-print-directory torch
	$(PY) -m pip install -q -r requirements-dev.txt $(addprefix -e ./,$(PACKAGES))
	touch $@

# torch alone into $(VENV) (made if missing), before anything that depends on it.
torch:
	test -x $(PY) || { $(PYTHON) -m venv $(VENV) && $(PY) -m pip install -q --upgrade pip; }
	$(PY) -m pip install -q --no-index --no-deps "$(TORCH_SPEC)" 2>/dev/null \
		|| $(PY) -m pip install -q --index-url "$(TORCH_INDEX)" "$(TORCH_SPEC)"

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

demo: setup
	$(VENV)/bin/esn demo --out $(DEMO_OUT)

lint: setup
	$(VENV)/bin/ruff check .

# The documentation site with its API reference, strict: a broken link or a public name without a
# docstring fails the build (tests/test_docs_site.py runs the same build in `make test`).
docs: setup
	$(VENV)/bin/mkdocs build --strict --site-dir $(SITE)

# A wheel and an sdist of every distribution (the wheel built from the sdist), into $(DIST)/. Needs only
# Python and pip: the build frontend and the backend (flit_core) get a small venv of their own, not the
# development one (torch, nnsight, mkdocs...). Then: pip install --find-links $(DIST) esn-core esn-qwen-omni
dist: $(BUILD_VENV)/.installed
	rm -rf $(DIST)
	for pkg in $(PACKAGES); do $(BUILD_VENV)/bin/python -m build --no-isolation --outdir $(DIST) $$pkg > /dev/null || exit 1; done
	ls $(DIST)

$(BUILD_VENV)/.installed: Makefile
	test -x $(BUILD_VENV)/bin/python || $(PYTHON) -m venv $(BUILD_VENV)
	$(BUILD_VENV)/bin/python -m pip install -q "build>=1.2" "flit_core>=3.12,<5"
	touch $@

# CPU, tiny models: a smoke run of every benchmark. GPU numbers: see docs/performance.md.
bench: setup
	$(VENV)/bin/python benchmarks/bench_recording.py --size tiny
	$(VENV)/bin/python benchmarks/bench_steering.py --size tiny
	$(VENV)/bin/python benchmarks/bench_qwen_omni.py --size tiny --device cpu --work 8 16 2 --plan "2:eager/plain,graph/plain,graph/record,graph/rows+record" --repeats 1
	$(VENV)/bin/python benchmarks/bench_qwen3_omni.py --size tiny --device cpu --batches 1 2 --text-tokens 4 --audio-tokens 6 --repeats 1 --seconds 1 --variants record steer steer_rows steer_rows_same
	$(VENV)/bin/python benchmarks/bench_graph_decode.py --device cpu --size tiny --repeats 2 --steps 8
	$(VENV)/bin/python benchmarks/bench_serve.py --requests 8 --concurrency 4 --time-limit 60
	$(VENV)/bin/python benchmarks/bench_first_audio.py --rounds 1 --concurrency 1 2
	$(VENV)/bin/python benchmarks/token2wav_horizon.py --perturb 1 2
	$(VENV)/bin/python benchmarks/bench_store.py --size tiny --attempts 100 --distinct 2

clean:
	rm -rf $(VENV) $(BUILD_VENV) $(DEMO_OUT) $(DIST) $(SITE)
