"""Connection hygiene and TLS for the two servers, from settings: uvicorn (HTTP/WS) and grpc.aio.

- HTTP: a connection must finish its request headers within `http_header_timeout_s` (slowloris: 500
  connections that never finished their headers were held for 60 s) and each piece of its body within
  `http_body_timeout_s` (limits.BodyLimit, 408); `http_max_connections` caps open
  connections + tasks (503 over it); idle keep-alive connections close after `http_keep_alive_s`.
- HTTP headers are bounded while they arrive (HeaderTimeoutProtocol, before any key is checked): a request line +
  headers over `http_max_header_bytes` or over `http_max_headers` lines gets 431 and the connection closed (one
  connection trickling tiny headers for the 10 s header timeout grew the process by ~2 GB: httptools keeps every
  header, and uvicorn's h11 limit does not apply to it). At most `max_unauthenticated_connections` connections
  may be inside their header section at once; a new connection over that is closed at once. Memory of one
  connection in its header section: at most `http_max_header_bytes` + one socket read (256 KiB).
- gRPC: `grpc_max_concurrent_rpcs` (RESOURCE_EXHAUSTED over it), `grpc_max_streams_per_connection` concurrent
  HTTP/2 streams per connection (MAX_CONCURRENT_STREAMS), keepalive pings and limits, idle connections closed,
  max message size = `max_body_bytes`.
- JSON nesting: REST bodies (http.BodyLimit) and WebSocket messages (ws.receive_object) deeper than
  `max_json_depth` are refused before json.loads (schemas.JsonDepth; 100k `[` raised RecursionError in the parser).
- TLS: `tls_cert` + `tls_key` (PEM) serve HTTPS/WSS and gRPC over TLS; `tls_client_ca` makes gRPC
  require client certificates signed by that CA (mTLS).
"""

from __future__ import annotations

import asyncio
import json

import grpc
import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..settings import ServerSettings
from .errors import error_body


class _HeadersTooLarge(Exception):
    """Raised inside a parser callback to stop httptools; the 431 goes out from data_received."""


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """httptools protocol that bounds a request's header section: its time (`header_timeout_s`: closed), its
    bytes (`max_header_bytes`: 431) and lines (`max_headers`: 431), and how many connections may be inside one at
    once (`max_pending`: a new connection over it is closed at once). `pending` is per server class (each
    uvicorn_options call makes its own)."""

    header_timeout_s = 10.0
    max_header_bytes = 16384
    max_headers = 100
    max_pending = 256
    pending: set = set()
    _header_timer: asyncio.TimerHandle | None = None
    _refused = False  # closed at connection_made: over max_pending
    _over: str | None = None  # why the headers were refused (431 sent)
    _in_headers = False  # between on_message_begin and on_headers_complete
    _idle = True  # no message in progress (the next byte starts one)
    _begun = 0  # messages begun on this connection
    _bytes = _lines = _raw = 0  # this message: header bytes and lines seen by the callbacks; raw bytes read

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
        if len(self.pending) >= self.max_pending:  # too many connections still in their headers: no more
            self._refused = True
            transport.close()
            return
        self.pending.add(self)
        self._arm()

    def data_received(self, data: bytes) -> None:
        """uvicorn's, plus the header bounds: callbacks count what httptools hands over (a header only arrives
        when the next one starts), and a read that begins and ends inside the header section counts whole (a
        header that never ends is buffered inside httptools)."""
        if self._refused or self._over is not None:
            return
        was_idle, in_headers, begun = self._idle, self._in_headers, self._begun
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            if self._over is not None:
                return self._send_431()
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
            return
        if self._in_headers and ((in_headers and self._begun == begun) or (was_idle and self._begun == begun + 1)):
            self._raw += len(data)  # every byte of this read belongs to the current header section
            if self._raw > self.max_header_bytes:
                self._over = self._too_many_bytes()
                self._send_431()

    def _too_many_bytes(self) -> str:
        return (f"request line + headers over the {self.max_header_bytes}-byte limit "
                f"(server.http_max_header_bytes)")

    def _count(self, n: int) -> None:
        self._bytes += n
        if self._bytes > self.max_header_bytes:
            self._over = self._too_many_bytes()
            raise _HeadersTooLarge

    def _send_431(self) -> None:
        self.pending.discard(self)
        self._disarm()
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:  # no earlier (pipelined) response is being written
            body = json.dumps(error_body("INVALID_ARGUMENT", self._over or "", "headers")).encode()
            self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body) + body)
        self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._begun += 1
        self._in_headers, self._idle = True, False
        self._bytes = self._lines = self._raw = 0
        self.pending.add(self)  # a keep-alive connection's next request: in its headers again (never refused)
        self._arm()  # keep-alive: the next request's headers get the same time

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:  # trailers of a chunked body count here too
        self._lines += 1
        if self._lines > self.max_headers:
            self._over = f"over {self.max_headers} header lines (server.http_max_headers)"
            raise _HeadersTooLarge
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self.pending.discard(self)
        self._disarm()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._idle = True
        super().on_message_complete()

    def connection_lost(self, exc) -> None:
        self.pending.discard(self)
        self._disarm()
        super().connection_lost(exc)


def uvicorn_options(srv: ServerSettings, tls: bool = True) -> dict:
    """Options of every uvicorn server we start: the front end's and the worker's probe/metrics port (tls=False)."""
    proto = type("HttpProtocol", (HeaderTimeoutProtocol,), {
        "header_timeout_s": srv.http_header_timeout_s, "max_header_bytes": srv.http_max_header_bytes,
        "max_headers": srv.http_max_headers, "max_pending": srv.max_unauthenticated_connections, "pending": set()})
    opts = dict(http=proto, limit_concurrency=srv.http_max_connections, timeout_keep_alive=int(srv.http_keep_alive_s),
                ws_max_size=srv.max_body_bytes, h11_max_incomplete_event_size=srv.http_max_header_bytes)
    if tls and srv.tls:
        opts.update(ssl_certfile=str(srv.tls_cert), ssl_keyfile=str(srv.tls_key))
    return opts


def grpc_options(srv: ServerSettings) -> list[tuple[str, int]]:
    ms = lambda s: int(s * 1000)  # noqa: E731
    return [
        ("grpc.max_receive_message_length", srv.max_body_bytes),
        ("grpc.max_concurrent_streams", srv.grpc_max_streams_per_connection),  # per HTTP/2 connection
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
