"""An in-process Flower ``Grid`` for the library's tests: it hands each message to a real
``ClientApp`` with that node's real ``Context`` (state kept across rounds, as a SuperNode
does) and turns an exception into an error reply, as Flower's ClientApp runner does. The
tests that start real Flower processes live in tests/flower/."""

from __future__ import annotations

import traceback
from typing import Dict, Iterable, List, Optional

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


class InProcessGrid(Grid):
    def __init__(self, app, node_configs: Dict[int, dict], run_config: Optional[dict] = None) -> None:
        self.app = app
        self.contexts = {
            node: Context(run_id=1, node_id=node, node_config=dict(cfg), state=RecordDict(), run_config=dict(run_config or {}))
            for node, cfg in node_configs.items()
        }
        # What the ServerApp process sets: messages the strategy builds carry these ids.
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
        self.offline: set = set()  # nodes that do not answer
        self.sent: List[Message] = []

    def set_run(self, run) -> None:  # pragma: no cover - not used in process
        pass

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # pragma: no cover
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages):  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: Optional[float] = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            if node in self.offline:
                continue
            try:
                reply = self.app(msg, self.contexts[node])
            except Exception as e:  # Flower's runner answers with an error reply
                reply = Message(Error(code=2, reason=f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=2)}"), reply_to=msg)
            replies.append(reply)
        return replies
