"""iotcompress.accelerate.register_compression under ``torchrun`` with 2 CPU processes."""

import os
import sys

import pytest
import torch

import faces_check
from iotcompress.accelerate import register_compression
from iotcompress.torch import CompressionState


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(900)  # launches of 2 processes: slow on a busy machine
def test_torchrun_calls_the_hook_saves_and_resumes_bit_identically(tmp_path):
    for phase in ("full", "resume"):
        faces_check.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                         faces_check.SCRIPT, "accelerate", str(tmp_path), phase], tmp_path)
    faces_check.check_resume(str(tmp_path), steps_per_epoch=8)
    # save_state wrote one file with every rank's hook state; torch.load's defaults accept it
    custom = [f for f in os.listdir(tmp_path / "checkpoint") if f.startswith("custom_checkpoint")]
    assert custom == ["custom_checkpoint_0.pkl"]
    hook = torch.load(tmp_path / "checkpoint" / custom[0])
    assert hook["world_size"] == 2 and [s["iteration"] for s in hook["ranks"]] == [16, 16]


def test_refuses_a_model_that_is_not_ddp():
    with pytest.raises(ValueError, match="DistributedDataParallel"):
        register_compression(object(), torch.nn.Linear(2, 2), CompressionState(density=0.1))
    with pytest.raises(ValueError, match="CompressionState"):
        register_compression(object(), torch.nn.Linear(2, 2), {"density": 0.1})
