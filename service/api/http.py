"""REST + WebSocket adapter (FastAPI) over the data plane. No torch, no model here.

The app is the request-body limits (outermost after the key gate) plus three routers: probes (/healthz,
/readyz, /metrics), models (list, predict, rollouts, the WebSocket session, /play) and admin (api/admin.py:
admin-scoped keys, model roots, pinned weights), and the one mapping of errors to JSON bodies (api/errors.py).

Body limits as pure ASGI middleware: bytes and JSON containers are counted while the body is read, so a body
over the limit is cut off with 413 before it is buffered whole or parsed (chunked bodies without Content-Length
included); a body that stops arriving for `body_timeout_s` gets 408. Why containers: `json.loads` turns 16 MB of
`[],[],...` into ~5 M Python lists (~450 MB). A legitimate request has at most a few thousand arrays/objects
(K candidates x T actions), so counting `[` and `{` bytes (never part of base64 frame data) bounds the memory a
body can cost before parsing. The same bytes give the nesting depth (`[`/`{` +1, `]`/`}` -1, running max over the
chunks, schemas.JsonDepth): a body nested deeper than `max_json_depth` gets 400 naming the limit before json.loads
sees it (5,000 nested `[` ran the parser into RecursionError, answered only "error parsing the body").
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import ServiceError
from ..metrics import exposition
from ..settings import ServerSettings
from .admin import admin_router
from .auth import WS_PROTOCOL, Gate, HttpGate, current_principal
from .dataplane import DataPlane, RolloutInput
from .errors import error_body, http_status, retry_after_header, send_json_error
from .schemas import JsonDepth, PredictIn, RolloutIn, describe, event_bytes, frames_in, options_in
from .ws import run_ws_session

STATIC = Path(__file__).parent / "static"


def create_app(dp: DataPlane, srv: ServerSettings, gate: Gate | None = None) -> FastAPI:
    app = FastAPI(title="worldserve", version="0.1.0",
                  description="Action-conditioned video world model serving: predict, rollouts, sessions.")
    app.add_middleware(BodyLimit, max_bytes=srv.max_body_bytes, max_items=srv.max_request_items,
                       body_timeout_s=srv.http_body_timeout_s, max_depth=srv.max_json_depth)
    if gate is not None:  # outermost: strangers are refused before their body is read
        app.add_middleware(HttpGate, gate=gate)
    _error_handlers(app)
    app.include_router(probes(dp))
    app.include_router(models(dp))
    if srv.admin_api:  # admin-scoped keys only (auth.py)
        app.include_router(admin_router(dp))
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def error_response(e: ServiceError) -> JSONResponse:
    ra = retry_after_header(e)
    return JSONResponse(error_body(e.code, e.message, e.field), status_code=http_status(e.code),
                        headers={"retry-after": ra} if ra is not None else {})


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, e: ServiceError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError):
        where, msg = describe(e.errors(), skip=1)
        return JSONResponse(error_body("INVALID_ARGUMENT", msg, where), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException):
        code = "INTERNAL" if e.status_code >= 500 else "NOT_FOUND" if e.status_code == 404 else "INVALID_ARGUMENT"
        return JSONResponse(error_body(code, str(e.detail)), status_code=e.status_code,
                            headers=getattr(e, "headers", None))


def probes(dp: DataPlane) -> APIRouter:
    r = APIRouter()

    @r.get("/healthz")
    async def healthz():
        if not dp.alive():
            return JSONResponse({"status": "dead"}, status_code=503)
        return {"status": "ok"}

    @r.get("/readyz")
    async def readyz():
        if not dp.ready():
            return JSONResponse({"status": "not ready"}, status_code=503)
        return {"status": "ready", "models": [m.name for m in dp.models()]}

    @r.get("/metrics")
    async def metrics():
        refresh = getattr(dp.queue, "refresh_metrics", None)  # isolated engines: their figures as of now
        if refresh is not None:
            await refresh()
        return Response(exposition(), media_type=CONTENT_TYPE_LATEST)

    return r


async def _until_disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read: the next message is the disconnect)."""
    while True:
        if (await request.receive())["type"] == "http.disconnect":
            return


def models(dp: DataPlane) -> APIRouter:
    r = APIRouter()

    @r.get("/v1/models")
    async def list_models():
        return {"models": [vars(m) for m in dp.models()]}

    @r.post("/v1/models/{name}/predict")
    async def predict(name: str, body: PredictIn, request: Request):
        m = dp.precheck(name, len(body.context), [len(body.actions)], len(body.context_actions or ()), single=True)
        inp = RolloutInput(name, frames_in(body.context), [body.actions], body.context_actions,
                           options_in(body.options), principal=current_principal(), info=m)
        work = asyncio.create_task(dp.predict(inp))
        gone = asyncio.create_task(_until_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():  # the client went away (or we are shutting down): cancel, free the slots
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
        if work.cancelled():
            return Response(status_code=499)
        rid, events, truncated = work.result()
        enc = body.options.frame_encoding
        tail = f',"truncated":{json.dumps(truncated)}' if body.options.anytime else ""
        return Response(b"".join((f'{{"request_id":{json.dumps(rid)},"steps":['.encode(),
                                  b",".join(event_bytes(e, enc) for e in events), f"]{tail}}}".encode())),
                        media_type="application/json")

    @r.post("/v1/models/{name}/rollouts")
    async def rollouts(name: str, body: RolloutIn):
        m = dp.precheck(name, len(body.context), [len(c) for c in body.candidates], len(body.context_actions or ()))
        inp = RolloutInput(name, frames_in(body.context), body.candidates, body.context_actions,
                           options_in(body.options), principal=current_principal(), info=m)
        req, events, reach = await dp.start_rollout(inp)
        enc = body.options.frame_encoding

        async def lines():
            async for ev in events:  # closing this generator (client gone) cancels the request
                yield event_bytes(ev, enc, reach) + b"\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson", headers={"x-request-id": req.id})

    @r.websocket("/v1/models/{name}/session")
    async def session(ws: WebSocket, name: str):
        offered = ws.scope.get("subprotocols", ())  # a browser sending its key as `bearer.<key>` needs one back
        await ws.accept(subprotocol=WS_PROTOCOL if WS_PROTOCOL in offered else None)
        await run_ws_session(ws, dp, name)

    @r.get("/play")
    async def play():
        return FileResponse(STATIC / "play.html")

    return r


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """413 for a body over `max_bytes` bytes or over `max_items` JSON arrays/objects, 400 for one nested deeper
    than `max_depth`, 408 for one that stops arriving for `body_timeout_s`."""

    def __init__(self, app: ASGIApp, max_bytes: int, max_items: int, body_timeout_s: float = 30.0,
                 max_depth: int = 32):
        self.app, self.max_bytes, self.max_items, self.body_timeout_s = app, max_bytes, max_items, body_timeout_s
        self.max_depth = max_depth

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
        depth = JsonDepth(self.max_depth)
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
                elif depth.feed(chunk):
                    seen["over"], seen["status"] = f"payload is {depth.message}", 400
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
