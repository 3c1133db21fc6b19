# The README's two commands: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test lint install lock services clean

# The locked versions first (no resolver backtracking, the same set on every machine), then the project itself.
$(STAMP): pyproject.toml requirements.lock
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --upgrade pip >/dev/null
	$(VENV)/bin/python -m pip install -r requirements.lock
	$(VENV)/bin/python -m pip install --no-deps -e '.[dev]'
	$(VENV)/bin/python -m pip check
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sketchgan demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# What the tests start besides Python, from Debian's packages when missing (needs root, as on CI): PostgreSQL's
# server (tests/test_mlflow_production.py) and Chromium, which Playwright drives (tests/test_studio_browser.py;
# Playwright's own browser download does not work without internet).
services:
	@missing=""; \
	ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || missing="$$missing postgresql"; \
	test -x /usr/bin/chromium || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi

test: $(STAMP) lint services
	$(VENV)/bin/python -m pytest

# Resolve pyproject.toml's dependencies afresh in a scratch venv and write what was installed to requirements.lock.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --upgrade pip >/dev/null
	.lock-venv/bin/python -m pip install '.[dev]'
	{ sed -n '1,3p' requirements.lock; .lock-venv/bin/python -m pip freeze --exclude-editable | grep -v '^sketchgan=='; } > requirements.lock.new
	mv requirements.lock.new requirements.lock && rm -rf .lock-venv

clean:
	rm -rf .sketchgan
