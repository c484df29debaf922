"""The training loop of the fleet simulator: every device's gradient of a real model on its
share of a real dataset (batched over devices with ``torch.func.vmap``), a method moving them,
and the clock advanced by the model in :mod:`iotcompress.simulate.clock`."""

from __future__ import annotations

import platform
import statistics
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import iotcompress as ic

from . import clock
from .._progress import Progress
from .fleet import Fleet, budgets
from .methods import METHODS, Method, Setup, make_method


def _data():
    from iotcompress.torch.digits import digits_data

    return digits_data()


def _model() -> nn.Module:
    from iotcompress.torch.digits import digits_cnn

    return digits_cnn()


def calibrate_compute_ms(batch: int, repeats: int = 30) -> float:
    """The median wall time (ms) of one forward/backward of the digits CNN on ``batch`` images,
    on one thread of this machine: the compute time of a device of speed 1.0."""
    (xtr, ytr), _ = _data()
    model = _model()
    x, y = xtr[:batch], ytr[:batch]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = []
        for k in range(repeats + 5):
            t0 = time.perf_counter()
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            if k >= 5:
                times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return 1e3 * statistics.median(times)


def scale_sizes(n: int) -> List[int]:
    sizes, k = [], 1
    while k < n:
        sizes.append(k)
        k *= 2
    return sizes + [n]


def scalability(compute_ms: np.ndarray, latency_ms: np.ndarray, bandwidth_mbps: np.ndarray,
                up: Sequence[np.ndarray], down: Sequence[np.ndarray], delay: int, sizes: Sequence[int]) -> List[Dict[str, float]]:
    """Speedup ``X`` on ``Y`` devices (the first ``Y`` of the fleet, all participating, each
    exchange carrying each device's mean measured bytes): ``X = Y * mean(c) / S(Y)``, the
    throughput of ``Y`` devices over that of one average device training alone (no
    communication)."""
    out = []
    for y in sizes:
        ex = [(u[:y], d[:y]) for u, d in zip(up, down)]
        s = clock.round_time_ms(compute_ms[:y], latency_ms[:y], bandwidth_mbps[:y], ex, delay=delay)
        out.append({"devices": int(y), "step_ms": s, "speedup": float(y * np.mean(compute_ms[:y]) / s)})
    return out


def simulate(
    fleet: Fleet,
    methods: Sequence[str] = METHODS,
    rounds: int = 200,
    target_accuracy: float = 0.95,
    batch: int = 8,
    lr: float = 0.05,
    momentum: float = 0.9,
    delay: int = 4,
    participation: float = 1.0,
    budget_ms: Optional[float] = None,
    rank: int = 2,
    quant: str = "int8",
    seed: int = 0,
    compute_ms: Optional[float] = None,
    progress: bool = True,
    threads: Optional[int] = 1,
    local_steps: int = 1,
    alpha: Optional[float] = None,
    density: float = 0.01,
    down_density: float = 0.05,
) -> Dict[str, Any]:
    """Trains the digits CNN on ``fleet`` with each method; returns the results (what
    ``report.json`` holds). ``compute_ms``: a speed-1.0 device's time for one forward/backward
    of ``batch`` images (default: measured here). See docs/global-training.md.

    ``local_steps``: SGD steps each device takes per round in the FedAvg methods (``fedavg``,
    ``fedavg-iotcompress``; the others take one). ``alpha``: non-IID shards, each class split
    over the devices in ``Dirichlet(alpha)`` proportions (default: an even round-robin deal).
    ``density``/``down_density``: ``fedavg-iotcompress``'s uplink and downlink densities.

    Example::

        from iotcompress.simulate import make_fleet, simulate
        result = simulate(make_fleet("mixed", devices=16), rounds=100)
        print(result["methods"]["iotcompress"]["time_to_target_s"])
    """
    if not 0.0 < participation <= 1.0:
        raise ValueError(f"participation must be in (0, 1], got {participation}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if not 0.0 < target_accuracy <= 1.0:
        raise ValueError(f"target accuracy must be in (0, 1], got {target_accuracy}")
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    if batch < 1 or rank < 1 or not lr > 0:
        raise ValueError(f"batch and rank must be >= 1 and lr > 0, got batch={batch}, rank={rank}, lr={lr}")
    ic.Compressor(1, quant=quant)  # a bad quantiser fails here, before any training
    if "iotcompress-delayed" in methods and delay < 1:
        raise ValueError("iotcompress-delayed needs --delay >= 1")
    if isinstance(local_steps, bool) or not isinstance(local_steps, int) or local_steps < 1:
        raise ValueError(f"local_steps must be an int >= 1, got {local_steps!r}")
    if alpha is not None and not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if threads is not None:
        torch.set_num_threads(threads)
    t_start = time.perf_counter()
    N = len(fleet)
    if compute_ms is None:
        compute_ms = calibrate_compute_ms(batch)
    c = compute_ms / fleet.compute_speed
    lat, bw = fleet.latency_ms, fleet.bandwidth_mbps
    budget = budgets(fleet, budget_ms)

    (xtr, ytr), (xte, yte) = _data()
    model = _model()
    names = [(k, tuple(v.shape)) for k, v in model.named_parameters()]
    w0 = torch.cat([v.detach().reshape(-1) for v in model.parameters()])
    numel = int(w0.numel())
    setup = Setup(numel=numel, devices=N, shapes=names, lr=lr, momentum=momentum, rank=rank, quant=quant,
                  delay=delay, up_bytes=budget["up"], down_bytes=budget["down"], seed=seed, density=density,
                  down_density=down_density, budget_bound=budget_ms is not None)

    # Data: a seeded permutation of the training set dealt out round-robin (or non-IID
    # Dirichlet shards); each device draws its batch from its own shard, with replacement
    # (shards are small when N is large).
    if alpha is not None:
        from iotcompress.fedavg import dirichlet_partition

        shards = [torch.from_numpy(p) for p in dirichlet_partition(ytr.numpy(), N, alpha, seed=seed, min_size=1)]
    else:
        perm = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(seed))
        shards = [perm[i::N] if i < len(perm) else perm[i % len(perm):i % len(perm) + 1] for i in range(N)]
    lengths = torch.tensor([len(s) for s in shards])
    padded = torch.zeros(N, int(lengths.max()), dtype=torch.long)
    for i, s in enumerate(shards):
        padded[i, : len(s)] = s

    def loss(p, x, y):
        return nn.functional.cross_entropy(functional_call(model, p, (x,)), y)

    def unflat(w: torch.Tensor, batched: bool) -> Dict[str, torch.Tensor]:
        lead = (w.shape[0],) if batched else ()
        return {name: w[..., a:b].view(*lead, *shape) for name, a, b, shape in setup.slices}

    grad_shared = vmap(grad(loss), in_dims=(None, 0, 0))
    grad_each = vmap(grad(loss), in_dims=(0, 0, 0))

    def accuracy(w: torch.Tensor) -> float:
        with torch.no_grad():
            return float((functional_call(model, unflat(w, False), (xte,)).argmax(1) == yte).float().mean())

    results: Dict[str, Any] = {}
    for key in methods:
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        rng = np.random.default_rng(seed)
        method: Method = make_method(key, setup, w0, weights=lengths.numpy().astype(np.float64))
        d = method.delay
        E = local_steps if method.local_training else 1
        c_round = c * E  # a round's compute: E local steps
        bar = Progress(rounds, method.label, enabled=progress)
        curve: List[Dict[str, float]] = [{"round": 0, "time_s": 0.0, "accuracy": accuracy(w0)}]
        sim_ms = 0.0
        up_sum = [np.zeros(N) for _ in range(method.exchanges)]
        down_sum = [np.zeros(N) for _ in range(method.exchanges)]
        up_count = np.zeros(N)
        up_bytes, down_bytes, ccr, step_ms = [], [], [], []
        hit: Optional[Dict[str, float]] = None
        t0 = time.perf_counter()
        k = max(1, round(participation * N))

        def batch_grads(w: torch.Tensor, shared: bool) -> torch.Tensor:
            pick = (torch.rand(N, batch, generator=gen) * lengths[:, None]).long()
            idx = torch.gather(padded, 1, pick)
            g = (grad_shared if shared else grad_each)(unflat(w, not shared), xtr[idx], ytr[idx])
            return torch.cat([g[name].reshape(N, -1) for name, *_ in setup.slices], dim=1)

        for r in range(1, rounds + 1):
            if k == N:
                mask = np.ones(N, bool)
            else:
                mask = np.zeros(N, bool)
                mask[rng.choice(N, k, replace=False)] = True
            if method.local_training:  # FedAvg: E local SGD steps from each participant's model
                W = method.begin(mask).clone()
                for _ in range(E):
                    W -= lr * batch_grads(W, False)
                traffic = method.finish(W, mask)
            else:
                traffic = method.step(batch_grads(method.device_weights(), method.shared), mask)
            s = clock.round_time_ms(c_round, lat, bw, traffic, delay=d, participants=mask)
            sim_ms += s
            step_ms.append(s)
            tc = clock.device_comm_ms(lat, bw, traffic)
            ccr.append(float(np.mean(tc[mask] / c_round[mask])))
            up_bytes.append(float(np.mean(sum(u for u, _ in traffic)[mask])))
            down_bytes.append(float(np.mean(sum(dn for _, dn in traffic)[mask])))
            for e, (u, dn) in enumerate(traffic):
                up_sum[e] += np.where(mask, u, 0)
                down_sum[e] += np.where(mask, dn, 0)
            up_count += mask
            acc = accuracy(method.server_weights())
            curve.append({"round": r, "time_s": sim_ms / 1e3, "accuracy": acc})
            if hit is None and acc >= target_accuracy:
                hit = {"round": r, "time_s": sim_ms / 1e3}
            bar.update(r, f"acc {acc:.3f}  sim {_fmt_s(sim_ms / 1e3)}")
        wall = time.perf_counter() - t0
        bar.close(f"(last-round accuracy {curve[-1]['accuracy']:.3f}, simulated {_fmt_s(sim_ms / 1e3)})")
        seen = np.maximum(up_count, 1)
        # Devices never sampled take the fleet's mean per participation.
        up_mean = [np.where(up_count > 0, u / seen, u.sum() / max(up_count.sum(), 1)) for u in up_sum]
        down_mean = [np.where(up_count > 0, dn / seen, dn.sum() / max(up_count.sum(), 1)) for dn in down_sum]
        last = [p["accuracy"] for p in curve[-5:]]
        results[key] = {
            "label": method.label,
            "delay": d,
            "local_steps": E,
            "exchanges_per_round": method.exchanges,
            "rounds": rounds,
            "time_to_target_s": None if hit is None else hit["time_s"],
            "rounds_to_target": None if hit is None else hit["round"],
            "final_accuracy": float(np.mean(last)),
            "best_accuracy": max(p["accuracy"] for p in curve),
            "simulated_s": sim_ms / 1e3,
            "step_ms": float(np.mean(step_ms)),
            "upload_bytes_per_device_round": float(np.mean(up_bytes)),
            "download_bytes_per_device_round": float(np.mean(down_bytes)),
            "bytes_per_device_round": float(np.mean(up_bytes) + np.mean(down_bytes)),
            "comm_to_compute": float(np.mean(ccr)),
            "scalability": scalability(c_round, lat, bw, up_mean, down_mean, d, scale_sizes(N)),
            "curve": curve,
            "wall_s": wall,
        }
    return {
        "config": dict(devices=N, fleet=fleet.source, methods=list(methods), rounds=rounds,
                       target_accuracy=target_accuracy, batch=batch, lr=lr, momentum=momentum, delay=delay,
                       participation=participation, budget_ms=budget_ms, rank=rank, quant=quant, seed=seed,
                       local_steps=local_steps, alpha=alpha, density=density, down_density=down_density,
                       dataset="scikit-learn digits (1,437 train / 360 test)", model=f"digits CNN ({numel:,} parameters)",
                       numel=numel, dense_bytes=4 * numel),
        "compute_ms_speed1": compute_ms,
        "machine": f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "fleet": fleet.summary(),
        "budgets": {
            "upload_bytes_median": float(np.median(budget["up"])),
            "download_bytes_median": float(np.median(budget["down"])),
            "over_budget_devices": int(budget["over_budget"].sum()),
        },
        "methods": results,
        "wall_s": time.perf_counter() - t_start,
    }


def _fmt_s(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"
