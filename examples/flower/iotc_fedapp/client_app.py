"""ClientApp: trains the global model on this node's partition. With ``compress=true`` the
iotcompress mod wraps the train function: it rebuilds the full model from the server's
compressed update on the way in, and sends the compressed delta on the way out; the train
function below does not change."""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from iotc_fedapp import task


def iotcompress_mod(msg: Message, context: Context, call_next):
    """Compression when the run asks for it (this app compares both). An app that always
    compresses writes ``ClientApp(mods=[compression_mod(density=0.03, quant="sign")])`` instead. The node
    config may name a link (``iotcompress-link="lora"``), a budget and a state directory
    (``iotcompress-state-dir``), which make the budget and the persistent state per node."""
    cfg = context.run_config
    if not cfg["compress"]:
        return call_next(msg, context)
    from iotcompress.flower import compression_mod

    budget = float(cfg["budget-ms"])
    mod = compression_mod(density=float(cfg["density"]), quant=str(cfg["quant"]),
                          budget_ms=budget if budget > 0 else None, audit=bool(cfg["audit"]))
    return mod(msg, context, call_next)


app = ClientApp(mods=[iotcompress_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, node = context.run_config, context.node_config
    pid, n = int(node["partition-id"]), int(node["num-partitions"])
    x, y = task.partition(pid, n)
    params = {k: a.numpy() for k, a in msg.content["arrays"].items()}
    server_round = int(msg.content["config"]["server-round"])
    seed = int(cfg["seed"]) * 1_000_003 + server_round * 1_009 + pid
    new, loss = task.train(params, x, y, int(cfg["local-epochs"]), float(cfg["lr"]), seed)
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in new.items()}),
        "metrics": MetricRecord({"train-loss": loss, "num-examples": len(y), "partition-id": pid}),
    })
    return Message(content=content, reply_to=msg)
