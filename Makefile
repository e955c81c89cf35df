# make test / make demo bootstrap .venv on a fresh machine. The pinned CPU torch is installed first so that pip never
# resolves torch to a multi-GB CUDA build; GPU users override it: make test TORCH_SPEC="torch==2.13.0 --index-url ..."
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYTEST_ARGS ?=
# make test-under-load: the same suite beside a CPU hog (one busy process per core) that stops with it
HOG_SECONDS ?= 3600

.PHONY: test test-under-load demo bench docs clean install

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q $(PYTEST_ARGS)

# CI shares its machine: the suite must stay green while other jobs use every core (docs/reliability.md)
test-under-load: $(VENV)/.installed
	exec env PYTHON=$(PY) .ci/with_cpu_hog.sh --seconds $(HOG_SECONDS) -- $(PY) -m pytest -q $(PYTEST_ARGS)

demo: $(VENV)/.installed
	$(PY) -m hiermoe_lightning fit --config configs/demo.yaml

clean:
	rm -rf $(VENV) build dist *.egg-info runs lightning_logs .pytest_cache
