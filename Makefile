# One entry point for every task. `make run` and `make test` set everything up on first use.
SHELL := /bin/bash
UV_VERSION := 0.13.9
UV := .tools/uv/bin/uv
PY := .venv/bin/python
export UV_PYTHON_DOWNLOADS := never
export UV_PYTHON := python3


.PHONY: setup run test pytest postgres redis prometheus bench ab soak generate check-generated lint typecheck buf-lint buf-breaking clean go-toolchain go-client ui check-ui chromium

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
test: setup check-generated check-ui lint typecheck buf-breaking postgres redis prometheus go-client chromium
	AIGNE_HUB_REQUIRE_POSTGRES=1 AIGNE_HUB_REQUIRE_GO=1 AIGNE_HUB_REQUIRE_CHROMIUM=1 .venv/bin/pytest

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

# The metrics tests scrape the gateway with a real Prometheus (Debian's package); the
# tests run the binary themselves on a free port, so the packaged service is not started
# (RUNLEVEL=1 and containers' policy-rc.d keep it down).
prometheus:
	@command -v prometheus >/dev/null || { \
		echo "installing Prometheus"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 \
			apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

# The web dashboard (ui/): its build, ui/dist, is committed and served by Envoy under
# /ui/; `make ui` rebuilds it after changing ui/src, `make check-ui` (part of `make
# test`) fails when the committed build is not what the sources build to.
UI_VITE := npx --no-install vite build --config ui/vite.config.mjs

ui: node_modules/.installed
	$(UI_VITE)

check-ui: node_modules/.installed
	@rm -rf .build/ui-check && $(UI_VITE) --outDir $(CURDIR)/.build/ui-check >/dev/null
	@diff -r ui/dist .build/ui-check >/dev/null || { \
		echo "ui/dist is stale: run 'make ui' and commit it"; diff -rq ui/dist .build/ui-check; exit 1; }

# The dashboard's browser tests drive Debian's Chromium with playwright-core (from
# package-lock.json; no browser is downloaded).
chromium:
	@test -x /usr/lib/chromium/chromium || { \
		echo "installing Chromium from Debian's packages"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			chromium fonts-dejavu-core >/dev/null; }

pytest: setup
	.venv/bin/pytest $(ARGS)

bench: setup
	$(PY) -m tests.bench

# Paired A/B of two gateways loaded in turn (tests/bench/ab.py): ARGS="--b-repo ../wt-b".
ab: setup
	$(PY) -m tests.bench.ab $(ARGS)

# Memory over a long run (default 1M requests, about an hour here): RSS of every
# process every 5 %, its slope, a verdict. Not part of `make test`; ARGS="--requests 200000".
soak: setup
	$(PY) -m tests.bench.soak $(ARGS)

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

# The Go client of tests/test_polyglot.py: Debian's Go toolchain and gRPC/protobuf
# libraries (GOPATH mode under /usr/share/gocode, so nothing is fetched from a module
# proxy), stubs generated from protos/ by buf with Debian's protoc-gen-go(-grpc).
GO_DEBS := golang-go golang-google-grpc-dev golang-google-protobuf-dev golang-google-genproto-dev \
	golang-github-golang-protobuf-1-5-dev protoc-gen-go protoc-gen-go-grpc
GO_BUILD := $(CURDIR)/.build/go
GO_ENV := GO111MODULE=off GOFLAGS= GOPATH=$(GO_BUILD):/usr/share/gocode GOCACHE=$(GO_BUILD)/cache

go-toolchain:
	@dpkg -s $(GO_DEBS) >/dev/null 2>&1 || { \
		echo "installing the Go toolchain from Debian's packages"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(GO_DEBS); }

go-client: $(GO_BUILD)/bin/hubclient

$(GO_BUILD)/bin/hubclient: protos/aigne/hub/v1/*.proto tests/polyglot/go/main.go buf.gen.go.yaml | go-toolchain node_modules/.installed
	rm -rf $(GO_BUILD)/src
	mkdir -p $(GO_BUILD)/src/aignehub/hubclient
	npx --no-install buf generate --template buf.gen.go.yaml --path protos/aigne -o $(GO_BUILD)/src
	cp tests/polyglot/go/main.go $(GO_BUILD)/src/aignehub/hubclient/
	cd $(GO_BUILD)/src/aignehub/hubclient && $(GO_ENV) go vet . && $(GO_ENV) go build -o $@ .

clean:
	rm -rf .venv .tools node_modules .build
