"""Request-body limits as pure ASGI middleware: bytes and JSON containers are counted while the body is
read, so a body over the limit is cut off with 413 before it is buffered whole or parsed (chunked bodies
without Content-Length included); a body that stops arriving for `body_timeout_s` gets 408. No torch.

Why containers: `json.loads` turns 16 MB of `[],[],...` into ~5 M Python lists (~450 MB). A legitimate
request has at most a few thousand arrays/objects (K candidates x T actions), so counting `[` and `{`
bytes (never part of base64 frame data) bounds the memory a body can cost before parsing.
"""

from __future__ import annotations

import asyncio
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_body


class BodyTooLarge(Exception):
    pass


def _json_error(status: int, code: str, message: str, field: str | None) -> tuple[dict, dict]:
    body = json.dumps(error_body(code, message, field)).encode()
    start = {"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         (b"connection", b"close")]}
    return start, {"type": "http.response.body", "body": body}


async def send_json_error(send: Send, status: int, code: str, message: str, field: str | None = None,
                          headers: list[tuple[bytes, bytes]] | None = None) -> None:
    start, body = _json_error(status, code, message, field)
    start["headers"] += headers or []
    await send(start)
    await send(body)


class BodyLimit:
    """413 for a body over `max_bytes` bytes or over `max_items` JSON arrays/objects."""

    def __init__(self, app: ASGIApp, max_bytes: int, max_items: int, body_timeout_s: float = 30.0):
        self.app, self.max_bytes, self.max_items, self.body_timeout_s = app, max_bytes, max_items, body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for k, v in scope.get("headers", ()):
            if k == b"content-length":
                n = v.decode("latin-1")
                if not n.isdigit() or int(n) > self.max_bytes:
                    return await send_json_error(send, 413, "INVALID_ARGUMENT",
                                                 f"payload of {n[:30]} bytes is over the {self.max_bytes}-byte limit",
                                                 "body")
        seen = {"bytes": 0, "items": 0, "over": None, "status": 413, "done": False}
        started = {"app": False}

        async def counted() -> Message:
            if seen["over"]:
                raise BodyTooLarge(seen["over"])
            if seen["done"]:  # the body is in: what comes now is the disconnect, whenever it comes
                return await receive()
            try:  # a body that trickles in (slowloris on the body) holds a connection and a task
                msg = await asyncio.wait_for(receive(), self.body_timeout_s)
            except TimeoutError:
                seen["over"], seen["status"] = f"request body not received within {self.body_timeout_s:g} s", 408
                raise BodyTooLarge(seen["over"]) from None
            if msg["type"] == "http.request":
                seen["done"] = not msg.get("more_body", False)
                chunk = msg.get("body", b"")
                seen["bytes"] += len(chunk)
                seen["items"] += chunk.count(b"[") + chunk.count(b"{")
                if seen["bytes"] > self.max_bytes:
                    seen["over"] = f"payload over the {self.max_bytes}-byte limit (cut off while reading)"
                elif seen["items"] > self.max_items:
                    seen["over"] = f"payload has over {self.max_items} JSON arrays/objects"
                if seen["over"]:
                    raise BodyTooLarge(seen["over"])
            return msg

        async def guarded_send(msg: Message) -> None:
            if seen["over"]:
                return  # the app's answer to a cut-off body is replaced by our 413
            if msg["type"] == "http.response.start":
                started["app"] = True
            await send(msg)

        try:
            await self.app(scope, counted, guarded_send)
        except BodyTooLarge:
            pass
        except Exception:
            if not seen["over"]:
                raise
        if seen["over"] and not started["app"]:
            await send_json_error(send, seen["status"], "INVALID_ARGUMENT", seen["over"], "body")
