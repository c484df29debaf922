"""The ``iotcompress`` command: ``demo``, ``simulate`` and ``inspect``.

Example::

    $ iotcompress --version
    $ iotcompress demo
    $ iotcompress simulate --devices 64 --fleet mixed
    $ iotcompress inspect message.bin
"""

from __future__ import annotations

import argparse
import json
import os
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


def simulate_cmd(args: argparse.Namespace) -> int:
    try:
        import torch  # noqa: F401
        import matplotlib  # noqa: F401
    except ImportError:
        print("simulate needs torch, scikit-learn and matplotlib: pip install 'iotcompress[simulate]'",
              file=sys.stderr)
        return 2
    from iotcompress.simulate import make_fleet
    from iotcompress.simulate.report import fmt_time, headline, write_report
    from iotcompress.simulate.run import simulate

    try:
        fleet = make_fleet(args.fleet, devices=args.devices, seed=args.seed)
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        print(f"iotcompress simulate: {len(fleet)} devices ({fleet.source}), {args.rounds} rounds, "
              f"methods {', '.join(methods)}", file=sys.stderr)
        result = simulate(
            fleet, methods=methods, rounds=args.rounds, target_accuracy=args.target_accuracy, batch=args.batch,
            lr=args.lr, delay=args.delay, participation=args.participation, budget_ms=args.budget_ms,
            rank=args.rank, quant=args.quant, seed=args.seed, compute_ms=args.compute_ms,
            progress=not args.quiet, threads=args.threads, local_steps=args.local_steps, alpha=args.alpha,
            density=args.density, down_density=args.down_density,
        )
    except ValueError as e:
        print(f"iotcompress simulate: {e}", file=sys.stderr)
        return 2
    command = "iotcompress " + " ".join(sys.argv[1:] if args.argv is None else args.argv)
    paths = write_report(result, args.out, command=command.strip())
    target = result["config"]["target_accuracy"]
    print(f"\n{'method':<40}{'time to ' + format(target, '.0%'):>16}{'bytes/device/round':>20}{'final acc':>11}")
    for r in result["methods"].values():
        print(f"{r['label']:<40}{fmt_time(r['time_to_target_s']):>16}{r['bytes_per_device_round']:>20,.0f}"
              f"{r['final_accuracy']:>11.3f}")
    for line in headline(result):
        print("\n" + line)
    print(f"\nreport: {paths['md']} (and {os.path.basename(paths['json'])}, "
          f"{', '.join(os.path.basename(paths[k]) for k in ('accuracy_vs_time', 'scalability'))}); "
          f"{result['wall_s']:.0f} s")
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
    parser.add_argument("--version", action="version",
                        version=f"iotcompress {ic.__version__} (wire format v{ic.WIRE_VERSION}, SIMD {ic.simd_level()})")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="compress a real gradient, then train with 4 workers three ways")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--quick", action="store_true", help="only the one-gradient table")
    p.set_defaults(func=demo)
    p = sub.add_parser(
        "simulate",
        help="train on a simulated fleet of devices with dense, low rank and iotcompress; report and plots",
        description="A fleet of simulated devices (own compute speeds and links) trains the digits CNN in one "
                    "process with the real compressor, on a simulated clock (compute + T_c = latency + "
                    "bytes/bandwidth per device). Writes OUT/report.md, report.json and PNG plots. "
                    "See docs/global-training.md.",
    )
    p.add_argument("--devices", type=int, default=None,
                   help="number of devices (default 64; a fleet file's own count; repeated to N if given)")
    p.add_argument("--fleet", default="mixed",
                   help="mixed | uniform-PRESET (datacenter, home-wifi, lte, lora, intercontinental) | FILE.csv | "
                        "FILE.toml (default mixed)")
    p.add_argument("--rounds", type=int, default=200, help="rounds (steps) per method (default 200)")
    p.add_argument("--target-accuracy", type=float, default=0.95, help="test accuracy to time (default 0.95)")
    p.add_argument("--delay", type=int, default=4, help="D of delayed averaging (default 4)")
    p.add_argument("--participation", type=float, default=1.0,
                   help="fraction of devices sampled to upload each round (default 1.0)")
    p.add_argument("--budget-ms", type=float, default=None,
                   help="time budget of one exchange per device, shared by upload and download "
                        "(default: twice each device's latency)")
    p.add_argument("--methods", default="dense,lowrank,iotcompress,iotcompress-delayed",
                   help="comma-separated subset of dense, lowrank, iotcompress, iotcompress-delayed, fedavg, "
                        "fedavg-iotcompress")
    p.add_argument("--batch", type=int, default=8, help="images per device per step (default 8)")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default 0.05, momentum 0.9)")
    p.add_argument("--rank", type=int, default=2, help="rank of the low-rank method (default 2)")
    p.add_argument("--quant", default="int8", help="iotcompress value quantiser (default int8)")
    p.add_argument("--compute-ms", type=float, default=None,
                   help="compute time of a speed-1.0 device per step (default: measured)")
    p.add_argument("--local-steps", type=int, default=1,
                   help="local SGD steps per round of the FedAvg methods (default 1)")
    p.add_argument("--alpha", type=float, default=None,
                   help="non-IID shards: Dirichlet(alpha) class proportions per device (default: IID)")
    p.add_argument("--density", type=float, default=0.01, help="fedavg-iotcompress uplink density (default 0.01)")
    p.add_argument("--down-density", type=float, default=0.05,
                   help="fedavg-iotcompress downlink density (default 0.05)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: best on a busy machine)")
    p.add_argument("--out", default="simulation", help="output directory (default simulation/)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=simulate_cmd)
    p = sub.add_parser("inspect", help="print the header of message files")
    p.add_argument("files", nargs="+")
    p.set_defaults(func=inspect_cmd)
    args = parser.parse_args(argv)
    args.argv = None if argv is None else list(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
