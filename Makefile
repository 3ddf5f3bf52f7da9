# KNEXA — the two commands (`make demo`, `make test`) set everything up themselves.
# The venv is (re)installed only when pyproject.toml changes (stamp files), so
# repeated runs are fast.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test test-all test-slow test-reliability bench bench-check clean venv netns-tools

$(VENV)/bin/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH (or: make PYTHON=python3 ...)"; exit 2; }
	$(PYTHON) -m venv $(VENV)

# Runtime + ML extra (torch is pinned to 2.13.0: the CPU wheel, never a CUDA build).
$(VENV)/.installed-run: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[ml]'
	@touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed-run
	$(PY) -m pip install -q -e '.[ml,dev]'
	@touch $@

venv: $(VENV)/.installed-dev

demo: $(VENV)/.installed-run
	$(PY) -m harness.cli demo

# harness.netlab (tests/e2e/test_netns.py, `knexa-harness up --topology nat`) builds network
# namespaces with iproute2 + nftables: installed from Debian's packages when missing (as root);
# elsewhere those tests skip, visibly, with the reason.
netns-tools:
	@if ! command -v ip >/dev/null 2>&1 || ! command -v nft >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y iproute2 nftables; \
	  else echo "note: ip/nft missing and not root: the network-namespace tests will skip"; fi; \
	fi

# pytest exits 5 when it collected no test: that is a failure of the suite, not a pass.
test: $(VENV)/.installed-dev netns-tools
	@$(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "FAIL: pytest collected no tests (exit 5)"; exit 1; fi; exit $$rc

test-slow: $(VENV)/.installed-dev
	$(PY) -m pytest -q -m slow

test-reliability: $(VENV)/.installed-dev
	$(PY) -m pytest -q -m reliability -p no:randomly

# BENCH_FLAGS=--quick for the small sizes. bench-check: not in CI (timing is noisy); run it
# before a stop that touches a hot path — fails on a ratio > 10 % worse than the last
# recorded run of this machine, or below its target (benchmarks/bench_check.py).
BENCH_FLAGS ?=
bench: $(VENV)/.installed-run
	$(PY) -m benchmarks.run_all $(BENCH_FLAGS)

bench-check: bench
	$(PY) -m benchmarks.bench_check

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
