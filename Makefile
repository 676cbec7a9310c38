# chatd: `make run` and `make test` are all a fresh machine needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= etc/chatd.ini
PYTEST_ARGS ?=
BENCH_ARGS ?=
BENCH_STAMP := $(VENV)/.bench-installed

.PHONY: run test conformance conformance-full bench venv sslyze node-deps dev-files system-deps clean

run: venv dev-files  ## set up and run the server on the embedded broker
	$(VENV)/bin/twistd -n --pidfile= chatd --config $(CONFIG)

test: venv sslyze system-deps node-deps $(BENCH_STAMP)  ## set up and run the default test suite (incl. conformance cases 1-10 and a tiny bench run)
	$(PY) -m pytest $(PYTEST_ARGS)

conformance: venv  ## Autobahn Testsuite, cases 1-10
	$(PY) conformance/run.py

conformance-full: venv  ## Autobahn Testsuite, every case incl. permessage-deflate
	$(PY) conformance/run.py --full

bench: venv system-deps $(BENCH_STAMP)  ## chatd vs a plain Twisted + Autobahn broadcast, scenarios 1-5 (not part of `make test`; docs/performance.md)
	$(PY) bench/run.py $(BENCH_ARGS)

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[test,bench]' --config-settings editable_mode=compat
	touch $@

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	$(PY) -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
	touch $@

# sslyze (tests/test_tls.py) pins cryptography < 47: its own venv, run as a subprocess.
SSLYZE_VENV := .venv-sslyze
sslyze: $(SSLYZE_VENV)/.installed  ## sslyze for the TLS profile test

$(SSLYZE_VENV)/.installed: tests/sslyze-requirements.txt
	$(PYTHON) -m venv --clear $(SSLYZE_VENV)
	$(SSLYZE_VENV)/bin/python -m pip install -q -r tests/sslyze-requirements.txt
	touch $@

# The real STOMP clients (@stomp/stompjs, stompjs + sockjs-client) for the
# STOMP tests, pinned by package-lock.json; install scripts are not needed
# (they only build optional native speed-ups).
STOMP_CLIENTS := tests/stomp-clients
node-deps: $(STOMP_CLIENTS)/node_modules/.installed  ## Node packages for the STOMP client tests

$(STOMP_CLIENTS)/node_modules/.installed: $(STOMP_CLIENTS)/package-lock.json | system-deps
	cd $(STOMP_CLIENTS) && npm ci --no-audit --no-fund --ignore-scripts
	touch $@

dev-files: venv
	test -f etc/dev/fullchain.pem -a -f etc/dev/privkey.pem || $(PY) -m chatd devcert etc/dev
	test -f etc/dev/jwt.secret || $(PY) -m chatd devsecret etc/dev/jwt.secret

system-deps:  ## Debian packages the tests run, when missing: redis-server, Chromium (page test), Node, nginx and systemd's tools (operations tests)
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v npm >/dev/null || missing="$$missing nodejs npm"; \
	{ command -v nginx || test -x /usr/sbin/nginx; } >/dev/null || missing="$$missing nginx"; \
	{ command -v systemd-analyze && command -v systemd-socket-activate; } >/dev/null || missing="$$missing systemd"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

clean:
	rm -rf $(VENV) .venv-wstest $(SSLYZE_VENV) .venv-sslyze.lock build *.egg-info .pytest_cache .hypothesis $(STOMP_CLIENTS)/node_modules
