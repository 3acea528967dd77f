# `make demo` and `make test` each build .venv from scratch when it is missing.
VENV   := .venv
PY     := $(VENV)/bin/python
# torch and torchvision are pinned to the builds this machine keeps on disk.
TORCH  := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test clean-venv

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test,notebooks]'
	touch $@

demo: $(VENV)/.installed
	$(PY) -m diffusion_core.demo

test: $(VENV)/.installed
	$(PY) -m pytest -q -p no:cacheprovider

clean-venv:
	rm -rf $(VENV)
