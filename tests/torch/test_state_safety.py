"""All or nothing in the torch faces without a process group: checkpoints that
``torch.load(weights_only=True)`` accepts, ``load_state_dict`` that checks before it assigns,
gradient hooks and ``apply_messages`` that leave everything as it was when they raise."""

import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import iotcompress as ic
from iotcompress.torch import CompressionState, apply_messages, register_gradient_hooks
from iotcompress.torch._frames import FAILED, HEADER_LEN, MESSAGE, SAT_OUT, decode_header, encode_header

PROPERTY = settings(max_examples=40, deadline=None, derandomize=True)


def make_model(empty=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3))
    if empty:
        model.register_parameter("empty", nn.Parameter(torch.zeros(0)))
    return model


def backward(model, seed=0, nan=False):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 10, generator=g), torch.randint(0, 3, (16,), generator=g)
    loss = nn.functional.cross_entropy(model(x), y)
    (loss * float("nan") if nan else loss).backward()


def stepped_state(steps=2, **options):
    """A CompressionState whose compressors have run ``steps`` compresses (the hook's own
    per-parameter path, without a process group)."""
    state = CompressionState(density=0.2, quant="int8", momentum=0.9, **options)
    params = list(make_model().parameters())
    rng = np.random.default_rng(0)
    for _ in range(steps):
        for i, p in enumerate(params):
            state._compressor(p, 0, i).compress(rng.standard_normal(p.numel()).astype(np.float32))
    return state, params


def snapshot(compressors):
    return {k: (c.residual, c.velocity, c.step) for k, c in compressors.items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k][0], b[k][0], err_msg=k)
        np.testing.assert_array_equal(a[k][1], b[k][1], err_msg=k)
        assert a[k][2] == b[k][2], k


def as_numpy(obj):
    """A checkpoint in the numpy form of format 2."""
    if isinstance(obj, torch.Tensor):
        return obj.numpy()
    if isinstance(obj, dict):
        return {k: as_numpy(v) for k, v in obj.items()}
    return obj


def test_checkpoints_load_with_weights_only(tmp_path):
    state, _ = stepped_state()
    model = make_model()
    hooks = register_gradient_hooks(model, lambda n, m: None, density=0.2, momentum=0.9)
    backward(model)
    torch.save({"hook": state.state_dict(), "hooks": hooks.state_dict()}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt")  # weights_only=True, torch's default
    fresh = CompressionState(density=0.2, quant="int8", momentum=0.9)
    fresh.load_state_dict(ckpt["hook"])
    assert_same(snapshot(fresh._compressors), snapshot(state._compressors))
    other = register_gradient_hooks(make_model(), lambda n, m: None, density=0.2, momentum=0.9)
    other.load_state_dict(ckpt["hooks"])
    assert_same(snapshot(other.compressors), snapshot(hooks.compressors))
    # The numpy form of older checkpoints still loads.
    again = CompressionState(density=0.2, quant="int8", momentum=0.9)
    again.load_state_dict(as_numpy(state.state_dict()))
    assert_same(snapshot(again._compressors), snapshot(state._compressors))


@pytest.mark.parametrize("corrupt, match", [
    (lambda s: s["compressors"]["0.3"].update(residual=torch.zeros(2)), r"compressors\['0.3'\].*shape"),
    (lambda s: s["compressors"]["0.3"].update(numel="3"), r"compressors\['0.3'\]"),
    (lambda s: s["compressors"].update({"0.3": 7}), r"compressors\['0.3'\]"),
    (lambda s: s.update(iteration=-1), "iteration"),
    (lambda s: s.update(participating="yes"), "participating"),
    (lambda s: s.update(inflight={"exchanges": [], "local": {0: {"0.0": (3, torch.zeros(200))}}, "unlaunched": []}),
     "inflight.*out of range"),
])
def test_load_state_dict_checks_every_entry_before_assigning(corrupt, match):
    state, _ = stepped_state(steps=1)
    saved = state.state_dict()
    state, _ = stepped_state(steps=3)  # now different from the checkpoint
    before = snapshot(state._compressors)
    corrupt(saved)
    with pytest.raises((ValueError, TypeError), match=match):
        state.load_state_dict(saved)
    assert_same(snapshot(state._compressors), before)
    assert state.iteration == 0 and state.participating


def test_pickled_budgeted_state_runs_its_first_step():
    model = make_model()
    state = CompressionState(network=ic.NetworkProfile.preset("lte"), budget_ms=60, model=model, quant="int8")
    for saved_after_a_step in (False, True):
        if saved_after_a_step:
            for i, p in enumerate(model.parameters()):
                state._compressor(p, 0, i).compress(torch.ones(p.numel()))
        restored = pickle.loads(pickle.dumps(state))
        for i, p in enumerate(model.parameters()):
            comp = restored._compressor(p, 0, i)  # raised "not in the model given to set_budget"
            assert comp.options["target_bytes"] == state._compressor(p, 0, i).options["target_bytes"] > 0
            comp.compress(torch.ones(p.numel()))


def test_pickle_keeps_participating_and_on_nonfinite():
    state = CompressionState(density=0.1, on_nonfinite="skip")
    state.participating = False
    restored = pickle.loads(pickle.dumps(state))
    assert restored.participating is False and restored.on_nonfinite == "skip"
    with pytest.raises(ValueError, match="on_nonfinite"):
        CompressionState(on_nonfinite="ignore")


def test_zero_element_parameter_has_no_compressor_and_sends_nothing():
    model, outbox = make_model(empty=True), []
    hooks = register_gradient_hooks(model, lambda n, m: outbox.append((n, m)), density=0.5)
    backward(model)
    assert "empty" not in hooks.compressors and sorted(n for n, _ in outbox) == sorted(hooks.compressors)
    server = make_model(empty=True)
    apply_messages(server, outbox)
    assert server.empty.grad is None


@PROPERTY
@given(seed=st.integers(0, 2**16), victim=st.integers(0, 3), cut=st.integers(1, 40), flip=st.booleans())
def test_apply_messages_applies_nothing_when_one_message_is_bad(seed, victim, cut, flip):
    model, outbox = make_model(), []
    register_gradient_hooks(model, lambda n, m: outbox.append((n, m)), density=0.3, quant="int8")
    backward(model, seed)
    messages = outbox + outbox  # two devices' worth
    name, msg = messages[-1 - victim]
    bad = bytearray(msg)
    if flip:
        bad[min(cut, len(bad) - 1)] ^= 0x5A
    else:
        bad = bad[: max(len(bad) - cut, 0)]
    messages[-1 - victim] = (name, bytes(bad))
    server = make_model()
    backward(server, seed + 1)
    before = {n: p.grad.clone() for n, p in server.named_parameters()}
    with pytest.raises(ic.DecodeError, match=name):
        apply_messages(server, messages, average=True)
    for n, p in server.named_parameters():
        assert torch.equal(p.grad, before[n]), n


@PROPERTY
@given(seed=st.integers(0, 2**16), failing=st.integers(0, 3), nan=st.booleans())
def test_gradient_hooks_keep_state_after_an_injected_error(seed, failing, nan):
    model = make_model()
    names = [n for n, _ in model.named_parameters()]
    sent, link = [], {"down": False}

    def send(name, msg):
        if link["down"] and name == names[failing]:
            raise ConnectionError("link down")
        sent.append(name)

    hooks = register_gradient_hooks(model, send, density=0.3, quant="int8", momentum=0.9)
    backward(model, seed)  # a first step so the state is not all zeros
    model.zero_grad()
    before = snapshot(hooks.compressors)
    sent.clear()
    link["down"] = not nan
    with pytest.raises(ic.CompressError if nan else ConnectionError):
        backward(model, seed + 1, nan=nan)
    after = snapshot(hooks.compressors)
    # The parameter whose hook failed is exactly as before; the others sent their messages.
    for name in names:
        if name not in sent:
            assert_same({name: after[name]}, {name: before[name]})


def test_bucket_headers_round_trip_and_reject_garbage():
    for kind, length, reason in ((MESSAGE, 10, ""), (SAT_OUT, 0, ""), (FAILED, 0, "CompressError: é" * 30)):
        h = decode_header(encode_header(kind, length, reason), 0, 100)
        assert (h.kind, h.length) == (kind, length) and reason.startswith(h.reason) and len(h.reason.encode()) <= 119
    good = encode_header(MESSAGE, 10)
    for bad in (good[:-1], bytes([9]) + good[1:], encode_header(MESSAGE, 101), encode_header(SAT_OUT, 3),
                good[:-1] + b"x", encode_header(MESSAGE, 10, "text on a message")):
        with pytest.raises(ic.DecodeError, match="rank 3"):
            decode_header(bad, 3, 100)
    assert len(good) == HEADER_LEN
