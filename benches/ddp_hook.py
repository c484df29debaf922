"""DDP communication-hook benchmark (not a test): time per training step of a ~25-million
parameter model, world size 2 (gloo on localhost), for plain allreduce, PyTorch's PowerSGD
hook, PyTorch's fp16_compress_hook and the iotcompress hook (top-0.1 % int8, DGC, dense f16).
Prints a markdown table.

    .venv/bin/python benches/ddp_hook.py [--steps 8] [--warmup 3] [--methods fp16,iotcompress-dense-f16]

Each method runs in its own pair of processes, one after the other, on the same machine:
compare the ratios, not the absolute times (the machine is shared and noisy).
"""

import argparse
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def model_25m() -> nn.Module:
    """Five 2236x2236 linear layers: 25.0 million parameters (ResNet-50 has 25.6 M)."""
    torch.manual_seed(0)
    layers = []
    for _ in range(5):
        layers += [nn.Linear(2236, 2236), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def worker(rank, world, store, out, method, steps, warmup):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model = model_25m()
        # One large bucket: PyTorch's PowerSGD hook issues collectives from future callbacks, and
        # with several buckets in flight gloo sees them in different orders on different ranks.
        ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=1024)
        if method == "powersgd":
            from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd

            state = powersgd.PowerSGDState(process_group=None, matrix_approximation_rank=4, start_powerSGD_iter=2)
            ddp.register_comm_hook(state, powersgd.powerSGD_hook)
        elif method == "fp16":
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
        elif method == "iotcompress-dense-f16":
            from iotcompress.torch import CompressionState, compression_hook

            ddp.register_comm_hook(CompressionState(quant="f16"), compression_hook)
        elif method.startswith("iotcompress"):
            from iotcompress.torch import CompressionState, compression_hook

            opts = dict(density=0.001, quant="int8")
            if method == "iotcompress+momentum":
                opts["momentum"] = 0.9
            ddp.register_comm_hook(CompressionState(**opts), compression_hook)
        opt = torch.optim.SGD(ddp.parameters(), lr=1e-3)
        x = torch.randn(32, 2236, generator=torch.Generator().manual_seed(rank))
        def step():
            opt.zero_grad()
            ddp(x).square().mean().backward()
            opt.step()

        for _ in range(warmup):
            step()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        elapsed = time.perf_counter() - t0
        # Backward alone (no communication) for reference.
        model.zero_grad()
        t0 = time.perf_counter()
        model(x).square().mean().backward()
        compute = time.perf_counter() - t0
        if rank == 0:
            with open(out, "w") as f:
                f.write(f"{elapsed / steps} {compute} {sum(p.numel() for p in model.parameters())}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--methods", default="allreduce,powersgd,iotcompress,iotcompress+momentum,fp16,iotcompress-dense-f16",
                   help="comma-separated; the ratios are to the first")
    a = p.parse_args()
    methods = a.methods.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for m in methods:
            store, out = os.path.join(d, f"store-{m}"), os.path.join(d, f"out-{m}")
            mp.spawn(worker, args=(2, store, out, m, a.steps, a.warmup), nprocs=2, join=True)
            with open(out) as f:
                step, compute, numel = (float(x) for x in f.read().split())
            rows.append((m, step, compute, int(numel)))
            print(f"{m}: {step * 1e3:.0f} ms/step", flush=True)
    labels = {
        "allreduce": "allreduce (no hook)",
        "powersgd": "PowerSGD hook, rank 4",
        "iotcompress": "iotcompress top-0.1 % int8",
        "iotcompress+momentum": "iotcompress DGC (momentum 0.9)",
        "fp16": "PyTorch fp16_compress_hook",
        "iotcompress-dense-f16": "iotcompress dense f16 (allreduce)",
    }
    base = rows[0][1]
    print(f"\n### DDP step time, {rows[0][3]:,} parameters, world size 2, gloo on localhost, batch 32\n")
    print(f"| method | ms/step | x {labels[rows[0][0]]} | forward+backward alone (ms) |")
    print("|---|---|---|---|")
    for m, step, compute, _ in rows:
        print(f"| {labels[m]} | {step * 1e3:.0f} | {step / base:.2f} | {compute * 1e3:.0f} |")


if __name__ == "__main__":
    main()
