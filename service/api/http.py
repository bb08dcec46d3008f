"""REST + WebSocket adapter (FastAPI) over the data plane. No torch, no model here."""

from __future__ import annotations

import base64
import binascii
import json
import time
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from ..errors import InvalidArgument, ServiceError
from ..messages import ErrorCode, FrameMode, Priority, RolloutEvent
from .dataplane import DataPlane, Options, RolloutInput, WireFrame, raise_for
from .errors import http_status
from .images import encode_frame

STATIC = Path(__file__).parent / "static"
FRAME_MODES = {"all": FrameMode.ALL, "last": FrameMode.LAST, "none": FrameMode.NONE}
PRIORITIES = {"interactive": Priority.INTERACTIVE, "normal": Priority.NORMAL, "bulk": Priority.BULK}


class FrameIn(BaseModel):
    encoding: Literal["raw", "png", "jpeg"] = "png"
    data: str = Field(description="base64 of the PNG/JPEG file or of raw RGB8 bytes")
    height: int = 0
    width: int = 0


class OptionsIn(BaseModel):
    frames: Literal["all", "last", "none"] = "all"
    seed: int = 0
    temperature: float = 0.0
    deadline_ms: int = 0
    priority: Literal["interactive", "normal", "bulk"] = "normal"
    return_tokens: bool = False
    frame_encoding: Literal["raw", "png", "jpeg"] = "png"


class PredictIn(BaseModel):
    context: list[FrameIn]
    actions: list[Any] = Field(description="one action per step: int (discrete) or list of floats")
    context_actions: list[Any] | None = None
    options: OptionsIn = OptionsIn()


class RolloutIn(BaseModel):
    context: list[FrameIn]
    candidates: list[list[Any]]
    context_actions: list[Any] | None = None
    options: OptionsIn = OptionsIn()


def _frames(frames: list[FrameIn]) -> list[WireFrame]:
    out = []
    for i, f in enumerate(frames):
        try:
            data = base64.b64decode(f.data, validate=True)
        except (binascii.Error, ValueError) as e:
            raise InvalidArgument(f"context[{i}].data is not valid base64", f"context[{i}].data") from e
        out.append(WireFrame(f.encoding, data, f.height, f.width))
    return out


def _options(o: OptionsIn) -> Options:
    return Options(FRAME_MODES[o.frames], o.seed, o.temperature, o.deadline_ms, PRIORITIES[o.priority],
                   o.return_tokens, o.frame_encoding)


def event_json(ev: RolloutEvent, encoding: str) -> dict:
    if ev.final:
        err = None if ev.error == ErrorCode.OK else {"code": ev.error.name, "message": ev.message}
        return {"final": True, "error": err}
    d: dict = {"candidate": ev.candidate, "step": ev.step, "reward": ev.reward, "done": ev.done}
    if ev.frame is not None:
        h, w = ev.frame.shape[:2]
        d["frame"] = {"encoding": encoding, "height": h, "width": w,
                      "data": base64.b64encode(encode_frame(ev.frame, encoding)).decode()}
    if ev.tokens is not None:
        d["tokens"] = ev.tokens.tolist()
    return d


def error_body(e: ServiceError) -> dict:
    return {"error": {"code": e.code.name, "message": e.message, "field": e.field}}


def create_app(dp: DataPlane, max_body_bytes: int) -> FastAPI:
    app = FastAPI(title="worldserve", version="0.1.0",
                  description="Action-conditioned video world model serving: predict, rollouts, sessions.")

    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, e: ServiceError):
        return JSONResponse(error_body(e), status_code=http_status(e.code))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError):
        errs = e.errors()
        where = ".".join(str(x) for x in errs[0]["loc"][1:]) if errs else "body"
        msg = f"{where}: {errs[0]['msg']}" if errs else "invalid request"
        return JSONResponse({"error": {"code": "INVALID_ARGUMENT", "message": msg, "field": where}}, status_code=422)

    @app.middleware("http")
    async def _limit_body(request: Request, call_next):
        n = request.headers.get("content-length")
        if n is not None and n.isdigit() and int(n) > max_body_bytes:
            return JSONResponse({"error": {"code": "INVALID_ARGUMENT", "field": "body",
                                           "message": f"payload of {n} bytes is over the {max_body_bytes}-byte limit"}},
                                status_code=413)
        return await call_next(request)

    @app.get("/healthz")
    async def healthz():
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

    @app.post("/v1/models/{name}/predict")
    async def predict(name: str, body: PredictIn):
        inp = RolloutInput(name, _frames(body.context), [body.actions], body.context_actions, _options(body.options))
        rid, events = await dp.predict(inp)
        enc = body.options.frame_encoding
        return {"request_id": rid, "steps": [event_json(e, enc) for e in events]}

    @app.post("/v1/models/{name}/rollouts")
    async def rollouts(name: str, body: RolloutIn, request: Request):
        inp = RolloutInput(name, _frames(body.context), body.candidates, body.context_actions,
                           _options(body.options))
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
        await ws.accept()
        await run_ws_session(ws, dp, name)

    return app


async def run_ws_session(ws: WebSocket, dp: DataPlane, name: str) -> None:
    """JSON protocol: client sends {"type": "open", "context": [...], "options": {...}}, then
    {"type": "action", "action": a} per step; server answers {"type": "frame", ...} per action,
    {"type": "error", "code", "message"} on bad input (the session stays open for a bad action)."""
    import asyncio

    req, pump_task = None, None
    try:
        first = await ws.receive_json()
        if first.get("type") != "open":
            raise InvalidArgument("first message must be {\"type\": \"open\", ...}", "type")
        body = RolloutIn(candidates=[], **{k: v for k, v in first.items() if k != "type"})
        enc = body.options.frame_encoding
        req, events = await dp.open_session(RolloutInput(name, _frames(body.context), [], body.context_actions,
                                                         _options(body.options)))
        await ws.send_json({"type": "opened", "session_id": req.id})

        async def pump():
            async for ev in events:
                if ev.final:
                    raise_for(ev)
                    return
                await ws.send_json({"type": "frame", "t": time.time(), **event_json(ev, enc)})

        pump_task = asyncio.create_task(pump())
        recv_task = None
        while True:
            recv_task = asyncio.create_task(ws.receive_json())
            done, _ = await asyncio.wait({pump_task, recv_task}, return_when=asyncio.FIRST_COMPLETED)
            if pump_task in done:
                recv_task.cancel()
                pump_task.result()
                break
            msg = recv_task.result()
            if msg.get("type") == "close":
                await dp.close_session(req)
                await pump_task
                break
            try:
                await dp.act(req, msg.get("action"))
            except InvalidArgument as e:
                await ws.send_json({"type": "error", **error_body(e)["error"]})
        await ws.close()
    except WebSocketDisconnect:
        pass
    except ServiceError as e:
        await ws.send_json({"type": "error", **error_body(e)["error"]})
        await ws.close(code=1008)
    except (ValueError, TypeError, json.JSONDecodeError) as e:
        await ws.send_json({"type": "error", "code": "INVALID_ARGUMENT", "message": str(e)})
        await ws.close(code=1008)
    finally:
        if pump_task is not None and not pump_task.done():
            pump_task.cancel()  # closes the event stream: the engine frees the slot
        if req is not None:
            await dp.close_session(req)
