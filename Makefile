# shmserve build entry points. Run `make help` for the list.
#
# Python comes from a local 3.12 interpreter (uv may not download one here),
# uv from a pinned wheel in .tools/, everything else from uv.lock.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:

UV_VERSION := 0.13.9
GO ?= go

# Resolved once, to the real binary rather than a pyenv shim: a shim only works
# in directories whose .python-version selects 3.12, and uv records the path.
# Override with `make PYTHON=/path/to/python3.12`.
ifeq ($(origin PYTHON),undefined)
PYTHON := $(shell for c in python3.12 $(HOME)/.pyenv/versions/3.12*/bin/python3.12; do \
	"$$c" -c 'import sys; assert sys.version_info[:2] == (3, 12); print(sys.executable)' 2>/dev/null && break; \
	done; true)
endif

TOOLS := .tools
UV := $(TOOLS)/bin/uv
# Versioned stamp so bumping UV_VERSION reinstalls uv.
UV_STAMP := $(TOOLS)/.uv-$(UV_VERSION)

VENV := .venv
VENV_ALL := $(VENV)/.synced-all
VENV_SERVE := $(VENV)/.synced-serve

# Never let uv fetch an interpreter (no route to its download host) or pick a
# different one than the Makefile validated.
ifneq ($(PYTHON),)
export UV_PYTHON := $(PYTHON)
endif
export UV_PYTHON_DOWNLOADS := never
# Trust the OS CA bundle like pip and git do; uv's bundled roots alone fail
# behind a TLS-inspecting registry proxy whenever SSL_CERT_FILE is not set.
export UV_SYSTEM_CERTS ?= 1
export UV_PROJECT_ENVIRONMENT := $(CURDIR)/$(VENV)
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PIP_NO_INPUT := 1

# The Go tests spawn the sidecar themselves and need to know which one.
export SHMSERVE_PYTHON := $(CURDIR)/$(VENV)/bin/python
export SHMSERVE_BIN := $(CURDIR)/$(VENV)/bin/shmserve
# posix semaphores are reached through cgo; a CGO_ENABLED=0 in the caller's
# environment would otherwise silently exclude those files from the build.
export CGO_ENABLED := 1

.PHONY: help
help:
	@echo "make venv        .venv with every extra and group (what 'make test' uses)"
	@echo "make venv-serve  .venv with only core + serve + http (fast; enough for the demo)"
	@echo "make demo        start the sidecar (CIFAR-10 model), drive it from Go, print results"
	@echo "make test        go tests in goclient/ and pytest tests/ against .venv, and check-arm64"
	@echo "make check-arm64 cross-compile the native ring module and the Go client for linux/arm64"
	@echo "make test-arm64  the Go suite and the server both as arm64 under qemu-user (~15 min, not in CI)"
	@echo "make bench       transport comparison, reference results under bench/results/ (~7 min)"
	@echo "make bench-quick the same as a ~20 s smoke run (bench/results/tmp/)"
	@echo "make lock        re-resolve uv.lock after editing pyproject.toml"
	@echo "make versions    print the toolchain this Makefile will use"
	@echo "make clean       remove .venv, .tools and caches"
	@echo "PYTHON=$(or $(PYTHON),<none found>)"

.PHONY: check-python
check-python:
	@if [ -z "$(PYTHON)" ]; then \
		echo "error: no Python 3.12 found (tried python3.12 on PATH and $(HOME)/.pyenv/versions/3.12*/bin/python3.12)." >&2; \
		echo "       Install one, or run: make PYTHON=/path/to/python3.12 ..." >&2; \
		exit 1; \
	fi

# uv comes from PyPI like any package, so a fresh machine needs only python.
$(UV_STAMP): | check-python
	rm -rf $(TOOLS)
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install -q uv==$(UV_VERSION)
	touch $@

.PHONY: uv
uv: $(UV_STAMP)

# --locked, not --frozen: a pyproject.toml edited without `make lock` fails
# here with uv's "lockfile needs to be updated" instead of installing something
# other than what the lock says.
# The native module is built by the package's backend during the sync, so its source is a
# prerequisite too (uv rebuilds it through pyproject.toml's cache-keys).
NATIVE_SOURCES := setup.py shmserve/_ring.c shmserve/_stream.c

$(VENV_ALL): pyproject.toml uv.lock $(NATIVE_SOURCES) $(UV_STAMP)
	$(UV) sync --locked --all-extras --all-groups || { echo "hint: if uv.lock is stale, run 'make lock' and commit it" >&2; exit 1; }
	touch $@

# --inexact: keep whatever a full `make venv` already installed, so switching
# between the two targets never uninstalls TensorFlow/JAX only to reinstall it.
$(VENV_SERVE): pyproject.toml uv.lock $(NATIVE_SOURCES) $(UV_STAMP)
	$(UV) sync --locked --inexact --extra serve --extra http || { echo "hint: if uv.lock is stale, run 'make lock' and commit it" >&2; exit 1; }
	touch $@

.PHONY: venv venv-serve
venv: $(VENV_ALL)
venv-serve: $(VENV_SERVE)

.PHONY: lock
lock: $(UV_STAMP)
	$(UV) lock

.PHONY: versions
versions: $(UV_STAMP)
	@echo "python: $(PYTHON) ($$($(PYTHON) --version 2>&1))"
	@echo "uv:     $$($(UV) --version)"
	@echo "go:     $$($(GO) version)"
	@echo "gcc:    $$(gcc --version | head -n1)"
	@echo "make:   $$($(MAKE) --version | head -n1)"

.PHONY: test test-go test-py check-arm64
test: test-go test-py check-arm64

# arm64 (Graviton, Ampere, Docker on Apple Silicon) is not run on this x86-64 machine, but a
# change that stops the native ring module or the Go client building for it fails make test:
# the module is cross-compiled with Debian's gcc-aarch64-linux-gnu (installed when missing and
# root), the Go module vetted and built for linux/arm64 with cgo.
ARM64_CC ?= aarch64-linux-gnu-gcc
ARM64_CFLAGS := -std=c11 -O2 -Wall -Wextra -Werror -fPIC
check-arm64: $(VENV_ALL)
	@command -v $(ARM64_CC) >/dev/null || { [ "$$(id -u)" = 0 ] && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q gcc-aarch64-linux-gnu >/dev/null; } || \
	  { echo "check-arm64: needs $(ARM64_CC) (apt-get install gcc-aarch64-linux-gnu)" >&2; exit 1; }
	for source in shmserve/_ring.c shmserve/_stream.c; do \
	  $(ARM64_CC) $(ARM64_CFLAGS) \
	    -I"$$($(VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')" \
	    -c $$source -o /dev/null || exit 1; \
	done
	cd goclient && GOARCH=arm64 CGO_ENABLED=1 CC=$(ARM64_CC) $(GO) vet ./... && \
	  GOARCH=arm64 CGO_ENABLED=1 CC=$(ARM64_CC) $(GO) build -o /dev/null ./cmd/shmclient

# Not in make test (a few minutes, and downloads an arm64 Python): the whole Go suite built
# for linux/arm64 and run under qemu-user, its cross-language tests against the server run
# by Debian's arm64 Python under qemu-user too, with the native modules cross-compiled for
# it (tests/arm64/make_root.py says what the root holds). qemu-user translates arm64's
# memory model onto the host's stronger x86-64 one, so this checks that both sides build,
# start and speak the protocol on arm64, not their ordering; spec section 10 and the
# acquire/release code are what make that portable.
# One package at a time (-p 1): the emulated server takes ~12 s to start, and two packages
# starting servers at once pushed them past the tests' 30 s ready timeout.
# TestSIGKILLedParentStopsItsServer is skipped: it re-executes its own test binary, and an
# arm64 binary only runs through qemu, which the kernel would need binfmt_misc to know. The two
# classify tests are skipped: they serve the CIFAR model, whose LiteRT runtime the root lacks.
ARM64_ROOT := .arm64/root
ARM64_SERVER := .arm64/shmserve
.PHONY: test-arm64
test-arm64: check-arm64
	@command -v qemu-aarch64 >/dev/null || { [ "$$(id -u)" = 0 ] && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q qemu-user >/dev/null; } || \
	  { echo "test-arm64: needs qemu-aarch64 (apt-get install qemu-user)" >&2; exit 1; }
	$(VENV)/bin/python tests/arm64/make_root.py $(ARM64_ROOT)
	root=$$PWD/$(ARM64_ROOT) server=$$PWD/$(ARM64_SERVER); \
	set -- $$(QEMU_LD_PREFIX=$$root PYTHONHOME=$$root/usr qemu-aarch64 $$root/python -c \
	  'import sysconfig; print(sysconfig.get_paths()["include"], sysconfig.get_config_var("EXT_SUFFIX"))'); \
	for module in _ring _stream; do \
	  $(ARM64_CC) $(ARM64_CFLAGS) -shared -I$$1 -idirafter $$root/usr/include \
	    shmserve/$$module.c -o shmserve/$$module$$2 -lpthread || exit 1; \
	done; \
	printf '%s\n' '#!/bin/sh' \
	  "export QEMU_LD_PREFIX=$$root PYTHONHOME=$$root/usr PYTHONPATH=$$PWD:$$root/site" \
	  "exec qemu-aarch64 $$root/python -m shmserve.cli \"\$$@\"" > $$server; \
	chmod +x $$server; \
	$$server models >/dev/null && \
	cd goclient && QEMU_LD_PREFIX=$$root SHMSERVE_BIN=$$server \
	  GOARCH=arm64 CGO_ENABLED=1 CC=$(ARM64_CC) \
	  $(GO) test -count=1 -p 1 -exec qemu-aarch64 \
	  -skip 'TestSIGKILLedParentStopsItsServer|TestCrossLanguageClassifyOverEveryTransport|TestSpawnServesTheCommandAndStopsAtExit' ./...

# examples/go is a module of its own (a user's program depending on goclient), so ./... of
# goclient does not reach it.
test-go: $(VENV_ALL)
	cd goclient && $(GO) test -count=1 ./...
	cd examples/go && $(GO) test -count=1 ./...

# pytest's exit 5 ("no tests collected") is left as a failure on purpose.
test-py: $(VENV_ALL)
	$(VENV)/bin/pytest -q tests/

# The Go client, built once; cgo links the POSIX semaphore calls.
SHMCLIENT := goclient/bin/shmclient
GO_SOURCES := $(shell find goclient -name '*.go' -not -name '*_test.go' 2>/dev/null) goclient/go.mod
$(SHMCLIENT): $(GO_SOURCES)
	cd goclient && $(GO) build -o bin/shmclient ./cmd/shmclient

# Images for the demo come from the shared CIFAR-10 training set when this checkout has it
# beside it (never copied into the repo); otherwise the demo classifies what DEMO_IMAGES names.
CIFAR_TARBALL ?= $(firstword $(wildcard ../shared/data/cifar10-train-jpg.tar.gz shared/data/cifar10-train-jpg.tar.gz))
DEMO_NAME ?= demo
DEMO_SOCKET := /tmp/shmserve-$(shell id -u)/$(DEMO_NAME).sock

.PHONY: demo
demo: $(VENV_SERVE) $(SHMCLIENT)
	@work=$$(mktemp -d); server=; \
	trap 'test -n "$$server" && kill $$server 2>/dev/null; wait 2>/dev/null; rm -rf "$$work"' EXIT; \
	if [ -n "$(CIFAR_TARBALL)" ]; then \
		for c in airplane automobile bird cat deer dog frog horse ship truck; do \
			echo train/$$c/0001.jpg train/$$c/0002.jpg; done | xargs tar xzf $(CIFAR_TARBALL) -C "$$work"; \
	fi; \
	images="$${DEMO_IMAGES:-$$work/train}"; \
	echo "== starting the sidecar: shmserve serve --model cifar --transport shm,unix --name $(DEMO_NAME)"; \
	mkfifo "$$work/ready"; \
	$(VENV)/bin/shmserve serve --model cifar --transport shm,unix --name $(DEMO_NAME) \
		--socket $(DEMO_SOCKET) >"$$work/ready" & server=$$!; \
	read -t 60 ready <"$$work/ready" || { echo "sidecar did not report ready" >&2; exit 1; }; \
	echo "$$ready"; \
	echo "== echo over shared memory, then over the Unix socket"; \
	$(SHMCLIENT) echo -addr shm://$(DEMO_NAME) "hello over shared memory"; \
	$(SHMCLIENT) echo -addr unix://$(DEMO_SOCKET) "hello over the unix socket"; \
	echo "== classify (expected class = folder name)"; \
	if [ -d "$$images" ] || [ -f "$$images" ]; then $(SHMCLIENT) classify -addr shm://$(DEMO_NAME) -c 4 "$$images"; \
	else echo "no images: set DEMO_IMAGES=DIR or put the CIFAR-10 tarball at ../shared/data/"; fi; \
	echo "== 3072-byte echo latency, shm vs unix, one run"; \
	$(SHMCLIENT) bench -addr shm://$(DEMO_NAME),unix://$(DEMO_SOCKET) -n 20000 -size 3072; \
	kill $$server; wait $$server; server=; \
	left=$$(ls /dev/shm | grep -c "shmserve\.$(DEMO_NAME)" || true); \
	echo "== sidecar stopped; objects left in /dev/shm: $$left"

.PHONY: clean
clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache .hypothesis dist build
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# ---- bench (issue 5): transport comparison; see bench/README.md -----------------------
BENCH_BUILD := bench/build

.PHONY: bench bench-quick bench-build
bench-build: $(BENCH_BUILD)/pingpong $(BENCH_BUILD)/gobench

$(BENCH_BUILD)/pingpong: bench/floor/pingpong.c
	mkdir -p $(@D)
	gcc -O2 -Wall -Wextra -std=c11 -pthread -o $@ $<

# Phony so `go build` always runs: it is incremental and tracks goclient/ itself.
.PHONY: $(BENCH_BUILD)/gobench
$(BENCH_BUILD)/gobench:
	cd bench/gobench && $(GO) build -o ../build/gobench .

# Full run: reference results under bench/results/ (about 6 minutes on 2 cores).
bench: $(VENV_ALL) bench-build
	$(VENV)/bin/python bench/run.py

# Smoke run for CI: a few seconds per transport, results under bench/results/tmp/.
bench-quick: $(VENV_ALL) bench-build
	$(VENV)/bin/python bench/run.py --quick
