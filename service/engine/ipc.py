"""The wire between a front end and an engine process (engine/process.py): length-prefixed frames on a local
stream socket, each a kind byte and a payload. Payloads are the typed messages of messages.py (pack / unpack: a
JSON header and the raw buffers of the arrays), never bare tuples. No torch here.

    frame  = u32 payload length | u8 kind | payload
    CONFIG : JSON {"settings": {"model": ..., "engine": ...}, "weights_sha256": ...}   front end -> engine
    READY  : ModelInfo JSON                                                            engine -> front end
    MSG    : pack(RolloutRequest | SessionAction | Cancel)                             front end -> engine
    EVENTS : u8 fatal | u32 n | n x (u32 length | pack(RolloutEvent))  (one engine step) engine -> front end
    STOP   : empty                                                                     front end -> engine
    METRICS: Prometheus text of the engine process, every METRICS_EVERY_S             engine -> front end
    METRICS_NOW: empty: send the metrics now (a /metrics scrape)                       front end -> engine
    ACTS   : u32 n | n x (u32 length | pack(SessionAction)): one loop pass's actions      front end -> engine
    METRICS_FRESH: Prometheus text, the answer to METRICS_NOW                          engine -> front end
    FAILED : JSON {"code", "message", "field", "kind"}: the engine could not be built  engine -> front end
"""

from __future__ import annotations

import json
import socket
import struct

from ..errors import ServiceError, from_code
from ..messages import ErrorCode, RolloutEvent, pack, unpack
from ..model.config import ConfigurationError

CONFIG, READY, MSG, EVENTS, STOP, METRICS, FAILED, METRICS_NOW, METRICS_FRESH, ACTS = range(1, 11)
METRICS_EVERY_S = 0.5  # how stale the front end's /metrics may be for an isolated engine
_HEAD = struct.Struct("<IB")
_U32 = struct.Struct("<I")
MAX_FRAME = 1 << 30  # a corrupt length ends the connection instead of allocating it


class Closed(ConnectionError):
    """The other end closed the socket (or died)."""


def send(sock: socket.socket, kind: int, payload: bytes = b"") -> None:
    sock.sendall(_HEAD.pack(len(payload), kind) + payload)


def _exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise Closed("engine connection closed")
        got += k
    return bytes(buf)


def recv(sock: socket.socket) -> tuple[int, bytes]:
    n, kind = _HEAD.unpack(_exactly(sock, _HEAD.size))
    if n > MAX_FRAME:
        raise Closed(f"frame of {n} bytes: corrupt stream")
    return kind, _exactly(sock, n) if n else b""


# what a build raises for a bad configuration or directory (most specific first: ModelLoadError is a
# ConfigurationError, which `worldserve serve` reports without a traceback, and a ValueError, the admin API's 400)
_KINDS = {k.__name__: k for k in (ConfigurationError, ValueError, TypeError, OSError, RuntimeError)}


def encode_failure(e: Exception) -> bytes:
    """A failed build, as the front end re-raises it: a ServiceError by its code, a bad configuration / directory
    by its kind (_KINDS), anything else as RuntimeError."""
    if isinstance(e, ServiceError):
        d = {"code": int(e.code), "message": e.message, "field": e.field, "kind": None}
    else:
        kind = next((k.__name__ for k in type(e).__mro__ if k.__name__ in _KINDS), None)
        d = {"code": int(ErrorCode.INTERNAL), "message": str(e) if kind else f"{type(e).__name__}: {e}",
             "field": None, "kind": kind or "RuntimeError"}
    return json.dumps(d).encode()


def decode_failure(payload: bytes) -> Exception:
    d = json.loads(payload)
    if d.get("kind") is None:
        e = from_code(ErrorCode(d["code"]), d["message"])
        e.field = d.get("field")
        return e
    return _KINDS.get(d["kind"], RuntimeError)(d["message"])


def encode_msgs(msgs: list) -> bytes:
    parts = [_U32.pack(len(msgs))]
    for m in msgs:
        b = pack(m)
        parts += [_U32.pack(len(b)), b]
    return b"".join(parts)


def decode_msgs(payload: bytes, off: int = 0) -> list:
    (n,) = _U32.unpack_from(payload, off)
    off, msgs = off + _U32.size, []
    for _ in range(n):
        (size,) = _U32.unpack_from(payload, off)
        off += _U32.size
        msgs.append(unpack(payload[off : off + size]))
        off += size
    return msgs


def encode_events(events: list[RolloutEvent], fatal: bool) -> bytes:
    return bytes([int(fatal)]) + encode_msgs(events)


def decode_events(payload: bytes) -> tuple[list[RolloutEvent], bool]:
    return decode_msgs(payload, 1), bool(payload[0])
