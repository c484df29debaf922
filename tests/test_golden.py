"""Golden vectors through the Python face, and through the independent spec decoder."""

import json
from pathlib import Path

import numpy as np
import pytest

import iotcompress as ic
from wire_spec import decode as spec_decode

VECTORS = Path(__file__).parent / "vectors"
MANIFEST = json.loads((VECTORS / "cases.json").read_text())
CASES = MANIFEST["cases"]


def grad_of(step):
    return np.array([int(h, 16) for h in step["grad"]], dtype=np.uint32).view(np.float32)


def test_manifest_is_for_this_wire_version():
    assert MANIFEST["wire_version"] == ic.WIRE_VERSION == 1
    assert len(CASES) >= 10


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_compress_reproduces_golden_bytes(case):
    c = ic.Compressor(case["numel"], **case["options"])
    for i, step in enumerate(case["steps"]):
        want = (VECTORS / step["message"]).read_bytes()
        assert c.compress(grad_of(step)) == want, f"step {i}"


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_spec_decoder_agrees_with_library(case):
    for step in case["steps"]:
        msg = (VECTORS / step["message"]).read_bytes()
        spec = spec_decode(msg)
        info = ic.inspect(msg)
        for field in ("numel", "nnz", "quant", "index", "rice_k", "levels", "stream", "header_bytes"):
            assert spec[field] == info[field], field
        assert np.float32(spec["scale"]) == np.float32(info["scale"])
        dense = np.zeros(case["numel"], np.float32)
        dense[spec["positions"]] = spec["values"]
        np.testing.assert_array_equal(ic.decode(msg), dense)


def test_walkthrough_in_the_spec():
    """The annotated bytes in docs/wire-format.md are the real ones."""
    msg = (VECTORS / "threshold_int8.0.bin").read_bytes()
    assert msg.hex(" ") == "49 43 01 13 10 04 f8 fb 1d 3c 10 25 cc 81 3e 95 54 f8 3c 62"
    spec = spec_decode(msg)
    assert spec["positions"] == [4, 8, 10, 13]
    assert (VECTORS / "empty_int8.0.bin").read_bytes().hex(" ") == "49 43 01 23 14 00 00 00 00 00 00 e3 e3 e8 9c"
    doc = (Path(__file__).parents[1] / "docs" / "wire-format.md").read_text()
    assert "cc 81 3e 95" in doc and "e3 e3 e8 9c" in doc
