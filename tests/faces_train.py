"""Training scripts of tests/test_lightning.py, tests/test_accelerate.py and
tests/test_readme.py, run as their users run them: ``python tests/faces_train.py lightning
OUT PHASE`` (Lightning launches the second rank itself) and ``torchrun --nproc-per-node 2
tests/faces_train.py accelerate|readme OUT PHASE``. PHASE ``full`` trains 4 epochs and checkpoints after epoch 2; ``resume`` restores
that checkpoint and trains epochs 3 and 4. Each rank writes ``OUT/PHASE_rank{r}.pt``: the
final weights, its hook state and its hook stats."""

import os
import sys

import torch
from torch import nn

from iotcompress.torch import CompressionState, compression_hook

EPOCHS, CHECKPOINT_EPOCH, BATCH = 4, 2, 16


def digits(n=256):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.utils.data.TensorDataset(torch.tensor(x[:n] / 16.0, dtype=torch.float32), torch.tensor(y[:n]))


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def hook_state():
    # momentum in the hook: a lost velocity or residual makes the resumed weights differ
    return CompressionState(density=0.05, quant="int8", momentum=0.9)


def save_result(out, phase, rank, model, state):
    torch.save({"weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "hook": state.state_dict(), "stats": dict(state.stats)},
               os.path.join(out, f"{phase}_rank{rank}.pt"))


def lightning(out, phase):
    import lightning as L

    from iotcompress.lightning import CompressionStrategy

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    state = hook_state()
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=out, filename="epoch{epoch}", save_top_k=-1,
                                                      every_n_epochs=1, auto_insert_metric_name=False)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=CompressionStrategy(state), max_epochs=EPOCHS,
                        callbacks=[checkpoints], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=out)
    module = Module()
    data = torch.utils.data.DataLoader(digits(), batch_size=BATCH, shuffle=True)
    ckpt = None if phase == "full" else os.path.join(out, f"epoch{CHECKPOINT_EPOCH - 1}.ckpt")
    trainer.fit(module, data, ckpt_path=ckpt)
    save_result(out, phase, trainer.global_rank, module.net, state)


def readme_blocks():
    """The README's DDP example and its resume block, as they are written there."""
    import re

    readme = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "README.md")).read()
    section = readme.split("## PyTorch: the DGC recipe in a DDP hook", 1)[1]
    train, resume = re.findall(r"```python\n(.*?)```", section, re.S)[:2]
    setup, loop = train.split("for x, y in loader:", 1)
    return setup, "for x, y in loader:" + loop, resume


def readme(out, phase):
    """The README's blocks, verbatim, on 2 gloo ranks: ``full`` trains 4 epochs in ``out/full``;
    ``first`` trains 2 in ``out/resumed`` and writes the README's checkpoint; ``resume`` runs
    the setup, the resume block and 2 more epochs there."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cwd = os.path.join(out, "full" if phase == "full" else "resumed")
    os.makedirs(cwd, exist_ok=True)
    os.chdir(cwd)
    data = digits()
    sampler = torch.utils.data.DistributedSampler(data, shuffle=True, seed=0)
    setup, loop, resume = readme_blocks()
    scope = {"model": mlp()}
    exec(setup, scope)
    if phase == "resume":
        exec(resume, scope)
    epochs = {"full": range(EPOCHS), "first": range(CHECKPOINT_EPOCH), "resume": range(CHECKPOINT_EPOCH, EPOCHS)}
    for epoch in epochs[phase]:
        sampler.set_epoch(epoch)
        scope["loader"] = torch.utils.data.DataLoader(data, batch_size=BATCH, sampler=sampler)
        exec(loop, scope)  # the loop and the checkpoint, as written: each epoch's replaces the last
    save_result(out, phase, rank, scope["model"], scope["state"])
    dist.barrier()
    dist.destroy_process_group()


def dense(out, quant):
    """20 steps of the digits MLP on 2 gloo ranks, once with PyTorch's own hook for ``quant``
    (allreduce_hook, fp16_compress_hook, bf16_compress_hook) and once with compression_hook
    and a dense ``CompressionState(quant=quant)``: each run's gradients per step and final
    weights, and the hook's stats."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    theirs = {"f32": default_hooks.allreduce_hook, "f16": default_hooks.fp16_compress_hook,
              "bf16": default_hooks.bf16_compress_hook}[quant]
    data = digits()
    result = {}
    for name in ("torch", "iotcompress", "sit-out"):
        model = mlp()
        ddp = nn.parallel.DistributedDataParallel(model)
        state = CompressionState(quant=quant)
        if name == "torch":
            ddp.register_comm_hook(None, theirs)
        else:
            ddp.register_comm_hook(state, compression_hook)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        grads = []
        for step in range(20):
            state.participating = not (name == "sit-out" and rank == 1 and step == 0)
            idx = torch.arange(step * 2 * BATCH + rank * BATCH, step * 2 * BATCH + (rank + 1) * BATCH) % len(data)
            x, y = data[idx]
            opt.zero_grad()
            nn.functional.cross_entropy(ddp(x), y).backward()
            grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone())
            opt.step()
        result[name] = {"grads": grads, "weights": {k: v.clone() for k, v in model.state_dict().items()},
                        "stats": dict(state.stats)}
        if name == "sit-out":  # rank 0's own first gradient, for the average over the one sender
            model = mlp()
            x, y = data[torch.arange(0, BATCH)]
            nn.functional.cross_entropy(model(x), y).backward()
            result["rank0-first"] = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.save(result, os.path.join(out, f"dense_{quant}_rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def accelerate(out, phase):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed

    from iotcompress.accelerate import register_compression

    # the seedable sampler shuffles by (seed, epoch): epoch 3 of a resumed run sees epoch 3's order
    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    set_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = torch.utils.data.DataLoader(digits(), batch_size=BATCH, shuffle=True)
    model, opt, data = accelerator.prepare(model, opt, data)
    state = register_compression(accelerator, model, hook_state())
    checkpoint = os.path.join(out, "checkpoint")
    first = 0
    if phase == "resume":
        accelerator.load_state(checkpoint)
        first = CHECKPOINT_EPOCH
    for epoch in range(first, EPOCHS):
        data.set_epoch(epoch)
        for x, y in data:
            opt.zero_grad()
            accelerator.backward(nn.functional.cross_entropy(model(x), y))
            opt.step()
        if phase == "full" and epoch + 1 == CHECKPOINT_EPOCH:
            accelerator.save_state(checkpoint)
    save_result(out, phase, accelerator.process_index, accelerator.unwrap_model(model), state)
    # end_training destroys the process group at once: a rank that got there first while its
    # peer was still in a collective aborted the peer ("terminate called without an active
    # exception"), one run in two under load. Accelerate's idiom: wait for everyone first.
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    torch.set_num_threads(1)
    face, out, phase = sys.argv[1:4]
    {"lightning": lightning, "accelerate": accelerate, "readme": readme, "dense": dense}[face](out, phase)
