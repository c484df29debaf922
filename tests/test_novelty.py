"""The novelty filter (iotcompress.data): decisions equal to an independent numpy model of the
specification (float32, the 8-lane sum, the ring), the exact variant's distance promise,
select_novel's fraction search and groups, errors that change nothing, the torch wrappers,
the same decisions on the Cortex-M4F under QEMU (marked mcu) and a smoke run of the
evaluation command (marked slow)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import iotcompress as ic
from iotcompress.data import NoveltyFilter, select_novel

ROOT = Path(__file__).resolve().parents[1]
F = np.float32

_spec = importlib.util.spec_from_file_location("gen_novelty", ROOT / "firmware" / "gen_novelty.py")
gen_novelty = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen_novelty)


def walk(n: int, shape: tuple, seed: int, still: float = 0.6) -> np.ndarray:
    """A redundant stream: a random walk that often stands still."""
    rng = np.random.default_rng(seed)
    steps = rng.standard_normal((n, *shape)).astype(F)
    steps *= np.where(rng.random(n) < still, F(0.01), F(0.5)).astype(F).reshape(-1, *[1] * len(shape))
    return np.cumsum(steps, axis=0, dtype=F)


# --- the specification in numpy, written from docs/novelty.md -------------------------------


def lane_sum(terms: np.ndarray) -> F:
    lanes = [F(0)] * 8
    for i, t in enumerate(terms):
        lanes[i % 8] = F(lanes[i % 8] + t)
    l = lanes  # noqa: E741
    return F(F(F(l[0] + l[4]) + F(l[2] + l[6])) + F(F(l[1] + l[5]) + F(l[3] + l[7])))


def sqrt32(x: F) -> F:
    if not x > 0:
        return F(0)
    y = np.array([(np.array(x, F).view(np.uint32) >> 1) + (127 << 22)], np.uint32).view(F)[0]
    for _ in range(5):
        y = F(F(0.5) * F(y + F(x / y)))
    return y


def view(sample: np.ndarray, channels: int, pool: int, metric: str) -> np.ndarray:
    rows = sample.reshape(channels, -1)
    out = []
    for r in rows:
        v = []
        for s in range(0, len(r), pool):
            block = r[s : s + pool]
            acc = F(0)
            for x in block:
                acc = F(acc + x)
            v.append(F(acc / F(len(block))))
        if metric == "cosine":
            acc = F(0)
            for x in v:
                acc = F(acc + x)
            mean = F(acc / F(len(v)))
            v = [F(x - mean) for x in v]
        out += v
    out = np.array(out, F)
    if metric == "cosine":
        norm = sqrt32(lane_sum(out * out))
        out = out * (F(1) / norm if norm > 0 else F(0))
    return out.astype(F)


def reference(samples, channels, pool, capacity, metric, threshold, keep=0.0, rate=0.05):
    kept, thr, out = [], F(threshold), []
    for s in samples:
        v = view(s, channels, pool, metric)
        nearest = F(np.inf)
        for k in reversed(kept):
            d = v - k
            nearest = min(nearest, lane_sum(d * d))
        decision = not (nearest < F(thr * thr))
        if decision:
            kept = (kept + [v])[-capacity:]
        if keep > 0:
            if thr == 0:
                if np.isfinite(nearest):
                    thr = sqrt32(nearest)
            else:
                factor = F(F(1) + F(F(rate) * F(F(1) - F(keep)))) if decision else F(F(1) - F(F(rate) * F(keep)))
                thr = F(thr * factor)
        out.append(decision)
    return np.array(out), thr


CONFIGS = [
    dict(channels=1, pool=1, capacity=8, metric="euclidean", threshold=0.8),
    dict(channels=3, pool=2, capacity=5, metric="euclidean", threshold=0.5),
    dict(channels=2, pool=3, capacity=16, metric="cosine", threshold=0.4),
    dict(channels=2, pool=1, capacity=4, metric="cosine", threshold=0.0, keep=0.2),
    dict(channels=3, pool=4, capacity=12, metric="euclidean", threshold=0.0, keep=0.1, rate=0.1),
]


def make_filter(shape, c):
    return NoveltyFilter(shape, keep=c.get("keep") or None, threshold=c["threshold"], metric=c["metric"],
                         pool=c["pool"], capacity=c["capacity"], rate=c.get("rate", 0.05))


@pytest.mark.parametrize("c", CONFIGS)
def test_decisions_equal_the_numpy_specification(c):
    x = walk(150, (c["channels"], 11), seed=c["capacity"])
    f = make_filter(x.shape[1:], c)
    got = f.mask(x)
    want, thr = reference(x, c["channels"], c["pool"], c["capacity"], c["metric"], c["threshold"],
                          c.get("keep", 0.0), c.get("rate", 0.05))
    np.testing.assert_array_equal(got, want)
    assert f.threshold == thr
    assert (f.seen, f.kept) == (150, int(want.sum()))
    assert 0 < want.sum() < 150


def test_offer_and_mask_and_call_agree_and_are_deterministic():
    x = walk(200, (3, 16), seed=1)
    opts = dict(keep=0.25, pool=2, capacity=32)
    a = NoveltyFilter((3, 16), **opts).mask(x)
    f = NoveltyFilter((3, 16), **opts)
    c = np.array([f.offer(s) for s in x])
    kept_items = list(NoveltyFilter((3, 16), **opts)((s, i) for i, s in enumerate(x)))
    np.testing.assert_array_equal(a, c)
    assert a[0], "the first sample is always new"
    assert [i for _, i in kept_items] == list(np.flatnonzero(a))
    np.testing.assert_array_equal(a, NoveltyFilter((3, 16), **opts).mask(x))


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_exact_variant_never_keeps_two_close_samples(metric):
    x = walk(300, (2, 12), seed=5)
    thr = 0.9 if metric == "euclidean" else 0.5
    idx = select_novel(x, threshold=thr, metric=metric, pool=2, capacity=300)
    views = [view(s, 2, 2, metric) for s in x[idx]]
    assert 5 < len(idx) < 300
    for i in range(len(views)):
        for j in range(i):
            d = views[i] - views[j]
            assert lane_sum(d * d) >= F(F(thr) * F(thr)), (i, j)


@pytest.mark.parametrize("keep", [0.05, 0.2, 0.5])
def test_select_novel_hits_the_fraction(keep):
    x = walk(600, (3, 16), seed=2)
    idx = select_novel(x, keep=keep, pool=2)
    assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0)
    assert abs(len(idx) - keep * 600) <= max(3, 0.02 * 600)


def test_select_novel_groups_filter_each_stream_alone():
    x = np.concatenate([walk(100, (12,), seed=3), walk(50, (12,), seed=4, still=0.95) * F(0.01)])
    groups = np.repeat([0, 1], [100, 50])
    idx = select_novel(x, keep=0.2, groups=groups)
    per_group = np.bincount(groups[idx], minlength=2)
    assert abs(per_group[0] - 20) <= 2 and abs(per_group[1] - 10) <= 2
    alone = select_novel(x[100:], keep=0.2)
    np.testing.assert_array_equal(idx[idx >= 100] - 100, alone)


def test_budget_bytes_sets_the_fraction():
    f = NoveltyFilter((4, 8), budget_bytes=4 * 32 * 50, expected_samples=500)
    x = walk(500, (4, 8), seed=9)
    # 50 samples' bytes of 500: the adaptive filter aims at keep=0.1 (an aim, not a cap).
    np.testing.assert_array_equal(f.mask(x), NoveltyFilter((4, 8), keep=0.1).mask(x))


def test_memory_is_fixed():
    f = NoveltyFilter((3, 64), keep=0.1, pool=4, capacity=20)
    assert f.nbytes == 4 * 21 * 3 * 16
    f.mask(walk(2000, (3, 64), seed=6))
    assert f.nbytes == 4 * 21 * 3 * 16 and f.seen == 2000


def test_errors_change_nothing():
    x = walk(60, (2, 8), seed=7)
    f = NoveltyFilter((2, 8), keep=0.3)
    g = NoveltyFilter((2, 8), keep=0.3)
    f.mask(x[:30])
    g.mask(x[:30])
    bad = x[30:40].copy()
    bad[5, 1, 3] = np.nan
    with pytest.raises(ic.CompressError):
        f.mask(bad)
    with pytest.raises(ic.CompressError):
        f.offer(bad[5])
    with pytest.raises(ValueError):
        f.offer(x[0, :, :7])
    assert (f.seen, f.kept, f.threshold) == (g.seen, g.kept, g.threshold)
    np.testing.assert_array_equal(f.mask(x[30:]), g.mask(x[30:]))


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(keep=0.0), dict(keep=1.5), dict(threshold=-1.0), dict(threshold=float("nan")),
     dict(keep=0.5, metric="manhattan"), dict(keep=0.5, pool=0), dict(keep=0.5, capacity=0),
     dict(keep=0.5, rate=1.0), dict(budget_bytes=100), dict(keep=0.5, budget_bytes=100, expected_samples=3)],
)
def test_bad_options_raise_with_a_reason(kwargs):
    with pytest.raises(ValueError):
        NoveltyFilter((3, 8), **kwargs)


def test_select_novel_checks_its_arguments():
    x = walk(10, (8,), seed=0)
    with pytest.raises(ValueError):
        select_novel(x)
    with pytest.raises(ValueError):
        select_novel(x, keep=0.5, threshold=1.0)
    with pytest.raises(ValueError):
        select_novel(x[0], keep=0.5)
    with pytest.raises(ValueError):
        select_novel(x, keep=0.5, groups=[0, 1])


def test_torch_sampler_and_iterable_dataset():
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader, TensorDataset

    from iotcompress.data import NovelIterableDataset, NovelSampler

    x = walk(300, (3, 16), seed=8)
    y = np.arange(300)
    want = np.flatnonzero(NoveltyFilter((3, 16), keep=0.2).mask(x))
    ds = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    sampler = NovelSampler(ds, shape=(3, 16), keep=0.2)
    assert len(sampler) == len(want)
    seen = torch.cat([b[1] for b in DataLoader(ds, batch_size=16, sampler=sampler)]).numpy()
    np.testing.assert_array_equal(seen, want)
    stream = NovelIterableDataset([(torch.from_numpy(s), i) for i, s in enumerate(x)], shape=(3, 16), keep=0.2)
    for _ in range(2):  # every pass the same selection
        got = torch.cat([b[1] for b in DataLoader(stream, batch_size=16)]).numpy()
        np.testing.assert_array_equal(got, want)


# --- the same decisions on a Cortex-M4F --------------------------------------------------------


@pytest.mark.mcu
@pytest.mark.timeout(1800)
def test_m4f_decisions_equal_host_decisions():
    sys.path.insert(0, str(Path(__file__).parent))
    import test_mcu

    missing = test_mcu._missing_mcu_tools()
    if missing:
        test_mcu._skip_or_fail("MCU toolchain missing: " + ", ".join(missing))
    elf = ROOT / "target" / "mcu" / "mps2-an386" / "novelty.elf"
    r = subprocess.run(["make", "-C", str(ROOT / "firmware"), str(elf)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = subprocess.run(["qemu-system-arm", "-M", "mps2-an386", "-nographic", "-monitor", "none", "-serial",
                          "null", "-semihosting", "-kernel", str(elf)], capture_output=True, text=True, timeout=600)
    lines = {w[1]: w for w in (ln.split() for ln in run.stdout.splitlines()) if w and w[0] == "NOV"}
    assert "DONE failures 0" in run.stdout and run.returncode == 0, run.stdout[-3000:]
    board = run.stdout.split("\n", 1)[0].split()
    assert board[3] == board[4], "iotcompress_novelty_size() != sizeof(IotcompressNovelty)"
    x = np.array(gen_novelty.stream(), F)
    for c in gen_novelty.cases():
        shape = (c["channels"], x.shape[1] // c["channels"]) if c["channels"] > 1 else (x.shape[1],)
        f = NoveltyFilter(shape, keep=c["keep"] or None, threshold=c["threshold"], pool=c["pool"],
                          metric=("euclidean", "cosine")[c["metric"]], capacity=c["capacity"], rate=c["rate"])
        host = f.mask(x.reshape(len(x), *f.shape))
        w = lines[c["name"]]
        assert w[-1] == "".join("1" if k else "0" for k in host), c["name"]
        assert (int(w[3]), int(w[5])) == (f.seen, f.kept)
        assert int(w[7], 16) == int(np.array(f.threshold, F).view(np.uint32))
        assert (w[9], w[10]) == ("IOTCOMPRESS_ERR_NON_FINITE_GRADIENT", "unchanged")
        assert 0 < f.kept < f.seen


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_evaluation_command_smoke(tmp_path):
    pytest.importorskip("aeon")
    r = subprocess.run([sys.executable, str(ROOT / "benches" / "novelty_eval.py"), "--quick", "--out", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    text = (tmp_path / "results.md").read_text()
    assert "BasicMotions" in text and "ACSF1" in text and "novelty-euclidean" in text
    assert (tmp_path / "accuracy.png").stat().st_size > 10_000
