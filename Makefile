# smtpguard — the two commands a newcomer runs: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
CONFIG ?=

.PHONY: run test venv sysdeps lint bench clean

$(BIN)/smtpguard: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

venv: $(BIN)/smtpguard

## Run smtpguard on its embedded defaults (listen 127.0.0.1:2525, upstream 127.0.0.1:10025,
## SQLite state in ./state/), or on CONFIG=path/to/smtpguard.toml.
run: venv
	@mkdir -p state
	$(BIN)/smtpguard serve $(if $(CONFIG),-c $(CONFIG))

sysdeps:
	bash tests/sysdeps.sh

## Install what the tests need and run them all (unit + real Postfix/DNS/Redis).
test: venv sysdeps
	$(BIN)/python -m pytest -q -ra

lint: venv
	$(BIN)/ruff check smtpguard tests bench
	$(BIN)/mypy smtpguard

## Performance figures (printed, never asserted).
bench: venv sysdeps
	$(BIN)/python bench/screen.py
	$(BIN)/python bench/relay.py
	$(BIN)/python bench/dns.py

clean:
	rm -rf $(VENV) state build .pytest_cache .mypy_cache .ruff_cache
