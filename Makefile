# vmferry — the two commands of the README are `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The native page digests (see their rule below).
PAGEHASH_SO := handler/native/_pagehash.so
PROTO_SRC := $(wildcard proto/vmferry/rpc/*.proto) $(wildcard proto/vmferry/etcdpb/*.proto)

.PHONY: all venv demo test test-unit test-integration lint proto proto-check bench clean lab-down \
	install-qemu install-etcd guest-image guest-image-optional test-deps chaos lock dist install-nspawn

all: test

# Install into a local virtual environment from the lock file (exact versions, hashes
# checked), then vmferry itself without touching its dependencies; re-run only when the
# lock or pyproject changes.
$(STAMP): pyproject.toml requirements.lock | $(PAGEHASH_SO)
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --require-hashes -r requirements.lock
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	@touch $(STAMP)

# The native page digests (handler/pagehash.py) and the memvm engine's one pass per page
# batch (handler/pagebatch.py: zero check + hash + copy); without them Python/numpy
# fallbacks give the same results, slower, and say so: two C files with xxhash used
# header-only, one library built into the package whenever a .c changes (~1 s, 24 KiB;
# an order-only prerequisite of the venv, so every target that needs the venv builds it
# once). gcc and xxhash.h (libxxhash-dev) are
# installed with apt-get as root when missing; never fatal.
$(PAGEHASH_SO): handler/native/pagehash.c handler/native/pagebatch.c handler/native/zero_page.h
	@if ! command -v gcc >/dev/null || [ ! -e /usr/include/xxhash.h ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -q && apt-get install -y -q --no-install-recommends gcc libc6-dev libxxhash-dev) \
	      >/dev/null || echo "warning: could not install gcc/libxxhash-dev"; \
	  fi; \
	fi; \
	if command -v gcc >/dev/null && [ -e /usr/include/xxhash.h ]; then \
	  { gcc -O3 -std=c11 -D_GNU_SOURCE -Wall -Wextra -shared -fPIC -o $@.tmp $(filter %.c,$^) && mv $@.tmp $@; } || \
	    echo "warning: $@ not built: page digests use the slower Python fallback"; \
	else echo "note: no gcc or xxhash.h (libxxhash-dev): page digests use the slower Python fallback"; fi

# Re-resolve requirements.lock from pyproject's ranges (keeps current pins unless they no
# longer fit; `make lock LOCK_ARGS=--upgrade` moves to the newest), with pip-tools in a
# throw-away virtual environment of its own.
LOCK_ARGS ?=
lock:
	@test -x build/lock-venv/bin/pip-compile || \
	  { $(PY) -m venv build/lock-venv && build/lock-venv/bin/pip install --quiet pip-tools; }
	build/lock-venv/bin/pip-compile --quiet --generate-hashes --allow-unsafe --extra dev \
	  --strip-extras --no-emit-index-url --no-emit-find-links $(LOCK_ARGS) \
	  -o requirements.lock pyproject.toml

# What the tests need beyond Python: the system Chromium (console browser tests), QEMU
# (driver `qemu`) and etcd (the store's etcd backend, replicated controllers). Installed with apt-get as root, only when missing; otherwise those
# tests skip and say why. `make demo` needs none of it.
test-deps:
	@if [ "$$(id -u)" = 0 ]; then \
	  command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium); \
	else command -v chromium >/dev/null || echo "note: no chromium (not root): console browser tests will be skipped"; fi
	@$(MAKE) --no-print-directory install-qemu install-etcd
	@$(MAKE) --no-print-directory install-nspawn

# systemd-nspawn and systemd-analyze for the install test (tests/integration/test_hosts_nspawn.py)
# and the units' security figures: as root, only when missing. Installing the packages
# starts nothing (systemd runs only inside the test's containers). Never fatal.
install-nspawn:
	@command -v systemd-nspawn >/dev/null && command -v systemd-analyze >/dev/null || \
	  { if [ "$$(id -u)" = 0 ]; then \
	      (apt-get update -q && apt-get install -y -q --no-install-recommends systemd-container) \
	        || echo "warning: could not install systemd-container (the nspawn test will skip)"; \
	    else echo "note: not root: the nspawn test will skip"; fi; }

# QEMU and the guest image's build tools (driver `qemu`); only as root, only when missing.
# Never fatal: without QEMU the qemu tests skip and say why.
install-qemu:
	@command -v qemu-system-x86_64 >/dev/null && command -v cpio >/dev/null || \
	  { if [ "$$(id -u)" = 0 ]; then \
	      (apt-get update -q && apt-get install -y -q --no-install-recommends qemu-system-x86 cpio gcc libc6-dev) \
	        || echo "warning: could not install qemu-system-x86 (the qemu tests will skip)"; \
	    else echo "note: not root: install qemu-system-x86 and cpio yourself for the qemu driver"; fi; }

# etcd (Debian's etcd-server): the etcd store backend's tests and `lab up --ha`; only as
# root, only when missing. Never fatal: without it those tests skip and say why.
install-etcd:
	@command -v etcd >/dev/null || \
	  { if [ "$$(id -u)" = 0 ]; then \
	      (apt-get update -q && apt-get install -y -q --no-install-recommends etcd-server) \
	        || echo "warning: could not install etcd-server (the etcd tests will skip)"; \
	    else echo "note: not root: install etcd-server yourself for the etcd store tests"; fi; }

# The test/demo guest: Debian's kernel + a static memload /init (guest/). Fast when built.
guest-image:
	guest/build.sh

guest-image-optional:
	-@guest/build.sh || echo "warning: guest image not built: the qemu tests will skip"

venv: $(STAMP)

# Generated gRPC code is committed; this target reproduces it from proto/.
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I proto \
	  --python_out=. --grpc_python_out=. --mypy_out=. \
	  --plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy $(PROTO_SRC)

# Fails when the committed generated code is stale.
proto-check: $(STAMP)
	@tmp=$$(mktemp -d) && \
	$(BIN)/python -m grpc_tools.protoc -I proto --python_out=$$tmp --grpc_python_out=$$tmp \
	  --mypy_out=$$tmp --plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy $(PROTO_SRC) && \
	for f in $$(cd $$tmp && find . -name '*.py' -o -name '*.pyi'); do \
	  cmp -s $$tmp/$$f $$f || { echo "stale generated code: $$f (run 'make proto')"; rm -rf $$tmp; exit 1; }; \
	done; rm -rf $$tmp; echo "generated code is up to date"

# What deploy/install.sh installs on a host: the wheel, and constraints.txt (the exact
# versions of requirements.lock, so hosts run what the tests ran).
# The wheel carries handler/native/_pagehash.so when it was built here (x86_64 Linux, as
# the hosts: the wheel's tag does not say so; elsewhere the Python fallback hashes).
dist: $(STAMP)
	rm -rf dist && mkdir -p dist
	$(BIN)/pip wheel --quiet --no-deps --no-build-isolation -w dist .
	@$(BIN)/python -c "import sys, zipfile; names = zipfile.ZipFile(sys.argv[1]).namelist(); \
	  print('wheel carries the native page digests' if 'handler/native/_pagehash.so' in names \
	  else 'warning: the wheel has no handler/native/_pagehash.so (hosts hash in Python)')" dist/*.whl
	sed -n 's/^\([A-Za-z0-9_.-]*==[^ ]*\).*/\1/p' requirements.lock > dist/constraints.txt
	@ls dist

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

# Two worker processes, one test module each at a time (module-scoped labs stay whole):
# the integration tests mostly wait on their daemons, so two run side by side on two
# cores (measured: 1571 tests, 16.5 min in one process, 15.8 min in two with the
# machine under a load of 4-9). TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= 2
PYTEST_PARALLEL = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

test: $(STAMP) test-deps proto-check lint guest-image-optional
	$(BIN)/pytest -q $(PYTEST_PARALLEL) tests

test-unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

test-integration: $(STAMP) test-deps guest-image-optional
	$(BIN)/pytest -q $(PYTEST_PARALLEL) -m slow tests/integration

# The fault-injection suites (issue 25): every pre-copy switchover step, post-copy with a
# handler killed or the network cut past the recovery window, and a short network drop in
# pre-copy, 20 times each (`make test` runs each once). CHAOS_REPS=n to change the count.
CHAOS_REPS ?= 20
CHAOS_SUITES := tests/integration/test_chaos.py tests/integration/test_postcopy_faults.py \
	tests/integration/test_network_faults.py
chaos: $(STAMP)
	CHAOS_REPS=$(CHAOS_REPS) $(BIN)/pytest -q -s $(CHAOS_SUITES)

demo: $(STAMP)
	$(BIN)/python -m vmferry.lab.demo

# QEMU is the peer the benchmark compares against (Debian's package; installed when root).
# BENCH_ARGS passes options through, e.g. make bench BENCH_ARGS="--quick --scenario random".
bench: $(STAMP)
	@command -v qemu-system-x86_64 >/dev/null || \
	  if [ "$$(id -u)" = 0 ]; then apt-get update && apt-get install -y qemu-system-x86; \
	  else echo "qemu-system-x86_64 is missing and not root: the QEMU peers are skipped"; fi
	$(BIN)/python -m bench.run $(BENCH_ARGS)

lab-down: $(STAMP)
	$(BIN)/vmferry lab down

clean:
	rm -rf $(VENV) .lab build dist *.egg-info $(PAGEHASH_SO)
