# The two commands of the README: `make dev` (worker + Dagster UI on the embedded defaults)
# and `make test` (the whole suite). Both set up everything they need on a fresh machine.
VENV ?= .venv
PYTHON ?= python3

.PHONY: dev test bench system-deps

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -U pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

# bubblewrap sandboxes user scripts (scripting node); DejaVu fonts give PDFs non-Latin text.
system-deps:
	@command -v bwrap >/dev/null && [ -d /usr/share/fonts/truetype/dejavu ] || { apt-get update -qq && apt-get install -y -qq bubblewrap fonts-dejavu-core >/dev/null; }

dev: $(VENV)/.installed system-deps
	$(VENV)/bin/flux-dagster dev

test: $(VENV)/.installed system-deps
	$(VENV)/bin/pytest

bench: $(VENV)/.installed system-deps
	$(VENV)/bin/python -m bench.run
