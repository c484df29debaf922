#!/usr/bin/env bash
# Checks the wheels `make wheels` put in DIST (default dist/), as a package index and a user
# would: auditwheel (the manylinux2014 tag is earned), abi3audit (only the stable ABI of
# CPython 3.9), the licence files inside, and the x86_64 wheel in a fresh venv without Rust,
# where the API tests run against it (no test may skip).
set -euo pipefail
dist=${1:-dist}
py=${PY:-.venv/bin/python}
fail() { echo "check-wheels: $*" >&2; exit 1; }

shopt -s nullglob
wheels=("$dist"/iotcompress-*-cp39-abi3-manylinux*.whl)
sdists=("$dist"/iotcompress-*.tar.gz)
[ ${#wheels[@]} -eq 2 ] || fail "expected an x86_64 and an aarch64 abi3 wheel in $dist, found: ${wheels[*]:-none}"
[ ${#sdists[@]} -eq 1 ] || fail "expected one sdist in $dist"

for wheel in "${wheels[@]}"; do
  arch=$(basename "$wheel" .whl | sed 's/.*_\(x86_64\|aarch64\)$/\1/')
  case "$wheel" in *manylinux_2_17_"$arch"*|*manylinux2014_"$arch"*) ;; *) fail "$wheel: not tagged manylinux2014";; esac
  echo "== $(basename "$wheel")"
  report=$("$py" -m auditwheel show "$wheel")
  echo "$report"
  # (auditwheel wraps its lines: join them before matching)
  tr '\n' ' ' <<<"$report" | grep -q "consistent with the following platform tag: \"manylinux_2_17_$arch\"" \
    || fail "$wheel: auditwheel does not find it manylinux_2_17 ($arch) compatible"
  "$py" -m abi3audit --strict --report "$wheel" || fail "$wheel: abi3audit found symbols outside the stable ABI"
  names=$("$py" -m zipfile -l "$wheel")
  for f in LICENSE-MIT LICENSE-APACHE; do grep -q "$f" <<<"$names" || fail "$wheel: no $f"; done
  # stripped: no .symtab or .debug_* section in the extension (ELF64 little-endian section headers)
  "$py" - "$wheel" <<'PY' || fail "$wheel: the extension is not stripped"
import struct, sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
so = next(n for n in z.namelist() if n.endswith(".so"))
elf = z.read(so)
shoff, = struct.unpack_from("<Q", elf, 0x28)
shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
def section(i):
    return struct.unpack_from("<IIQQQQ", elf, shoff + i * shentsize)
names_at = section(shstrndx)[4]
names = [elf[names_at + section(i)[0]:].split(b"\0", 1)[0].decode() for i in range(shnum)]
left = [n for n in names if n == ".symtab" or n.startswith(".debug")]
assert not left, f"{so}: {left}"
print(f"{so}: {len(elf):,} bytes, stripped ({shnum} sections, no .symtab)")
PY
done
sdist_names=$(tar -tzf "${sdists[0]}")
for f in LICENSE-MIT LICENSE-APACHE; do
  grep -q "/$f$" <<<"$sdist_names" || fail "${sdists[0]}: no $f"
done

x86=$(printf '%s\n' "${wheels[@]}" | grep '_x86_64\.whl$')
venv=$(mktemp -d)/venv
trap 'rm -rf "$(dirname "$venv")"' EXIT
python3 -m venv "$venv"
# Nothing but the venv on PATH (Debian's cargo lives in /usr/bin here), binaries only:
# nothing may be built.
clean_path="$venv/bin"
for tool in cargo rustc maturin; do
  if PATH=$clean_path command -v "$tool" >/dev/null; then fail "$tool is on the clean PATH ($(PATH=$clean_path command -v $tool))"; fi
done
PATH=$clean_path "$venv/bin/pip" install -q --only-binary=:all: "$x86[torch]" "pytest>=7" "pytest-timeout>=2" "hypothesis>=6"
PATH=$clean_path "$venv/bin/python" -c "import iotcompress, sys; f = iotcompress._iotcompress.__file__; assert f.startswith(sys.prefix), f; print('installed:', f)"
set +e
out=$(PATH=$clean_path "$venv/bin/python" -m pytest -p no:cacheprovider -q -rs \
  tests/test_api.py tests/test_golden.py tests/test_stream.py tests/test_network.py tests/test_properties.py \
  tests/test_cli.py 2>&1)
rc=$?
set -e
echo "$out" | tail -15
[ $rc -eq 0 ] || fail "the API tests failed against the installed wheel"
if grep -qi "skipped" <<<"$out"; then fail "a test skipped against the installed wheel"; fi
echo "check-wheels: both wheels pass auditwheel and abi3audit; the API tests pass against the installed x86_64 wheel"
