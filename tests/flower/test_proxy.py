"""The counting proxy against a real HTTP/1.1 server and a raw TCP echo on localhost: it
forwards every byte unchanged and attributes all of them to requests and responses."""

import http.client
import http.server
import socket
import socketserver
import threading
import time

import pytest

from proxy import CountingProxy, totals


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: several requests on one connection

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        size = int(self.path.rsplit("/", 1)[-1])
        if self.path.startswith("/chunked/"):
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"x" * (size // 2), body[:1], b"y" * (size - size // 2)):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            self.wfile.write(b"z" * size)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


@pytest.mark.timeout(30)
def test_http_requests_are_counted_exactly_both_ways(server):
    proxy = CountingProxy("127.0.0.1", server)
    try:
        port = proxy.listen("node")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        sizes = [(f"/fixed/{n}", n) for n in (0, 10, 70_000)] + [("/chunked/100001", 100_002)]
        for path, expect in sizes:
            conn.request("POST", path, body=b"q" * 1234)
            assert len(conn.getresponse().read()) == expect
        conn.close()
        for _ in range(50):
            snap = proxy.snapshot()
            if snap["connections"] and snap["connections"][0]["closed"]:
                break
            time.sleep(0.1)
        (c,) = snap["connections"]
        evs = snap["events"]
        assert [e["path"] for e in evs] == [p for p, _ in sizes]
        assert all(e["label"] == "node" and e["status"] == "200" for e in evs)
        # Every byte belongs to one request or one response: nothing lost, nothing invented.
        assert sum(e["up"] for e in evs) == c["up"] and sum(e["down"] for e in evs) == c["down"]
        for e, (_, body) in zip(evs, sizes):
            assert 1234 < e["up"] < 1234 + 400 and body < e["down"] < body + 400 + (40 if "chunked" in e["path"] else 0)
        assert totals(snap, label="node") == {"up": c["up"], "down": c["down"], "requests": 4}
        assert totals(snap, label="other")["requests"] == 0
    finally:
        proxy.close()


@pytest.mark.timeout(30)
def test_a_stream_that_is_not_http_is_forwarded_and_counted():
    class Echo(socketserver.BaseRequestHandler):
        def handle(self):
            while data := self.request.recv(4096):
                self.request.sendall(data)

    srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    proxy = CountingProxy("127.0.0.1", srv.server_address[1])
    try:
        port = proxy.listen("raw")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            payload = bytes(range(256)) * 40
            s.sendall(payload)
            got = b""
            while len(got) < len(payload):
                got += s.recv(65536)
        assert got == payload
        for _ in range(50):
            c = proxy.snapshot()["connections"][0]
            if c["closed"]:
                break
            time.sleep(0.1)
        assert c["up"] == len(payload) and c["down"] == len(payload)
        assert proxy.snapshot()["events"] == []
    finally:
        proxy.close()
        srv.shutdown()
        srv.server_close()
