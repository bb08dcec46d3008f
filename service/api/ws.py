"""WebSocket session adapter over the data plane. No torch here.

JSON text protocol: the client sends {"type": "open", "context": [...], "options": {...}}, then
{"type": "action", "action": a} per step and {"type": "close"} at the end; the server answers
{"type": "opened", "session_id"}, {"type": "frame", ...} per action, and {"type": "error", "code",
"message", "field"} on bad input. A bad action keeps the session open; a malformed frame (binary,
not JSON, not a JSON object, nested deeper than server.max_json_depth) or a bad open ends it with an error
message and a close frame (1003 for binary data, 1008 otherwise, see errors.WS_CLOSE). The `open` must come
within server.session_open_timeout_s of the handshake, else the session ends (error message + 1008) and its
place among server.max_sessions comes back: silent WebSockets cannot hold every place.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from fastapi import WebSocket, WebSocketDisconnect
from pydantic import ValidationError
from starlette.websockets import WebSocketState

from ..errors import InvalidArgument, ServiceError
from .auth import current_principal
from .dataplane import DataPlane, RolloutInput
from .errors import WS_UNSUPPORTED_DATA, code_name, ws_close_code
from .schemas import JsonDepth, SessionOpenIn, event_bytes, frames_in, options_in, validation_error
from .session import CLOSE, session_events

log = logging.getLogger("worldserve.api.ws")


class BadFrame(InvalidArgument):
    def __init__(self, message: str, close_code: int = 1008):
        super().__init__(message, "message")
        self.close_code = close_code


async def receive_object(ws: WebSocket, max_depth: int = 32) -> dict:
    """The next client message as a JSON object, or BadFrame / WebSocketDisconnect."""
    msg = await ws.receive()
    if msg["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(msg.get("code", 1000))
    text = msg.get("text")
    if text is None:
        raise BadFrame("binary frames are not accepted: send JSON text messages", WS_UNSUPPORTED_DATA)
    depth = JsonDepth(max_depth)
    if depth.feed(text):  # before json.loads: 100k `[` would raise RecursionError inside the parser
        raise BadFrame(f"message is {depth.message}")
    try:
        obj = json.loads(text)
    except ValueError as e:  # includes ints over Python's digit limit
        raise BadFrame(f"message is not valid JSON: {str(e)[:100]}") from e
    if not isinstance(obj, dict):
        raise BadFrame(f"message must be a JSON object, got a JSON {type(obj).__name__}")
    return obj


def error_message(e: ServiceError) -> dict:
    return {"type": "error", "code": code_name(e.code), "message": e.message, "field": e.field}


async def _close(ws: WebSocket, e: ServiceError | None, code: int) -> None:
    if ws.application_state != WebSocketState.CONNECTED or ws.client_state != WebSocketState.CONNECTED:
        return
    try:
        if e is not None:
            await ws.send_json(error_message(e))
        await ws.close(code=code)
    except (WebSocketDisconnect, RuntimeError, OSError):
        pass


async def _inbox(ws: WebSocket, max_depth: int):
    """Client messages -> actions (or CLOSE); an unknown type is reported and the session goes on."""
    while True:
        msg = await receive_object(ws, max_depth)
        kind = msg.get("type")
        if kind == "close":
            yield CLOSE
            return
        if kind == "action":
            yield msg.get("action")
        else:
            await ws.send_json(error_message(InvalidArgument(
                f'unknown message type {str(kind)[:40]!r} (use "action" or "close")', "type")))


async def run_ws_session(ws: WebSocket, dp: DataPlane, name: str) -> None:
    req, srv = None, dp.server
    try:
        try:
            first = await asyncio.wait_for(receive_object(ws, srv.max_json_depth), srv.session_open_timeout_s)
        except TimeoutError:
            raise InvalidArgument(f"no `open` message within the session open deadline of "
                                  f"{srv.session_open_timeout_s:g} s (server.session_open_timeout_s)", "open") from None
        if first.get("type") != "open":
            raise InvalidArgument('first message must be {"type": "open", ...}', "type")
        try:
            body = SessionOpenIn.model_validate(first)
        except ValidationError as ve:
            raise validation_error(ve) from None
        enc = body.options.frame_encoding
        req, events = await dp.open_session(RolloutInput(name, frames_in(body.context), [], body.context_actions,
                                                         options_in(body.options), principal=current_principal()))
        await ws.send_json({"type": "opened", "session_id": req.id})

        async def rejected(e: InvalidArgument) -> None:  # a bad action: say so, the session goes on
            await ws.send_json(error_message(e))

        async for ev in session_events(dp, req, events, _inbox(ws, srv.max_json_depth), rejected):
            await ws.send_text(event_bytes(ev, enc, head={"type": "frame", "t": time.time()}).decode())
        await _close(ws, None, 1000)
    except WebSocketDisconnect:
        pass
    except BadFrame as e:
        await _close(ws, e, e.close_code)
    except ServiceError as e:
        await _close(ws, e, ws_close_code(e.code))
    except Exception:  # noqa: BLE001 - never an unhandled error in the ASGI app: log it, close with 1011
        log.exception("websocket session failed")
        await _close(ws, ServiceError("internal error in the session"), 1011)
    finally:
        if req is not None:
            try:
                await dp.close_session(req)
            except Exception:  # noqa: BLE001 - best effort (queue gone at shutdown)
                log.debug("close_session failed", exc_info=True)
