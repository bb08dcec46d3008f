"""REST + WebSocket adapter (FastAPI) over the data plane. No torch, no model here."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ServiceError
from ..settings import ServerSettings
from .auth import WS_PROTOCOL, Gate, HttpGate
from .dataplane import DataPlane, RolloutInput
from .errors import error_body, http_status, retry_after_header
from .limits import BodyLimit
from .schemas import LoadModelIn, PredictIn, RolloutIn, describe, event_json, frames_in, options_in
from .ws import run_ws_session

STATIC = Path(__file__).parent / "static"


def error_response(e: ServiceError) -> JSONResponse:
    ra = retry_after_header(e)
    return JSONResponse(error_body(e.code, e.message, e.field), status_code=http_status(e.code),
                        headers={"retry-after": ra} if ra is not None else {})


async def _until_disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read: the next message is the disconnect)."""
    while True:
        if (await request.receive())["type"] == "http.disconnect":
            return


def create_app(dp: DataPlane, srv: ServerSettings, gate: Gate | None = None) -> FastAPI:
    app = FastAPI(title="worldserve", version="0.1.0",
                  description="Action-conditioned video world model serving: predict, rollouts, sessions.")
    app.add_middleware(BodyLimit, max_bytes=srv.max_body_bytes, max_items=srv.max_request_items,
                       body_timeout_s=srv.http_body_timeout_s)
    if gate is not None:  # outermost: strangers are refused before their body is read
        app.add_middleware(HttpGate, gate=gate)

    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, e: ServiceError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError):
        where, msg = describe(e.errors(), skip=1)
        return JSONResponse(error_body("INVALID_ARGUMENT", msg, where), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException):
        code = {404: "NOT_FOUND", 405: "INVALID_ARGUMENT", 413: "INVALID_ARGUMENT"}.get(e.status_code,
                                                                                      "INVALID_ARGUMENT")
        if e.status_code >= 500:
            code = "INTERNAL"
        return JSONResponse(error_body(code, str(e.detail)),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.get("/healthz")
    async def healthz():
        if not dp.alive():
            return JSONResponse({"status": "dead"}, status_code=503)
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if not dp.ready():
            return JSONResponse({"status": "not ready"}, status_code=503)
        return {"status": "ready", "models": [m.name for m in dp.models()]}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models():
        return {"models": [vars(m) for m in dp.models()]}

    if srv.admin_api:  # behind the API keys like every non-public path

        @app.post("/v1/admin/models", status_code=201)
        async def load_model(body: LoadModelIn):
            return vars(await dp.load_model(body.dir))

        @app.delete("/v1/admin/models/{name}")
        async def unload_model(name: str):
            await dp.unload_model(name)
            return {"unloaded": name}

    @app.post("/v1/models/{name}/predict")
    async def predict(name: str, body: PredictIn, request: Request):
        dp.precheck(name, len(body.context), [len(body.actions)], len(body.context_actions or ()), single=True)
        inp = RolloutInput(name, frames_in(body.context), [body.actions], body.context_actions,
                           options_in(body.options))
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
        rid, events = work.result()
        enc = body.options.frame_encoding
        return {"request_id": rid, "steps": [event_json(e, enc) for e in events]}

    @app.post("/v1/models/{name}/rollouts")
    async def rollouts(name: str, body: RolloutIn):
        dp.precheck(name, len(body.context), [len(c) for c in body.candidates], len(body.context_actions or ()))
        inp = RolloutInput(name, frames_in(body.context), body.candidates, body.context_actions,
                           options_in(body.options))
        req, events = await dp.rollout(inp)
        enc = body.options.frame_encoding

        async def lines():
            async for ev in events:  # closing this generator (client gone) cancels the request
                yield json.dumps(event_json(ev, enc)) + "\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson", headers={"x-request-id": req.id})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/play")
    async def play():
        return FileResponse(STATIC / "play.html")

    @app.websocket("/v1/models/{name}/session")
    async def session(ws: WebSocket, name: str):
        offered = ws.scope.get("subprotocols", ())  # a browser sending its key as `bearer.<key>` needs one back
        await ws.accept(subprotocol=WS_PROTOCOL if WS_PROTOCOL in offered else None)
        await run_ws_session(ws, dp, name)

    return app
