# Two services, one run directory:  make train  (terminal 1)   make eval  (terminal 2)
# CONFIG=config/x.yaml picks the config (default: config/default.yaml, the embedded CPU demo);
# ARGS="training.learning_rate=1e-5 ..." overrides keys; RUN=runs/x evaluates an existing run and exits
# (WATCH=1 keeps watching); CKPT=path evaluates one checkpoint folder and exits.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Without an NVIDIA GPU, ask for torch 2.13.0: on this workplace's machines pip finds a CPU build of it
# on disk (its find-links); elsewhere it is PyPI's build. TORCH_SPEC= lets pip choose.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 || echo "torch==2.13.0")

CONFIG ?=
ARGS   ?=
RUN    ?=
CKPT   ?=
WATCH  ?=
config_flag := $(if $(CONFIG),--config $(CONFIG))

.PHONY: setup train eval demo lint test test-gpu gpu-check bench clean-runs

setup: $(STAMP)

# flock: `make train` and `make eval` started together on a fresh clone must not install twice at once.
$(STAMP): pyproject.toml
	flock .setup.lock sh -c '\
	  if [ -f $(STAMP) ] && [ $(STAMP) -nt pyproject.toml ]; then exit 0; fi; \
	  test -x $(PY) || $(PYTHON) -m venv $(VENV) || exit 1; \
	  if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q "$(TORCH_SPEC)" || echo "note: $(TORCH_SPEC) not available; pip chooses torch"; fi; \
	  $(PY) -m pip install -q -e ".[dev]" && touch $(STAMP)'

train: setup
	$(PY) -m trainer $(config_flag) $(ARGS)

eval: setup
	$(PY) -m evaluator $(config_flag) $(if $(CKPT),--ckpt $(CKPT)) $(if $(RUN),--run $(RUN) $(if $(WATCH),,--once)) $(ARGS)

demo: setup
	$(PY) -m demo $(config_flag) $(ARGS)

# The rules are pyproject.toml's [tool.ruff]; `ruff check --fix .` and `ruff format .` repair most of what fails.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Lint first: a test run starts only on code that passes it.
# The report's test looks at the page in a real headless Chromium: installed here where apt-get can (as root).
test: setup lint
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    { apt-get install -y -q chromium >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }; }; } || \
	  echo "note: chromium could not be installed; the report's browser test is skipped"
	$(PY) -m pytest -q

test-gpu: setup
	$(PY) -m pytest -q -m gpu

gpu-check: setup
	$(PY) -m bench.gpu_check $(config_flag)

bench: setup
	$(PY) -m bench.run_all

clean-runs:
	rm -rf runs
