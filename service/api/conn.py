"""Connection hygiene and TLS for the two servers, from settings: uvicorn (HTTP/WS) and grpc.aio.

- HTTP: a connection must finish its request headers within `http_header_timeout_s` (slowloris: 500
  connections that never finished their headers were held for 60 s) and each piece of its body within
  `http_body_timeout_s` (limits.BodyLimit, 408); `http_max_connections` caps open
  connections + tasks (503 over it); idle keep-alive connections close after `http_keep_alive_s`.
- gRPC: `grpc_max_concurrent_rpcs` (RESOURCE_EXHAUSTED over it), keepalive pings and limits, idle
  connections closed, max message size = `max_body_bytes`.
- TLS: `tls_cert` + `tls_key` (PEM) serve HTTPS/WSS and gRPC over TLS; `tls_client_ca` makes gRPC
  require client certificates signed by that CA (mTLS).
"""

from __future__ import annotations

import asyncio

import grpc
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..settings import ServerSettings


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """httptools protocol that closes a connection whose request headers do not arrive in time."""

    header_timeout_s = 10.0
    _header_timer: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()  # keep-alive: the next request's headers get the same time

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)


def uvicorn_options(srv: ServerSettings, tls: bool = True) -> dict:
    """Options of every uvicorn server we start: the front end's and the worker's probe/metrics port (tls=False)."""
    proto = type("HttpProtocol", (HeaderTimeoutProtocol,), {"header_timeout_s": srv.http_header_timeout_s})
    opts = dict(http=proto, limit_concurrency=srv.http_max_connections, timeout_keep_alive=int(srv.http_keep_alive_s),
                ws_max_size=srv.max_body_bytes, h11_max_incomplete_event_size=64 * 1024)
    if tls and srv.tls:
        opts.update(ssl_certfile=str(srv.tls_cert), ssl_keyfile=str(srv.tls_key))
    return opts


def grpc_options(srv: ServerSettings) -> list[tuple[str, int]]:
    ms = lambda s: int(s * 1000)  # noqa: E731
    return [
        ("grpc.max_receive_message_length", srv.max_body_bytes),
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_time_ms", ms(srv.grpc_keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", ms(srv.grpc_keepalive_timeout_s)),
        ("grpc.max_connection_idle_ms", ms(srv.grpc_max_connection_idle_s)),
        ("grpc.http2.min_ping_interval_without_data_ms", ms(srv.grpc_min_ping_interval_s)),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def grpc_credentials(srv: ServerSettings) -> grpc.ServerCredentials | None:
    if not srv.tls:
        return None
    pair = [(srv.tls_key.read_bytes(), srv.tls_cert.read_bytes())]
    if srv.tls_client_ca is not None:
        return grpc.ssl_server_credentials(pair, root_certificates=srv.tls_client_ca.read_bytes(),
                                           require_client_auth=True)
    return grpc.ssl_server_credentials(pair)
