"""A counting TCP proxy for localhost: SuperNode -> proxy -> SuperLink.

Each listener (one per SuperNode, so bytes are attributed to a node) forwards every
connection to the target unchanged and counts the bytes in each direction. It also follows
the HTTP/1.1 exchanges inside the stream (Flower's Fleet API is protobuf over HTTP/1.1) and
records one event per request: time, listener label, path, bytes up (request) and bytes
down (its response), so traffic can be split by RPC and by time window (a round, an idle
minute). A stream it cannot parse is still forwarded and counted in the connection totals.

In a test: ``p = CountingProxy("127.0.0.1", 8000); port = p.listen("sn0"); ...; p.snapshot()``.
As a tool: ``python proxy.py --target 127.0.0.1:8000 --listen sn0=9100 --listen sn1=9101
--out counts.json`` writes the JSON at exit (SIGINT/SIGTERM) and on SIGUSR1."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

_MAX_HEAD = 64 * 1024  # a longer header block is not HTTP we follow; we stop parsing


class _HttpFollower:
    """Splits one direction of an HTTP/1.1 stream into messages: yields (start line, size)."""

    def __init__(self, is_response: bool) -> None:
        self.is_response = is_response
        self.buf = b""
        self.body_left = 0
        self.chunked = False
        self.line = ""
        self.size = 0
        self.broken = False

    def feed(self, data: bytes) -> List[Tuple[str, int]]:
        done: List[Tuple[str, int]] = []
        if self.broken:
            return done
        self.buf += data
        while self.buf:
            if self.body_left > 0:
                take = min(self.body_left, len(self.buf))
                self.body_left -= take
                self.size += take
                self.buf = self.buf[take:]
                if self.body_left == 0 and not self.chunked:
                    done.append((self.line, self.size))
                    self.line = ""
                continue
            if self.chunked:
                end = self.buf.find(b"\r\n")
                if end < 0:
                    break
                size_line = self.buf[:end].split(b";")[0].strip()
                try:
                    n = int(size_line, 16)
                except ValueError:
                    self.broken = True
                    break
                if n == 0:  # last chunk; no trailers from the servers we proxy
                    end2 = self.buf.find(b"\r\n\r\n", end)
                    if end2 < 0:
                        break
                    self.size += end2 + 4
                    self.buf = self.buf[end2 + 4:]
                    self.chunked = False
                    done.append((self.line, self.size))
                    self.line = ""
                    continue
                self.size += end + 2
                self.buf = self.buf[end + 2:]
                self.body_left = n + 2  # the data and its CRLF
                continue
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > _MAX_HEAD:
                    self.broken = True
                break
            head = self.buf[:end].decode("latin-1")
            self.buf = self.buf[end + 4:]
            lines = head.split("\r\n")
            self.line, self.size = lines[0], end + 4
            headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
            if headers.get("transfer-encoding", "").lower() == "chunked":
                self.chunked = True
                continue
            try:
                self.body_left = int(headers.get("content-length", "0"))
            except ValueError:
                self.broken = True
                break
            if self.body_left == 0:
                done.append((self.line, self.size))
                self.line = ""
        return done


class CountingProxy:
    """Listeners on 127.0.0.1 that forward to ``target_host:target_port`` and count."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._lock = threading.Lock()
        self.events: List[Dict[str, Any]] = []
        self.connections: List[Dict[str, Any]] = []
        self._loop = asyncio.new_event_loop()
        self._servers: List[asyncio.AbstractServer] = []
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    def listen(self, label: str, port: int = 0) -> int:
        """Start a listener for ``label``; returns its port."""

        async def start() -> asyncio.AbstractServer:
            return await asyncio.start_server(lambda r, w: self._handle(label, r, w), "127.0.0.1", port)

        server = asyncio.run_coroutine_threadsafe(start(), self._loop).result(10)
        self._servers.append(server)
        return server.sockets[0].getsockname()[1]

    async def _handle(self, label: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = {"label": label, "opened": time.time(), "closed": None, "up": 0, "down": 0}
        with self._lock:
            self.connections.append(conn)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            conn["closed"] = time.time()
            writer.close()
            return
        pending: List[Dict[str, Any]] = []  # requests waiting for their responses, in order
        requests, responses = _HttpFollower(False), _HttpFollower(True)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, up: bool) -> None:
            try:
                while True:
                    data = await src.read(65536)
                    if not data:
                        break
                    dst.write(data)
                    with self._lock:
                        conn["up" if up else "down"] += len(data)
                        if up:
                            for line, size in requests.feed(data):
                                parts = line.split(" ")
                                ev = {"t": time.time(), "label": label, "method": parts[0],
                                      "path": parts[1] if len(parts) > 1 else "", "up": size, "down": 0}
                                self.events.append(ev)
                                pending.append(ev)
                        else:
                            for line, size in responses.feed(data):
                                if pending:
                                    ev = pending.pop(0)
                                    ev["down"] = size
                                    ev["status"] = line.split(" ")[1] if " " in line else ""
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                try:
                    dst.close()
                except Exception:  # noqa: BLE001 - closing a broken transport
                    pass

        await asyncio.gather(pump(reader, up_writer, True), pump(up_reader, writer, False))
        conn["closed"] = time.time()

    def snapshot(self) -> Dict[str, Any]:
        with self._lock:
            return {"target": list(self.target), "events": [dict(e) for e in self.events],
                    "connections": [dict(c) for c in self.connections]}

    def close(self) -> None:
        async def stop() -> None:
            for s in self._servers:
                s.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        try:
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()


def totals(snapshot: Dict[str, Any], t0: float = 0.0, t1: float = float("inf"),
           label: Optional[str] = None) -> Dict[str, int]:
    """Bytes up and down and the request count of the events in [t0, t1) (of one label)."""
    evs = [e for e in snapshot["events"] if t0 <= e["t"] < t1 and (label is None or e["label"] == label)]
    return {"up": sum(e["up"] for e in evs), "down": sum(e["down"] for e in evs), "requests": len(evs)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", required=True, help="HOST:PORT of the SuperLink")
    ap.add_argument("--listen", action="append", required=True, help="LABEL=PORT (repeatable)")
    ap.add_argument("--out", required=True, help="JSON file written at exit and on SIGUSR1")
    args = ap.parse_args()
    host, _, port = args.target.rpartition(":")
    proxy = CountingProxy(host, int(port))
    for item in args.listen:
        label, _, p = item.partition("=")
        print(f"{label}: 127.0.0.1:{proxy.listen(label, int(p))} -> {args.target}", flush=True)

    def dump(*_: Any) -> None:
        with open(args.out, "w") as f:
            json.dump(proxy.snapshot(), f)

    stop = threading.Event()
    signal.signal(signal.SIGUSR1, dump)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    dump()
    proxy.close()


if __name__ == "__main__":
    main()
