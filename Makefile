# Two commands do everything on a fresh Debian/Ubuntu machine:
#   make demo   set up (Fashion-MNIST package, virtualenv, torch, robusttrain) and run the short comparison
#   make test   set up, then run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
TORCH ?= torch==2.13.0

.PHONY: setup demo test lint bench clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian's dataset-fashion-mnist"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq dataset-fashion-mnist; \
	fi
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[dev,analog]'
	touch $@

demo: setup
	$(VENV)/bin/robusttrain compare --config experiments/quick_fashion.yaml

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check robusttrain tests experiments
	$(VENV)/bin/mypy

bench: setup
	$(PY) experiments/bench_estimator.py

clean:
	rm -rf $(VENV) runs lightning_logs .pytest_cache .mypy_cache
