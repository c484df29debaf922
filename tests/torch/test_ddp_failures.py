"""Bounded failure of the DDP hook with real gloo process groups (spawned workers, ``file://``
store under ``tmp_path``): settings checked on the first step, error frames instead of hangs,
``on_nonfinite="skip"``."""

import numpy as np
import pytest
import torch

import workers
from test_ddp_hook import spawn

pytestmark = pytest.mark.distributed


def test_mismatched_settings_fail_on_every_rank_naming_them(tmp_path):
    # Different delays would cross-match their collectives; the first step's settings
    # exchange stops both ranks before that, under the default 30-minute group timeout.
    options = [dict(density=0.1, quant="int8", delay=0), dict(density=0.1, quant="int4", delay=2)]
    ranks = workers_outcomes(tmp_path, options, nan_ranks=())
    for r in ranks:
        assert r["step"] == 0 and r["elapsed"] < 60, r
        assert r["error"].startswith("SettingsMismatchError"), r["error"]
        assert "delay (rank 0: 0, rank 1: 2)" in r["error"]
        assert 'quant (rank 0: "int8", rank 1: "int4")' in r["error"]
        assert "momentum" not in r["error"], "only what differs is named"


@pytest.mark.parametrize("delay", [0, 1])
def test_a_failing_rank_fails_its_peer_within_seconds_and_nothing_is_lost(delay, tmp_path):
    options = [dict(density=0.1, quant="int8", momentum=0.9, delay=delay)] * 2
    ranks = workers_outcomes(tmp_path, options, nan_ranks=(1,))
    failed, peer = ranks[1], ranks[0]
    assert failed["step"] == 1 and "CompressError" in failed["error"], failed["error"]
    # The peer names the failed rank and its reason: at once without a delay, at its next
    # step's first hook with one.
    assert peer["step"] == 1 + delay and peer["elapsed"] < 60, peer
    assert peer["error"].startswith("RankFailedError") and "rank 1: CompressError" in peer["error"], peer["error"]
    if delay == 0:
        # Every compressor on both ranks is back where it was before the failed step.
        for r in ranks:
            assert r["iteration"] == 1
            assert r["before"].keys() == r["after"].keys() and r["before"]
            for key, (res, vel) in r["before"].items():
                np.testing.assert_array_equal(res, r["after"][key][0], err_msg=key)
                np.testing.assert_array_equal(vel, r["after"][key][1], err_msg=key)
            assert any(res.any() for res, _ in r["before"].values()), "a state that could change"


def test_nonfinite_skip_sits_the_step_out_and_training_goes_on(tmp_path):
    skip = dict(on_nonfinite="skip")
    runs = [("dense", skip), ("sparse", dict(skip, density=0.1, momentum=0.9)),
            ("delayed", dict(skip, density=0.1, momentum=0.9, delay=1))]
    ranks = spawn(workers.delayed_steps, 2, tmp_path, runs, 3, None, {1: (1,)}, "WithEmpty")
    dense = [r["dense"] for r in ranks]
    for step in range(3):
        for name, got in dense[0]["applied"][step].items():
            local = [d["local"][step].get(name) for d in dense]
            if got.numel() == 0:
                continue
            # At the NaN step the average is rank 0's gradient alone, bit for bit.
            want = local[0] if step == 1 else (local[0] + local[1]) / 2
            assert torch.equal(got, want) if step == 1 else torch.allclose(got, want, rtol=1e-6, atol=1e-7), (step, name)
            assert torch.equal(dense[1]["applied"][step][name], got), "both ranks apply the same"
    for run in ("dense", "sparse", "delayed"):
        a, b = ranks[0][run], ranks[1][run]
        for name, w in a["weights"].items():
            assert torch.isfinite(w).all() and torch.isfinite(b["weights"][name]).all(), (run, name)
            if run != "delayed":  # with a delay the replicas differ by their own last gradients
                assert torch.equal(w, b["weights"][name]), (run, name)
        assert b["stats"]["nonfinite_skips"] == 1 and a["stats"]["nonfinite_skips"] == 0
        assert b["stats"]["iteration"] == 2
        # The skipping rank's compressors did not change in its skipped step (and did in others).
        if run != "dense":
            rec = ranks[1][run]
            for key, (res, vel) in rec["before"][1].items():
                np.testing.assert_array_equal(res, rec["after"][1][key][0], err_msg=(run, key))
                np.testing.assert_array_equal(vel, rec["after"][1][key][1], err_msg=(run, key))
            assert any((rec["before"][2][k][0] != v[0]).any() for k, v in rec["after"][2].items())


def workers_outcomes(tmp_path, options, nan_ranks):
    return spawn(workers.failing_step, 2, tmp_path, options, tuple(nan_ranks))
