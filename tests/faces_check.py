"""What tests/test_lightning.py and tests/test_accelerate.py assert on the runs of
tests/faces_train.py: the hook was called and sent fewer bytes than dense, and the resumed
run ended bit-identical to the uninterrupted one (weights and hook state, every rank)."""

import os
import subprocess

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "faces_train.py")
WORLD = 2


def run(command, tmp_path, timeout=240):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(command)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"


def flat(obj, prefix=""):
    """Every leaf of a nested state as (path, numpy array or plain value)."""
    if isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from flat(obj[k], f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from flat(v, f"{prefix}/{i}")
    elif isinstance(obj, torch.Tensor):
        yield prefix, obj.detach().cpu().numpy()
    elif isinstance(obj, np.ndarray):
        yield prefix, obj
    else:
        yield prefix, obj


def assert_identical(a, b, what):
    fa, fb = dict(flat(a)), dict(flat(b))
    assert fa.keys() == fb.keys(), f"{what}: different keys {set(fa) ^ set(fb)}"
    for k in fa:
        if isinstance(fa[k], np.ndarray):
            assert fa[k].dtype == fb[k].dtype and np.array_equal(fa[k], fb[k]), f"{what}{k} differs"
        else:
            assert fa[k] == fb[k], f"{what}{k}: {fa[k]!r} != {fb[k]!r}"


def results(out, phase):
    # the test's own result files (written by faces_train.save_result) hold the hook state as it is
    return [torch.load(os.path.join(out, f"{phase}_rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def check_resume(out, steps_per_epoch, epochs=4):
    full, resumed = results(out, "full"), results(out, "resume")
    for rank in range(WORLD):
        stats = full[rank]["stats"]
        assert full[rank]["hook"]["iteration"] == steps_per_epoch * epochs, "the hook was not called every step"
        assert 0 < stats["total_bytes_sent"] < stats["total_dense_bytes"] / 5, stats
        assert_identical(full[rank]["weights"], resumed[rank]["weights"], f"rank {rank} weights")
        assert_identical(full[rank]["hook"], resumed[rank]["hook"], f"rank {rank} hook state")
    # the ranks' hook states differ (each keeps what it has not sent), the replicas do not
    assert_identical(full[0]["weights"], full[1]["weights"], "replicas")
    r0, r1 = (dict(flat(full[r]["hook"]["compressors"])) for r in range(WORLD))
    assert any(isinstance(v, np.ndarray) and not np.array_equal(v, r1[k]) for k, v in r0.items())
