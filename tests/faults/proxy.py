"""An HTTP proxy in front of the S3 server that fails a share of uploads, for fault tests.

Each PUT is, at random: answered ``503 Slow Down`` without reaching the server; forwarded
and then its connection dropped before the answer (the object may be stored, the client
cannot know); or forwarded normally. Everything else passes through untouched. The Host
header is kept, so the clients' SigV4 signatures still verify upstream.
"""

from __future__ import annotations

import http.client
import random
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


class FlakyS3Proxy:
    def __init__(
        self, upstream_port: int, *, fail_rate: float = 0.2, drop_rate: float = 0.05, seed: int = 0
    ) -> None:
        self.upstream_port = upstream_port
        self.fail_rate = fail_rate
        self.drop_rate = drop_rate
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.puts = self.failed = self.dropped = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
                upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=30)
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"
                }
                headers["Content-Length"] = str(len(body))
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                payload = response.read()
                upstream.close()
                return response.status, response.getheaders(), payload

            def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response(status)
                head = self.command == "HEAD"  # keeps the upstream length, sends no body
                for key, value in headers:
                    skip = ("transfer-encoding", "connection") + (
                        () if head else ("content-length",)
                    )
                    if key.lower() not in skip:
                        self.send_header(key, value)
                if not head:
                    self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _handle(self) -> None:
                body = self._body()
                if self.command == "PUT":
                    with proxy.lock:
                        proxy.puts += 1
                        roll = proxy.random.random()
                    if roll < proxy.fail_rate:
                        with proxy.lock:
                            proxy.failed += 1
                        self._answer(503, [("Content-Type", "application/xml")], SLOW_DOWN)
                        return
                    if roll < proxy.fail_rate + proxy.drop_rate:
                        with proxy.lock:
                            proxy.dropped += 1
                        self._forward(body)
                        self.connection.shutdown(socket.SHUT_RDWR)
                        self.close_connection = True
                        return
                self._answer(*self._forward(body))

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FlakyS3Proxy:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
