# make test / make demo bootstrap .venv on a fresh machine. The pinned CPU torch is installed first so that pip never
# resolves torch to a multi-GB CUDA build; GPU users override it: make test TORCH_SPEC="torch==2.13.0 --index-url ..."
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYTEST_ARGS ?=

.PHONY: test demo bench docs clean install

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: $(VENV)/.installed
	$(PY) -m hiermoe_lightning fit --config configs/demo.yaml

clean:
	rm -rf $(VENV) build dist *.egg-info runs lightning_logs .pytest_cache
