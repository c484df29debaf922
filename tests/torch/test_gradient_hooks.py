"""Gradient hooks without DDP: compress on one model, apply on another."""

import pytest
import torch
from torch import nn

import iotcompress as ic
from iotcompress.torch import apply_messages, register_gradient_hooks


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3))


def backward(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 10, generator=g), torch.randint(0, 3, (16,), generator=g)
    nn.functional.cross_entropy(model(x), y).backward()


def test_dense_messages_reproduce_the_gradients_exactly():
    device, server = make_model(), make_model()
    outbox = []
    hooks = register_gradient_hooks(device, lambda name, msg: outbox.append((name, msg)))
    backward(device)
    assert sorted(n for n, _ in outbox) == sorted(n for n, _ in device.named_parameters())
    apply_messages(server, outbox)
    for (name, p), q in zip(device.named_parameters(), server.parameters()):
        assert torch.equal(p.grad, q.grad), name
    hooks.remove()
    outbox.clear()
    backward(device, seed=1)
    assert outbox == [], "remove() stops the hooks"


def test_sparse_messages_average_across_devices_and_keep_residuals():
    devices = [make_model() for _ in range(3)]
    outboxes = [[] for _ in devices]
    hooks = [register_gradient_hooks(d, lambda n, m, box=box: box.append((n, m)), density=0.1, quant="int8")
             for d, box in zip(devices, outboxes)]
    for i, d in enumerate(devices):
        backward(d, seed=i)
    server = make_model()
    apply_messages(server, [m for box in outboxes for m in box], scale=1 / 3)
    for name, p in server.named_parameters():
        want = torch.zeros(p.numel())
        for h, box in zip(hooks, outboxes):
            msg = dict(box)[name]
            assert ic.inspect(msg)["nnz"] == max(1, -(-p.numel() // 10))
            want += torch.from_numpy(ic.decode(msg)) / 3
        torch.testing.assert_close(p.grad.reshape(-1), want)
    # Error feedback: what was not sent is in the residual, exactly.
    d, h = devices[0], hooks[0]
    for name, p in d.named_parameters():
        sent = torch.from_numpy(ic.decode(dict(outboxes[0])[name]))
        residual = torch.from_numpy(h.compressors[name].residual)
        torch.testing.assert_close(sent + residual, p.grad.reshape(-1), rtol=0, atol=1e-6)


def test_apply_messages_errors_and_dtypes():
    model = make_model()
    outbox = []
    register_gradient_hooks(model, lambda n, m: outbox.append((n, m)))
    backward(model)
    half = make_model().to(torch.bfloat16)
    apply_messages(half, outbox)
    for p, q in zip(model.parameters(), half.parameters()):
        torch.testing.assert_close(q.grad.float(), p.grad, rtol=1e-2, atol=1e-3)
    with pytest.raises(KeyError, match="no parameter named"):
        apply_messages(model, {"nope": outbox[0][1]})
    before = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(ic.DecodeError):
        apply_messages(model, {outbox[0][0]: outbox[0][1][:-1]})
    assert all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters()))


def test_gradient_hook_state_round_trips():
    model = make_model()
    hooks = register_gradient_hooks(model, lambda n, m: None, density=0.2, momentum=0.9)
    backward(model)
    saved = hooks.state_dict()
    other = register_gradient_hooks(make_model(), lambda n, m: None, density=0.2, momentum=0.9)
    other.load_state_dict(saved)
    for name, c in hooks.compressors.items():
        assert (other.compressors[name].residual == c.residual).all()


def test_skip_accumulates_without_sending_and_average_counts_the_senders():
    devices = [make_model() for _ in range(3)]
    outbox = []
    hooks = [register_gradient_hooks(d, lambda n, m: outbox.append((n, m)), density=0.1) for d in devices]
    backward(devices[0], seed=0)
    with hooks[1].skip():
        assert not hooks[1].participating
        backward(devices[1], seed=1)
    assert hooks[1].participating
    backward(devices[2], seed=2)
    names = [n for n, _ in devices[0].named_parameters()]
    assert len(outbox) == 2 * len(names), "the skipping device sent nothing"
    for name, p in devices[1].named_parameters():
        # Nothing sent, nothing lost: the residual is the whole gradient.
        assert torch.equal(torch.from_numpy(hooks[1].compressors[name].residual), p.grad.reshape(-1))
    server, by_hand = make_model(), make_model()
    apply_messages(server, outbox, average=True)
    apply_messages(by_hand, outbox, scale=1 / 2)
    for p, q in zip(server.parameters(), by_hand.parameters()):
        assert torch.equal(p.grad, q.grad)
