"""SIMD and threads change the speed, never the bytes: messages made with the scalar kernels
(IOTCOMPRESS_SIMD=off, in a fresh process) and with several threads equal the default ones."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

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


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX-only")
def test_threads_work_in_a_forked_child():
    # The worker pool's threads do not survive a fork (a DataLoader worker, a
    # multiprocessing "fork" start): the child must make its own, not wait on the parent's.
    g = (np.random.default_rng(1).standard_normal(N) * 1e-3).astype(np.float32)
    parent = ic.Compressor(N, density=0.01, quant="int8", threads=2)
    parent.compress(g)  # the pool exists now
    expected = ic.Compressor(N, density=0.01, quant="int8").compress(g)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report the message, never return into pytest
        try:
            os.close(read)
            msg = ic.Compressor(N, density=0.01, quant="int8", threads=2).compress(g)
            os.write(write, msg)
        finally:
            os._exit(0)
    os.close(write)
    got = b""
    deadline = time.monotonic() + 60
    with os.fdopen(read, "rb", buffering=0) as pipe:
        while True:
            ready, _, _ = select.select([pipe], [], [], max(deadline - time.monotonic(), 0))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail("the forked child hung, waiting on the parent's worker threads")
            chunk = pipe.read(1 << 16)
            if not chunk:
                break
            got += chunk
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert got == expected
