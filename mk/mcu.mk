# Cortex-M targets, included by the top-level Makefile (firmware/Makefile does the work).
#
#   make mcu-test      build the firmware of the three QEMU boards, run it, compare with the
#                      host library (tests/test_mcu.py); skips without the toolchain unless
#                      IOTCOMPRESS_REQUIRE_MCU=1 (CI)
#   make mcu-size      flash / RAM / stack / instructions per element table (docs/mcu.md)
#   make header        regenerate include/iotcompress.h with cbindgen
#   make header-check  fail if include/iotcompress.h is stale
#
# MCU_TOOLCHAIN=rustup|debian|auto, MCU_CARGO, MCU_RUSTC: see firmware/Makefile.

CBINDGEN         ?= cbindgen
CBINDGEN_VERSION := 0.29.4
CBINDGEN_ARGS    := --quiet --config rust/iotcompress-ffi/cbindgen.toml --crate iotcompress-ffi rust/iotcompress-ffi
MCU_MAKE          = $(MAKE) --no-print-directory -C firmware $(if $(MCU_TOOLCHAIN),MCU_TOOLCHAIN=$(MCU_TOOLCHAIN))

.PHONY: mcu-build mcu-test mcu-size header header-check

mcu-build:
	$(MCU_MAKE) all

mcu-test: develop
	$(PY) -m pytest -m mcu tests/test_mcu.py tests/test_novelty.py

mcu-size:
	$(MCU_MAKE) size
	python3 firmware/size_report.py target/mcu
	@echo
	python3 firmware/size_report.py target/mcu --markdown
	@echo
	python3 firmware/size_report.py target/mcu --breakdown mps2-an386 threshold_int8

header:
	$(CBINDGEN) $(CBINDGEN_ARGS) --output include/iotcompress.h

header-check:
	@if ! command -v $(CBINDGEN) >/dev/null; then \
	  msg="cbindgen not found: cargo install cbindgen --version $(CBINDGEN_VERSION) --locked"; \
	  if [ "$$IOTCOMPRESS_REQUIRE_MCU" = 1 ]; then echo "$$msg"; exit 1; fi; \
	  echo "header-check skipped: $$msg"; exit 0; fi; \
	v=$$($(CBINDGEN) --version | awk '{print $$2}'); \
	[ "$$v" = "$(CBINDGEN_VERSION)" ] || echo "note: cbindgen $$v; the header is generated with $(CBINDGEN_VERSION)"; \
	tmp=$$(mktemp); \
	$(CBINDGEN) $(CBINDGEN_ARGS) --output $$tmp && diff -u include/iotcompress.h $$tmp; rc=$$?; rm -f $$tmp; \
	if [ $$rc != 0 ]; then echo "include/iotcompress.h is stale: run make header"; exit 1; fi; \
	echo "include/iotcompress.h is up to date"
