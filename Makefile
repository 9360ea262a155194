# smtpguard — the two commands a newcomer runs: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
CONFIG ?=

.PHONY: run test soak venv sysdeps lint bench clean wheelhouse compose-test docs

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

## The fault suite (tests/reliability/) at full size: thousands of messages through Postfix
## faults, thousands of fuzzed sessions; prints the table of figures.  make test runs it reduced.
soak: venv sysdeps
	rm -f build/soak.jsonl; mkdir -p build
	SMTPGUARD_SOAK=1 SMTPGUARD_SOAK_REPORT=build/soak.jsonl $(BIN)/python -m pytest -q -ra tests/reliability
	$(BIN)/python tests/reliability/figures.py build/soak.jsonl

## ruff on the code, tests and benchmarks; mypy --strict on the package (CI runs it before the tests).
lint: venv
	$(BIN)/ruff check smtpguard tests bench
	$(BIN)/mypy --strict smtpguard

## Performance figures (printed, never asserted).
bench: venv sysdeps
	$(BIN)/python bench/relay.py
	$(BIN)/python bench/screen.py
	$(BIN)/python bench/greylist.py --backend sqlite --backend redis --spf
	$(BIN)/python bench/tls.py
	$(BIN)/python bench/dns_screening.py
	$(BIN)/python bench/policy.py --backend sqlite --backend redis

## The project and its dependencies as wheels in build/wheels, for the container image
## (pip inside an image build cannot reach PyPI here).  async-timeout: redis needs it on
## Debian bookworm's Python 3.11.2, which the host's Python may not.
wheelhouse: venv
	rm -rf build/wheels
	$(BIN)/pip wheel -q . 'async-timeout>=4.0.3' -w build/wheels

## Build and run deploy/docker-compose.yml with podman-compose, send a message through it,
## check delivery and the Prometheus scrape, tear it down (root; see deploy/compose-test.sh).
compose-test: wheelhouse
	PYTHON=$(abspath $(BIN))/python bash deploy/compose-test.sh

## Regenerate the reference documents from the code (a unit test checks they are current).
docs: venv
	$(BIN)/python -m smtpguard.docgen configuration > docs/configuration.md
	$(BIN)/python -m smtpguard.docgen metrics > docs/metrics-reference.md
	$(BIN)/python deploy/grafana/make_dashboard.py > deploy/grafana/dashboards/smtpguard.json

clean:
	rm -rf $(VENV) state build .pytest_cache .mypy_cache .ruff_cache
