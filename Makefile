# The entry points a person types. `make demo` and `make test` work on a fresh clone:
# they create .venv, install what they need, build the extension and run.

VENV    ?= .venv
PY      := $(VENV)/bin/python
CARGO   ?= cargo
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(abspath $(VENV))/bin:$(PATH)

PY_DEPS := "maturin>=1.5,<2" "numpy>=1.21" "pytest>=7" "pytest-timeout>=2" "hypothesis>=6" "torch>=2.1" "scikit-learn>=1.0" "matplotlib>=3.5" "lightning>=2.2" "accelerate>=0.30" "aeon>=1.0" "flwr[simulation]==1.42.0"

.PHONY: novelty-eval demo test rust-test clippy nostd-check py-test develop deps lint fmt clean bench aarch64-test

demo: develop
	$(VENV)/bin/iotcompress demo

# mcu-test skips without the Cortex-M toolchain unless IOTCOMPRESS_REQUIRE_MCU=1 (CI).
test: develop rust-test clippy nostd-check header-check py-test mcu-test aarch64-test

$(PY):
	python3 -m venv $(VENV)

# Re-installs when pyproject.toml changes.
$(VENV)/.deps: pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PY_DEPS)
	touch $@

deps: $(VENV)/.deps

develop: deps
	$(VENV)/bin/maturin develop --release -q

# The whole suite, then the core's suite again on the scalar kernels only (SIMD turned off):
# every SIMD kernel must give the bytes the scalar specification gives.
rust-test:
	$(CARGO) test --workspace --release
	IOTCOMPRESS_SIMD=off $(CARGO) test -p iotcompress-core --release

# The NEON kernels against the scalar ones, and the golden vectors, on aarch64 under qemu-user.
# Needs `rustup target add aarch64-unknown-linux-gnu`, gcc-aarch64-linux-gnu and qemu-user;
# without them it skips with the reason, unless IOTCOMPRESS_REQUIRE_AARCH64=1 (CI).
AARCH64 := aarch64-unknown-linux-gnu
aarch64-test:
	@if ! rustup target list --installed 2>/dev/null | grep -qx $(AARCH64) \
	   || ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v qemu-aarch64 >/dev/null; then \
	  msg="aarch64-test: needs rustup target $(AARCH64), aarch64-linux-gnu-gcc and qemu-aarch64"; \
	  if [ "$$IOTCOMPRESS_REQUIRE_AARCH64" = 1 ]; then echo "$$msg" >&2; exit 1; fi; \
	  echo "SKIPPED $$msg"; exit 0; \
	fi; \
	CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
	CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu" \
	$(CARGO) test -p iotcompress-core --release --target $(AARCH64) --test simd --test golden

clippy: | $(PY)
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# The core builds as #![no_std] with no dependencies when its features are off.
nostd-check:
	$(CARGO) build -p iotcompress-core --no-default-features
	$(CARGO) build -p iotcompress-core --no-default-features --features alloc
	$(CARGO) build -p iotcompress-core --no-default-features --features small-crc
	@deps=$$($(CARGO) tree -p iotcompress-core --no-default-features -e normal --prefix none | sort -u | grep -v '^iotcompress-core'); \
	if [ -n "$$deps" ]; then echo "core has dependencies without features: $$deps"; exit 1; fi; \
	echo "no_std core: builds, no dependencies"

# Includes tests/flower/: real SuperLink/SuperNode/Ray processes on localhost (about 3.5 min;
# they skip without flwr unless IOTCOMPRESS_REQUIRE_FLOWER=1, as in CI).
py-test: develop
	$(PY) -m pytest -m "not mcu" tests
	IOTCOMPRESS_SIMD=off $(PY) -m pytest tests/test_golden.py tests/test_api.py -q

# The side-by-side benchmarks (not tests): writes benches/results/*.md and throughput.png.
# BENCH_ARGS=--quick for a short run.
bench: develop
	$(PY) benches/suite.py $(BENCH_ARGS)

# The novelty filter's evaluation on aeon's bundled sensor data (about 5 minutes on two
# cores): rewrites docs/novelty/ and the results section of docs/novelty.md. Not a test.
novelty-eval: develop
	nice -n 19 $(PY) benches/novelty_eval.py $(NOVELTY_ARGS)

lint: clippy
	$(CARGO) fmt --all -- --check

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
	rm -rf $(VENV)

include mk/mcu.mk

# Every cargo-fuzz target for FUZZ_SECONDS each (cargo install cargo-fuzz; stable toolchains
# need RUSTC_BOOTSTRAP=1), from the committed seeds in fuzz/seeds/ into fuzz/corpus/ (not
# committed). libfuzzer's final stats lines report the executions of each.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := decode roundtrip state stream ffi
.PHONY: fuzz
fuzz:
	@for t in $(FUZZ_TARGETS); do \
	  mkdir -p fuzz/corpus/$$t; \
	  (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run -O $$t corpus/$$t seeds/$$t -- \
	    -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1) || exit 1; \
	done
include mk/wheels.mk
