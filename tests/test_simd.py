"""SIMD and threads change the speed, never the bytes: messages made with the scalar kernels
(IOTCOMPRESS_SIMD=off, in a fresh process) and with several threads equal the default ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import iotcompress as ic

N = 300_001  # large enough for the SIMD bodies, their tails and several threads
MODES = [
    dict(density=0.001, quant="int8"),
    dict(density=0.001, quant="int8", momentum=0.9, nesterov=True),
    dict(density=0.01, quant="sign", exact=True),
    dict(threshold=2.5e-3, quant="int4"),
    dict(density=0.005, adaptive=True, quant="f16"),
    dict(quant="f16"),
    dict(quant="bf16", momentum=0.5),
    dict(quant="int8"),
    dict(quant="f32"),
    dict(quant="qsgd", seed=4),
]

SCRIPT = """
import json, sys, numpy as np, iotcompress as ic
modes = json.loads(sys.argv[1])
rng = np.random.default_rng(0)
grads = [(rng.standard_normal({n}) * 1e-3).astype(np.float32) for _ in range(3)]
out = {{"level": ic.simd_level(), "messages": []}}
for opts in modes:
    c = ic.Compressor({n}, **opts)
    out["messages"].append([c.compress(g).hex() for g in grads])
print(json.dumps(out))
"""


def messages(threads: int = 1) -> list[list[str]]:
    rng = np.random.default_rng(0)
    grads = [(rng.standard_normal(N) * 1e-3).astype(np.float32) for _ in range(3)]
    result = []
    for opts in MODES:
        c = ic.Compressor(N, threads=threads, **opts)
        result.append([c.compress(g).hex() for g in grads])
    return result


def test_scalar_kernels_give_the_same_bytes():
    env = dict(os.environ, IOTCOMPRESS_SIMD="off")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(n=N), json.dumps(MODES)],
        env=env, capture_output=True, text=True, check=True, timeout=120,
    )
    scalar = json.loads(proc.stdout)
    assert scalar["level"] == "scalar"
    assert scalar["messages"] == messages()


@pytest.mark.parametrize("threads", [2, 3])
def test_threads_give_the_same_bytes(threads):
    assert messages(threads) == messages(1)


def test_threads_option_is_checked():
    with pytest.raises(ValueError, match="threads"):
        ic.Compressor(10, threads=0)
    c = ic.Compressor(10)
    c.threads = 4
    assert c.threads == 4
