#!/usr/bin/env python3
"""Test inputs of the firmware, as a C header.

The cases are those of ``tests/vectors/cases.json`` (the golden vectors, whose ``.bin``
messages the host library produces byte for byte) that fit the board's RAM, plus a few
synthetic ones with larger tensors (their expected messages come from the host library in
``tests/test_mcu.py``, which imports :func:`board_cases` from this file).

Usage: ``gen_vectors.py BOARD OUT.h``. Standard library only.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VECTORS = ROOT / "tests" / "vectors"

#: Largest tensor of a golden case per board, and synthetic cases on top.
#: microbit has 16 KiB of RAM: residual + velocity + scratch + message + libc must fit.
BOARDS = {
    "microbit": {"max_numel": 512},
    "mps2-an385": {"max_numel": 1 << 20},
    "mps2-an386": {"max_numel": 1 << 20},
}

#: Synthetic cases: (name, numel, options, steps, seed of the inputs). The options use the
#: Python API's vocabulary, like cases.json.
SYNTHETIC = {
    "microbit": [
        ("syn_threshold_int8_512", 512, {"threshold": 0.05, "quant": "int8"}, 3, 1),
        ("syn_topk_sign_momentum_384", 384, {"density": 0.05, "exact": True, "quant": "sign", "momentum": 0.9}, 3, 2),
        ("syn_adaptive_bytes_int4_512", 512, {"target_bytes": 120, "quant": "int4"}, 3, 3),
    ],
    "mps2-an385": [
        ("syn_threshold_int8_4096", 4096, {"threshold": 0.02, "quant": "int8"}, 4, 4),
        # Large enough for DGC's sampled top-k (the golden cases all take the exact path).
        ("syn_sampled_sign_32768", 32768, {"density": 0.01, "quant": "sign", "momentum": 0.9, "nesterov": True, "seed": 5}, 3, 5),
        ("syn_adaptive_bytes_qsgd_4096", 4096, {"target_bytes": 400, "quant": "qsgd:15", "seed": 9}, 4, 6),
    ],
}
SYNTHETIC["mps2-an386"] = SYNTHETIC["mps2-an385"]

QUANT_BITS = {"f32": 32, "f16": 16, "bf16": 16, "int8": 8, "int4": 4, "sign": 1, "ternary": 2, "qsgd": 9}


def synthetic_grad(numel: int, seed: int, step: int) -> list[int]:
    """float32 bit patterns from a 32-bit LCG: values in [-1, 1) with a heavy tail, so that
    thresholds select a varying few."""
    x = (seed * 7919 + step * 104729 + 1) & 0xFFFFFFFF
    out = []
    for _ in range(numel):
        x = (x * 1664525 + 1013904223) & 0xFFFFFFFF
        u = (x >> 8) / float(1 << 24)  # [0, 1)
        v = (2.0 * u - 1.0) ** 3  # heavier mass near zero
        out.append(struct.unpack("<I", struct.pack("<f", v))[0])
    return out


def board_cases(board: str) -> list[dict]:
    """The cases a board runs: dicts with name, numel, options, steps (each with ``grad``,
    float32 bit patterns, and ``message``, the golden bytes or None)."""
    manifest = json.loads((VECTORS / "cases.json").read_text())
    cases = []
    for c in manifest["cases"]:
        if c["numel"] > BOARDS[board]["max_numel"]:
            continue
        steps = [
            {"grad": [int(h, 16) for h in s["grad"]], "message": (VECTORS / s["message"]).read_bytes()}
            for s in c["steps"]
        ]
        cases.append({"name": c["name"], "numel": c["numel"], "options": c["options"], "steps": steps})
    for name, numel, options, nsteps, seed in SYNTHETIC[board]:
        steps = [{"grad": synthetic_grad(numel, seed, s), "message": None} for s in range(nsteps)]
        cases.append({"name": name, "numel": numel, "options": options, "steps": steps})
    return cases


def c_float(bits: int) -> str:
    """An exact C literal of a float32 bit pattern (hexadecimal float)."""
    (v,) = struct.unpack("<f", struct.pack("<I", bits))
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError("gradients are finite")
    return f"{v.hex()}f" if v != 0 or not (bits >> 31) else "-0.0f"


def c_config(o: dict) -> str:
    """A designated initializer of IotcompressConfig (fields left out are 0, the defaults)."""
    f = []
    if "threshold" in o:
        f.append(".selection = IOTCOMPRESS_SELECT_THRESHOLD")
        f.append(f".threshold = {c_float(struct.unpack('<I', struct.pack('<f', o['threshold']))[0])}")
    elif "target_bytes" in o:
        f.append(".selection = IOTCOMPRESS_SELECT_ADAPTIVE_BYTES")
        f.append(f".target_bytes = {int(o['target_bytes'])}u")
    elif "density" in o:
        kind = "ADAPTIVE_DENSITY" if o.get("adaptive") else "TOPK"
        f.append(f".selection = IOTCOMPRESS_SELECT_{kind}")
        f.append(f".density = {float(o['density']).hex()}")
        if o.get("exact"):
            f.append(".exact = 1u")
    q = o.get("quant", "f32")
    if q.startswith("qsgd"):
        levels = int(q.split(":")[1]) if ":" in q else 15
        f.append(".quant = IOTCOMPRESS_QUANT_QSGD")
        f.append(f".qsgd_levels = {levels}u")
    else:
        f.append(f".quant = IOTCOMPRESS_QUANT_{q.upper()}")
    if o.get("momentum"):
        kind = "NESTEROV" if o.get("nesterov") else "VANILLA"
        f.append(f".momentum_kind = IOTCOMPRESS_MOMENTUM_{kind}")
        f.append(f".momentum = {c_float(struct.unpack('<I', struct.pack('<f', o['momentum']))[0])}")
    if o.get("seed"):
        f.append(f".seed = {int(o['seed'])}u")
    return "{ " + ", ".join(f) + " }"


def bound(numel: int, quant: str) -> int:
    bits = QUANT_BITS[quant.split(":")[0]]
    return 24 + (numel + 7) // 8 + (numel * bits + 7) // 8 + 4


def render(board: str) -> str:
    cases = board_cases(board)
    out = [
        f"/* Generated by firmware/gen_vectors.py for {board}: do not edit. */",
        "#ifndef FW_VECTORS_H",
        "#define FW_VECTORS_H",
        "#include <stdint.h>",
        '#include "iotcompress.h"',
        "",
        "struct fw_step { const float *grad; const uint8_t *msg; uint32_t msg_len; };",
        "struct fw_case { const char *name; uint32_t numel; IotcompressConfig config;",
        "                 uint32_t n_steps; const struct fw_step *steps; };",
        "",
    ]
    max_numel = max(c["numel"] for c in cases)
    max_msg = max(bound(c["numel"], c["options"].get("quant", "f32")) for c in cases)
    any_momentum = any(c["options"].get("momentum") for c in cases)
    for ci, c in enumerate(cases):
        for si, s in enumerate(c["steps"]):
            vals = ", ".join(c_float(b) for b in s["grad"])
            out.append(f"static const float fw_grad_{ci}_{si}[{c['numel']}] = {{ {vals} }};")
            if s["message"] is not None:
                data = ", ".join(f"0x{b:02x}" for b in s["message"])
                out.append(f"static const uint8_t fw_msg_{ci}_{si}[{len(s['message'])}] = {{ {data} }};")
        steps = []
        for si, s in enumerate(c["steps"]):
            if s["message"] is None:
                steps.append(f"{{ fw_grad_{ci}_{si}, 0, 0 }}")
            else:
                steps.append(f"{{ fw_grad_{ci}_{si}, fw_msg_{ci}_{si}, {len(s['message'])}u }}")
        out.append(f"static const struct fw_step fw_steps_{ci}[] = {{ {', '.join(steps)} }};")
        out.append("")
    out.append("static const struct fw_case fw_cases[] = {")
    for ci, c in enumerate(cases):
        out.append(
            f'    {{ "{c["name"]}", {c["numel"]}u, {c_config(c["options"])}, {len(c["steps"])}u, fw_steps_{ci} }},'
        )
    out.append("};")
    out.append(f"#define FW_N_CASES {len(cases)}u")
    out.append(f"#define FW_MAX_NUMEL {max_numel}u")
    out.append(f"#define FW_MAX_VELOCITY {max_numel if any_momentum else 1}u")
    out.append(f"#define FW_MSG_CAP {max_msg}u")
    out.append("#endif")
    return "\n".join(out) + "\n"


def main() -> int:
    if len(sys.argv) != 3 or sys.argv[1] not in BOARDS:
        print(f"usage: {sys.argv[0]} {{{','.join(BOARDS)}}} OUT.h", file=sys.stderr)
        return 2
    text = render(sys.argv[1])
    out = Path(sys.argv[2])
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists() or out.read_text() != text:
        out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
