#!/usr/bin/env python3
"""Evaluation of the novelty filter (iotcompress.data) on real IoT data bundled with aeon.

Each dataset's recordings are cut into overlapping windows (as a device's stream sees them,
recording after recording), standardised per channel with the training windows' statistics,
and a small 1-D CNN is trained on

* all training windows,
* the windows the novelty filter keeps at keep fraction f, offered in stream order:
  ``select_novel`` (the fixed threshold that keeps f, searched over the whole training set;
  Euclidean and cosine views) and the streaming ``NoveltyFilter`` (adaptive threshold,
  Euclidean), as a device that cannot revisit its stream would run it,
* a uniformly random subsample of exactly as many windows (a fresh one per seed),

for f from 5 % to 50 % and several seeds (the seed sets the model's initialisation, the batch
order and the random subsample; the filter has no randomness). Accuracy is over every test
window. Reported: mean and standard deviation over seeds, the paired difference filter minus
random (mean, standard error, seeds won), bytes of the kept windows and training time.

Writes docs/novelty/results.md, docs/novelty/accuracy.png and the results section of
docs/novelty.md (between its markers). ``--quick``: a smoke run (one seed, two fractions,
two epochs) that writes to a temporary directory unless --out is given.

Usage: ``python benches/novelty_eval.py [--seeds 5] [--quick] [--out DIR]``
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from iotcompress.data import NoveltyFilter, select_novel

ROOT = Path(__file__).resolve().parents[1]
MARK_BEGIN, MARK_END = "<!-- novelty-eval:begin -->", "<!-- novelty-eval:end -->"


@dataclass(frozen=True)
class Dataset:
    """An aeon dataset, its windows and the filter's view of them."""

    name: str
    why: str
    window: int
    stride: int
    pool: int


DATASETS = [
    Dataset("BasicMotions", "smartwatch accelerometer + gyroscope (6 axes, 10 Hz), 4 activities", 32, 2, 2),
    Dataset("ACSF1", "smart-plug power traces of 10 home appliances (1 channel)", 256, 64, 4),
]
FRACTIONS = [0.05, 0.1, 0.2, 0.3, 0.5]
METHODS = ["novelty-euclidean", "novelty-cosine", "novelty-stream", "random"]


def windows(x: np.ndarray, width: int, stride: int) -> np.ndarray:
    """(n, c, t) recordings -> (n * w, c, width) overlapping windows, recording after recording."""
    starts = range(0, x.shape[2] - width + 1, stride)
    return np.stack([x[:, :, s : s + width] for s in starts], axis=1).reshape(-1, x.shape[1], width)


def load(ds: Dataset):
    from aeon.datasets import load_classification

    (xtr, ytr), (xte, yte) = (load_classification(ds.name, split=s) for s in ("train", "test"))
    classes = {c: i for i, c in enumerate(sorted(set(ytr)))}
    per = len(range(0, xtr.shape[2] - ds.window + 1, ds.stride))
    wtr, wte = windows(xtr, ds.window, ds.stride), windows(xte, ds.window, ds.stride)
    mean = wtr.mean(axis=(0, 2), keepdims=True)
    std = wtr.std(axis=(0, 2), keepdims=True) + 1e-6
    norm = lambda w: ((w - mean) / std).astype(np.float32)  # noqa: E731
    lab = lambda y: np.repeat([classes[c] for c in y], per).astype(np.int64)  # noqa: E731
    recording = np.repeat(np.arange(len(xtr)), per)
    return norm(wtr), lab(ytr), norm(wte), lab(yte), len(classes), recording


def train_eval(xtr, ytr, xte, yte, n_classes, seed, epochs, min_steps):
    """Trains a small 1-D CNN; returns (test accuracy, training seconds)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    c = xtr.shape[1]
    model = nn.Sequential(
        nn.Conv1d(c, 16, 5, padding=2), nn.ReLU(), nn.MaxPool1d(2),
        nn.Conv1d(16, 32, 5, padding=2), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
        nn.Linear(32, n_classes),
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = torch.from_numpy(xtr), torch.from_numpy(ytr)
    gen = torch.Generator().manual_seed(seed)
    batch = 32
    steps_per_epoch = max(1, (len(x) + batch - 1) // batch)
    steps = max(epochs * steps_per_epoch, min_steps)
    t0 = time.perf_counter()
    done = 0
    while done < steps:
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done == steps:
                break
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        pred = model(torch.from_numpy(xte)).argmax(1).numpy()
    return float((pred == yte).mean()), seconds


def run(args) -> dict:
    import torch

    torch.set_num_threads(1)
    results = {}
    for ds in DATASETS:
        xtr, ytr, xte, yte, k, recording = load(ds)
        n = len(xtr)
        rows = {"full": {"kept": n, "acc": [], "seconds": []}}
        selections = {}
        for f in args.fractions:
            options = dict(pool=ds.pool, capacity=args.capacity)
            for metric in ("euclidean", "cosine"):
                t0 = time.perf_counter()
                idx = select_novel(xtr, keep=f, metric=metric, groups=recording, **options)
                selections[(f, f"novelty-{metric}")] = (idx, 1e6 * (time.perf_counter() - t0) / n)
            stream = NoveltyFilter(xtr.shape[1:], keep=f, **options)
            t0 = time.perf_counter()
            mask = stream.mask(xtr)
            selections[(f, "novelty-stream")] = (np.flatnonzero(mask), 1e6 * (time.perf_counter() - t0) / n)
        for seed in range(args.seeds):
            acc, sec = train_eval(xtr, ytr, xte, yte, k, seed, args.epochs, args.min_steps)
            rows["full"]["acc"].append(acc)
            rows["full"]["seconds"].append(sec)
            for f in args.fractions:
                kept_n = None
                for method in METHODS:
                    if method == "random":
                        idx = np.sort(np.random.default_rng(1000 + seed).choice(n, kept_n, replace=False))
                        us = 0.0
                    else:
                        idx, us = selections[(f, method)]
                        # The random baseline matches the Euclidean filter's count.
                        kept_n = len(idx) if kept_n is None else kept_n
                    acc, sec = train_eval(xtr[idx], ytr[idx], xte, yte, k, seed, args.epochs, args.min_steps)
                    row = rows.setdefault(f"{f}/{method}", {"kept": len(idx), "acc": [], "seconds": [], "us": us})
                    row["acc"].append(acc)
                    row["seconds"].append(sec)
                    row["kept"] = len(idx)
            print(f"{ds.name} seed {seed} done", flush=True)
        results[ds.name] = {"n": n, "test": len(xte), "window": ds.window, "stride": ds.stride,
                            "channels": xtr.shape[1], "pool": ds.pool, "why": ds.why, "rows": rows}
    return results


def paired(rows, f, method):
    d = np.array(rows[f"{f}/{method}"]["acc"]) - np.array(rows[f"{f}/random"]["acc"])
    se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
    return d.mean(), se, int((d > 0).sum()), len(d)


def recommend(results, fractions, method="novelty-euclidean"):
    """The smallest fraction at which the filter is within 1 point of training on everything
    and better than random by more than two standard errors, on every dataset."""
    for f in fractions:
        ok = True
        for r in results.values():
            rows = r["rows"]
            full = np.mean(rows["full"]["acc"])
            mean, se, _, _ = paired(rows, f, method)
            ok &= np.mean(rows[f"{f}/{method}"]["acc"]) >= full - 0.01 and mean > 2 * se
        if ok:
            return f
    return None


def report(results, args) -> str:
    lines = []
    for name, r in results.items():
        rows = r["rows"]
        full = rows["full"]
        wbytes = 4 * r["channels"] * r["window"]
        lines += [
            f"### {name}: {r['why']}",
            "",
            f"{r['n']} training windows of {r['channels']} x {r['window']} (stride {r['stride']}), "
            f"{r['test']} test windows; filter view pooled by {r['pool']}, capacity {args.capacity}.",
            "",
            "| keep asked | method | kept | accuracy (mean ± sd) | vs random (mean ± se, seeds won) | bytes | train s | selection µs/window |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
            f"| 100 % | all windows | {full['kept']} | {100 * np.mean(full['acc']):.1f} ± {100 * np.std(full['acc']):.1f} "
            f"| | {full['kept'] * wbytes:,} | {np.mean(full['seconds']):.1f} | |",
        ]
        for f in args.fractions:
            for method in METHODS:
                row = rows[f"{f}/{method}"]
                vs = ""
                if method != "random":
                    m, se, won, nseeds = paired(rows, f, method)
                    vs = f"{100 * m:+.1f} ± {100 * se:.1f} ({won}/{nseeds})"
                us = f"{row['us']:.1f}" if method != "random" else ""
                lines.append(
                    f"| {100 * f:.0f} % | {method} | {row['kept']} ({100 * row['kept'] / r['n']:.1f} %) "
                    f"| {100 * np.mean(row['acc']):.1f} ± {100 * np.std(row['acc']):.1f} | {vs} "
                    f"| {row['kept'] * wbytes:,} | {np.mean(row['seconds']):.1f} | {us} |"
                )
        lines.append("")
    rec = recommend(results, args.fractions)
    lines.append(
        f"Recommended keep fraction (smallest where the Euclidean filter is within 1 point of all "
        f"windows and above random by more than two standard errors on every dataset): "
        f"{'none of those tried' if rec is None else f'{100 * rec:.0f} %'}."
    )
    lines.append("")
    lines.append(f"Command: `python benches/novelty_eval.py --seeds {args.seeds}` "
                 f"(epochs {args.epochs}, at least {args.min_steps} steps, one torch thread).")
    return "\n".join(lines) + "\n"


def plot(results, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4))
    for ax, (name, r) in zip(np.atleast_1d(axes), results.items()):
        rows = r["rows"]
        for method, style in zip(METHODS, ("o-", "s--", "d-.", "x:")):
            xs = [100 * rows[f"{f}/{method}"]["kept"] / r["n"] for f in args.fractions] + [100]
            ys = [100 * np.mean(rows[f"{f}/{method}"]["acc"]) for f in args.fractions] + [100 * np.mean(rows["full"]["acc"])]
            es = [100 * np.std(rows[f"{f}/{method}"]["acc"]) for f in args.fractions] + [100 * np.std(rows["full"]["acc"])]
            ax.errorbar(xs, ys, yerr=es, fmt=style, capsize=3, label=method)
        ax.axhline(100 * np.mean(rows["full"]["acc"]) - 1, color="grey", lw=0.8, ls="--", label="all windows - 1 pt")
        ax.set_xscale("log")
        ax.set_xlabel("kept fraction of training windows (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(name)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--min-steps", type=int, default=150)
    p.add_argument("--capacity", type=int, default=64)
    p.add_argument("--fractions", type=float, nargs="+", default=FRACTIONS)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 2 fractions, 2 epochs")
    p.add_argument("--out", type=Path, default=None, help="output directory (default docs/novelty)")
    args = p.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.min_steps, args.fractions = 2, 1, 5, [0.1, 0.3]
    out = args.out or (Path(tempfile.mkdtemp()) if args.quick else ROOT / "docs" / "novelty")
    out.mkdir(parents=True, exist_ok=True)
    results = run(args)
    text = report(results, args)
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, args, out / "accuracy.png")
    doc = ROOT / "docs" / "novelty.md"
    if not args.quick and args.out is None and doc.exists():
        s = doc.read_text()
        if MARK_BEGIN in s and MARK_END in s:
            head, rest = s.split(MARK_BEGIN, 1)
            doc.write_text(head + MARK_BEGIN + "\n" + text + MARK_END + rest.split(MARK_END, 1)[1])
    print(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
