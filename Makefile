# The two commands of the README: `make demo` and `make test`. Both set up .venv first
# (scripts/setup.sh; a no-op when nothing changed).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test
setup:
	bash scripts/setup.sh

demo: setup
	$(PY) jobs/train_era5.py

# DeepSpeed JIT-compiles a CPU comm op on its first initialize (~30 s); build it once up front.
test: setup
	$(PY) -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load()" >/dev/null
	$(PY) -m pytest -q -p no:cacheprovider
