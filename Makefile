# The two commands of the README: `make dev` (worker + Dagster UI on the embedded defaults)
# and `make test` (the whole suite). Both set up everything they need on a fresh machine.
VENV ?= .venv
PYTHON ?= python3

.PHONY: dev test test-slow test-multihost bench bench-peer faults system-deps compose-test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -U pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

# bubblewrap sandboxes user scripts, node runs the JavaScript ones, DejaVu fonts give PDFs
# non-Latin text, ffmpeg splits large audio files for transcription (and makes the tests' audio);
# the fault suite starts its own postgres (initdb) and redis-server. Installed from Debian's
# packages when missing.
system-deps:
	@missing=""; \
	command -v bwrap >/dev/null || missing="$$missing bubblewrap"; \
	command -v node >/dev/null || missing="$$missing nodejs"; \
	[ -d /usr/share/fonts/truetype/dejavu ] || missing="$$missing fonts-dejavu-core"; \
	command -v ffmpeg >/dev/null || missing="$$missing ffmpeg"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	if [ -n "$$missing" ]; then apt-get update -qq && apt-get install -y -qq $$missing >/dev/null; fi

# make dev HOST=0.0.0.0 PORT=3001 (the UI has no authentication: keep 127.0.0.1 unless behind a proxy)
HOST ?= 127.0.0.1
PORT ?= 3000
dev: $(VENV)/.installed system-deps
	$(VENV)/bin/flux-dagster dev --host $(HOST) --port $(PORT)

test: $(VENV)/.installed system-deps
	$(VENV)/bin/pytest

# Minutes-long checks left out of `make test` (e.g. Ctrl-C on a real `flux-dagster dev`).
test-slow: $(VENV)/.installed system-deps
	$(VENV)/bin/pytest -m slow

# Two Celery run workers on the machine's RabbitMQ, one SIGKILLed mid-burst (docs/multi-host.md:
# 1-4 minutes; out of `make test` while a run retry can still fail after an unlucky kill).
test-multihost: $(VENV)/.installed system-deps
	$(VENV)/bin/pytest -m multihost -s flux_dagster_tests/test_e2e_celery.py

# psutil samples the processes; pgbouncer pools Postgres connections in the "ours" set-up.
# BENCH_ARGS: e.g. --quick, --storage postgres (see bench/run.py).
bench: $(VENV)/.installed system-deps
	$(VENV)/bin/pip install -q -e '.[test,bench]'
	@command -v pgbouncer >/dev/null || [ -x /usr/sbin/pgbouncer ] || { apt-get update -qq && apt-get install -y -qq pgbouncer >/dev/null; }
	$(VENV)/bin/python -m bench.run $(BENCH_ARGS)

# Issue 12's table: flux-dagster beside a Temporal worker doing the same work (bench/peer.py).
bench-peer: $(VENV)/.installed system-deps
	$(VENV)/bin/pip install -q -e '.[test,bench]'
	$(VENV)/bin/python -m bench.peer $(BENCH_ARGS)

# Every fault-injection scenario at the issue's burst sizes (docs/faults.md, ~1 h): prints the
# table and writes it to bench/results/faults.md. Fails when a goal does not hold.
faults: $(VENV)/.installed system-deps
	FLUX_FAULTS_FULL=1 $(VENV)/bin/pytest flux_dagster_tests/faults -m faults --timeout 1200 -q -rN

# The docker/ stack built and run end to end (docs/containers.md): starts a dockerd if none runs,
# builds a Debian base image when FLUX_BASE_IMAGE is not given. Docker, compose and debootstrap
# come from Debian's packages when missing.
compose-test: $(VENV)/.installed
	@missing=""; \
	command -v dockerd >/dev/null || missing="$$missing docker.io"; \
	docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null || missing="$$missing docker-compose"; \
	[ -n "$$FLUX_BASE_IMAGE" ] || command -v debootstrap >/dev/null || missing="$$missing debootstrap"; \
	if [ -n "$$missing" ]; then apt-get update -qq && apt-get install -y -qq $$missing >/dev/null; fi
	$(VENV)/bin/pytest -m compose -s -p no:cacheprovider flux_dagster_tests/test_compose_stack.py
