"""ServerApp: FedAvg (``compress=false``) or iotcompress's CompressedFedAvg (``compress=true``)
over every connected node, central evaluation on the held-out digits, and a JSON report:
test accuracy per round and the payload bytes each client received and sent each round.

The report goes to the run config's ``report-path`` (rewritten after every round, atomically,
so a watcher sees the progress) or, when that is empty, to stdout as one line starting with
``IOTC_REPORT ``."""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, Iterable, List, Optional

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from iotc_fedapp import task

app = ServerApp()


def payload_bytes(content: RecordDict) -> int:
    """What the message carries for the model: the data of every Array (for a numpy Array that
    includes its .npy header) and every bytes value of a ConfigRecord. Metrics and scalars are
    not counted; the wire (framing, headers, objects) is measured by the tests' proxy."""
    total = 0
    for record in content.array_records.values():
        total += sum(len(a.data) for a in record.values())
    for record in content.config_records.values():
        for value in record.values():
            values = value if isinstance(value, list) else [value]
            total += sum(len(v) for v in values if isinstance(v, bytes))
    return total


class CountingGrid:
    """The Grid the strategy talks to, counting each train round's payload per node (and the
    reply's ``partition-id``, which survives a node's restart under a new node id)."""

    def __init__(self, grid: Grid, on_round, compressed: bool) -> None:
        self._grid, self._on_round, self.compressed = grid, on_round, compressed
        self.rounds: List[Dict[str, Any]] = []

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], timeout: Optional[float] = None):
        messages = list(messages)
        train = [m for m in messages if m.metadata.message_type.startswith("train")]
        start = time.time()
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        if train:
            row: Dict[str, Any] = {"round": len(self.rounds) + 1, "t_start": start, "t_end": time.time(),
                                   "down": {}, "up": {}, "partition": {}, "errors": []}
            for m in train:
                row["down"][str(m.metadata.dst_node_id)] = payload_bytes(m.content)
            if self.compressed:
                row["down_kind"] = {str(m.metadata.dst_node_id): _envelope_kind(m.content) for m in train}
            for r in replies:
                nid = str(r.metadata.src_node_id)
                if r.has_error():
                    row["errors"].append({"node": nid, "reason": r.error.reason})
                    continue
                row["up"][nid] = payload_bytes(r.content)
                for metrics in r.content.metric_records.values():
                    if "partition-id" in metrics:
                        row["partition"][nid] = int(metrics["partition-id"])
            self.rounds.append(row)
            self._on_round()
        return replies


def _envelope_kind(content: RecordDict) -> Optional[str]:
    """"keyframe" or "delta" for a compressed downlink message (None for plain FedAvg)."""
    from iotcompress.fedavg import KIND_KEYFRAME, parse_envelope
    from iotcompress.flower import ENVELOPE_KEY

    for record in content.config_records.values():
        if ENVELOPE_KEY in record:
            return "keyframe" if parse_envelope(record[ENVELOPE_KEY]).kind == KIND_KEYFRAME else "delta"
    return None


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    compress = bool(cfg["compress"])
    min_nodes = int(cfg["min-nodes"])
    kwargs = dict(fraction_train=float(cfg["fraction-train"]), fraction_evaluate=0.0,
                  min_train_nodes=min_nodes, min_available_nodes=min_nodes)
    if compress:
        from iotcompress.flower import CompressedFedAvg

        strategy = CompressedFedAvg(**kwargs, density=float(cfg["down-density"]),
                                    quant=str(cfg["down-quant"]))
    else:
        strategy = FedAvg(**kwargs)

    _, _, x_test, y_test = task.train_test()
    report: Dict[str, Any] = {"compress": compress, "run_config": dict(cfg), "accuracy": {}, "done": False}
    path = str(cfg["report-path"])

    def write() -> None:
        report["rounds"] = counting.rounds
        if compress:  # the strategy's own record: bytes, keyframes, failed replies per round
            report["strategy_stats"] = json.loads(json.dumps(strategy.stats, default=str))
        if path:
            tmp = f"{path}.tmp"
            with open(tmp, "w") as f:
                json.dump(report, f)
            os.replace(tmp, path)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        params = {k: a.numpy() for k, a in arrays.items()}
        acc = task.accuracy(params, x_test, y_test)
        report["accuracy"][str(server_round)] = acc
        return MetricRecord({"accuracy": acc})

    counting = CountingGrid(grid, write, compress)
    initial = ArrayRecord({k: Array(v) for k, v in task.init_params(int(cfg["seed"])).items()})
    strategy.start(grid=counting, initial_arrays=initial, num_rounds=int(cfg["num-server-rounds"]),
                   timeout=float(cfg["round-timeout"]), evaluate_fn=evaluate)
    rounds = counting.rounds
    report["final_accuracy"] = report["accuracy"][str(len(rounds))] if rounds else None
    report["mean_up_per_client_round"] = float(np.mean([b for r in rounds for b in r["up"].values()] or [0]))
    report["mean_down_per_client_round"] = float(np.mean([b for r in rounds for b in r["down"].values()] or [0]))
    report["done"] = True
    write()
    print("IOTC_REPORT " + json.dumps({k: v for k, v in report.items() if k != "rounds"}), flush=True)
