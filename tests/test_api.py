"""The Python face: argument checking (with messages that say what to do), torch tensors,
decode/decode_add/inspect, state_dict round trips, errors that leave the state unchanged,
and the GIL released during the work."""

from __future__ import annotations

import pickle
import struct
import sys
import threading
import tracemalloc

import numpy as np
import pytest

import iotcompress as ic
from wire_spec import crc32c

torch = pytest.importorskip("torch")
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402


def randn(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


def message(n: int = 100, seed: int = 0, **opts) -> bytes:
    return ic.Compressor(n, **opts).compress(randn(n, seed))


def checksummed(body: bytes) -> bytes:
    return body + struct.pack("<I", crc32c(body))


# ------------------------------------------------------------------ the package


def test_public_names_and_error_hierarchy():
    for name in ic.__all__:
        assert hasattr(ic, name), name
    assert issubclass(ic.DecodeError, ic.IotCompressError) and issubclass(ic.DecodeError, ValueError)
    assert issubclass(ic.CompressError, ic.IotCompressError) and issubclass(ic.CompressError, ValueError)
    assert not issubclass(ic.DecodeError, ic.CompressError)
    assert ic.QUANTS == ("f32", "f16", "bf16", "int8", "int4", "sign", "ternary", "qsgd")
    assert ic.WIRE_VERSION == 1 and ic.DEFAULT_MAX_NUMEL == 1 << 28


def test_compressor_properties():
    c = ic.Compressor(10, density=0.5, quant="int8", momentum=0.5, seed=3)
    assert c.numel == 10 and c.step == 0 and c.last_nnz == 0 and c.threshold is None
    assert c.options["density"] == 0.5 and c.options["quant"] == "int8" and c.options["seed"] == 3
    c.options["density"] = 0.9  # a copy
    assert c.options["density"] == 0.5
    for arr in (c.residual, c.velocity):
        assert arr.dtype == np.float32 and arr.shape == (10,) and not arr.any()
    c.residual[:] = 5  # a copy, too
    assert not c.residual.any()
    assert "density=0.5" in repr(c) and "int8" in repr(c)
    msg = c.compress(np.arange(10, dtype=np.float32))
    assert c.step == 1 and c.last_nnz == 5 and len(msg) <= c.max_message_len
    assert ic.Compressor(10, threshold=0.25).threshold == 0.25


# ------------------------------------------------------------ gradient arguments


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32, np.uint8, np.complex64])
def test_wrong_dtype_is_a_type_error_that_says_how_to_convert(dtype):
    c = ic.Compressor(8)
    with pytest.raises(TypeError, match=r"float32.*astype\(np\.float32\)"):
        c.compress(np.zeros(8, dtype=dtype))


@pytest.mark.parametrize("grad", [[0.0] * 8, (0.0,) * 8, 3.0, None, b"\0" * 32])
def test_non_array_gradient_is_a_type_error(grad):
    with pytest.raises(TypeError, match=r"np\.asarray"):
        ic.Compressor(8).compress(grad)


def test_two_dimensional_gradient_says_flatten():
    with pytest.raises(ValueError, match=r"1-D.*reshape\(-1\)"):
        ic.Compressor(8).compress(np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match=r"1-D"):
        ic.Compressor(1).compress(np.array(1.0, np.float32))


def test_non_contiguous_gradient_says_ascontiguousarray():
    g = np.zeros(16, np.float32)[::2]
    with pytest.raises(ValueError, match=r"contiguous.*np\.ascontiguousarray"):
        ic.Compressor(8).compress(g)
    ic.Compressor(8).compress(np.ascontiguousarray(g))  # what the message says works


def test_wrong_length_gradient_names_both_lengths():
    with pytest.raises(ValueError, match=r"7 elements, expected 8"):
        ic.Compressor(8).compress(np.zeros(7, np.float32))


def test_unaligned_gradient_is_a_value_error():
    buf = bytearray(4 * 8 + 1)
    g = np.frombuffer(buf, dtype=np.float32, offset=1, count=8)
    assert g.flags.c_contiguous and not g.flags.aligned
    c = ic.Compressor(8)
    with pytest.raises(ValueError):
        c.compress(g)
    assert c.step == 0


def test_unaligned_gradient_message_says_what_to_do():
    g = np.frombuffer(bytearray(4 * 8 + 1), dtype=np.float32, offset=1, count=8)
    with pytest.raises(ValueError, match=r"align"):
        ic.Compressor(8).compress(g)


def test_read_only_gradient_is_accepted():
    g = np.frombuffer(randn(50).tobytes(), np.float32)
    assert not g.flags.writeable
    assert ic.Compressor(50).compress(g) == ic.Compressor(50).compress(g.copy())


# ------------------------------------------------------------ constructor options


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(numel=0), r"numel must be in 1\.\.2\*\*32-1"),
        (dict(numel=2**32), r"numel must be in"),
        (dict(density=0.0), r"density must be in \(0, 1\].*density=0\.001"),
        (dict(density=1.5), r"density must be in \(0, 1\]"),
        (dict(density=-0.1), r"density must be in \(0, 1\]"),
        (dict(density=float("nan")), r"density must be in \(0, 1\]"),
        (dict(density=0.1, threshold=1.0), r"at most one of density, threshold, target_bytes and network"),
        (dict(threshold=1.0, target_bytes=100), r"at most one"),
        (dict(threshold=-1.0), r"threshold must be finite and >= 0"),
        (dict(threshold=float("inf")), r"threshold must be finite"),
        (dict(threshold=float("nan")), r"threshold must be finite"),
        (dict(target_bytes=0), r"target_bytes must be a positive int"),
        (dict(target_bytes=2**32), r"target_bytes must be a positive int"),
        (dict(target_bytes=100.0), r"target_bytes must be a positive int"),
        (dict(adaptive=True), r"adaptive=True needs density="),
        (dict(exact=True), r"exact=True applies to top-k; also set density="),
        (dict(density=0.1, exact=True, adaptive=True), r"exclude each other"),
        (dict(quant="int3"), r"unknown quant 'int3'; choose one of f32, f16, bf16, int8, int4, sign, ternary, qsgd"),
        (dict(quant="F32"), r"unknown quant"),
        (dict(quant="qsgd:0"), r"qsgd levels must be 1\.\.255.*qsgd:15"),
        (dict(quant="qsgd:256"), r"qsgd levels must be 1\.\.255"),
        (dict(quant="qsgd:x"), r"qsgd levels must be 1\.\.255"),
        (dict(quant="qsgd:"), r"qsgd levels must be 1\.\.255"),
        (dict(momentum=1.0), r"momentum must be in \[0, 1\)"),
        (dict(momentum=-0.1), r"momentum must be in \[0, 1\)"),
        (dict(momentum=True), r"momentum must be in"),
        (dict(nesterov=True), r"nesterov=True needs momentum > 0, e\.g\. momentum=0\.9"),
        (dict(seed=-1), r"seed must be an int in \[0, 2\*\*64\)"),
        (dict(seed=2**64), r"seed must be an int"),
        (dict(seed=1.0), r"seed must be an int"),
    ],
)
def test_bad_options_are_value_errors_that_say_what_to_do(kwargs, match):
    kwargs = dict(kwargs)
    numel = kwargs.pop("numel", 10)
    with pytest.raises(ValueError, match=match):
        ic.Compressor(numel, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [dict(numel=10.0), dict(numel=True), dict(numel="10"), dict(density="0.1"), dict(density=True), dict(threshold="1"), dict(quant=8)],
)
def test_options_of_the_wrong_type_are_type_errors(kwargs):
    kwargs = dict(kwargs)
    numel = kwargs.pop("numel", 10)
    with pytest.raises(TypeError):
        ic.Compressor(numel, **kwargs)


def test_option_edges_are_accepted():
    for kwargs in (
        dict(density=1.0),
        dict(density=1e-9),
        dict(threshold=0.0),
        dict(target_bytes=1),
        dict(quant="qsgd:1"),
        dict(quant="qsgd:255"),
        dict(momentum=0.0),
        dict(momentum=0.999, nesterov=True),
        dict(seed=2**64 - 1),
        dict(seed=np.uint64(5)),
        dict(density=0.5, adaptive=True),
        dict(density=0.5, exact=True),
    ):
        c = ic.Compressor(np.int64(10), **kwargs)
        assert ic.decode(c.compress(randn(10))).shape == (10,)


# ----------------------------------------------------------------- torch tensors


class _RecordOps(TorchDispatchMode):
    """Records every aten op run on tensors while active."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _copies(ops):
    return [o for o in ops if any(w in o for w in ("clone", "copy", "contiguous", "empty", "to_copy", "_to", "new_"))]


def test_recorder_sees_tensor_copies():
    """Guards the no-copy test: the recorder does see a copy."""
    t = torch.ones(4)
    with _RecordOps() as rec:
        t.detach().clone()
    assert _copies(rec.ops)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_cpu_tensor_is_compressed_without_a_copy(requires_grad):
    n = 1 << 21
    base = randn(n)
    t = torch.from_numpy(base.copy()).requires_grad_(requires_grad)
    want = ic.Compressor(n, density=0.001, quant="int8").compress(base)
    c = ic.Compressor(n, density=0.001, quant="int8")
    tracemalloc.start()
    try:
        with _RecordOps() as rec:
            got = c.compress(t)
        _, peak = tracemalloc.get_traced_memory()
        # Control: a numpy copy of the gradient does show up in the traced peak.
        tracemalloc.reset_peak()
        base.copy()
        _, peak_of_copy = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == want
    assert not _copies(rec.ops), rec.ops
    assert peak < n * 4 // 4 <= peak_of_copy
    assert t.requires_grad == requires_grad  # the caller's tensor is not detached in place


def test_parameter_grad_and_views_of_tensors():
    p = torch.nn.Parameter(torch.from_numpy(randn(64)))
    assert ic.Compressor(64).compress(p) == ic.Compressor(64).compress(p.detach().numpy())
    w = torch.from_numpy(randn(64)).reshape(8, 8)
    assert ic.Compressor(64).compress(w.reshape(-1)) == ic.Compressor(64).compress(randn(64))
    with pytest.raises(ValueError, match=r"1-D"):
        ic.Compressor(64).compress(w)
    with pytest.raises(ValueError, match=r"contiguous"):
        ic.Compressor(32).compress(torch.from_numpy(randn(64))[::2])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16, torch.int32])
def test_non_float32_tensor_is_a_type_error_that_says_float(dtype):
    with pytest.raises(TypeError, match=r"float32.*tensor\.float\(\)"):
        ic.Compressor(8).compress(torch.zeros(8, dtype=dtype))


def test_tensor_off_the_cpu_says_cpu():
    t = torch.empty(8, device="meta")
    with pytest.raises(ValueError, match=r"meta.*tensor\.cpu\(\)"):
        ic.Compressor(8).compress(t)


def test_decode_add_into_a_tensor_works_in_place():
    msg = message(50)
    t = torch.zeros(50)
    before = t.data_ptr()
    ic.decode_add(msg, t)
    assert t.data_ptr() == before
    np.testing.assert_array_equal(t.numpy(), ic.decode(msg))
    with pytest.raises(TypeError, match=r"tensor\.float\(\)"):
        ic.decode_add(msg, torch.zeros(50, dtype=torch.float64))


# ------------------------------------------------------------------- decoding


def test_decode_returns_a_new_float32_array():
    g = randn(100)
    msg = ic.Compressor(100).compress(g)
    a, b = ic.decode(msg), ic.decode(msg, numel=100)
    np.testing.assert_array_equal(a, g)
    np.testing.assert_array_equal(b, g)
    assert a.dtype == np.float32 and a.flags.c_contiguous and a.flags.writeable
    assert not np.shares_memory(a, b)


@pytest.mark.parametrize("numel", [99, 101, 0, 1])
def test_decode_numel_mismatch_is_a_decode_error(numel):
    with pytest.raises(ic.DecodeError):
        ic.decode(message(100), numel=numel)
    with pytest.raises(ValueError):  # DecodeError is a ValueError
        ic.decode(message(100), numel=numel)


@pytest.mark.parametrize("numel", [-1, 1.5, True, "100"])
def test_decode_rejects_a_bad_numel_argument(numel):
    with pytest.raises(ValueError, match=r"non-negative int"):
        ic.decode(message(100), numel=numel)


def test_max_numel_limits_what_decode_allocates():
    msg = message(100)
    np.testing.assert_array_equal(ic.decode(msg, max_numel=100), ic.decode(msg))
    with pytest.raises(ic.DecodeError, match=r"exceeds"):
        ic.decode(msg, max_numel=99)
    with pytest.raises(ic.DecodeError):
        ic.decode(msg, max_numel=0)


@pytest.mark.parametrize("numel", [ic.DEFAULT_MAX_NUMEL + 1, 2**32 - 1])
def test_huge_announced_numel_is_refused_before_allocating(numel):
    # An f32 message with Rice index and no entries: valid, but it announces `numel`
    # elements (2**32 - 1 float32 would be 16 GiB).
    varint = bytearray()
    x = numel
    while True:
        varint.append((x & 0x7F) | (0x80 if x >> 7 else 0))
        x >>= 7
        if not x:
            break
    msg = checksummed(b"IC\x01\x20" + bytes(varint) + b"\x00" + b"\x00")
    info = ic.inspect(msg)
    assert info["numel"] == numel and info["nnz"] == 0
    with pytest.raises(ic.DecodeError):
        ic.decode(msg)
    with pytest.raises(ic.DecodeError):
        ic.decode(msg, max_numel=1000)
    with pytest.raises(ic.DecodeError):
        ic.decode_add(msg, np.zeros(10, np.float32))


def test_decode_add_adds_scaled_message():
    g = randn(200, 1)
    msg = ic.Compressor(200, density=0.1, exact=True).compress(g)
    dense = ic.decode(msg)
    assert np.count_nonzero(dense) == 20
    base = randn(200, 2)
    for scale in (1.0, 0.5, -2.0, 0.0, 1 / 3):
        out = base.copy()
        ic.decode_add(msg, out, scale=scale)
        np.testing.assert_allclose(out, base + np.float32(scale) * dense, rtol=1e-6, atol=0)
    out = base.copy()
    ic.decode_add(msg, out)
    np.testing.assert_array_equal(out, base + dense)  # the default scale is 1
    untouched = dense == 0
    np.testing.assert_array_equal(out[untouched], base[untouched])


def test_decode_add_sums_messages_of_several_workers():
    n, workers = 1000, 4
    grads = [randn(n, s) for s in range(workers)]
    msgs = [ic.Compressor(n, quant="f32").compress(g) for g in grads]
    total = np.zeros(n, np.float32)
    for m in msgs:
        ic.decode_add(m, total, scale=1 / workers)
    np.testing.assert_allclose(total, np.mean(grads, axis=0), rtol=1e-5, atol=1e-6)


def test_decode_add_checks_out():
    msg = message(50)
    with pytest.raises(ic.DecodeError):
        ic.decode_add(msg, np.zeros(49, np.float32))
    with pytest.raises(TypeError, match=r"astype\(np\.float32\)"):
        ic.decode_add(msg, np.zeros(50, np.float64))
    with pytest.raises(ValueError, match=r"1-D"):
        ic.decode_add(msg, np.zeros((5, 10), np.float32))
    with pytest.raises(ValueError, match=r"contiguous"):
        ic.decode_add(msg, np.zeros(100, np.float32)[::2])
    ro = np.zeros(50, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match=r"read-only"):
        ic.decode_add(msg, ro)
    assert not ro.any()


def _corruptions(msg: bytes):
    """Named corruptions of a valid message, including ones only visible at its very end
    (CRC, last value, padding), which a streaming decoder would notice too late."""
    yield "crc byte", msg[:-1] + bytes([msg[-1] ^ 0x01])
    yield "last value bit", msg[:-5] + bytes([msg[-5] ^ 0x80]) + msg[-4:]
    yield "truncated", msg[:-1]
    yield "trailing byte", msg + b"\x00"
    yield "middle byte", msg[: len(msg) // 2] + bytes([msg[len(msg) // 2] ^ 0xFF]) + msg[len(msg) // 2 + 1 :]


@pytest.mark.parametrize("quant", ["f32", "int8", "int4", "ternary", "qsgd"])
def test_decode_add_is_all_or_nothing(quant):
    msg = message(300, quant=quant)
    base = randn(300, 5)
    for name, bad in _corruptions(msg):
        out = base.copy()
        with pytest.raises(ic.DecodeError):
            ic.decode_add(bad, out)
        np.testing.assert_array_equal(out, base, err_msg=name)


def test_decode_add_is_all_or_nothing_on_late_structural_errors():
    """Messages with a correct CRC whose last entry is invalid: nothing may be added."""
    base = randn(8, 9)
    # f32, dense: 1.0, 2.0, 3.0, then NaN in the last value.
    nan_last = checksummed(b"IC\x01\x00\x04\x04" + np.array([1, 2, 3, np.nan], "<f4").tobytes())
    # int4, dense, 3 entries: codes 1, 2, 3, and a non-zero padding nibble.
    pad = checksummed(b"IC\x01\x04\x03\x03" + struct.pack("<f", 1.0) + bytes([0x21, 0x53]))
    good_pad = checksummed(b"IC\x01\x04\x03\x03" + struct.pack("<f", 1.0) + bytes([0x21, 0x03]))
    np.testing.assert_array_equal(ic.decode(good_pad), [1, 2, 3])
    # ternary, dense, 6 entries: a full byte, then a last byte with a non-zero unused digit.
    trit = checksummed(b"IC\x01\x06\x06\x06" + struct.pack("<f", 1.0) + b"\0\0\0\0" + bytes([242, 1 + 3 * 2]))
    for bad, n, reason in ((nan_last, 4, r"not finite"), (pad, 3, r"padding"), (trit, 6, r"padding")):
        out = base[:n].copy()
        with pytest.raises(ic.DecodeError, match=reason):
            ic.decode_add(bad, out)
        np.testing.assert_array_equal(out, base[:n])
        with pytest.raises(ic.DecodeError):
            ic.decode(bad)


@pytest.mark.parametrize(
    "wrap",
    [bytes, bytearray, memoryview, lambda m: np.frombuffer(m, np.uint8), lambda m: torch.frombuffer(bytearray(m), dtype=torch.uint8)],
    ids=["bytes", "bytearray", "memoryview", "numpy-uint8", "torch-uint8"],
)
def test_messages_in_any_byte_container(wrap):
    msg = message(64, quant="int8", density=0.25)
    wrapped = wrap(msg)
    np.testing.assert_array_equal(ic.decode(wrapped), ic.decode(msg))
    assert ic.inspect(wrapped) == ic.inspect(msg)
    out = np.zeros(64, np.float32)
    ic.decode_add(wrapped, out)
    np.testing.assert_array_equal(out, ic.decode(msg))


@pytest.mark.parametrize("bad", [np.zeros(10, np.int8), np.zeros(10, np.float32), "IC\x01", 12, None, [73, 67, 1]])
def test_other_message_types_are_type_errors(bad):
    for fn in (ic.decode, ic.inspect):
        with pytest.raises(TypeError, match=r"bytes|uint8"):
            fn(bad)


def test_garbage_is_a_decode_error_with_a_reason():
    for bad, reason in ((b"", r"truncated"), (b"XY\x01\x00\x00\x00\x00\x00\x00\x00", r"magic"), (b"IC\x02" + b"\0" * 7, r"version")):
        with pytest.raises(ic.DecodeError, match=reason):
            ic.decode(bad)
    with pytest.raises(ic.DecodeError, match=r"checksum"):
        m = message(10)
        ic.decode(m[:-1] + bytes([m[-1] ^ 1]))


def test_inspect_reports_the_header_and_sizes():
    g = randn(1000)
    msg = ic.Compressor(1000, density=0.01, exact=True, quant="qsgd:4", seed=9).compress(g)
    info = ic.inspect(msg)
    assert set(info) == {
        "version", "numel", "nnz", "quant", "levels", "index", "rice_k", "scale",
        "stream", "header_bytes", "index_bytes", "value_bytes", "nbytes",
    }  # fmt: skip
    assert info["version"] == ic.WIRE_VERSION
    assert info["numel"] == 1000 and info["nnz"] == 10 and info["quant"] == "qsgd" and info["levels"] == 4
    assert info["index"] == "rice" and 0 <= info["rice_k"] <= 31
    assert info["nbytes"] == len(msg) == info["header_bytes"] + info["index_bytes"] + info["value_bytes"] + 4
    assert info["value_bytes"] == (10 * (1 + 3) + 7) // 8
    top = np.sort(np.abs(g))[-10:]
    assert np.float32(info["scale"]) == top.max()
    dense_info = ic.inspect(message(16, quant="f16"))
    assert dense_info["index"] == "dense" and dense_info["rice_k"] is None and dense_info["scale"] == 0.0
    assert dense_info["value_bytes"] == 32 and dense_info["levels"] == 0


# ---------------------------------------------------------------- state_dict


CONFIGS = [
    dict(),
    dict(density=0.01, quant="int8", momentum=0.9),
    dict(density=0.05, exact=True, quant="qsgd", momentum=0.9, nesterov=True, seed=7),
    dict(density=0.02, adaptive=True, quant="ternary", seed=3),
    dict(target_bytes=300, quant="sign"),
    dict(threshold=1.5, quant="bf16", momentum=0.5),
]
N = 5000


def _grads(count, start=0):
    return [randn(N, 1000 + start + i) for i in range(count)]


@pytest.mark.parametrize("opts", CONFIGS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "dense")
def test_state_dict_round_trip_gives_bit_identical_messages(opts, tmp_path):
    c = ic.Compressor(N, **opts)
    for g in _grads(3):
        c.compress(g)
    state = c.state_dict()
    pickled = pickle.dumps(c)
    torch.save(state, tmp_path / "state.pt")
    # The tensors as torch tensors load with weights_only=True, too.
    as_tensors = {**state, "residual": torch.from_numpy(state["residual"]), "velocity": torch.from_numpy(state["velocity"])}
    torch.save(as_tensors, tmp_path / "tensors.pt")
    residual_at_save = state["residual"].copy()

    later = _grads(4, start=3)
    want = [c.compress(g) for g in later]
    # The snapshot does not follow the compressor.
    np.testing.assert_array_equal(state["residual"], residual_at_save)
    assert state["step"] == 3

    restored = []
    for load in (
        lambda: state,
        lambda: pickle.loads(pickle.dumps(state)),
        lambda: torch.load(tmp_path / "state.pt", weights_only=False),
        lambda: torch.load(tmp_path / "tensors.pt", weights_only=True),
    ):
        c2 = ic.Compressor(N, **opts)
        c2.load_state_dict(load())
        restored.append(c2)
    restored.append(pickle.loads(pickled))
    for c2 in restored:
        assert c2.step == 3
        assert [c2.compress(g) for g in later] == want
        np.testing.assert_array_equal(c2.residual, c.residual)
        np.testing.assert_array_equal(c2.velocity, c.velocity)
        assert c2.threshold == c.threshold and c2.step == c.step == 7


def test_state_dict_contents():
    c = ic.Compressor(100, density=0.1, momentum=0.9, quant="int4", seed=5)
    c.compress(randn(100))
    s = c.state_dict()
    assert s["format"] == 1 and s["numel"] == 100 and s["step"] == 1
    assert s["options"] == c.options
    np.testing.assert_array_equal(s["residual"], c.residual)
    np.testing.assert_array_equal(s["velocity"], c.velocity)
    s["residual"][:] = 123.0  # mutating the dict leaves the compressor alone
    assert not (c.residual == 123.0).any()


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda s: s.update(numel=99), r"numel=99"),
        (lambda s: s.update(format=2), r"format"),
        (lambda s: s["options"].update(quant="int4"), r"options"),
        (lambda s: s["options"].update(seed=1), r"options"),
        (lambda s: s["options"].update(momentum=0.5), r"options"),
        (lambda s: s.update(residual=np.zeros(99, np.float32)), r"residual.*shape"),
        (lambda s: s.update(velocity=np.zeros((10, 10), np.float32)), r"velocity.*shape"),
    ],
)
def test_load_state_dict_rejects_mismatches_and_keeps_the_state(change, match):
    opts = dict(density=0.1, quant="int8", momentum=0.9)
    c, twin = ic.Compressor(100, **opts), ic.Compressor(100, **opts)
    for i in range(2):
        assert c.compress(randn(100, i)) == twin.compress(randn(100, i))
    donor = ic.Compressor(100, **opts)
    donor.compress(randn(100, 42))
    state = donor.state_dict()
    change(state)
    with pytest.raises(ValueError, match=match):
        c.load_state_dict(state)
    assert c.step == twin.step == 2
    assert c.compress(randn(100, 7)) == twin.compress(randn(100, 7))


def test_load_state_dict_adopts_the_states_selection():
    """The selection may change during training (set_selection, e.g. DGC warm-up): a state
    carries it, and restoring continues exactly where the donor was."""
    donor = ic.Compressor(200, density=0.25, quant="int8", momentum=0.9)
    donor.compress(randn(200, 1))
    donor.set_selection(density=0.01)
    donor.compress(randn(200, 2))
    c = ic.Compressor(200, density=0.25, quant="int8", momentum=0.9)
    c.load_state_dict(donor.state_dict())
    assert c.options == donor.options and c.options["density"] == 0.01
    for i in range(3):
        assert c.compress(randn(200, 10 + i)) == donor.compress(randn(200, 10 + i))
    assert c.last_nnz == 2


def test_set_selection_validates_and_keeps_the_state():
    c = ic.Compressor(100, density=0.5)
    c.compress(randn(100, 0))
    residual = c.residual
    with pytest.raises(ValueError, match="at most one"):
        c.set_selection(density=0.1, threshold=1.0)
    c.set_selection(threshold=10.0)
    np.testing.assert_array_equal(c.residual, residual)
    c.compress(np.zeros(100, np.float32))
    assert c.last_nnz == 0


def test_load_state_dict_from_another_numel_compressor():
    with pytest.raises(ValueError, match=r"numel"):
        ic.Compressor(10).load_state_dict(ic.Compressor(11).state_dict())
    with pytest.raises(ValueError, match=r"options"):
        ic.Compressor(10).load_state_dict(ic.Compressor(10, quant="f16").state_dict())


# ------------------------------------------------------------ non-finite gradients


@pytest.mark.parametrize("opts", CONFIGS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "dense")
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", [0, N // 2, N - 1])
def test_non_finite_gradient_is_a_compress_error_and_changes_nothing(opts, bad, where):
    c, twin = ic.Compressor(N, **opts), ic.Compressor(N, **opts)
    for g in _grads(2):
        assert c.compress(g) == twin.compress(g)
    before = c.state_dict()
    last_nnz = c.last_nnz
    g = randn(N, 77)
    g[where] = bad
    with pytest.raises(ic.CompressError, match=r"NaN or infinity") as info:
        c.compress(g)
    assert isinstance(info.value, ic.IotCompressError) and isinstance(info.value, ValueError)
    after = c.state_dict()
    np.testing.assert_array_equal(after["residual"], before["residual"])
    np.testing.assert_array_equal(after["velocity"], before["velocity"])
    assert (after["step"], after["threshold"], after["bits_per_entry"]) == (before["step"], before["threshold"], before["bits_per_entry"])
    assert c.last_nnz == last_nnz
    for g in _grads(2, start=10):
        assert c.compress(g) == twin.compress(g)


@pytest.mark.parametrize("opts", CONFIGS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "dense")
def test_accumulate_keeps_a_skipped_rounds_gradient_in_the_residual(opts):
    c, twin = ic.Compressor(N, **opts), ic.Compressor(N, **opts)
    g1, g2 = _grads(2, start=20)
    c.accumulate(g1)
    assert c.step == 0 and c.last_nnz == 0
    if opts.get("momentum"):
        m = np.float32(opts["momentum"])
        u = m * g1 if opts.get("nesterov") else g1  # u = m*(u + g) or m*u + g, from u = 0
        np.testing.assert_allclose(c.velocity, u, rtol=1e-6)
        np.testing.assert_allclose(c.residual, u + g1 if opts.get("nesterov") else u, rtol=1e-6)
    else:
        np.testing.assert_array_equal(c.residual, g1)  # nothing lost
    # From a zero state, skipping a round then sending equals sending the sum at once.
    if not opts.get("momentum"):
        assert c.compress(g2) == twin.compress(g1 + g2)
        np.testing.assert_array_equal(c.residual, twin.residual)
    # Validation and the all-or-nothing guarantee are those of compress.
    before = c.state_dict()
    bad = randn(N, 5)
    bad[N // 3] = np.nan
    with pytest.raises(ic.CompressError, match=r"NaN or infinity"):
        c.accumulate(bad)
    with pytest.raises(ValueError):
        c.accumulate(randn(N - 1))
    with pytest.raises(TypeError):
        c.accumulate(randn(N).astype(np.float64))
    after = c.state_dict()
    np.testing.assert_array_equal(after["residual"], before["residual"])
    np.testing.assert_array_equal(after["velocity"], before["velocity"])
    assert after["step"] == before["step"]


def test_residual_overflow_is_a_compress_error():
    c = ic.Compressor(2, threshold=3.4e38)
    g = np.array([3e38, 1.0], np.float32)
    c.compress(g)  # 3e38 < Wt: kept in the residual
    with pytest.raises(ic.CompressError, match=r"overflow"):
        c.compress(g)  # 6e38 overflows float32


# --------------------------------------------------------------------- the GIL


def test_compress_and_decode_run_concurrently_in_threads():
    n, workers = 4_000_000, 2
    grads = [randn(n, 10 + i) for i in range(workers)]
    opts = dict(density=0.001, quant="int8", momentum=0.9)
    want = [ic.Compressor(n, **opts).compress(g) for g in grads]
    got, errors = [None] * workers, []
    barrier = threading.Barrier(workers)

    def work(i):
        try:
            c = ic.Compressor(n, **opts)
            barrier.wait(timeout=60)
            got[i] = c.compress(grads[i])
            out = np.zeros(n, np.float32)
            ic.decode_add(got[i], out)
            ic.decode(got[i])
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a compress thread hung"
    assert not errors, errors
    assert got == want


def _compress_op(n):
    c, g = ic.Compressor(n, density=0.01, exact=True), randn(n, 3)
    return lambda: c.compress(g)


def _decode_add_op(n):
    msg, out = ic.Compressor(n, quant="f16").compress(randn(n, 4)), np.zeros(n, np.float32)
    return lambda: ic.decode_add(msg, out)


@pytest.mark.parametrize("make_op", [_compress_op, _decode_add_op], ids=["compress", "decode_add"])
def test_gil_is_released_while_working(make_op):
    """With a switch interval of 100 s, CPython never forces a thread to give up the GIL
    during this test: the main thread can run while the worker is inside the loop only if
    the extension releases the GIL itself. (No timing is asserted.)"""
    op, rounds = make_op(1_000_000), 30
    progress, done, seen = [0], threading.Event(), []

    def worker():
        for _ in range(rounds):
            op()
            progress[0] += 1
        done.set()

    old = sys.getswitchinterval()
    sys.setswitchinterval(100.0)
    try:
        t = threading.Thread(target=worker, daemon=True)
        t.start()
        while not done.is_set():
            seen.append(progress[0])
            done.wait(0.0005)  # releases the GIL
        t.join(timeout=120)
    finally:
        sys.setswitchinterval(old)
    assert not t.is_alive()
    assert progress[0] == rounds
    assert any(p < rounds for p in seen), "the main thread never ran while the worker was busy"
