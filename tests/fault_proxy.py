"""A seeded fault-injecting HTTP proxy on loopback, in front of the real FHIR sandbox (tests only).

Each request draws from one seeded RNG (in arrival order): with probability ``rate`` it gets one fault,
chosen uniformly from ``faults``:

* ``throttle``: 429 with ``Retry-After: 1``, not forwarded;
* ``unavailable``: 503, not forwarded;
* ``delay``: forwarded after a pause drawn from ``delay`` seconds;
* ``reset``: the connection is reset (TCP RST) before anything is forwarded;
* ``drop``: forwarded, the server's answer read, then the connection reset instead of answering
  ("committed then dropped": the server did the work, the client never hears of it).

``plan(method, path, body)`` overrides the draw for scripted cases (return a fault name or None).
Every forwarded request is logged with the upstream status, so a test can show what the server said.
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import requests

FAULTS = ("throttle", "unavailable", "delay", "reset", "drop")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "content-length", "content-encoding", "host"}


@dataclass(frozen=True)
class Forwarded:
    """One request the server saw: method, path (query included), its status, and the fault applied."""

    method: str
    path: str
    status: int
    fault: str | None


class FaultProxy:
    """``with FaultProxy(upstream_base, seed=...) as proxy:`` then use ``proxy.base_url`` as the FHIR base."""

    def __init__(self, upstream: str, *, seed: int = 0, rate: float = 0.1, faults: Sequence[str] = FAULTS,
                 delay: tuple[float, float] = (0.2, 1.5),
                 plan: Callable[[str, str, bytes], str | None] | None = None) -> None:
        parts = urlsplit(upstream)
        self.upstream_origin = f"{parts.scheme}://{parts.netloc}"
        self.upstream_path = parts.path.rstrip("/")
        self.rate = rate
        self.faults = tuple(faults)
        self.delay = delay
        self.plan = plan
        self.injected: Counter[tuple[str, str]] = Counter()  # (fault, method)
        self.forwarded: list[Forwarded] = []
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._local = threading.local()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                proxy._serve(self)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle

            def log_message(self, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: object, client_address: object) -> None:
                pass  # a reset connection is the point, not an error

        self._server = Server(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}{self.upstream_path}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def count(self, fault: str, method: str | None = None) -> int:
        return sum(n for (f, m), n in self.injected.items() if f == fault and (method is None or m == method))

    # ------------------------------------------------------------------ internals

    def _choose(self, method: str, path: str, body: bytes) -> tuple[str | None, float]:
        with self._lock:
            if self.plan is not None:
                fault = self.plan(method, path, body)
            elif self._rng.random() < self.rate:
                fault = self._rng.choice(self.faults)
            else:
                fault = None
            pause = self._rng.uniform(*self.delay) if fault == "delay" else 0.0
            if fault is not None:
                self.injected[(fault, method)] += 1
        return fault, pause

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    @staticmethod
    def _reset(handler: BaseHTTPRequestHandler) -> None:
        """Close with SO_LINGER 0: the peer gets a TCP RST, not an orderly FIN."""
        handler.close_connection = True
        try:
            handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            handler.connection.close()
        except OSError:
            pass

    @staticmethod
    def _answer(handler: BaseHTTPRequestHandler, status: int, headers: dict[str, str], body: bytes) -> None:
        handler.send_response(status)
        for name, value in headers.items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(body)

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        method = handler.command
        fault, pause = self._choose(method, handler.path, body)
        if fault == "throttle":
            self._answer(handler, 429, {"Retry-After": "1", "Content-Type": "text/plain"}, b"throttled")
            return
        if fault == "unavailable":
            self._answer(handler, 503, {"Content-Type": "text/plain"}, b"unavailable")
            return
        if fault == "reset":
            self._reset(handler)
            return
        if fault == "delay":
            time.sleep(pause)
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["Host"] = handler.headers.get("Host") or ""
        response = self._session().request(method, self.upstream_origin + handler.path, data=body or None,
                                           headers=headers, allow_redirects=False, timeout=120)
        with self._lock:
            self.forwarded.append(Forwarded(method, handler.path, response.status_code, fault))
        if fault == "drop":
            self._reset(handler)
            return
        out = {k: v for k, v in response.headers.items() if k.lower() not in HOP_BY_HOP}
        self._answer(handler, response.status_code, out, response.content)
