"""Measures the example for docs: 10 non-IID clients, the same rounds, plain FedAvg against
compressed FedAvg, in the Simulation Engine (payload bytes) and in the Deployment Engine on
localhost (payload bytes, and the wire bytes both ways through a counting proxy, per round
and per idle minute). Real processes, a few minutes on two cores; not a test.

    python examples/flower/measure.py --rounds 30 --clients 10 --out examples/flower/results.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "flower"))
from harness import Flower  # noqa: E402
from proxy import totals  # noqa: E402


def summary(report, snap=None, clients=0, t_run=None):
    rounds = report["rounds"]
    ups = [b for r in rounds for b in r["up"].values()]
    downs = [b for r in rounds for b in r["down"].values()]
    out = {"final_accuracy": report["final_accuracy"], "accuracy": report["accuracy"], "rounds": len(rounds),
           "payload_up_per_client_round": sum(ups) / len(ups),
           "payload_down_per_client_round": sum(downs) / len(downs),
           "round_seconds": [round(r["t_end"] - r["t_start"], 2) for r in rounds]}
    if snap is not None:
        win = [totals(snap, r["t_start"], r["t_end"]) for r in rounds]
        out["wire_up_per_client_round"] = sum(w["up"] for w in win) / (clients * len(rounds))
        out["wire_down_per_client_round"] = sum(w["down"] for w in win) / (clients * len(rounds))
        run = totals(snap, *t_run)
        out["wire_run_total_up_per_client"] = run["up"] / clients  # includes GetFab, GetRun, polls
        out["wire_run_total_down_per_client"] = run["down"] / clients
        by_path = {}
        for e in snap["events"]:
            if t_run[0] <= e["t"] < t_run[1]:
                p = by_path.setdefault(e["path"].rsplit("/", 1)[-1], {"requests": 0, "up": 0, "down": 0})
                p["requests"] += 1
                p["up"] += e["up"]
                p["down"] += e["down"]
        out["wire_by_rpc_per_client_round"] = {k: {kk: vv / (clients * len(rounds)) for kk, vv in v.items()}
                                               for k, v in sorted(by_path.items())}
    return out


def simulation(args, work):
    flower = Flower(work / "sim")
    try:
        flower.superlink(simulation=True)
        conn = flower.write_connections(simulation_nodes=args.clients)
        res = {}
        for compress in args.compress:
            path = flower.dir / f"report-{compress}.json"
            flower.run(conn, {"num-server-rounds": args.rounds, "compress": compress, "min-nodes": args.clients,
                              "report-path": str(path)})
            res["compressed" if compress else "plain"] = summary(flower.wait_report(path, 1800))
            print("simulation", compress, res["compressed" if compress else "plain"]["final_accuracy"], flush=True)
        return res
    finally:
        flower.close()


def deployment(args, work):
    flower = Flower(work / "dep")
    try:
        flower.superlink()
        labels = [f"sn{p}" for p in range(args.clients)]
        for p, label in enumerate(labels):
            flower.supernode(label, {"partition-id": p, "num-partitions": args.clients,
                                     "iotcompress-state-dir": str(flower.dir / f"state{p}")})
        conn = flower.write_connections()
        deadline = time.monotonic() + 120
        while not all(any(e["label"] == l for e in flower.proxy.snapshot()["events"]) for l in labels):
            if time.monotonic() > deadline:
                raise TimeoutError("SuperNodes did not connect")
            time.sleep(1)
        time.sleep(5)
        t0 = time.time()
        time.sleep(args.idle_seconds)
        t1 = time.time()
        snap = flower.proxy.snapshot()
        idle = totals(snap, t0, t1)
        res = {"idle_per_node_per_minute": {"up": idle["up"] * 60 / (t1 - t0) / args.clients,
                                            "down": idle["down"] * 60 / (t1 - t0) / args.clients,
                                            "requests": idle["requests"] * 60 / (t1 - t0) / args.clients,
                                            "seconds": t1 - t0}}
        for compress in args.compress:
            path = flower.dir / f"report-{compress}.json"
            t_start = time.time()
            flower.run(conn, {"num-server-rounds": args.rounds, "compress": compress, "min-nodes": args.clients,
                              "report-path": str(path)})
            report = flower.wait_report(path, 3600, watch=["superlink", *labels])
            time.sleep(4)  # the last confirmations
            key = "compressed" if compress else "plain"
            res[key] = summary(report, flower.proxy.snapshot(), args.clients, (t_start, time.time()))
            print("deployment", key, res[key]["final_accuracy"], flush=True)
        return res
    finally:
        flower.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--idle-seconds", type=float, default=30.0)
    ap.add_argument("--engines", default="simulation,deployment")
    ap.add_argument("--modes", default="plain,compressed")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    args.compress = [{"plain": False, "compressed": True}[m] for m in args.modes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="iotc-flower-measure-"))
    res = {"rounds": args.rounds, "clients": args.clients}
    for engine in args.engines.split(","):
        res[engine] = {"simulation": simulation, "deployment": deployment}[engine](args, work)
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
