"""Dense f32 / f16 / bf16 through compression_hook: reduced with one allreduce like PyTorch's
own hooks (2 gloo ranks under torchrun), error feedback of the rounding kept."""

import sys

import pytest
import torch

import faces_check


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(900)  # launches of 2 processes: slow on a busy machine
@pytest.mark.parametrize("quant", ["f32", "f16", "bf16"])
def test_dense_values_are_allreduced_like_pytorchs_hooks(tmp_path, quant):
    faces_check.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                     faces_check.SCRIPT, "dense", str(tmp_path), quant], tmp_path)
    runs = [torch.load(tmp_path / f"dense_{quant}_rank{r}.pt") for r in range(2)]
    size = {"f32": 4, "f16": 2, "bf16": 2}[quant]
    numel = runs[0]["torch"]["grads"][0].numel()
    for run in runs:
        theirs, ours = run["torch"], run["iotcompress"]
        # the first step has no residual yet: the same bits as PyTorch's hook
        assert torch.equal(theirs["grads"][0], ours["grads"][0])
        if quant == "f32":  # no rounding, no residual: bit for bit over all 20 steps
            assert all(torch.equal(a, b) for a, b in zip(theirs["grads"], ours["grads"]))
            faces_check.assert_identical(theirs["weights"], ours["weights"], "weights")
        else:  # the rounding error is fed back: later steps differ from PyTorch's, not by much
            assert not all(torch.equal(a, b) for a, b in zip(theirs["grads"], ours["grads"]))
            rel = (theirs["weights"]["2.weight"] - ours["weights"]["2.weight"]).norm() / theirs["weights"]["2.weight"].norm()
            assert rel < 1e-2
        # one allreduce of the values: the bytes of allreduce in the wire type, no message framing
        assert ours["stats"]["bytes_sent"] == numel * size
        assert ours["stats"]["iteration"] == 19  # the last step's index: the hook ran all 20
    # rank 1 sat out step 0: the average is rank 0's gradient alone (in the wire type)
    for run in runs:
        expect = runs[0]["rank0-first"].to({"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[quant])
        got = run["sit-out"]["grads"][0]
        assert torch.equal(got, expect.float()) if quant == "f32" else torch.allclose(got, expect.float(), rtol=1e-2, atol=1e-4)
    faces_check.assert_identical(runs[0]["sit-out"]["weights"], runs[1]["sit-out"]["weights"], "replicas")
