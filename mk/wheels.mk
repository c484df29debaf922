# Publishable wheels, included by the top-level Makefile.
#
#   make wheels        dist/: abi3 (CPython >= 3.9) manylinux2014 wheels for x86_64 and aarch64,
#                      stripped, and the sdist. zig (PyPI's ziglang) links them against glibc
#                      2.17 whatever this machine's glibc is, and cross-links the aarch64 one.
#   make wheel-check   auditwheel and abi3audit on both wheels; the x86_64 wheel installed into
#                      a fresh venv (no Rust on its PATH, binaries only) and the API tests run
#                      against it (mk/check-wheels.sh).
#
# Needs `rustup target add aarch64-unknown-linux-gnu`. pip wheel / python -m build make a
# linux_x86_64 wheel for this machine only (maturin's PEP 517 default): publish dist/.

DIST          ?= dist
WHEEL_TOOLS   := "ziglang>=0.11" "auditwheel>=6" "abi3audit>=0.0.10"
WHEEL_TARGETS := x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu

.PHONY: wheels wheel-check

wheels: deps
	$(PY) -m pip install -q $(WHEEL_TOOLS)
	rm -rf $(DIST)
	for target in $(WHEEL_TARGETS); do \
	  $(VENV)/bin/maturin build --release --zig --target $$target --compatibility manylinux2014 --out $(DIST) || exit 1; \
	done
	$(VENV)/bin/maturin sdist --out $(DIST)

wheel-check: wheels
	PY=$(PY) bash mk/check-wheels.sh $(DIST)
