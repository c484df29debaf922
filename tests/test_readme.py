"""The README's DDP example and its checkpoint recipe, verbatim, on 2 gloo ranks under
``torchrun``: the checkpoint loads with ``torch.load``'s defaults, and the resumed run ends
bit-identical to the uninterrupted one on every rank."""

import sys

import pytest
import torch

import faces_check


def torchrun(tmp_path, phase):
    faces_check.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                     faces_check.SCRIPT, "readme", str(tmp_path), phase], tmp_path)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(900)  # launches of 2 processes: slow on a busy machine
def test_readme_checkpoint_resumes_bit_identically_on_every_rank(tmp_path):
    torchrun(tmp_path, "first")
    ckpt = torch.load(tmp_path / "resumed" / "ckpt.pt")  # the defaults: weights_only=True
    assert ckpt["hook"]["world_size"] == 2 and [s["iteration"] for s in ckpt["hook"]["ranks"]] == [16, 16]
    torchrun(tmp_path, "resume")
    torchrun(tmp_path, "full")
    faces_check.check_resume(str(tmp_path), steps_per_epoch=8)
