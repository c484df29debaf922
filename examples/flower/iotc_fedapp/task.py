"""The learning task, shared by the ClientApp and the ServerApp: scikit-learn's digits (read
straight from the file scikit-learn ships, so a fresh ``flwr-clientapp`` process does not pay
for importing scikit-learn), a fixed stratified train/test split, Dirichlet non-IID partitions,
and a 64-256-128-10 MLP in numpy trained with SGD and momentum."""

from __future__ import annotations

import importlib.util
import os
from typing import Dict, List, Tuple

import numpy as np

Params = Dict[str, np.ndarray]
LAYERS = (64, 256, 128, 10)
SPLIT_SEED = 1234  # the split and the partitions are the same for every run


def _digits() -> Tuple[np.ndarray, np.ndarray]:
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise RuntimeError("scikit-learn is needed for its bundled digits data set")
    path = os.path.join(os.path.dirname(spec.origin), "datasets", "data", "digits.csv.gz")
    data = np.loadtxt(path, delimiter=",", dtype=np.float32)
    return data[:, :-1] / 16.0, data[:, -1].astype(np.int64)


def train_test() -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """1,347 training and 450 test images, stratified by class."""
    x, y = _digits()
    rng = np.random.default_rng(SPLIT_SEED)
    test = np.concatenate([rng.permutation(np.flatnonzero(y == c))[: round(0.25 * (y == c).sum())]
                           for c in range(10)])
    mask = np.zeros(len(y), bool)
    mask[test] = True
    return x[~mask], y[~mask], x[mask], y[mask]


def dirichlet_partitions(y: np.ndarray, n: int, alpha: float = 0.5, min_size: int = 10) -> List[np.ndarray]:
    """Indices of ``n`` non-IID partitions: each class is split by proportions drawn from
    Dirichlet(alpha); redrawn until every partition holds at least ``min_size`` examples."""
    rng = np.random.default_rng(SPLIT_SEED + n)
    while True:
        parts: List[List[int]] = [[] for _ in range(n)]
        for c in range(10):
            idx = rng.permutation(np.flatnonzero(y == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * n))[:-1] * len(idx)).astype(int)
            for p, chunk in enumerate(np.split(idx, cuts)):
                parts[p].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]


def partition(partition_id: int, num_partitions: int) -> Tuple[np.ndarray, np.ndarray]:
    x, y, _, _ = train_test()
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is not in [0, {num_partitions})")
    idx = dirichlet_partitions(y, num_partitions)[partition_id]
    return x[idx], y[idx]


def init_params(seed: int) -> Params:
    rng = np.random.default_rng(seed)
    params: Params = {}
    for i, (fan_in, fan_out) in enumerate(zip(LAYERS[:-1], LAYERS[1:]), 1):
        bound = np.sqrt(6.0 / fan_in)  # He uniform, for ReLU layers
        params[f"fc{i}.weight"] = rng.uniform(-bound, bound, (fan_out, fan_in)).astype(np.float32)
        params[f"fc{i}.bias"] = np.zeros(fan_out, np.float32)
    return params


def _forward(params: Params, x: np.ndarray) -> Tuple[List[np.ndarray], np.ndarray]:
    acts = [x]
    n_layers = len(LAYERS) - 1
    for i in range(1, n_layers + 1):
        z = acts[-1] @ params[f"fc{i}.weight"].T + params[f"fc{i}.bias"]
        acts.append(np.maximum(z, 0) if i < n_layers else z)
    return acts[:-1], acts[-1]


def train(params: Params, x: np.ndarray, y: np.ndarray, epochs: int, lr: float, seed: int,
          momentum: float = 0.9, batch: int = 32) -> Tuple[Params, float]:
    """Local SGD; returns the new parameters and the mean training loss of the last epoch."""
    p = {k: v.copy() for k, v in params.items()}
    vel = {k: np.zeros_like(v) for k, v in p.items()}
    rng = np.random.default_rng(seed)
    n_layers = len(LAYERS) - 1
    loss = 0.0
    for _ in range(epochs):
        losses = []
        for b in np.array_split(rng.permutation(len(y)), max(1, -(-len(y) // batch))):
            acts, logits = _forward(p, x[b])
            logits = logits - logits.max(axis=1, keepdims=True)
            prob = np.exp(logits)
            prob /= prob.sum(axis=1, keepdims=True)
            losses.append(float(-np.log(prob[np.arange(len(b)), y[b]] + 1e-12).mean()))
            g = prob
            g[np.arange(len(b)), y[b]] -= 1.0
            g /= len(b)
            for i in range(n_layers, 0, -1):
                grad_w, grad_b = g.T @ acts[i - 1], g.sum(axis=0)
                if i > 1:
                    g = (g @ p[f"fc{i}.weight"]) * (acts[i - 1] > 0)
                for k, grad in ((f"fc{i}.weight", grad_w), (f"fc{i}.bias", grad_b)):
                    vel[k] = momentum * vel[k] + grad
                    p[k] -= lr * vel[k]
        loss = float(np.mean(losses))
    return p, loss


def accuracy(params: Params, x: np.ndarray, y: np.ndarray) -> float:
    return float((_forward(params, x)[1].argmax(axis=1) == y).mean())
