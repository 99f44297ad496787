# Two commands do everything; each shows the plain commands behind it.
PYTHON ?= python3

.PHONY: install train test lint

install:
	$(PYTHON) -m pip install -e ".[test]"

# The main job with its defaults (the classic recipe); add settings with ARGS="key=value ...".
train: install
	accelerate launch trainer/train.py $(ARGS)

test: install
	$(PYTHON) -m pytest

lint:
	ruff check . && ruff format --check .
