# One entry point for every task. `make run` and `make test` set everything up on first use.
SHELL := /bin/bash
UV_VERSION := 0.13.9
UV := .tools/uv/bin/uv
PY := .venv/bin/python
export UV_PYTHON_DOWNLOADS := never
export UV_PYTHON := python3


.PHONY: setup run test pytest postgres redis bench generate check-generated lint typecheck buf-lint buf-breaking clean

setup: .venv/.installed node_modules/.installed

$(UV):
	python3 -m venv .tools/uv
	.tools/uv/bin/pip install --quiet uv==$(UV_VERSION)

.venv/.installed: pyproject.toml uv.lock $(UV)
	$(UV) sync --frozen --quiet --extra local
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

run: setup
	.venv/bin/aigne-hub serve

# The one test command (README, CI): static checks, then the whole suite.
test: setup check-generated lint typecheck buf-breaking postgres redis
	AIGNE_HUB_REQUIRE_POSTGRES=1 .venv/bin/pytest

# Storage tests run against SQLite and PostgreSQL (127.0.0.1:5432, trust auth, database
# `test`, as on these machines): start the local cluster if it is installed but stopped.
postgres:
	@pg_isready -q -h 127.0.0.1 -p 5432 || { \
		echo "starting PostgreSQL"; \
		pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql) main start && \
		for i in $$(seq 50); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.2; done; }

# Routing tests share cooldowns through Redis (127.0.0.1:6379, as on these machines):
# start the local server if it is installed but stopped.
redis:
	@redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 || { \
		echo "starting Redis"; \
		mkdir -p /var/lib/redis /var/log/redis; \
		redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
			--dir /var/lib/redis --logfile /var/log/redis/ci.log && \
		for i in $$(seq 50); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 0.1; done; }

pytest: setup
	.venv/bin/pytest $(ARGS)

bench: setup
	$(PY) -m tests.bench

generate: setup
	$(PY) -m server.tools.generate

check-generated: setup
	$(PY) -m server.tools.generate --check

lint: setup buf-lint
	.venv/bin/ruff check server tests
	.venv/bin/ruff format --check server tests

typecheck: setup
	.venv/bin/mypy

buf-lint: node_modules/.installed
	npx --no-install buf lint

# Compares the protos with a git ref (default: the previous commit); e.g.
# `make buf-breaking AGAINST=origin/main` before proposing a contract change.
AGAINST ?= HEAD~1
buf-breaking: node_modules/.installed
	@if git rev-parse -q --verify '$(AGAINST):protos' >/dev/null; then \
		echo "buf breaking against $(AGAINST)"; \
		npx --no-install buf breaking --against '.git#ref=$(AGAINST)'; \
	else echo "buf breaking: $(AGAINST) has no protos to compare with"; fi

clean:
	rm -rf .venv .tools node_modules
