"""Worker bodies of the multiprocess tests. Each runs in a spawned process with a real gloo
process group over a ``file://`` store, and writes what the test asserts on to
``out_dir/rank{r}.pt``."""

import datetime
import hashlib
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

import iotcompress as ic
from iotcompress.torch import CompressionState, compression_hook


class TwoLayer(nn.Module):
    """Registered as (second, first) but applied first-then-second, so DDP's rebuilt bucket
    order (gradient-ready order) differs from its initial one (reverse registration order)."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.second = nn.Linear(24, 4).to(dtype)
        self.first = nn.Linear(16, 24).to(dtype)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def batch(rank, step, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(8, 16, generator=g).to(dtype), torch.randint(0, 4, (8,), generator=g)


def init(rank, world, store, timeout_s=60):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))


def finish():
    """Barrier, then teardown: a rank that destroys its group while another still talks to
    the store can abort (gloo: "terminate called without an active exception"). A rank that
    succeeded then leaves without the interpreter's finalisation, where torch's C++ threads
    (DDP, gloo) can meet the same abort at random; its results are already saved."""
    failing = sys.exc_info()[0] is not None
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if not failing:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def save(out_dir, rank, obj):
    torch.save(obj, os.path.join(out_dir, f"rank{rank}.pt"))


def loss_of(model, rank, step, dtype=torch.float32):
    x, y = batch(rank, step, dtype)
    return nn.functional.cross_entropy(model(x).float(), y)


def dense_equals_allreduce(rank, world, store, out_dir, ddp_kwargs, dtype_name):
    """The same model and data under plain allreduce and under the hook with dense f32."""
    init(rank, world, store)
    try:
        dtype = getattr(torch, dtype_name)
        grads = {}
        for name in ("allreduce", "hook"):
            model = TwoLayer(dtype)
            ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.001, **ddp_kwargs)
            if name == "hook":
                ddp.register_comm_hook(CompressionState(), compression_hook)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
            per_step = []
            for step in range(4):
                opt.zero_grad()
                if step == 2:  # gradient accumulation: one micro-batch without communication
                    with ddp.no_sync():
                        loss_of(ddp, rank, 100 + step, dtype).backward()
                loss_of(ddp, rank, step, dtype).backward()
                per_step.append([p.grad.detach().clone() for p in model.parameters()])
                opt.step()
            grads[name] = per_step
        save(out_dir, rank, grads)
    finally:
        finish()


def rebuild_keeps_residuals(rank, world, store, out_dir):
    init(rank, world, store)
    try:
        model = TwoLayer()
        ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.0015)
        state = CompressionState(threshold=0.05, quant="int8", momentum=0.5)
        names = {id(p): n for n, p in model.named_parameters()}
        layouts, records = [], []

        def recording_hook(st, bucket):
            params = bucket.parameters()
            before = {names[id(p)]: (st.compressor_for(p).residual if st.compressor_for(p) else None) for p in params}
            layouts.append((bucket.index(), tuple(names[id(p)] for p in params)))
            fut = compression_hook(st, bucket)
            after = {names[id(p)]: st.compressor_for(p).residual for p in params}
            records.append((before, after))
            return fut

        ddp.register_comm_hook(state, recording_hook)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        steps = []
        for step in range(4):
            opt.zero_grad()
            start = len(records)
            loss_of(ddp, rank, step).backward()
            opt.step()
            steps.append((list(layouts[start:]), records[start:]))
        save(out_dir, rank, {"steps": steps, "ncompressors": len(state._compressors)})
    finally:
        finish()


def train_steps(rank, world, store, out_dir, resume_from, first, last, options):
    """Steps ``first..last-1``; saves a checkpoint after step 2 in the uninterrupted run."""
    init(rank, world, store)
    try:
        model = TwoLayer()
        ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.001)
        state = CompressionState(**options)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        if resume_from:
            ckpt = torch.load(os.path.join(resume_from, f"ckpt{rank}.pt"), weights_only=False)
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["opt"])
            state.load_state_dict(ckpt["hook"])
        digests = {}

        names = {id(p): n for n, p in model.named_parameters()}

        def hashing_hook(st, bucket):
            # Per parameter: bucket layouts differ between the runs (a resumed DDP starts
            # from its initial buckets), what each parameter receives must not.
            iteration, params = st.iteration, bucket.parameters()

            def digest(fut):
                t, offset = fut.value(), 0
                for p in params:
                    piece = t[offset : offset + p.numel()].numpy().tobytes()
                    digests.setdefault(iteration, {})[names[id(p)]] = hashlib.sha256(piece).hexdigest()
                    offset += p.numel()
                return t

            return compression_hook(st, bucket).then(digest)

        ddp.register_comm_hook(state, hashing_hook)
        for step in range(first, last):
            opt.zero_grad()
            loss_of(ddp, rank, step).backward()
            opt.step()
            if step == 2 and not resume_from:
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "hook": state.state_dict()},
                           os.path.join(out_dir, f"ckpt{rank}.pt"))
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        save(out_dir, rank, {"weights": weights, "digests": digests, "stats": state.stats})
    finally:
        finish()


def empty_messages(rank, world, store, out_dir):
    init(rank, world, store)
    try:
        model = TwoLayer()
        ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.001)
        state = CompressionState(threshold=1e9, quant="int8")
        ddp.register_comm_hook(state, compression_hook)
        grads = []
        for step in range(2):
            ddp.zero_grad()
            loss_of(ddp, rank, step).backward()
            grads.append([p.grad.detach().clone() for p in model.parameters()])
        save(out_dir, rank, {"grads": grads, "stats": state.stats})
    finally:
        finish()


def failing_rank(rank, world, store, out_dir, timeout_s):
    init(rank, world, store, timeout_s=timeout_s)
    model = TwoLayer()
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.001)
    ddp.register_comm_hook(CompressionState(density=0.1), compression_hook)
    outcome = {}
    t0 = time.monotonic()
    try:
        loss = loss_of(ddp, rank, 0)
        if rank == world - 1:
            loss = loss * float("nan")  # this rank's gradient is NaN: its hook raises
        loss.backward()
        outcome["error"] = None
    except Exception as e:  # noqa: BLE001 - the test inspects what was raised
        outcome["error"] = f"{type(e).__name__}: {e}"
    outcome["elapsed"] = time.monotonic() - t0
    save(out_dir, rank, outcome)
    # No destroy_process_group: the group is broken. Leave without the interpreter's
    # finalisation, where torch's C++ threads abort at random on a broken group.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def nccl_dense_equals_allreduce(rank, world, store, out_dir):
    """CUDA buckets over NCCL: the hook stages through pinned CPU memory."""
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.cuda.set_device(rank)
        grads = {}
        for name in ("allreduce", "hook"):
            model = TwoLayer().cuda()
            ddp = nn.parallel.DistributedDataParallel(model, device_ids=[rank], bucket_cap_mb=0.001)
            if name == "hook":
                ddp.register_comm_hook(CompressionState(), compression_hook)
            per_step = []
            for step in range(3):
                ddp.zero_grad()
                x, y = batch(rank, step)
                nn.functional.cross_entropy(ddp(x.cuda()), y.cuda()).backward()
                per_step.append([p.grad.detach().cpu().clone() for p in model.parameters()])
            grads[name] = per_step
        save(out_dir, rank, grads)
    finally:
        finish()


def network_budgets(rank, world, store, out_dir, links, delay=0):
    """Each rank on its own link with its own time budget per step (several buckets)."""
    init(rank, world, store)
    try:
        model = TwoLayer()
        ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.001)
        latency_ms, mbps, budget_ms = links[rank]
        state = CompressionState(network=ic.NetworkProfile(latency_ms, mbps), budget_ms=budget_ms, model=ddp,
                                 quant="int8", momentum=0.9, delay=delay)
        ddp.register_comm_hook(state, compression_hook)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        steps, losses = [], []
        for step in range(30):
            opt.zero_grad()
            loss = loss_of(ddp, rank, step % 3)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            steps.append(dict(state.stats))
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        save(out_dir, rank, {"stats": steps, "losses": losses, "weights": weights})
    finally:
        finish()


def _recording(names, record):
    """A hook that saves this rank's bucket gradient per parameter name, then compresses."""

    def hook(st, bucket):
        flat, offset = bucket.buffer().detach().float(), 0
        for p in bucket.parameters():
            record[names[id(p)]] = flat[offset : offset + p.numel()].clone().view_as(p)
            offset += p.numel()
        return compression_hook(st, bucket)

    return hook


def delayed_steps(rank, world, store, out_dir, runs, steps, skips=None, nans=None, model_name="TwoLayer"):
    """For each ``(label, options)`` in ``runs``: ``steps`` SGD steps of ``model`` (a class
    name here) under the hook, recording per step this rank's local gradients, what the hook
    gave the optimizer, and the residuals (and every compressor's residual and velocity)
    before and after; ``skips`` maps rank -> steps it sits out, ``nans`` rank -> steps
    whose loss is NaN; ``model_name`` is a model class of this module."""
    init(rank, world, store)
    try:
        results = {}
        for label, options in runs:
            model = globals()[model_name]()
            ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.001)
            state = CompressionState(**options)
            names = {id(p): n for n, p in model.named_parameters()}
            local = {}
            ddp.register_comm_hook(state, _recording(names, local))
            opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
            record = {"local": [], "applied": [], "residual_before": [], "residual_after": [], "before": [],
                      "after": []}
            for step in range(steps):

                def residuals():
                    return {n: (torch.from_numpy(state.compressor_for(p).residual).clone()
                                if state.compressor_for(p) else None) for n, p in model.named_parameters()}

                state.participating = step not in (skips or {}).get(rank, ())
                record["residual_before"].append(residuals())
                record["before"].append(_residuals(state))
                opt.zero_grad()
                loss = loss_of(ddp, rank, step)
                if step in (nans or {}).get(rank, ()):
                    loss = loss * float("nan")
                loss.backward()
                record["local"].append(dict(local))
                record["applied"].append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
                record["residual_after"].append(residuals())
                record["after"].append(_residuals(state))
                opt.step()
            record["weights"] = {n: p.detach().clone() for n, p in model.named_parameters()}
            record["stats"] = dict(state.stats)
            results[label] = record
        save(out_dir, rank, results)
    finally:
        finish()


class WithEmpty(TwoLayer):
    """TwoLayer plus a zero-element parameter that takes part in the graph."""

    def __init__(self):
        super().__init__()
        self.empty = nn.Parameter(torch.zeros(0))

    def forward(self, x):
        return super().forward(x) + self.empty.sum()


def _residuals(state):
    return {k: (c.residual.copy(), c.velocity.copy()) for k, c in state._compressors.items()}


def failing_step(rank, world, store, out_dir, options_per_rank, nan_ranks, timeout_s=None):
    """Three steps under each rank's own options (the default process-group timeout of 30
    minutes unless ``timeout_s``); at step 1 the ``nan_ranks`` have a NaN loss. Saves the
    first error, how long it took to come, and the compressors before and after that step."""
    if timeout_s is None:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    else:
        init(rank, world, store, timeout_s=timeout_s)
    torch.set_num_threads(1)
    model = TwoLayer()
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.001)
    state = CompressionState(**options_per_rank[rank])
    ddp.register_comm_hook(state, compression_hook)
    outcome = {"error": None, "step": None}
    for step in range(3):
        before = _residuals(state)
        t0 = time.monotonic()
        try:
            loss = loss_of(ddp, rank, step)
            if step == 1 and rank in nan_ranks:
                loss = loss * float("nan")
            loss.backward()
        except Exception as e:  # noqa: BLE001 - the test inspects what was raised
            outcome.update(error=f"{type(e).__name__}: {e}", step=step, elapsed=time.monotonic() - t0,
                           before=before, after=_residuals(state), iteration=state.iteration)
            break
    save(out_dir, rank, outcome)
    # The group may be broken; leave without the interpreter's finalisation (see failing_rank).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
