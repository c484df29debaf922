"""The core on microcontrollers: firmware for three QEMU Cortex-M boards (microbit: M0,
mps2-an385: M3, mps2-an386: M4F) runs the compressor through the C API over the golden
vectors and synthetic cases; every message must be byte-identical to the host library's (and
to the golden .bin files), and the device's decode of the host-made messages must equal the
host's. Also the C header and library on the host (strict C99/C++, the docs' example).

Without the toolchain (arm-none-eabi-gcc + newlib, qemu-system-arm, and rustup thumb targets
or Debian's rustc-web/cargo-web/rust-web-src) these tests skip with the reason;
IOTCOMPRESS_REQUIRE_MCU=1 (set by CI) turns the skip into a failure. `make mcu-test` runs them.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import iotcompress as ic

ROOT = Path(__file__).resolve().parents[1]
FIRMWARE = ROOT / "firmware"
BUILD = ROOT / "target" / "mcu"
BOARDS = ["microbit", "mps2-an385", "mps2-an386"]
REQUIRE = os.environ.get("IOTCOMPRESS_REQUIRE_MCU") == "1"
INSTALL_HINT = (
    "apt-get install gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm "
    "rustc-web cargo-web rust-web-src (or rustup target add thumbv6m-none-eabi "
    "thumbv7m-none-eabi thumbv7em-none-eabihf)"
)
QUANT_NAMES = ["f32", "f16", "bf16", "int8", "int4", "sign", "ternary", "qsgd"]
INDEX_NAMES = ["dense", "bitmap", "rice"]

pytestmark = [pytest.mark.mcu, pytest.mark.timeout(1800)]

_spec = importlib.util.spec_from_file_location("gen_vectors", FIRMWARE / "gen_vectors.py")
gen_vectors = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen_vectors)


def _skip_or_fail(reason: str) -> None:
    if REQUIRE:
        pytest.fail(f"{reason} (IOTCOMPRESS_REQUIRE_MCU=1 forbids skipping; {INSTALL_HINT})")
    pytest.skip(f"{reason}; install: {INSTALL_HINT}")


def _missing_mcu_tools() -> list[str]:
    missing = [t for t in ("make", "arm-none-eabi-gcc", "qemu-system-arm") if not shutil.which(t)]
    if shutil.which("arm-none-eabi-gcc"):
        lib = subprocess.run(
            ["arm-none-eabi-gcc", "-mthumb", "-mcpu=cortex-m0", "-print-file-name=librdimon_nano.a"],
            capture_output=True, text=True,
        ).stdout.strip()
        if not os.path.isabs(lib):
            missing.append("newlib for arm-none-eabi (librdimon_nano.a)")
    if shutil.which("make"):
        toolchain = subprocess.run(
            ["make", "-s", "-C", str(FIRMWARE), "print-toolchain"], capture_output=True, text=True
        ).stdout.strip()
        if toolchain not in ("rustup", "debian"):
            missing.append("a Rust toolchain for thumbv6m/thumbv7m/thumbv7em")
    return missing


@pytest.fixture(scope="session")
def firmware() -> Path:
    missing = _missing_mcu_tools()
    if missing:
        _skip_or_fail("MCU toolchain missing: " + ", ".join(missing))
    jobs = str(max(1, min(4, os.cpu_count() or 1)))
    r = subprocess.run(["make", "-C", str(FIRMWARE), "-j", jobs, "all"], capture_output=True, text=True)
    assert r.returncode == 0, f"firmware build failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return BUILD


class Run:
    """The parsed semihosting output of one board's test firmware."""

    def __init__(self, text: str, returncode: int):
        self.text, self.returncode = text, returncode
        self.messages: dict[tuple[str, int], bytes] = {}
        self.nnz: dict[tuple[str, int], int] = {}
        self.headers: dict[tuple[str, int], list[str]] = {}
        self.decoded: dict[str, dict[int, int]] = {}
        self.corrupt: dict[str, tuple[str, str]] = {}
        self.lines = text.splitlines()
        for line in self.lines:
            words = line.split()
            if not words:
                continue
            if words[0] == "MSG":
                key = (words[1], int(words[2]))
                self.nnz[key] = int(words[4])
                self.messages[key] = bytes.fromhex(words[5]) if len(words) > 5 else b""
            elif words[0] == "HDR":
                self.headers[(words[1], int(words[2]))] = words[3:]
            elif words[0] == "DEC":
                self.decoded[words[1]] = {int(i): int(b, 16) for i, b in (w.split(":") for w in words[2:])}
            elif words[0] == "CORRUPT":
                self.corrupt[words[1]] = (words[2], words[3])

    def line(self, tag: str) -> list[str]:
        found = [ln.split() for ln in self.lines if ln.startswith(tag + " ")]
        assert len(found) == 1, f"expected one {tag} line in:\n{self.text[-2000:]}"
        return found[0]


_runs: dict[str, Run] = {}


def run_board(firmware: Path, board: str) -> Run:
    if board not in _runs:
        elf = firmware / board / "test.elf"
        cmd = ["qemu-system-arm", "-M", board, "-nographic", "-monitor", "none", "-serial", "null",
               "-semihosting", "-kernel", str(elf)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        _runs[board] = Run(r.stdout + r.stderr, r.returncode)
    return _runs[board]


def grad_of(bits: list[int]) -> np.ndarray:
    return np.array(bits, dtype=np.uint32).view(np.float32)


@pytest.mark.parametrize("board", BOARDS)
def test_firmware_runs_clean(firmware, board):
    run = run_board(firmware, board)
    assert run.line("DONE") == ["DONE", "failures", "0"], run.text[-3000:]
    assert run.returncode == 0
    assert run.line("BOARD")[1] == board
    abi = run.line("ABI")
    assert abi[2] == abi[4], "iotcompress_state_size() != sizeof(IotcompressCompressor) in C"
    assert "FAULT" not in run.text and "ERR " not in run.text


@pytest.mark.parametrize("board", BOARDS)
def test_device_messages_equal_host_messages(firmware, board):
    run = run_board(firmware, board)
    cases = gen_vectors.board_cases(board)
    assert len(cases) >= (12 if board == "microbit" else 14)
    for case in cases:
        host = ic.Compressor(case["numel"], **case["options"])
        for i, step in enumerate(case["steps"]):
            want = host.compress(grad_of(step["grad"]))
            if step["message"] is not None:
                assert want == step["message"], f"host library vs golden {case['name']} step {i}"
            assert (case["name"], i) in run.messages, f"{board} printed no message for {case['name']} step {i}"
            got = run.messages[(case["name"], i)]
            assert got == want, f"{board} {case['name']} step {i}:\n device {got.hex()}\n host   {want.hex()}"
            assert run.nnz[(case["name"], i)] == ic.inspect(want)["nnz"]


@pytest.mark.parametrize("board", BOARDS)
def test_device_decodes_host_messages(firmware, board):
    run = run_board(firmware, board)
    golden = [c for c in gen_vectors.board_cases(board) if c["steps"][0]["message"] is not None]
    assert golden
    for case in golden:
        total = np.zeros(case["numel"], np.float32)
        for i, step in enumerate(case["steps"]):
            msg = step["message"]
            total += ic.decode(msg)
            info = ic.inspect(msg)
            h = run.headers[(case["name"], i)]
            device = {
                "numel": int(h[0]), "nnz": int(h[1]), "quant": QUANT_NAMES[int(h[2])], "levels": int(h[3]),
                "index": INDEX_NAMES[int(h[4])], "rice_k": int(h[5]),
                "scale": np.uint32(int(h[6], 16)).view(np.float32), "stream": int(h[7], 16),
                "header_bytes": int(h[8]), "index_bytes": int(h[9]), "value_bytes": int(h[10]), "nbytes": int(h[11]),
            }
            for field, value in device.items():
                want = info[field]
                if field == "scale":
                    want = np.float32(want)
                if field == "rice_k" and want is None:
                    want = 0
                if field == "levels" and want is None:
                    want = 0
                assert value == want, f"{board} {case['name']} step {i}: {field} {value} != {want}"
        host_bits = {i: int(b) for i, b in enumerate(total.view(np.uint32)) if b}
        assert run.decoded[case["name"]] == host_bits, f"{board} {case['name']}: decoded sum differs"


@pytest.mark.parametrize("board", BOARDS)
def test_device_refuses_corrupt_messages(firmware, board):
    run = run_board(firmware, board)
    assert run.corrupt
    for name, (code, effect) in run.corrupt.items():
        assert (code, effect) == ("IOTCOMPRESS_ERR_CHECKSUM_MISMATCH", "unchanged"), name


@pytest.mark.parametrize("board", BOARDS)
def test_stack_stays_under_two_kib(firmware, board):
    """Peak stack of iotcompress_compress / iotcompress_decode_add over every case, measured
    by stack painting on the device (the issue's budget is 2 KiB)."""
    words = run_board(firmware, board).line("STACK")
    compress, decode = int(words[2]), int(words[4])
    assert 0 < compress < 2048 and 0 < decode < 2048, words


def _host_cc_tools() -> list[str]:
    return [t for t in ("cargo", "gcc", "g++") if not shutil.which(t)]


@pytest.fixture(scope="session")
def host_lib() -> Path:
    missing = _host_cc_tools()
    if missing:
        _skip_or_fail("host C toolchain missing: " + ", ".join(missing))
    r = subprocess.run(["cargo", "build", "--release", "-q", "-p", "iotcompress-ffi"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    lib = ROOT / "target" / "release" / "libiotcompress.a"
    assert lib.exists()
    return lib


def _build_and_run(tmp_path: Path, lib: Path, source: str, compiler: list[str]) -> str:
    exe = tmp_path / (Path(source).stem + "-" + compiler[0])
    cmd = compiler + ["-Wall", "-Wextra", "-Werror", "-pedantic", f"-I{ROOT / 'include'}",
                      str(FIRMWARE / source), "-x", "none", str(lib), "-lpthread", "-ldl", "-lm", "-o", str(exe)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr}"
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_c_header_and_library_on_the_host(host_lib, tmp_path):
    for compiler in (["gcc", "-std=c99"], ["g++", "-std=c++11", "-x", "c++"]):
        out = _build_and_run(tmp_path, host_lib, "host_test.c", compiler)
        assert "host_test: 0 failures" in out


def example_gradient(step: int, numel: int = 1000) -> np.ndarray:
    """firmware/example.c's compute_gradient, in float32 like the C code."""
    i = np.arange(numel, dtype=np.uint64)
    x = ((i * 2654435761) % 2**32) ^ ((step * 40503) % 2**32)
    return (np.float32(1) * (x % 2001).astype(np.float32) / np.float32(1000) - np.float32(1)).astype(np.float32)


def check_example_output(out: str) -> None:
    """The example's messages: equal to iotcompress.StreamingCompressor's for the same
    gradients (fed in the same chunks), and decoded on the host to what the device's
    server printed."""
    msgs = [bytes.fromhex(w.split()[1]) for w in out.splitlines() if w.startswith("MSG ")]
    sent = re.findall(r"sent (\d+) bytes: (\d+) of 1000 entries", out)
    assert len(msgs) == 5 and len(sent) == 5
    host = ic.StreamingCompressor(1000, threshold=0.9, target_count=50, quant="int8", momentum=0.9, state="int8")
    for step, (msg, (nbytes, nnz)) in enumerate(zip(msgs, sent)):
        want = host.compress(example_gradient(step), chunks=[100] * 10)
        assert msg == want, f"step {step}:\n device {msg.hex()}\n host   {want.hex()}"
        assert (len(msg), ic.inspect(msg)["nnz"]) == (int(nbytes), int(nnz)) and int(nnz) > 0
        ic.decode(msg, 1000)


def test_docs_example_compiles_runs_and_is_shown_verbatim(host_lib, tmp_path):
    out = _build_and_run(tmp_path, host_lib, "example.c", ["gcc", "-std=c99"])
    check_example_output(out)
    docs = (ROOT / "docs" / "mcu.md").read_text()
    assert (FIRMWARE / "example.c").read_text().strip() in docs, "docs/mcu.md must show firmware/example.c"


@pytest.mark.parametrize("board", ["mps2-an385", "mps2-an386"])
def test_docs_example_prints_the_same_on_the_device(firmware, host_lib, tmp_path, board):
    host = _build_and_run(tmp_path, host_lib, "example.c", ["gcc", "-std=c99"])
    cmd = ["qemu-system-arm", "-M", board, "-nographic", "-monitor", "none", "-serial", "null",
           "-semihosting", "-kernel", str(firmware / board / "example.elf")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (r.stdout + r.stderr).splitlines() == host.splitlines()
    check_example_output(r.stdout + r.stderr)


# ------------------------------------------------------------- the 20 kB-SRAM budget example

TRAIN20K_NUMEL = 2410
RAM_BUDGET = 20 * 1024


def _fnv_weights(w: np.ndarray) -> int:
    digest = 2166136261
    for bits in w.view(np.uint32).tolist():
        digest = ((digest ^ bits) * 16777619) % 2**32
    return digest


def _train20k_initial_weights() -> np.ndarray:
    """train20k.c's initial weights, in float32 like the C code."""
    def hash32(v):
        m = 0xFFFFFFFF
        v = v & m
        v ^= v >> 16
        v = (v * 0x7FEB352D) & m
        v ^= v >> 15
        v = (v * 0x846CA68B) & m
        v ^= v >> 16
        return v
    i = np.arange(TRAIN20K_NUMEL, dtype=np.uint64)
    unit = (hash32(i + 12345) & 0xFFFF).astype(np.float32) / np.float32(32768) - np.float32(1)
    fan = np.where(i < 32 * 65, np.float32(0.125), np.float32(0.177)).astype(np.float32)
    return (fan * unit).astype(np.float32)


@pytest.fixture(scope="session")
def train20k_run(firmware) -> str:
    elf = firmware / "mps2-an385" / "train20k.elf"
    cmd = ["qemu-system-arm", "-M", "mps2-an385", "-nographic", "-monitor", "none", "-serial", "null",
           "-semihosting", "-kernel", str(elf)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "ERR " not in out and "FAULT" not in out, out[-3000:]
    return out


def test_train20k_fits_in_20_kib_of_ram(firmware, train20k_run):
    """.data + .bss + the reserved stack fit in 20 KiB (the linker script's whole RAM), and the
    stack measured by painting stays inside its reservation."""
    elf = firmware / "mps2-an385" / "train20k.elf"
    sizes = subprocess.run(["arm-none-eabi-size", "-A", str(elf)], capture_output=True, text=True,
                           check=True).stdout
    sec = {p[0]: int(p[1]) for p in (ln.split() for ln in sizes.splitlines()) if len(p) >= 2 and p[1].isdigit()}
    syms = subprocess.run(["arm-none-eabi-nm", str(elf)], capture_output=True, text=True, check=True).stdout
    addr = {p[2]: int(p[0], 16) for p in (ln.split() for ln in syms.splitlines()) if len(p) == 3}
    ram_start = 0x20000000
    stack_reserved = addr["__stack_top"] - addr["__stack_limit"]
    assert addr["__stack_top"] - ram_start == RAM_BUDGET, "the linker script's RAM must be 20 KiB"
    static = sec.get(".data", 0) + sec.get(".bss", 0)
    assert static + stack_reserved <= RAM_BUDGET, (static, stack_reserved)
    peak = int(re.search(r"^STACK (\d+)$", train20k_run, re.M).group(1))
    assert 0 < peak < stack_reserved, (peak, stack_reserved)


def test_train20k_learns_and_its_messages_decode_on_the_host(train20k_run):
    lines = train20k_run.splitlines()
    acc = [(int(w[1]), int(w[2])) for w in (ln.split() for ln in lines) if w[0] == "ACC"]
    assert acc[0][0] == 0 and acc[0][1] <= 40, acc  # chance is 20 of 200
    assert acc[-1][1] >= 150, acc
    msgs = [ln.split() for ln in lines if ln.startswith("MSG ")]
    assert len(msgs) == 200
    # The host decodes every message and, replaying the updates, ends with the device's model.
    w = _train20k_initial_weights()
    for step, (_, s, nnz, selected, hexmsg) in enumerate(msgs):
        msg = bytes.fromhex(hexmsg)
        info = ic.inspect(msg)
        assert int(s) == step and len(msg) <= 512
        assert (info["numel"], info["nnz"], info["quant"], info["index"]) == (TRAIN20K_NUMEL, int(nnz), "int8", "rice")
        assert int(nnz) <= int(selected)
        ic.decode_add(msg, w, scale=-0.5)
    done = next(ln.split() for ln in lines if ln.startswith("DONE "))
    assert _fnv_weights(w) == int(done[4])


def test_train20k_host_build_prints_the_same(host_lib, tmp_path, train20k_run):
    exe = tmp_path / "train20k"
    cmd = ["gcc", "-std=c99", "-O2", "-ffp-contract=off", "-DHOST", "-Wall", "-Wextra", "-Werror", "-pedantic",
           f"-I{ROOT / 'include'}", str(FIRMWARE / "train20k.c"), str(host_lib), "-lpthread", "-ldl", "-lm",
           "-o", str(exe)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    host = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120).stdout
    strip = lambda text: [ln for ln in text.splitlines() if not ln.startswith("STACK ")]  # noqa: E731
    assert strip(host) == strip(train20k_run)


# ------------------------------------------------------------------ the streaming path's size

_spec_size = importlib.util.spec_from_file_location("size_report", FIRMWARE / "size_report.py")
size_report = importlib.util.module_from_spec(_spec_size)
_spec_size.loader.exec_module(size_report)

#: Symbols a firmware that only streams must not link: the batch pipeline, top-k and DGC
#: sampling, and double-precision soft-float.
BATCH_ONLY = re.compile(
    r"Compressor::compress|Compressor::top_k|SamplePlan|kth_largest|select_nth|sqrt_f64|"
    r"ThresholdController::update|__aeabi_d|__aeabi_[a-z0-9]*2d$|df[23]$|f64"
)


def test_streaming_path_fits_16_kib_of_flash_and_2_kib_of_stack(firmware):
    """The issue's budget on thumbv7em: threshold + int8 + wire encode in 16 kB of flash and
    2 kB of stack, measured on the size probe that only uses the streaming encoder."""
    elf = firmware / "mps2-an386" / "size-stream_int8.elf"
    r = subprocess.run(["make", "-C", str(FIRMWARE), str(elf)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    share = size_report.lib_share(Path(str(elf) + ".map"))
    flash = sum(share.get(s, 0) for s in size_report.FLASH_SECTIONS)
    assert 0 < flash <= 16 * 1024, f"library flash {flash} B"
    names = subprocess.run(["arm-none-eabi-nm", "-C", str(elf)], capture_output=True, text=True, check=True).stdout
    linked = [ln.split(None, 2)[-1] for ln in names.splitlines() if len(ln.split()) >= 3]
    bad = [n for n in linked if BATCH_ONLY.search(n)]
    assert not bad, f"the streaming firmware links batch-only code: {bad}"
    probe = size_report.run_probe("mps2-an386", elf)
    assert probe["status"] == 0 and probe["nnz"] > 0
    assert 0 < probe["stack_compress"] < 2048, probe
