"""Foundation measurements (not a test): message size against the entropy bound, and
compress time against the memory floor. Prints markdown tables.

    .venv/bin/python benches/foundation.py [--numel 25557032] [--repeat 5]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

import iotcompress as ic


def log2_binomial(n: int, k: int) -> float:
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


def sizes(n: int) -> None:
    print(f"\n### Message size against the entropy bound (n = {n:,}, int8 values, uniformly random positions)\n")
    print("| density | k | message bytes | index bits/entry | log2 C(n,k)/k | index overhead | header+CRC bytes | total vs (entropy + 8 bits/entry) |")
    print("|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for density in (0.01, 0.001):
        g = rng.standard_normal(n).astype(np.float32)
        c = ic.Compressor(n, density=density, exact=True, quant="int8")
        msg = c.compress(g)
        info = ic.inspect(msg)
        k = info["nnz"]
        bound = log2_binomial(n, k)
        index_bits = 8 * info["index_bytes"] + 8  # the Rice parameter byte counts as index
        total_bound = (bound + 8 * k) / 8
        print(
            f"| {density:.1%} | {k:,} | {len(msg):,} | {index_bits / k:.3f} | {bound / k:.3f} | "
            f"{index_bits / bound - 1:+.2%} | {info['header_bytes'] - 1 + 4} | {len(msg) / total_bound - 1:+.2%} |"
        )


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def speed(n: int, repeat: int) -> None:
    rng = np.random.default_rng(1)
    g = (rng.standard_normal(n) * 1e-3).astype(np.float32)
    r = np.zeros(n, np.float32)
    floor = best_of(lambda: np.add(r, g, out=r), repeat)
    print(f"\n### Compress time, n = {n:,} float32 (ResNet-50's size), one thread, best of {repeat}\n")
    print(f"memory floor `numpy.add(r, g, out=r)`: {floor * 1e3:.1f} ms\n")
    print("| mode | ms | x floor | message bytes |")
    print("|---|---|---|---|")
    modes = [
        ("top-0.1% sampled (DGC), int8", dict(density=0.001, quant="int8")),
        ("top-0.1% sampled (DGC), int8, momentum 0.9", dict(density=0.001, quant="int8", momentum=0.9)),
        ("top-0.1% sampled (DGC), f32", dict(density=0.001)),
        ("threshold (≈0.1 %), int8", dict(threshold=3.3e-3, quant="int8")),
        ("top-0.1% exact, int8", dict(density=0.001, exact=True, quant="int8")),
        ("dense, f16", dict(quant="f16")),
    ]
    zeros = np.zeros(n, np.float32)
    for name, opts in modes:
        # Each timed call is one step of a fresh compressor whose state pages were touched by
        # a zero-gradient step, so every mode sees the same v = g.
        def one_step():
            c = ic.Compressor(n, **opts)
            c.compress(zeros)
            t0 = time.perf_counter()
            out["m"] = c.compress(g)
            return time.perf_counter() - t0

        out = {}
        t = min(one_step() for _ in range(repeat))
        print(f"| {name} | {t * 1e3:.1f} | {t / floor:.2f} | {len(out['m']):,} |")
    msg = out["m"]
    acc = np.zeros(n, np.float32)
    t = best_of(lambda: ic.decode_add(msg, acc), repeat)
    print(f"\ndecode_add of the dense f16 message: {t * 1e3:.1f} ms ({t / floor:.2f} x floor)")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--numel", type=int, default=25_557_032)
    p.add_argument("--repeat", type=int, default=5)
    a = p.parse_args()
    sizes(1_000_000)
    speed(a.numel, a.repeat)


if __name__ == "__main__":
    main()
