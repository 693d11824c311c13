"""A TCP proxy on 127.0.0.1 that breaks chosen S3 reads: the first ``cuts`` responses to GET
requests whose request line contains ``match`` are cut after ``after`` bytes (headers included),
as a connection reset mid-body would. Everything else passes through unchanged (the client signs
for the proxy's host:port, which the server then sees, so SigV4 signatures still check).

    with FaultProxy(server.endpoint, match=b"/key", cuts=2, after=4096) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
"""

from __future__ import annotations

import socket
import threading
from urllib.parse import urlparse


class FaultProxy:
    def __init__(self, upstream: str, match: bytes, cuts: int, after: int):
        u = urlparse(upstream)
        self.upstream = (u.hostname, u.port)
        self.match, self.cuts, self.after = match, cuts, after
        self.cut_count = 0
        self.lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *_) -> None:
        self.sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            state = {"budget": None}
            threading.Thread(target=self._up, args=(client, upstream, state), daemon=True).start()
            threading.Thread(target=self._down, args=(upstream, client, state), daemon=True).start()

    def _up(self, client: socket.socket, upstream: socket.socket, state: dict) -> None:
        try:
            while data := client.recv(65536):
                first = data.split(b"\r\n", 1)[0]
                if first.startswith(b"GET ") and self.match in first:
                    with self.lock:
                        if self.cut_count < self.cuts:
                            self.cut_count += 1
                            state["budget"] = self.after
                upstream.sendall(data)
        except OSError:
            pass
        finally:
            _close(upstream)

    def _down(self, upstream: socket.socket, client: socket.socket, state: dict) -> None:
        try:
            while data := upstream.recv(65536):
                budget = state["budget"]
                if budget is not None and len(data) >= budget:
                    client.sendall(data[:budget])
                    break  # cut: both connections go
                if budget is not None:
                    state["budget"] = budget - len(data)
                client.sendall(data)
        except OSError:
            pass
        finally:
            _close(client)
            _close(upstream)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()
