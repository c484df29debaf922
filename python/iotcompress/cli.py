"""The ``iotcompress`` command: ``demo`` and ``inspect``.

Example::

    $ iotcompress demo
    $ iotcompress inspect message.bin
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import List, Optional, Sequence

import numpy as np

import iotcompress as ic


def _flat_grad(model) -> np.ndarray:
    import torch

    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy().copy()


def demo(args: argparse.Namespace) -> int:
    try:
        import torch
        from torch import nn
    except ImportError:
        print("the demo needs torch and scikit-learn: pip install 'iotcompress[torch]'", file=sys.stderr)
        return 2

    print("iotcompress demo: a real gradient of a CNN on scikit-learn's digits, compressed\n")
    from iotcompress.torch.digits import digits_cnn, digits_data

    (xtr, ytr), _ = digits_data()
    model = digits_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for i in range(0, 640, 32):  # a few steps so the gradient is a mid-training one
        opt.zero_grad()
        nn.functional.cross_entropy(model(xtr[i : i + 32]), ytr[i : i + 32]).backward()
        opt.step()
    opt.zero_grad()
    nn.functional.cross_entropy(model(xtr[640:672]), ytr[640:672]).backward()
    g = _flat_grad(model)
    n = g.size
    dense = 4 * n
    configs: List[tuple] = [
        ("dense f32", {}),
        ("dense f16", {"quant": "f16"}),
        ("dense int8", {"quant": "int8"}),
        ("dense qsgd (s=15)", {"quant": "qsgd"}),
        ("dense ternary", {"quant": "ternary"}),
        ("threshold Wt=1e-3, int8", {"threshold": 1e-3, "quant": "int8"}),
        ("top-1% int8 (sampled)", {"density": 0.01, "quant": "int8"}),
        ("top-1% sign", {"density": 0.01, "quant": "sign"}),
        ("top-0.1% int8 (exact)", {"density": 0.001, "quant": "int8", "exact": True}),
    ]
    print(f"one gradient: {n:,} float32 = {dense:,} bytes dense\n")
    print(f"{'compressor':<26}{'bytes':>9}{'ratio':>9}{'sent':>8}{'index':>8}{'rel. error':>12}{'after 20 steps':>16}{'time':>9}")
    for name, opts in configs:
        c = ic.Compressor(n, **opts)
        t0 = time.perf_counter()
        msg = c.compress(g)
        dt = time.perf_counter() - t0
        info = ic.inspect(msg)
        err = float(np.linalg.norm(ic.decode(msg) - g) / np.linalg.norm(g))
        # Error feedback: what was not sent is delayed, not lost. Feed the same gradient 19
        # more times; the running sum of the decoded messages approaches the sum of inputs.
        total = ic.decode(msg)
        for _ in range(19):
            ic.decode_add(c.compress(g), total)
        err20 = float(np.linalg.norm(total - 20 * g) / np.linalg.norm(20 * g))
        print(
            f"{name:<26}{len(msg):>9,}{dense / len(msg):>8.1f}x{info['nnz'] / n:>8.2%}{info['index']:>8}"
            f"{err:>12.4f}{err20:>16.4f}{dt * 1e3:>7.2f}ms"
        )
    print("\n(rel. error: ||decoded - g|| / ||g|| for one message; after 20 steps: the same for the")
    print(" sum of 20 messages of the same gradient, which error feedback drives towards zero)\n")

    if args.quick:
        return 0
    from iotcompress.torch.digits import DGC_OPTIONS, train

    print(f"data-parallel training: {args.workers} gloo workers on localhost, the CNN on digits, "
          f"{args.epochs} epochs, batch 32 per worker")
    runs = [
        ("dense allreduce", "dense"),
        ("PowerSGD hook (rank 1)", "powersgd"),
        (f"iotcompress DGC {DGC_OPTIONS['density']:.1%} {DGC_OPTIONS['quant']}", "iotcompress"),
    ]
    results = []
    for label, method in runs:
        results.append((label, train(method, world=args.workers, epochs=args.epochs, progress=True)))
    print(f"\n{'method':<28}{'test acc':>9}{'bytes/step/worker':>19}{'ratio':>9}{'wall':>8}")
    for label, r in results:
        print(f"{label:<28}{r['accuracy']:>9.3f}{r['bytes_per_step']:>19,.0f}"
              f"{r['dense_bytes_per_step'] / r['bytes_per_step']:>8.1f}x{r['wall_s']:>7.1f}s")
    print("\n(test acc: mean over the last 5 epochs; bytes per step: what one worker sends, after the")
    print(" warm-up of PowerSGD and DGC; wall: the training loop on rank 0; DGC keeps momentum and")
    print(" error feedback in the hook, SGD without momentum)")
    return 0


def inspect_cmd(args: argparse.Namespace) -> int:
    for path in args.files:
        with open(path, "rb") as f:
            msg = f.read()
        try:
            info = ic.inspect(msg)
        except ic.DecodeError as e:
            print(f"{path}: invalid: {e}")
            return 1
        print(f"{path}: {json.dumps(info)}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="iotcompress", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="compress a real gradient, then train with 4 workers three ways")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--quick", action="store_true", help="only the one-gradient table")
    p.set_defaults(func=demo)
    p = sub.add_parser("inspect", help="print the header of message files")
    p.add_argument("files", nargs="+")
    p.set_defaults(func=inspect_cmd)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
