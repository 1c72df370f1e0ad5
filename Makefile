# codex-jax: the two commands are `make train` and `make test`; each sets up .venv when needed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
WORKDIR ?= runs/default
TEST_WORKERS ?= 2

.PHONY: install install-test train test test-fast bench bench-peers lint clean

install: $(STAMP)
install-test: $(TEST_STAMP)

# Reinstall whenever pyproject.toml changes; editable, so code changes need no reinstall. `make train` needs
# the package and the corpus extra; `make test` adds the test extra (pytest, chex, CPU torch, transformers).
$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "codex-jax needs Python >= 3.11"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[corpus]'
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(TEST_STAMP)

# The default experiment on the embedded multimodal corpus, on this machine's CPU. Rerunning resumes.
# The corpus is built once (about a minute) into the cache dir; later runs find it and skip.
train: install
	$(BIN)/codex data build-default
	$(BIN)/codex train --config=experiments/codex.py:tiny --workdir=$(WORKDIR)

# Files go whole to one worker (--dist loadfile), so a module's fixtures are built once, not once per worker.
test: install-test
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

# The edit loop: everything not marked slow (real training subprocesses, compile-heavy layouts).
test-fast: install-test
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow" --durations=10

# One JSON line per config: tokens/s, model TFLOP/s, MFU against the measured matmul peak.
bench: install
	@for variant in tiny bench bench_bf16; do \
	  JAX_PLATFORMS=cpu $(BIN)/codex bench --config=experiments/codex.py:$$variant --name=$$variant \
	    --steps=$${BENCH_STEPS:-3} --json || exit 1; \
	done
	@# tiny trains five objectives; the same shape text-only, at equal tokens, gives their step-time overhead.
	@JAX_PLATFORMS=cpu $(BIN)/codex bench --config=experiments/codex.py:tiny --name=tiny-text-only \
	  "--config.objectives.weights=(1.0, 0.0, 0.0, 0.0, 0.0)" --steps=$${BENCH_STEPS:-3} --json
	@JAX_PLATFORMS=cpu $(BIN)/codex bench --config=experiments/codex.py:bench --name=bench --checkpoint --json
	@$(BIN)/codex data build-default > /dev/null
	@JAX_PLATFORMS=cpu $(BIN)/codex data bench --config=experiments/codex.py:tiny --batches=$${BENCH_BATCHES:-100} --json
	@XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu $(BIN)/codex bench --config=experiments/codex.py:tiny --name=tiny-layouts --config.model.num_heads=8 --config.model.num_kv_heads=8 --layouts --steps=$${BENCH_STEPS:-3} --json

# The bench step beside the same model in PyTorch (eager and torch.compile), same run, and the ratios.
bench-peers: install-test
	@$(BIN)/python benchmarks/peers.py --steps=$${BENCH_STEPS:-3}

lint: install-test
	$(BIN)/python -m pip install --quiet "ruff>=0.8,<1"
	$(BIN)/ruff check codex_jax experiments tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
