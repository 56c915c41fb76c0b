# Two commands matter: `make run` (the hub with embedded defaults) and `make test`.
# Each creates .venv on first use, so a fresh clone needs only Python 3.11+.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Test processes: most tests wait on real brokers and short timers rather than the CPU, so two
# workers finish in about half the time of one on a 2-core machine (each module stays in one
# worker: its module-scoped brokers are started once). Three were faster still, but on a loaded
# machine they starved the tests that time real processes.
TEST_WORKERS ?= 2

.PHONY: run test check lint typecheck bench bench-full truth failover faults tour clean

# setuptools in the venv itself lets tests/test_agent_install.py build the wheel without an
# isolated build environment. The editable install's "Editable installation" notice from
# setuptools is filtered by its exact text: it says only that a folder named like a package in
# the working directory could shadow it; every other warning and every error still shows.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip 'setuptools>=77'
	PYTHONWARNINGS='ignore:Editable installation:UserWarning' \
		$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/presence-hub --broker auto --storage tinydb --db presence-data/presence.json \
		--http 127.0.0.1:8080

test: $(STAMP) check
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

check: lint typecheck

lint: $(STAMP)
	$(BIN)/ruff check hub device_agent tests bench examples tools

typecheck: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m bench --quick

# Long (about half an hour, and over 1 GB of RAM for the 1M-device restart): the same scenarios
# and the same BENCH {json} line at the sizes of the targets.
bench-full: $(STAMP)
	$(BIN)/python -m bench

# README's tour replayed from this checkout on the embedded broker and on a Mosquitto it starts,
# every promised output checked (tests/test_tour.py runs the same).
tour: $(STAMP)
	$(BIN)/python tools/tour.py

# About two minutes: a fleet under handovers, takeovers, sleeps, a hub SIGKILL and a Mosquitto
# restart; prints the false status changes (goal 0) and the will-to-offline latency.
truth: $(STAMP)
	$(BIN)/python -m bench.truth

# About a minute and a half: two --standby hubs on a private Mosquitto and redis-server, the
# active one SIGKILLed ten times; prints lease expiry and first answer (p50/max), lost activity
# and offline flaps (goal 0).
failover: $(STAMP)
	$(BIN)/python -m bench.failover

# The fault matrix on its own (it is part of `make test` too), one line per case.
FAULTS := tests/test_fault_matrix.py tests/test_external_faults.py tests/test_embedded_faults.py \
	tests/test_store_faults.py tests/test_store_outage.py tests/test_flaps.py \
	tests/test_durable_commands.py tests/test_mosquitto_export.py tests/test_cli_accounts.py \
	tests/test_hub_mqtt.py tests/test_standby.py
faults: $(STAMP)
	$(BIN)/python -m pytest -v $(FAULTS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
