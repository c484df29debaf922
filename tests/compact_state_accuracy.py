"""What a compact residual costs in accuracy (docs/mcu.md): a 64-32-10 multilayer perceptron
(2410 parameters, the size of firmware/train20k.c's model) trained on scikit-learn's digits
with SGD on the decoded messages of iotcompress.StreamingCompressor, the gradient fed neuron by
neuron as a device would, the residual stored as f32, f16, bf16 or int8 (one scale per 32
elements); and uncompressed SGD for reference. Numpy only.

    python tests/compact_state_accuracy.py [--seeds 5] [--epochs 30] [--counts 120 24]

prints a markdown table: test accuracy (the mean of the last 5 epochs, then mean ± standard
deviation over the seeds) and bytes per message. tests/test_stream.py runs a short version.
"""

from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Optional

import numpy as np

import iotcompress as ic

IN, HID, OUT = 64, 32, 10
W2_AT = HID * (IN + 1)
NUMEL = W2_AT + OUT * (HID + 1)
LAST_EPOCHS = 5


def digits():
    """scikit-learn's digits (1,797 8x8 images in [0, 1]), a fixed 80/20 split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images.reshape(-1, 64) / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(y))
    split = int(0.8 * len(y))
    return (x[perm[:split]], y[perm[:split]]), (x[perm[split:]], y[perm[split:]])


def init(seed: int) -> np.ndarray:
    """Flat parameters in train20k.c's layout: unit j of layer 1 is 64 weights then its bias."""
    rng = np.random.default_rng(seed)
    w = np.empty(NUMEL, np.float32)
    w[:W2_AT] = rng.uniform(-1, 1, W2_AT) / np.sqrt(IN)
    w[W2_AT:] = rng.uniform(-1, 1, NUMEL - W2_AT) / np.sqrt(HID)
    return w


def layers(w: np.ndarray):
    l1 = w[:W2_AT].reshape(HID, IN + 1)
    l2 = w[W2_AT:].reshape(OUT, HID + 1)
    return l1[:, :IN], l1[:, IN], l2[:, :HID], l2[:, HID]


def predict(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    w1, b1, w2, b2 = layers(w)
    return (np.maximum(x @ w1.T + b1, 0) @ w2.T + b2).argmax(1)


def gradient_chunks(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> List[np.ndarray]:
    """The mean cross-entropy gradient of a mini-batch, one chunk per neuron (65 or 33
    floats), in parameter order."""
    w1, b1, w2, b2 = layers(w)
    h = np.maximum(x @ w1.T + b1, 0)
    z = h @ w2.T + b2
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    dz = p
    dz[np.arange(len(y)), y] -= 1
    dz /= len(y)
    dh = (dz @ w2) * (h > 0)
    g1 = np.concatenate([dh.T @ x, dh.sum(0)[:, None]], 1).astype(np.float32)
    g2 = np.concatenate([dz.T @ h, dz.sum(0)[:, None]], 1).astype(np.float32)
    return [np.ascontiguousarray(row) for row in g1] + [np.ascontiguousarray(row) for row in g2]


def train(seed: int, epochs: int, state: Optional[str], count: int, lr: float = 0.5, batch: int = 32) -> Dict:
    """One run; ``state=None`` is uncompressed SGD."""
    (xtr, ytr), (xte, yte) = digits()
    w = init(seed)
    c = None
    if state is not None:
        c = ic.StreamingCompressor(NUMEL, threshold=1e-3, target_count=count, quant="int8", state=state)
    curve, sent = [], []
    rng = np.random.default_rng(1000 + seed)
    for _ in range(epochs):
        perm = rng.permutation(len(ytr))
        for i in range(0, len(perm) - batch + 1, batch):
            idx = perm[i:i + batch]
            chunks = gradient_chunks(w, xtr[idx], ytr[idx])
            if c is None:
                w -= lr * np.concatenate(chunks)
                sent.append(4 * NUMEL)
                continue
            c.begin()
            for chunk in chunks:
                c.feed(chunk)
            msg = c.finish()
            ic.decode_add(msg, w, scale=-lr)
            sent.append(len(msg))
        curve.append(float((predict(w, xte) == yte).mean()))
    return {"accuracy": float(np.mean(curve[-LAST_EPOCHS:])), "bytes": float(np.mean(sent)), "curve": curve}


def table(seeds: int, epochs: int, counts: List[int]) -> str:
    rows = ["| residual | entries a message | test accuracy (mean ± sd over seeds) | Δ vs f32 residual | bytes a message |",
            "| --- | ---: | ---: | ---: | ---: |"]
    dense = [train(s, epochs, None, 0) for s in range(seeds)]
    acc = np.array([r["accuracy"] for r in dense]) * 100
    rows.append(f"| (uncompressed SGD) | {NUMEL} | {acc.mean():.2f} ± {acc.std():.2f} % | | {4 * NUMEL} |")
    for count in counts:
        base = None
        for state in ic.STATE_FORMATS:
            runs = [train(s, epochs, state, count) for s in range(seeds)]
            acc = np.array([r["accuracy"] for r in runs]) * 100
            if base is None:
                base = acc
            delta = acc - base
            d = "" if state == "f32" else f"{delta.mean():+.2f} ± {delta.std():.2f}"
            nbytes = np.mean([r["bytes"] for r in runs])
            rows.append(f"| {state} | {count} ({100 * count / NUMEL:.1f} %) | {acc.mean():.2f} ± {acc.std():.2f} % | {d} | {nbytes:.0f} |")
    return "\n".join(rows)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--counts", type=int, nargs="+", default=[120, 24])
    args = ap.parse_args(argv)
    print(table(args.seeds, args.epochs, args.counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
