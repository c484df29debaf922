"""The DDP communication hook with real gloo process groups on localhost (spawned workers,
``file://`` store under ``tmp_path``)."""

import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import workers
from iotcompress.torch import CompressionState, warmup_density

pytestmark = pytest.mark.distributed


def spawn(fn, world, tmp_path, *args):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    store = tmp_path / "store"
    if store.exists():
        store.unlink()
    mp.spawn(fn, args=(world, str(store), str(out), *args), nprocs=world, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.mark.parametrize("world", [2, 4])
def test_dense_f32_hook_equals_allreduce(world, tmp_path):
    ranks = spawn(workers.dense_equals_allreduce, world, tmp_path, {}, "float32")
    for r in ranks:
        for hook_step, ref_step in zip(r["hook"], r["allreduce"]):
            for got, want in zip(hook_step, ref_step):
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    # And every rank holds the same averaged gradient.
    for step in range(4):
        for p in range(4):
            assert torch.equal(ranks[0]["hook"][step][p], ranks[-1]["hook"][step][p])


@pytest.mark.parametrize(
    "ddp_kwargs, dtype",
    [
        ({"gradient_as_bucket_view": True}, "float32"),
        ({"static_graph": True}, "float32"),
        ({}, "float16"),
        ({}, "bfloat16"),
    ],
    ids=["bucket_view", "static_graph", "fp16", "bf16"],
)
def test_hook_variants_equal_allreduce(ddp_kwargs, dtype, tmp_path):
    ranks = spawn(workers.dense_equals_allreduce, 2, tmp_path, ddp_kwargs, dtype)
    low = dtype != "float32"
    for r in ranks:
        for hook_step, ref_step in zip(r["hook"], r["allreduce"]):
            for got, want in zip(hook_step, ref_step):
                assert got.dtype == want.dtype == getattr(torch, dtype)
                # Half precision: allreduce sums in half, the hook in float32 then rounds once.
                tol = dict(rtol=1e-2, atol=1e-3) if low else dict(rtol=1e-6, atol=1e-7)
                torch.testing.assert_close(got, want, **tol)


def test_bucket_rebuild_keeps_every_residual(tmp_path):
    ranks = spawn(workers.rebuild_keeps_residuals, 2, tmp_path)
    for r in ranks:
        steps = r["steps"]  # per step: (bucket layouts, [(residuals before, residuals after) per bucket])
        assert sorted(steps[0][0]) != sorted(steps[1][0]), "the test model must make DDP change its buckets"
        assert r["ncompressors"] == 4, "one compressor per parameter, none duplicated by the rebuild"
        for t in range(1, len(steps)):
            after_previous = {}
            for _, after in steps[t - 1][1]:
                after_previous.update(after)
            assert len(after_previous) == 4
            for before, _ in steps[t][1]:
                for name, residual in before.items():
                    assert residual is not None, f"step {t}: {name} lost its compressor"
                    np.testing.assert_array_equal(residual, after_previous[name], err_msg=f"step {t}: {name}")
            # Threshold mode leaves something behind, so the comparison is not vacuous.
            assert any((a != 0).any() for _, after in steps[t][1] for a in after.values())


@pytest.mark.parametrize("delay", [0, 2], ids=["sync", "delay2"])
def test_checkpoint_resume_is_bit_identical(delay, tmp_path):
    # delay=2: the checkpoint after step 2 holds step 1's decoded average and step 2's
    # exchange whose payload is not launched yet; the resumed run launches it at step 3.
    options = dict(density=0.05, quant="int8", momentum=0.9, nesterov=True, warmup_steps=4, clip_norm=1.0, seed=5,
                   delay=delay)
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    full_dir.mkdir()
    resumed_dir.mkdir()
    full = spawn(workers.train_steps, 2, full_dir, None, 0, 6, options)
    resumed = spawn(workers.train_steps, 2, resumed_dir, str(full_dir / "out"), 3, 6, options)
    for a, b in zip(full, resumed):
        for name in a["weights"]:
            assert torch.equal(a["weights"][name], b["weights"][name]), name
        for it in (3, 4, 5):
            assert a["digests"][it] == b["digests"][it], f"iteration {it}"
        assert a["stats"] == b["stats"]


@pytest.mark.parametrize("world", [2, 4])
def test_empty_messages_round(world, tmp_path):
    ranks = spawn(workers.empty_messages, world, tmp_path)
    for r in ranks:
        for step in r["grads"]:
            assert all((g == 0).all() for g in step)
        assert r["stats"]["density"] == 0.0
        assert 0 < r["stats"]["bytes_sent"] < 100


def test_a_failing_rank_fails_the_others_instead_of_hanging(tmp_path):
    timeout = 10
    ranks = spawn(workers.failing_rank, 2, tmp_path, timeout)
    assert ranks[1]["error"] and "CompressError" in ranks[1]["error"] and "NaN" in ranks[1]["error"]
    assert ranks[0]["error"], "rank 0 must see an error, not hang"
    assert ranks[0]["elapsed"] < timeout + 30


def test_state_options_are_validated_and_pickle_without_process_group():
    import pickle

    with pytest.raises(ValueError, match="warmup_steps needs density"):
        CompressionState(threshold=0.1, warmup_steps=10)
    with pytest.raises(ValueError, match="clip_norm"):
        CompressionState(clip_norm=-1)
    with pytest.raises(ValueError, match="density"):
        CompressionState(density=2.0)
    with pytest.raises(ValueError, match="delay"):
        CompressionState(delay=-1)
    with pytest.raises(ValueError, match="delay"):
        CompressionState(delay=1.5)
    s = CompressionState(object(), density=0.01, quant="int8", momentum=0.9, warmup_steps=8, delay=3)
    restored = pickle.loads(pickle.dumps(s))
    assert restored.process_group is None and restored.options == s.options and restored.warmup_steps == 8
    assert restored.delay == 3 and restored.participating
    with pytest.raises(ValueError, match="differ"):
        CompressionState(density=0.01, quant="int8", momentum=0.9, warmup_steps=8).load_state_dict(s.state_dict())
    assert [warmup_density(0.001, t, 8) for t in (0, 2, 4, 6, 8)] == [0.25, 0.0625, 0.015625, 0.00390625, 0.001]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (NCCL path); run on a GPU machine")
def test_nccl_cuda_buckets(tmp_path):
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    ranks = spawn(workers.nccl_dense_equals_allreduce, 1, tmp_path)
    for hook_step, ref_step in zip(ranks[0]["hook"], ranks[0]["allreduce"]):
        for got, want in zip(hook_step, ref_step):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("delay", [0, 2])
def test_per_device_budgets_hold_every_step(delay, tmp_path):
    """Rank 0 on LTE with 60 ms per step (6,250 B), rank 1 on a 10 kbit/s radio with 500 ms
    (375 B): every step's modelled T_c of what each rank sends is within its budget, the ranks
    stay in sync (with a delay: up to their own last D gradients) and the model learns."""
    links = [(50.0, 5.0, 60.0), (200.0, 0.01, 500.0)]
    ranks = spawn(workers.network_budgets, 2, tmp_path, links, delay)
    for r, (latency, mbps, budget) in zip(ranks, links):
        for s in r["stats"]:
            assert s["comm_time_ms"] <= budget, s
            assert s["bytes_sent"] <= s["budget_bytes"]
        assert r["stats"][-1]["budget_bytes"] == {0: 6250, 1: 375}[links.index((latency, mbps, budget))]
        assert sum(r["losses"][-3:]) < sum(r["losses"][:3])
    # The radio's rank sends less, at a higher threshold.
    assert ranks[1]["stats"][-1]["bytes_sent"] < ranks[0]["stats"][-1]["bytes_sent"]
    if delay == 0:
        for name, w in ranks[0]["weights"].items():
            assert torch.equal(w, ranks[1]["weights"][name])
