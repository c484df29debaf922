"""Delayed gradient averaging (``CompressionState(delay=D)``) and partial participation
(``state.participating = False``) in the DDP hook, with real gloo groups."""

import numpy as np
import pytest
import torch

import workers
from test_ddp_hook import spawn

pytestmark = pytest.mark.distributed

SPARSE = dict(threshold=0.02, quant="int8", momentum=0.9, clip_norm=1.0, seed=3)


def mean_over(grads):
    """What the hook computes for dense f32 messages: scale * g added in rank order."""
    total = torch.zeros_like(grads[0])
    for g in grads:
        total += np.float32(1 / len(grads)) * g
    return total


def test_delay_0_is_the_synchronous_hook(tmp_path):
    runs = [("plain", SPARSE), ("delay0", dict(SPARSE, delay=0))]
    for r in spawn(workers.delayed_steps, 2, tmp_path, runs, 5):
        for name, w in r["plain"]["weights"].items():
            assert torch.equal(w, r["delay0"]["weights"][name]), name
        for a, b in zip(r["plain"]["applied"], r["delay0"]["applied"]):
            assert all(torch.equal(a[n], b[n]) for n in a)
        assert r["plain"]["stats"] == r["delay0"]["stats"]


@pytest.mark.parametrize("world", [2, 4])
def test_delayed_averaging_applies_g_t_minus_g_t_minus_d_plus_avg_t_minus_d(world, tmp_path):
    steps = 6
    runs = [(f"d{d}", dict(delay=d)) for d in (1, 2)] + [("sparse2", dict(SPARSE, delay=2))]
    ranks = spawn(workers.delayed_steps, world, tmp_path, runs, steps)
    names = list(ranks[0]["d1"]["local"][0])
    for d in (1, 2):
        for r, res in enumerate(ranks):
            run = res[f"d{d}"]
            for t in range(steps):
                for n in names:
                    g_t = run["local"][t][n]
                    if t < d:
                        want = g_t
                    else:
                        avg = mean_over([other[f"d{d}"]["local"][t - d][n] for other in ranks])
                        want = (g_t - run["local"][t - d][n]) + avg
                    torch.testing.assert_close(run["applied"][t][n], want, rtol=1e-6, atol=1e-7,
                                               msg=f"delay {d} rank {r} step {t} {n}")
        # The replicas differ only by their last d local gradients: w_r + lr * sum(last d g_r) agree.
        restored = []
        for res in ranks:
            run = res[f"d{d}"]
            restored.append({n: run["weights"][n] + 0.1 * sum(run["local"][t][n] for t in range(steps - d, steps))
                             for n in names})
        for other in restored[1:]:
            for n in names:
                torch.testing.assert_close(other[n], restored[0][n], rtol=1e-5, atol=1e-6)
    # Compressed (threshold, int8, momentum): the delayed part is the same average on every rank.
    for t in range(2, steps):
        for n in names:
            parts = [res["sparse2"]["applied"][t][n] - res["sparse2"]["local"][t][n] + res["sparse2"]["local"][t - 2][n]
                     for res in ranks]
            for p in parts[1:]:
                torch.testing.assert_close(p, parts[0], rtol=1e-5, atol=1e-6)
            assert parts[0].abs().sum() > 0


@pytest.mark.parametrize("delay", [0, 2])
def test_a_rank_that_skips_rounds_keeps_its_gradients_and_rejoins(delay, tmp_path):
    world, steps = 4, 9
    skips = {1: (2, 3, 4, 5, 6), 3: (4,)}
    ranks = spawn(workers.delayed_steps, world, tmp_path, [("run", dict(delay=delay))], steps, skips)
    names = list(ranks[0]["run"]["local"][0])
    runs = [res["run"] for res in ranks]
    # Skipped rounds only accumulate: the residual grows by exactly the local gradient.
    for t in skips[1]:
        for n in names:
            before = runs[1]["residual_before"][t][n]
            before = torch.zeros(runs[1]["local"][t][n].numel()) if before is None else before
            want = before + runs[1]["local"][t][n].reshape(-1)
            assert torch.equal(runs[1]["residual_after"][t][n], want), (t, n)
    # The averages are over the ranks that sent; a rank's first message after a gap carries
    # everything it held back (dense f32: the whole residual).
    held = [None] * world
    for t in range(steps):
        for n in names:
            sent = []
            for r in range(world):
                g = runs[r]["local"][t][n]
                if held[r] is not None and n in held[r]:
                    g = held[r].pop(n) + g
                if t in skips.get(r, ()):
                    held[r] = held[r] or {}
                    held[r][n] = g
                else:
                    sent.append(g)
            avg = mean_over(sent)
            for r in range(world):
                applied = runs[r]["applied"][t + delay][n] if t + delay < steps else None
                if applied is None:
                    continue
                if delay:
                    applied = applied - runs[r]["local"][t + delay][n] + runs[r]["local"][t][n]
                torch.testing.assert_close(applied, avg, rtol=1e-5, atol=1e-6, msg=lambda m, t=t, r=r, n=n: f"step {t} rank {r} {n}: {m}")
    assert runs[1]["residual_after"][7][names[0]].abs().max() == 0, "dense f32: all sent on rejoining"
