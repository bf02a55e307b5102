"""A scriptable HTTP server on 127.0.0.1 for testing provider adapters at the wire level.

Each test queues ``Reply`` objects (status, headers, JSON body or server-sent events with
pacing, or a connection cut mid-way); the server answers requests in order and records what it
received (method, path, query, headers, JSON body) so a test can check the exact wire format.
When the queue is empty it answers with ``default`` (a 500 unless set). A ``responder`` set on
the server answers from what each request holds (concurrent requests in any order); it goes
first, and the queue answers when it returns None.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Reply:
    """One scripted answer.

    ``json_body`` is sent as ``application/json``; ``events`` as ``text/event-stream`` (each a
    JSON-able object or a raw string line such as ``"[DONE]"``), ``delay_s`` before the first
    byte and ``event_delay_s`` between events; ``cut_after`` closes the connection abruptly
    after that many events (no end marker, no terminating chunk).

    ``first_event_delay_s`` waits after the headers, before the first event (a slow first
    token); ``chunked`` frames the event stream with ``Transfer-Encoding: chunked`` as TGI and
    most servers do, so a cut is an incomplete body; ``reset`` ends a cut with a TCP RST.
    """

    status: int = 200
    json_body: Any = None
    events: list[Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    event_delay_s: float = 0.0
    cut_after: int | None = None
    event_names: list[str | None] | None = None
    first_event_delay_s: float = 0.0
    chunked: bool = False
    reset: bool = False


@dataclass
class Received:
    """One request as the server saw it."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any


class FakeHTTPServer:
    """Start with ``with FakeHTTPServer() as server:``; ``server.url`` is its base URL."""

    def __init__(self) -> None:
        self.replies: deque[Reply] = deque()
        self.received: list[Received] = []
        self.default = Reply(status=500, json_body={"error": {"message": "no scripted reply"}})
        self.responder: Callable[[Received], Reply | None] | None = None
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def queue(self, *replies: Reply) -> None:
        """Answer the next requests with ``replies``, in order."""
        with self._lock:
            self.replies.extend(replies)

    def __enter__(self) -> FakeHTTPServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _next(self, received: Received) -> Reply:
        reply = self.responder(received) if self.responder is not None else None
        if reply is not None:
            return reply
        with self._lock:
            return self.replies.popleft() if self.replies else self.default

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_GET(self) -> None:
                self._answer()

            def do_POST(self) -> None:
                self._answer()

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw.decode("utf-8", "replace")
                parts = urlsplit(self.path)
                received = Received(self.command, parts.path, parse_qs(parts.query), dict(self.headers.items()), body)
                fake.received.append(received)
                reply = fake._next(received)
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                if reply.events is not None:
                    self._stream(reply)
                else:
                    payload = json.dumps(reply.json_body if reply.json_body is not None else {}).encode()
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    try:
                        self.wfile.write(payload)
                    except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting
                        return

            def _stream(self, reply: Reply) -> None:
                self.send_response(reply.status)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                if reply.chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                if reply.first_event_delay_s:
                    time.sleep(reply.first_event_delay_s)
                events = reply.events or []
                for number, event in enumerate(events):
                    if reply.cut_after is not None and number >= reply.cut_after:
                        if reply.reset:
                            # Linger 0: close() sends RST instead of FIN.
                            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                            self.connection.close()
                        self.close_connection = True
                        return
                    if number and reply.event_delay_s:
                        time.sleep(reply.event_delay_s)
                    data = event if isinstance(event, str) else json.dumps(event)
                    name = reply.event_names[number] if reply.event_names else None
                    frame = ((f"event: {name}\n" if name else "") + f"data: {data}\n\n").encode()
                    if reply.chunked:
                        frame = f"{len(frame):x}\r\n".encode() + frame + b"\r\n"
                    try:
                        self.wfile.write(frame)
                        self.wfile.flush()
                    except (BrokenPipeError, ConnectionResetError):
                        return
                if reply.chunked:
                    try:
                        self.wfile.write(b"0\r\n\r\n")
                    except (BrokenPipeError, ConnectionResetError):
                        return
                self.close_connection = True

        return Handler
