"""``report.md``, ``report.json`` and the PNG plots of a simulation."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

PLOTS = ("accuracy_vs_time.png", "scalability.png")

_COLORS = {"dense": "#7f7f7f", "lowrank": "#1f77b4", "iotcompress": "#d62728", "iotcompress-delayed": "#ff7f0e"}


def fmt_time(s: Optional[float]) -> str:
    """Seconds in the unit that reads best (``None``: not reached)."""
    if s is None:
        return "not reached"
    if s < 1:
        return f"{s * 1e3:.0f} ms"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    if s < 3 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def _bytes(n: float) -> str:
    return f"{n:,.0f}"


def headline(result: Dict[str, Any]) -> List[str]:
    """Sentences comparing iotcompress's time to the target with the other methods'."""
    m = result["methods"]
    target = result["config"]["target_accuracy"]
    out = []
    for ours in ("iotcompress", "iotcompress-delayed"):
        if ours not in m or m[ours]["time_to_target_s"] is None:
            continue
        t = m[ours]["time_to_target_s"]
        parts = []
        for other in ("dense", "lowrank"):
            if other in m:
                o = m[other]["time_to_target_s"]
                parts.append(f"{m[other]['label']} {fmt_time(o)}" + ("" if o is None else f" ({o / t:,.1f}x longer)"))
        out.append(f"{m[ours]['label']} reaches {target:.0%} test accuracy in {fmt_time(t)} of simulated time; "
                   + "; ".join(parts) + ".")
    return out


def write_report(result: Dict[str, Any], out_dir: str, command: Optional[str] = None) -> Dict[str, str]:
    """Writes ``report.json``, ``report.md`` and the plots into ``out_dir`` (created); returns
    their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "report.json"), "md": os.path.join(out_dir, "report.md")}
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=1)
    paths.update(plot(result, out_dir))
    with open(paths["md"], "w") as f:
        f.write(markdown(result, command))
    return paths


def markdown(result: Dict[str, Any], command: Optional[str] = None) -> str:
    cfg, m = result["config"], result["methods"]
    target = cfg["target_accuracy"]
    n = cfg["devices"]
    lines = [f"# Fleet simulation: {n} devices, {cfg['fleet']}", ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += [
        f"{cfg['model']} on {cfg['dataset']}, {cfg['rounds']} rounds, batch {cfg['batch']} per device, "
        f"SGD lr {cfg['lr']} momentum {cfg['momentum']}, participation {cfg['participation']:.0%}, "
        + (f"FedAvg methods: {cfg['local_steps']} local steps per round (plain SGD, lr {cfg['lr']}), uplink density "
           f"{cfg['density']:g}, downlink {cfg['down_density']:g}; " if cfg.get("local_steps", 1) > 1 else "")
        + (f"non-IID shards (Dirichlet alpha {cfg['alpha']:g}), " if cfg.get("alpha") is not None else "")
        + f"seed {cfg['seed']}. Compute of a speed-1.0 device: {result['compute_ms_speed1']:.2f} ms per step "
        f"(measured: {result['machine']}). Budgets: "
        + ("twice each device's latency" if cfg["budget_ms"] is None else f"{cfg['budget_ms']:g} ms per exchange")
        + f" (median {_bytes(result['budgets']['upload_bytes_median'])} bytes each way"
        + (f"; {result['budgets']['over_budget_devices']} devices cannot meet it and send the minimum"
           if result["budgets"]["over_budget_devices"] else "")
        + f"). Simulated in {result['wall_s']:.0f} s of wall time.",
        "",
        "| link | devices | latency | bandwidth | compute speed (mean) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row in result["fleet"]:
        lines.append(f"| {row['link']} | {row['devices']} | {row['latency_ms']:g} ms | {row['bandwidth_mbps']:g} Mbit/s "
                     f"| {row['compute_speed']:.3g} |")
    lines += ["", "## Results", ""]
    for line in headline(result):
        lines += [line, ""]
    lines += [
        f"| method | time to {target:.0%} | rounds to {target:.0%} | final accuracy | bytes/device/round (up + down) "
        f"| compression vs dense | step time | comm / compute | speedup X / {n} |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    dense = 2 * cfg["dense_bytes"]
    for key, r in m.items():
        total = r["bytes_per_device_round"]
        lines.append(
            f"| {r['label']} | {fmt_time(r['time_to_target_s'])} | {r['rounds_to_target'] or '-'} "
            f"| {r['final_accuracy']:.3f} | {_bytes(r['upload_bytes_per_device_round'])} + "
            f"{_bytes(r['download_bytes_per_device_round'])} | {dense / total:,.1f}x "
            f"| {fmt_time(r['step_ms'] / 1e3)} | {r['comm_to_compute']:,.1f} | {r['scalability'][-1]['speedup']:.3g} / {n} |"
        )
    lines += [
        "",
        "Time: simulated, from the clock model (docs/global-training.md); final accuracy: mean test "
        "accuracy of the last 5 rounds; bytes: mean per participating device per round; comm / compute: "
        "a device's `T_c` over its compute time, averaged; speedup X / Y: throughput of Y devices over "
        "one average device training alone.",
        "",
        "![accuracy vs simulated time](accuracy_vs_time.png)",
        "",
        "## Scalability",
        "",
        "| method | " + " | ".join(f"{s['devices']}" for s in next(iter(m.values()))["scalability"]) + " |",
        "| --- |" + " ---: |" * len(next(iter(m.values()))["scalability"]),
    ]
    for key, r in m.items():
        lines.append(f"| {r['label']} | " + " | ".join(f"{s['speedup']:.3g}" for s in r["scalability"]) + " |")
    lines += [
        "",
        "Speedup X on Y devices (the first Y of this fleet, all participating, each sending its mean "
        "measured bytes).",
        "",
        "![scalability](scalability.png)",
        "",
    ]
    return "\n".join(lines)


def plot(result: Dict[str, Any], out_dir: str) -> Dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg, m = result["config"], result["methods"]
    paths = {}
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for key, r in m.items():
        t = [p["time_s"] for p in r["curve"][1:]]
        a = [p["accuracy"] for p in r["curve"][1:]]
        ax.plot(t, a, label=r["label"], color=_COLORS.get(key), lw=1.5)
        if r["time_to_target_s"] is not None:
            ax.plot([r["time_to_target_s"]], [cfg["target_accuracy"]], "o", color=_COLORS.get(key), ms=5)
    ax.axhline(cfg["target_accuracy"], color="k", lw=0.6, ls=":")
    ax.set_xscale("log")
    ax.set_ylim(0, 1)
    ax.set_xlabel("simulated time (s, log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{cfg['devices']} devices, {cfg['fleet']}: accuracy vs simulated time")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    paths["accuracy_vs_time"] = _save(plt, fig, os.path.join(out_dir, PLOTS[0]))

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    sizes = [s["devices"] for s in next(iter(m.values()))["scalability"]]
    ax.plot(sizes, sizes, color="k", lw=0.8, ls="--", label="ideal (X = Y)")
    for key, r in m.items():
        ax.plot(sizes, [s["speedup"] for s in r["scalability"]], "o-", label=r["label"], color=_COLORS.get(key), ms=4)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("devices Y")
    ax.set_ylabel("speedup X (throughput vs one device alone)")
    ax.set_title(f"scalability, {cfg['fleet']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    paths["scalability"] = _save(plt, fig, os.path.join(out_dir, PLOTS[1]))
    return paths


def _save(plt: Any, fig: Any, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
