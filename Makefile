# FedHQ: `make run` and `make test` each create .venv if it is missing and install the project.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fedhq-installed
# Served from this machine's local cache in about a minute; the ranges in pyproject.toml admit them.
# pip byte-compiles on one core (~100 s here); compileall does it on every core, skipping the
# packages' own test suites (~50 s on 2).
# The .pyc files matter: with PYTHONDONTWRITEBYTECODE set, nothing would be cached on import.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: install run test bench bench-overhead bench-gpu clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --no-compile $(TORCH_SPEC)
	$(PY) -m pip install -q --no-compile -e ".[test]"
	@$(PY) -m compileall -q -j 0 -x '/tests?/' $(VENV)/lib >/dev/null 2>&1 || true  # packages' own test suites skipped
	@touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/fedhq run --strategy fedhq

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(VENV)/bin/fedhq bench --config configs/digits.yaml --json out/bench-digits.json

bench-overhead: $(STAMP)
	$(VENV)/bin/fedhq bench-overhead

bench-gpu: $(STAMP)
	$(PY) -m flows.bench_gpu

clean:
	rm -rf .fedhq out .pytest_cache
