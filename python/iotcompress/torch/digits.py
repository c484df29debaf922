"""Data-parallel training of a small CNN on scikit-learn's digits with ``world`` gloo worker
processes on localhost, three ways: dense allreduce, PyTorch's PowerSGD hook, and
iotcompress (DGC recipe). Used by ``iotcompress demo`` and by the accuracy test.

Example::

    from iotcompress.torch.digits import train
    result = train("iotcompress", world=4, epochs=30)
    print(result["accuracy"], result["bytes_per_step"])
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from .._progress import Progress

METHODS = ("dense", "powersgd", "iotcompress")

#: The DGC recipe used for "iotcompress": top-0.1 %, int8 values, momentum correction and
#: factor masking in the hook, DGC warm-up and local gradient clipping.
DGC_OPTIONS = dict(density=0.001, quant="int8", momentum=0.9, clip_norm=5.0)


#: ``accuracy`` is the mean test accuracy over this many final epochs.
LAST_EPOCHS = 5


def digits_cnn() -> nn.Module:
    """The model: two 3x3 convolutions and two linear layers (38,282 parameters)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def digits_data():
    """scikit-learn's digits (1,797 8x8 images), a fixed 80/20 train/test split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    split = int(0.8 * len(y))
    return (x[perm[:split]], y[perm[:split]]), (x[perm[split:]], y[perm[split:]])


def powersgd_bytes_per_step(model: nn.Module, rank: int = 1, min_compression_rate: float = 2.0) -> int:
    """Bytes one worker contributes per step under PyTorch's PowerSGD hook after its start
    iteration: P and Q factors (``(n + m)·rank`` floats) for each weight matrix worth
    compressing, the tensor itself for the rest (biases, small matrices), as the hook does."""
    total = 0
    for p in model.parameters():
        if p.dim() <= 1:
            total += 4 * p.numel()
            continue
        n, m = p.shape[0], p.numel() // p.shape[0]
        r = min(n, m, rank)
        if n * m < min_compression_rate * (n + m) * r:
            total += 4 * p.numel()
        else:
            total += 4 * (n + m) * r
    return total


def _worker(rank: int, world: int, init_file: str, out_dir: str, method: str, epochs: int, lr: float,
            batch: int, warmup_steps: int, progress: bool, delay: int = 0) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        (xtr, ytr), (xte, yte) = digits_data()
        model = digits_cnn()
        ddp = nn.parallel.DistributedDataParallel(model)
        numel = sum(p.numel() for p in model.parameters())
        state: Any = None
        momentum = 0.9
        if method == "powersgd":
            from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd

            state = powersgd.PowerSGDState(process_group=None, matrix_approximation_rank=1,
                                           start_powerSGD_iter=max(2, warmup_steps))
            ddp.register_comm_hook(state, powersgd.powerSGD_hook)
        elif method == "iotcompress":
            from iotcompress.torch import CompressionState, compression_hook

            state = CompressionState(**DGC_OPTIONS, warmup_steps=warmup_steps, delay=delay)
            ddp.register_comm_hook(state, compression_hook)
            momentum = 0.0  # DGC: momentum lives in the hook
        elif delay:
            raise ValueError("delay=... applies to method='iotcompress' only")
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
        opt = torch.optim.SGD(ddp.parameters(), lr=lr, momentum=momentum)
        shard = torch.arange(rank, len(ytr), world)
        sent: List[int] = []
        curve: List[float] = []  # test accuracy after each epoch
        bar = Progress(epochs, f"{method} epochs", enabled=progress and rank == 0, stream=sys.stdout)
        t0 = time.perf_counter()
        for epoch in range(epochs):
            perm = shard[torch.randperm(len(shard), generator=torch.Generator().manual_seed(epoch))]
            for i in range(0, len(perm) - batch + 1, batch):
                idx = perm[i : i + batch]
                opt.zero_grad()
                nn.functional.cross_entropy(ddp(xtr[idx]), ytr[idx]).backward()
                opt.step()
                if method == "iotcompress":
                    sent.append(state.stats["bytes_sent"])
                elif method == "powersgd":
                    sent.append(powersgd_bytes_per_step(model) if len(sent) >= max(2, warmup_steps) else 4 * numel)
                else:
                    sent.append(4 * numel)
            with torch.no_grad():
                curve.append((model(xte).argmax(1) == yte).float().mean().item())
            bar.update(epoch + 1, f"test accuracy {curve[-1]:.3f}")
        wall = time.perf_counter() - t0
        bar.close(f"test accuracy {curve[-1]:.3f}")
        after = sent[warmup_steps:] or sent
        # 360 test images: one image is 0.28 points, so one epoch's figure is noisy; the mean
        # over the last epochs is what a method reaches.
        last = curve[-LAST_EPOCHS:]
        result = {
            "method": method, "rank": rank, "accuracy": sum(last) / len(last), "final_accuracy": curve[-1],
            "curve": curve, "steps": len(sent), "numel": numel,
            "dense_bytes_per_step": 4 * numel, "bytes_per_step": sum(after) / len(after),
            "bytes_per_step_all": sum(sent) / len(sent), "wall_s": wall,
            "weights_checksum": float(sum(p.detach().double().sum() for p in model.parameters())),
        }
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        failing = sys.exc_info()[0] is not None
        dist.barrier()  # no rank tears down while another still uses the group
        dist.destroy_process_group()
        if not failing:
            # The result is written: leave without the interpreter's finalisation, where
            # torch's C++ threads (DDP, gloo) can abort at random ("terminate called without
            # an active exception").
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)


def train(method: str, world: int = 4, epochs: int = 60, lr: float = 0.05, batch: int = 32,
          warmup_steps: int = 40, progress: bool = False, tmp: Optional[str] = None, delay: int = 0) -> Dict[str, Any]:
    """Trains with ``world`` spawned gloo workers; ``delay`` is the hook's delayed averaging
    (``CompressionState(delay=...)``, method "iotcompress" only). Returns rank 0's result: ``accuracy`` (the
    mean test accuracy of the last ``LAST_EPOCHS`` epochs; ``final_accuracy`` and ``curve`` have
    the last and every epoch's), ``bytes_per_step`` (per worker, after warm-up), ``dense_bytes_per_step``, ``wall_s``,
    and ``ranks`` (every rank's result; their weights agree)."""
    with tempfile.TemporaryDirectory(dir=tmp) as d:
        init_file = os.path.join(d, "store")
        mp.spawn(_worker, args=(world, init_file, d, method, epochs, lr, batch, warmup_steps, progress, delay),
                 nprocs=world, join=True)
        ranks = []
        for r in range(world):
            with open(os.path.join(d, f"rank{r}.json")) as f:
                ranks.append(json.load(f))
    result = dict(ranks[0])
    result["ranks"] = ranks
    return result
