"""A Prometheus /metrics endpoint on a chosen host, optionally behind a bearer token.

prometheus-client's `start_http_server` has no authentication, so this is a
small `http.server` of our own in a daemon thread: GET /metrics answers the
registry's text exposition; with a token, a request without
`Authorization: Bearer <token>` gets 401 (compared in constant time).
"""

from __future__ import annotations

import hmac
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

from qrelay.errors import FailedPrecondition


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], registry: CollectorRegistry, token: str | None):
        host = address[0]
        # An IPv6 host needs an IPv6 socket.
        if ":" in host:
            import socket

            self.address_family = socket.AF_INET6
        self.registry = registry
        self.token = token
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        token = self.server.token
        if token is not None and not _authorized(self.headers.get("Authorization"), token):
            self._reply(
                401,
                b"unauthorized: send 'Authorization: Bearer <metrics token>'\n",
                "text/plain; charset=utf-8",
                {"WWW-Authenticate": 'Bearer realm="metrics"'},
            )
            return
        if self.path.split("?", 1)[0] not in ("/metrics", "/"):
            self._reply(404, b"not found: metrics are at /metrics\n", "text/plain; charset=utf-8")
            return
        self._reply(200, generate_latest(self.server.registry), CONTENT_TYPE_LATEST)

    def _reply(
        self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: scrapes every few seconds would flood stderr."""


def _authorized(header: str | None, token: str) -> bool:
    scheme, _, given = (header or "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())


class MetricsServer:
    """/metrics of `registry` on host:port (port 0 picks one) until `stop()`."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        registry: CollectorRegistry = REGISTRY,
        token: str | None = None,
    ) -> None:
        try:
            self._server = _Server((host, port), registry, token)
        except OSError as exc:
            raise FailedPrecondition(
                f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}"
            ) from None
        self.host = host
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="qrelay-metrics", daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        """Stop serving and close the socket. Idempotent."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()
