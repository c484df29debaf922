#!/usr/bin/env python3
"""The size report (`make mcu-size`): flash, RAM, peak stack and instructions per element of
the library in a minimal firmware (firmware/size_main.c) per board and variant.

* flash / RAM: the input sections the linker took from libiotcompress.a (the Rust core, the
  C layer and the compiler-builtins routines they call: soft-float, memcpy), read from the link
  map; and each image's totals next to the baseline image that calls nothing of the library.
* stack: the peak of one iotcompress_compress / iotcompress_decode_add call, by stack
  painting on the device.
* instructions / element: QEMU runs with `-icount shift=0` (virtual time = 1 ns per
  instruction); SysTick ticks around the last of three compress steps, calibrated against a
  loop of known length, divided by the element count.

Usage: size_report.py BUILD_DIR [--markdown] [--symbols BOARD VARIANT N]
Standard library only; needs arm-none-eabi-size/-nm and qemu-system-arm.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

BOARDS = {
    "microbit": ("thumbv6m-none-eabi", "Cortex-M0"),
    "mps2-an385": ("thumbv7m-none-eabi", "Cortex-M3"),
    "mps2-an386": ("thumbv7em-none-eabihf", "Cortex-M4F"),
}
VARIANTS = {
    "baseline": "startup + probe, no library call",
    "threshold_int8": "threshold + int8 + wire encode",
    "topk_sign": "exact top-k (1 %) + sign + wire encode",
    "threshold_int8_decode": "threshold + int8 encode, and decode_add",
    "stream_int8": "streaming threshold + int8 + wire encode (f32 state)",
    "stream_int8_state8": "streaming threshold + int8 + wire encode (int8 state)",
}
LIB = "libiotcompress.a"
FLASH_SECTIONS = (".text", ".rodata", ".ARM.exidx", ".ARM.extab")
RAM_SECTIONS = (".data", ".bss")


def elf_sections(elf: Path) -> dict[str, int]:
    out = subprocess.run(["arm-none-eabi-size", "-A", str(elf)], capture_output=True, text=True, check=True).stdout
    sizes = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].startswith(".") and parts[1].isdigit():
            sizes[parts[0]] = int(parts[1])
    return sizes


def lib_share(map_file: Path) -> dict[str, int]:
    """Bytes per output section taken from libiotcompress.a, from a GNU ld map."""
    text = map_file.read_text()
    start = text.find("Linker script and memory map")
    shares: dict[str, int] = {}
    output = None
    pending = False
    for line in text[start:].splitlines():
        m = re.match(r"^(\.[\w.]+)\s*(0x[0-9a-f]+)?", line)
        if m and not line.startswith(" "):
            output = m.group(1)
            continue
        # An input section: " .text.name 0xADDR 0xSIZE file", possibly with the name alone
        # on the line before.
        m = re.match(r"^ (\S+)?\s+0x[0-9a-f]+\s+0x([0-9a-f]+)\s+(\S+)$", line)
        if m and output:
            if LIB in m.group(3) and (m.group(1) or pending):
                shares[output] = shares.get(output, 0) + int(m.group(2), 16)
            pending = False
            continue
        pending = bool(re.match(r"^ \.\S+$", line))
    return shares


def run_probe(board: str, elf: Path) -> dict[str, int]:
    cmd = ["qemu-system-arm", "-M", board, "-nographic", "-monitor", "none", "-serial", "null",
           "-semihosting", "-icount", "shift=0", "-kernel", str(elf)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    line = next((ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("SIZE ")), None)
    if r.returncode != 0 or line is None:
        raise SystemExit(f"{elf}: probe failed (exit {r.returncode}):\n{r.stdout}{r.stderr}")
    return {k: int(v) for k, v in (w.split("=") for w in line.split()[1:])}


def measure(build: Path) -> list[dict]:
    rows = []
    for board, (triple, cpu) in BOARDS.items():
        base = None
        for variant in VARIANTS:
            elf = build / board / f"size-{variant}.elf"
            sections = elf_sections(elf)
            share = lib_share(Path(str(elf) + ".map"))
            probe = run_probe(board, elf)
            insns_per_tick = probe["spin_insns"] / probe["spin_ticks"]
            row = {
                "board": board, "triple": triple, "cpu": cpu, "variant": variant,
                "flash": sum(sections.get(s, 0) for s in FLASH_SECTIONS),
                "ram": sum(sections.get(s, 0) for s in RAM_SECTIONS),
                "lib_flash": sum(share.get(s, 0) for s in FLASH_SECTIONS),
                "lib_ram": sum(share.get(s, 0) for s in RAM_SECTIONS),
                "n": probe["n"], "nnz": probe["nnz"], "bytes": probe["bytes"], "status": probe["status"],
                "stack_compress": probe["stack_compress"], "stack_decode": probe["stack_decode"],
                "insns_per_tick": insns_per_tick,
                "ipe_compress": probe["ticks_compress"] * insns_per_tick / probe["n"],
                "ipe_decode": probe["ticks_decode"] * insns_per_tick / probe["n"],
            }
            if variant == "baseline":
                base = row
            row["delta_flash"] = row["flash"] - base["flash"]
            row["delta_ram"] = row["ram"] - base["ram"]
            rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    out = [
        "| target (board) | variant | library flash | image flash (Δ baseline) | library RAM | "
        "peak stack compress / decode | instructions / element compress / decode | n, nnz, bytes |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        if r["variant"] == "baseline":
            continue
        dec = r["variant"].endswith("decode")
        stack_dec = f"{r['stack_decode']}" if dec else "–"
        ipe_dec = f"{r['ipe_decode']:.0f}" if dec else "–"
        out.append(
            f"| {r['triple']} ({r['board']}) | {VARIANTS[r['variant']]} | {r['lib_flash']} B | "
            f"{r['flash']} B (+{r['delta_flash']}) | {r['lib_ram']} B | "
            f"{r['stack_compress']} / {stack_dec} B | {r['ipe_compress']:.0f} / {ipe_dec} | "
            f"{r['n']}, {r['nnz']}, {r['bytes']} |"
        )
    return "\n".join(out)


def symbols(build: Path, board: str, variant: str, count: int) -> str:
    elf = build / board / f"size-{variant}.elf"
    out = subprocess.run(["arm-none-eabi-nm", "--size-sort", "-S", "-C", "--reverse-sort", str(elf)],
                         capture_output=True, text=True, check=True).stdout
    lines = [ln for ln in out.splitlines() if ln.split()[2].lower() in ("t", "r", "w")][:count]
    return "\n".join(f"{int(ln.split()[1], 16):6d}  {ln.split(None, 3)[3]}" for ln in lines)


#: Where the flash goes, by symbol name (first match wins).
GROUPS = [
    ("CRC-32C lookup tables", r"crc::TABLES?$"),
    ("streaming encoder (iotcompress_core::stream)", r"iotcompress_core::stream::"),
    ("top-k and DGC sampling (chosen at run time, so always linked)",
     r"Compressor::top_k|select::(SamplePlan|kth_largest|k_for_density)|core::slice::sort|select::median|min_index|max_index"),
    ("adaptive threshold controller", r"ThresholdController|sqrt_f64"),
    ("soft-float (f64 everywhere, f32 without an FPU) and integer division (compiler-builtins)",
     r"compiler_builtins::(float|int)|^__aeabi_[dfilu]|^__(add|sub|mul|div|extend|trunc|fix|float)\w*$|^__udivmod|^fmaxf?$"),
    ("memcpy / memset", r"compiler_builtins::mem|^mem(set|cpy)$|__aeabi_mem"),
    ("C layer (iotcompress-ffi)", r"^iotcompress_(?!core)|^iotcompress::|^<iotcompress::"),
    ("compress pipeline: feedback, threshold, quantise, wire encode, f16/bf16",
     r"iotcompress_core::|^<core::iter|core::slice::|core::iter::"),
    ("firmware (startup, probe)", r"^main$|Reset_Handler|^fw_|^put|^vectors$|_Handler$"),
]


def breakdown(build: Path, board: str, variant: str) -> list[tuple[str, int]]:
    elf = build / board / f"size-{variant}.elf"
    out = subprocess.run(["arm-none-eabi-nm", "--size-sort", "-S", "-C", str(elf)],
                         capture_output=True, text=True, check=True).stdout
    totals = {name: 0 for name, _ in GROUPS}
    totals["other"] = 0
    for ln in out.splitlines():
        parts = ln.split(None, 3)
        if len(parts) < 4 or parts[2].lower() not in ("t", "r", "w"):
            continue
        size, name = int(parts[1], 16), parts[3]
        group = next((g for g, pat in GROUPS if re.search(pat, name)), "other")
        totals[group] += size
    return sorted(totals.items(), key=lambda kv: -kv[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("build", type=Path)
    ap.add_argument("--markdown", action="store_true", help="print the table for docs/mcu.md")
    ap.add_argument("--symbols", nargs=3, metavar=("BOARD", "VARIANT", "N"), help="largest symbols of one image")
    ap.add_argument("--breakdown", nargs=2, metavar=("BOARD", "VARIANT"), help="flash of one image by group")
    args = ap.parse_args()
    if args.breakdown:
        for group, size in breakdown(args.build, *args.breakdown):
            print(f"| {group} | {size} B |")
        return 0
    if args.symbols:
        board, variant, n = args.symbols
        print(symbols(args.build, board, variant, int(n)))
        return 0
    rows = measure(args.build)
    if args.markdown:
        print(markdown(rows))
        return 0
    fmt = "{:<22} {:<22} {:>9} {:>9} {:>10} {:>7} {:>12} {:>12} {:>10} {:>10}"
    print(fmt.format("target", "variant", "lib flash", "lib RAM", "img flash", "Δ flash", "stack comp.", "stack dec.",
                     "insn/el c", "insn/el d"))
    for r in rows:
        print(fmt.format(r["triple"], r["variant"], r["lib_flash"], r["lib_ram"], r["flash"], r["delta_flash"],
                         r["stack_compress"], r["stack_decode"], f"{r['ipe_compress']:.1f}", f"{r['ipe_decode']:.1f}"))
    failed = [r for r in rows if r["status"] != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
