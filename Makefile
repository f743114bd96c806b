# Two commands for a new user: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN_DIR := .run
CONFIG := docs/examples/config.toml
SAMPLE := docs/examples/identities.jsonl

.PHONY: run test lint bench bench-extra soak clean system-deps

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The stamps make a second `make run` or `make test` skip the install when
# pyproject.toml has not changed since.
$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

# The Debian packages of the test suite. The tests need some at run time (pcscd,
# systemd-analyze), so every make invocation that reaches the test install checks them once,
# even when the stamp is up to date, and before the install, which compiles pyscard and evdev.
# As an order-only prerequisite this phony target never makes the stamp out of date.
system-deps:
	bash tests/system-deps.sh

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python system-deps
	$(BIN)/python -m pip install --quiet -e '.[test,pcsc,hid]'
	touch $@ $(VENV)/.installed-run

run: $(VENV)/.installed-run
	mkdir -p $(RUN_DIR)
	$(BIN)/identity-connector import --config $(CONFIG) $(SAMPLE)
	@echo
	@echo "Try it from another terminal:"
	@echo
	@$(BIN)/identity-connector curl-example --config $(CONFIG)
	@echo
	$(BIN)/identity-connector serve --config $(CONFIG)

test: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# Benchmarks: minutes, not part of `make test`. bench_all.py prints the results table (also in
# <workdir>/results.md) and draws the latency plot into docs/benchmark-latency.png.
BENCH_IDENTITIES ?= 1000000 10000000
BENCH_SECONDS ?= 20

$(VENV)/.installed-bench: pyproject.toml $(VENV)/.installed-test
	$(BIN)/python -m pip install --quiet -e '.[test,pcsc,hid,bench]'
	touch $@

bench: $(VENV)/.installed-bench
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(BIN)/python tests/bench/bench_all.py --identities $(BENCH_IDENTITIES) --duration $(BENCH_SECONDS)

# The other benchmarks of docs/benchmarks.md: scanner feedback and TLS.
bench-extra: $(VENV)/.installed-bench
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(BIN)/python tests/bench/bench_local_feedback.py --scans 2000
	$(BIN)/python tests/bench/bench_tls.py --identities 100000 --duration 15

# The soak: minutes of load with HQ outages and SIGKILLs, then checks that nothing was lost.
# Not part of `make test`; docs/soak.md describes it.
SOAK_SECONDS ?= 300
SOAK_KILL_SECONDS ?= 120

soak: $(VENV)/.installed-test
	$(BIN)/python tests/soak/soak.py --duration $(SOAK_SECONDS) --kill-period $(SOAK_KILL_SECONDS)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(RUN_DIR) $(VENV)
