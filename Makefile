# smtpguard — the two commands a newcomer runs: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
CONFIG ?=

.PHONY: run test soak venv sysdeps lint bench clean wheelhouse compose-test docs install

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
	$(BIN)/smtpguard serve -c $(or $(CONFIG),/dev/null)

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

## Performance figures (printed, never asserted); also installs postgrey, bench/policy.py's reference.
bench: venv sysdeps
	bash tests/sysdeps.sh --bench
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
	$(BIN)/python -m smtpguard.manpage > docs/smtpguard.8

## Install into PREFIX (a virtualenv of its own, /opt/smtpguard) and put the sample configuration
## (kept if present), the systemd unit, the man page and the documentation in their FHS places
## under DESTDIR (e.g. make install DESTDIR=/tmp/root for a package build).
PREFIX ?= /opt/smtpguard
DESTDIR ?=
install:
	$(PYTHON) -m venv $(DESTDIR)$(PREFIX)
	$(DESTDIR)$(PREFIX)/bin/pip install -q .
	install -d $(DESTDIR)/etc/smtpguard $(DESTDIR)/lib/systemd/system $(DESTDIR)/usr/share/man/man8 \
	  $(DESTDIR)/usr/share/doc/smtpguard/docs
	test -e $(DESTDIR)/etc/smtpguard/smtpguard.toml || \
	  install -m 0644 deploy/smtpguard.example.toml $(DESTDIR)/etc/smtpguard/smtpguard.toml
	install -m 0644 deploy/systemd/smtpguard.service $(DESTDIR)/lib/systemd/system/smtpguard.service
	install -m 0644 docs/smtpguard.8 $(DESTDIR)/usr/share/man/man8/smtpguard.8
	install -m 0644 README.md CHANGELOG.md $(DESTDIR)/usr/share/doc/smtpguard/
	install -m 0644 docs/*.md $(DESTDIR)/usr/share/doc/smtpguard/docs/

clean:
	rm -rf $(VENV) state build .pytest_cache .mypy_cache .ruff_cache
