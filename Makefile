# make install | run | test | lint | bench | gpu-check
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Torch pin for the x86-64 machines we develop and test on (a CUDA build that also runs on
# the CPU). Elsewhere pip chooses within pyproject's floor (torch>=2.10, see its comment);
# override with e.g. `make install TORCH="torch==2.11.0 torchvision==0.26.0"`.
ARCH   := $(shell uname -m)
ifeq ($(ARCH),x86_64)
TORCH  ?= torch==2.14.1 torchvision==0.29.1
else
TORCH  ?= torch>=2.10 torchvision>=0.25
endif
PYTEST ?= -q

.PHONY: install run test test-all lint format bench gpu-check clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(foreach p,$(TORCH),'$(p)')
	$(BIN)/python -m pip install -q -e '.[dev,sweep,parquet,tracking,export]'
	@# our own earlier name in this venv (now contrastive-cli; both would install `contrast`)
	-$(BIN)/python -m pip uninstall -q -y contrast 2>/dev/null
	touch $@

run: install
	$(BIN)/contrast train

# Everything but @pytest.mark.slow; exit code 5 (no tests collected) fails the target.
test: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST)

test-all: install
	$(BIN)/python -m pytest $(PYTEST)

lint: install
	$(BIN)/ruff check contrastive_cli tests benchmarks
	$(BIN)/ruff format --check contrastive_cli tests benchmarks

format: install
	$(BIN)/ruff check --fix contrastive_cli tests benchmarks
	$(BIN)/ruff format contrastive_cli tests benchmarks

bench: install
	$(BIN)/python -m benchmarks

# The GPU check (benchmarks/gpu_check.sh; README, GPU): on a GPU machine as it is; DEVICE=cpu
# rehearses every step here at small sizes. Results in benchmarks/results/gpu_check/ or $$OUT.
DEVICE ?= cuda
gpu-check:
	DEVICE=$(DEVICE) PYTHON=$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) bash benchmarks/gpu_check.sh

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
