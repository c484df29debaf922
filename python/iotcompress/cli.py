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


def _digits_cnn():
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def _digits():
    import torch
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(data.target, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    split = int(0.8 * len(y))
    return (x[perm[:split]], y[perm[:split]]), (x[perm[split:]], y[perm[split:]])


def _flat_grad(model) -> np.ndarray:
    import torch

    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy().copy()


def _apply_flat(model, flat: np.ndarray) -> None:
    import torch

    offset = 0
    for p in model.parameters():
        n = p.numel()
        p.grad.copy_(torch.from_numpy(flat[offset : offset + n]).view_as(p))
        offset += n


def _train(options: Optional[dict], epochs: int, lr: float, momentum: float, progress: str) -> tuple:
    """Trains the digits CNN; with ``options`` every gradient goes through an iotcompress
    round trip (compress -> bytes -> decode) as it would between two machines."""
    import torch
    from torch import nn

    (xtr, ytr), (xte, yte) = _digits()
    model = _digits_cnn()
    numel = sum(p.numel() for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    comp = ic.Compressor(numel, **options) if options is not None else None
    sent, steps = 0, 0
    batch = 32
    for epoch in range(epochs):
        perm = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(epoch))
        for i in range(0, len(ytr), batch):
            idx = perm[i : i + batch]
            opt.zero_grad()
            nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            if comp is None:
                sent += 4 * numel
            else:
                msg = comp.compress(_flat_grad(model))
                sent += len(msg)
                _apply_flat(model, ic.decode(msg, numel))
            opt.step()
            steps += 1
        with torch.no_grad():
            acc = (model(xte).argmax(1) == yte).float().mean().item()
        print(f"\r  {progress}: epoch {epoch + 1}/{epochs}, test accuracy {acc:.3f}", end="", flush=True)
    print()
    return acc, sent / steps, numel


def demo(args: argparse.Namespace) -> int:
    try:
        import torch
        from torch import nn
    except ImportError:
        print("the demo needs torch and scikit-learn: pip install 'iotcompress[torch]'", file=sys.stderr)
        return 2

    print("iotcompress demo: a real gradient of a CNN on scikit-learn's digits, compressed\n")
    (xtr, ytr), _ = _digits()
    model = _digits_cnn()
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
    print("training the CNN three ways, every gradient through a compress/decode round trip:")
    rows = [
        ("dense (plain SGD, momentum 0.9)", None, 0.9),
        ("DGC top-1% int8, momentum in compressor", {"density": 0.01, "quant": "int8", "momentum": 0.9}, 0.0),
        ("DGC top-0.1% int8, momentum in compressor", {"density": 0.001, "quant": "int8", "momentum": 0.9}, 0.0),
    ]
    results = []
    for name, opts, mom in rows:
        t0 = time.perf_counter()
        acc, per_step, numel = _train(opts, args.epochs, 0.05, mom, name)
        results.append((name, acc, per_step, time.perf_counter() - t0, numel))
    print(f"\n{'run':<44}{'test acc':>9}{'bytes/step':>12}{'ratio':>9}{'wall':>8}")
    for name, acc, per_step, wall, numel in results:
        print(f"{name:<44}{acc:>9.3f}{per_step:>12,.0f}{4 * numel / per_step:>8.1f}x{wall:>7.1f}s")
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
    p = sub.add_parser("demo", help="compress a real model's gradient and train with compression")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="only the one-gradient table")
    p.set_defaults(func=demo)
    p = sub.add_parser("inspect", help="print the header of message files")
    p.add_argument("files", nargs="+")
    p.set_defaults(func=inspect_cmd)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
