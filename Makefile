# FedHQ: `make run` and `make test` each create .venv if it is missing and install the project.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fedhq-installed
# torch and torchvision are served from this machine's local cache; the ranges in pyproject.toml
# admit them. One pip call installs them with the project. No byte-compiling at install (pip's
# takes ~100 s on one core, compileall ~50 s on 2): Python writes .pyc files for the modules that
# are imported, the first time, so PYTHONDONTWRITEBYTECODE is not passed on to make's commands.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

unexport PYTHONDONTWRITEBYTECODE

.PHONY: install run test test-integration bench bench-overhead bench-gpu bench-host clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --no-compile $(TORCH_SPEC) -e ".[test]"
	@touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/fedhq run --strategy fedhq

# the real servers and clusters (Prefect server, MLflow + S3, Dask) are `make test-integration`;
# .ci/run runs both
test: $(STAMP)
	$(PY) -m pytest -q -m "not integration" $(PYTEST_ARGS)

test-integration: $(STAMP)
	$(PY) -m pytest -q -m integration $(PYTEST_ARGS)

bench: $(STAMP)
	$(VENV)/bin/fedhq bench --config configs/digits.yaml --json out/bench-digits.json

bench-overhead: $(STAMP)
	$(VENV)/bin/fedhq bench-overhead

bench-gpu: $(STAMP)
	$(PY) -m flows.bench_gpu

bench-host: $(STAMP)
	$(PY) -m flows.bench_host

clean:
	rm -rf .fedhq out .pytest_cache
