VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
CONFIG ?= config.yaml

.PHONY: run test install install-dev lint mypy format check clean

$(VENV)/bin/activate:
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/activate
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(VENV)/bin/activate
	$(PIP) install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

run: install
	$(VENV)/bin/xray-watcher run --config $(CONFIG)

test: install-dev
	@sh scripts/ensure-chromium.sh || echo "make test: no Chromium, so the review page's browser test will be skipped (see above)"
	$(VENV)/bin/pytest -n 2 --dist loadfile

lint: install-dev
	$(VENV)/bin/ruff check watcher tests
	$(VENV)/bin/ruff format --check watcher tests

mypy: install-dev
	$(VENV)/bin/mypy watcher

format: install-dev
	$(VENV)/bin/ruff format watcher tests
	$(VENV)/bin/ruff check --fix watcher tests

check: install
	$(VENV)/bin/xray-watcher check --config $(CONFIG)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info

# As root: the hardened systemd service (see scripts/install-service.sh; PREFIX=/opt/xray-watcher)
install-service:
	sh scripts/install-service.sh $(PREFIX)

# As root: keeps config and data; `make uninstall-service PURGE=--purge` removes them too
uninstall-service:
	sh scripts/uninstall-service.sh $(PREFIX) $(PURGE)

.PHONY: install-service uninstall-service
