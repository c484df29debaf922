"""iotcompress.lightning.CompressionStrategy with a real 2-process CPU Trainer (DDP on gloo,
launched by Lightning itself as a user's ``python train.py`` is)."""

import os
import sys

import pytest
import torch

import faces_check
from iotcompress.lightning import CHECKPOINT_KEY, CompressionStrategy
from iotcompress.torch import CompressionState


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(900)  # launches of 2 processes: slow on a busy machine
def test_trainer_calls_the_hook_checkpoints_and_resumes_bit_identically(tmp_path):
    for phase in ("full", "resume"):
        faces_check.run([sys.executable, faces_check.SCRIPT, "lightning", str(tmp_path), phase], tmp_path)
    # 256 digits, batch 16, 2 ranks: 8 steps an epoch
    faces_check.check_resume(str(tmp_path), steps_per_epoch=8)
    # the checkpoint Lightning wrote holds every rank's hook state and loads with torch.load's defaults
    ckpt = torch.load(os.path.join(tmp_path, "epoch1.ckpt"))
    hook = ckpt[CHECKPOINT_KEY]
    assert hook["world_size"] == 2 and [s["iteration"] for s in hook["ranks"]] == [16, 16]


def test_strategy_refuses_a_second_hook():
    state = CompressionState(density=0.01)
    with pytest.raises(ValueError, match="ddp_comm_hook"):
        CompressionStrategy(state, ddp_comm_hook=lambda s, b: None)
    with pytest.raises(ValueError, match="CompressionState"):
        CompressionStrategy({"density": 0.01})
