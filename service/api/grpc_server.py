"""gRPC adapter (grpc.aio) over the data plane, plus the standard health and reflection services."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..errors import InvalidArgument, ServiceError
from ..messages import ModelInfo, RolloutEvent
from ..settings import ServerSettings
from ..wire import ENCODINGS, FRAME_MODES, PRIORITIES, PROTO_ENCODING, proto_map
from .auth import current_principal, hold_sessions, take_token
from .conn import grpc_credentials, grpc_options
from .dataplane import DataPlane, Options, RolloutInput, WireFrame, raise_for
from .errors import grpc_status, grpc_trailers
from .gen import worldserve_pb2 as pb
from .gen import worldserve_pb2_grpc as pbg
from .images import encode_frame
from .pb_guard import check, guarded
from .session import session_events
from .vector import EnvStart, VectorSessions

ENC_PB = proto_map(pb.Frame.Encoding, "", ENCODINGS, PROTO_ENCODING)
ENC_NAME = {v: k for k, v in ENC_PB.items()}
PRIORITY = {v: PRIORITIES[k] for k, v in proto_map(pb.Priority, "PRIORITY_", PRIORITIES).items()}
FRAMES = {v: FRAME_MODES[k] for k, v in proto_map(pb.FrameMode, "FRAMES_", FRAME_MODES).items()}
DEFAULT = Options()  # unset proto fields take the data plane's defaults, as REST's do
SERVICE = pb.DESCRIPTOR.services_by_name["WorldModelService"].full_name
log = logging.getLogger("worldserve.api.grpc")


async def _abort(context, e: ServiceError):
    await context.abort(grpc_status(e.code), e.message, trailing_metadata=grpc_trailers(e))


async def _abort_internal(context, fn_name: str):
    log.exception("gRPC %s failed", fn_name)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {fn_name}")


def maps_errors(fn):
    """Domain errors -> gRPC status, for unary and streaming handlers alike (the one mapping); anything
    else is logged and answered INTERNAL (never UNKNOWN)."""
    if inspect.isasyncgenfunction(fn):
        @functools.wraps(fn)
        async def gen(self, request, context):
            try:
                async for item in fn(self, request, context):
                    yield item
            except ServiceError as e:
                await _abort(context, e)
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception:  # noqa: BLE001
                await _abort_internal(context, fn.__name__)
        return gen

    @functools.wraps(fn)
    async def unary(self, request, context):
        try:
            return await fn(self, request, context)
        except ServiceError as e:
            await _abort(context, e)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception:  # noqa: BLE001
            await _abort_internal(context, fn.__name__)
    return unary


def _action(a: pb.Action, where: str):
    kind = a.WhichOneof("value")
    if kind == "discrete":
        return int(a.discrete)
    if kind == "continuous":
        return list(a.continuous.values)
    raise InvalidArgument(f"{where}: action has neither discrete nor continuous value", where)


def _seq(s: pb.ActionSequence, where: str) -> list:
    return [_action(a, f"{where}[{i}]") for i, a in enumerate(s.actions)]


def _options(o: pb.RolloutOptions) -> Options:
    if o.frames not in FRAMES:
        raise InvalidArgument(f"options.frames: unknown frame mode {o.frames}", "options.frames")
    if o.priority not in PRIORITY:
        raise InvalidArgument(f"options.priority: unknown priority {o.priority}", "options.priority")
    if o.frame_encoding not in ENC_NAME:
        raise InvalidArgument(f"options.frame_encoding: unknown encoding {o.frame_encoding}", "options.frame_encoding")
    enc = ENC_NAME[o.frame_encoding] if o.HasField("frame_encoding") else DEFAULT.frame_encoding
    return Options(FRAMES[o.frames], int(o.seed), float(o.temperature), int(o.deadline_ms),
                   PRIORITY[o.priority], bool(o.return_tokens), enc, bool(o.stop_on_done), bool(o.anytime),
                   bool(o.common_random_numbers))


def _frames(frames) -> list[WireFrame]:
    out = []
    for i, f in enumerate(frames):
        if f.encoding not in ENC_NAME:
            raise InvalidArgument(f"context[{i}].encoding: unknown encoding {f.encoding}", f"context[{i}]")
        out.append(WireFrame(ENC_NAME[f.encoding], f.data, f.height, f.width))
    return out


def _deadline(context) -> float | None:
    left = context.time_remaining()
    return None if left is None else time.time() + left


def _info(m: ModelInfo) -> pb.ModelInfo:
    return pb.ModelInfo(name=m.name, height=m.height, width=m.width, tokens_per_frame=m.tokens_per_frame,
                        vocab_size=m.vocab_size, n_actions=m.n_actions, action_dim=m.action_dim,
                        action_names=m.action_names, context_window=m.context_window,
                        max_horizon=m.max_horizon, max_candidates=m.max_candidates, backend=m.backend,
                        precision=m.precision)


def _event(ev: RolloutEvent, enc: str) -> pb.RolloutEvent:
    out = pb.RolloutEvent(request_id=ev.request_id, candidate=ev.candidate, step=ev.step, reward=ev.reward,
                          done=ev.done, ended=ev.ended)
    if ev.frame is not None:
        h, w = ev.frame.shape[:2]
        out.frame.CopyFrom(pb.Frame(encoding=ENC_PB[enc], height=h, width=w, data=encode_frame(ev.frame, enc)))
    if ev.tokens is not None:
        out.tokens.extend(ev.tokens.tolist())
    if ev.confidence is not None:  # proto3 optional: unset when the model gives none
        out.confidence = ev.confidence
    return out


class WorldModelServicer(pbg.WorldModelServiceServicer):
    def __init__(self, dp: DataPlane):
        self.dp = dp

    @maps_errors
    async def ListModels(self, request, context):
        return pb.ListModelsResponse(models=[_info(m) for m in self.dp.models()])

    @maps_errors
    async def Predict(self, request, context):
        check(request)
        m = self.dp.precheck(request.model, len(request.context), [len(request.actions.actions)],
                             len(request.context_actions.actions), single=True)
        inp = RolloutInput(request.model, _frames(request.context), [_seq(request.actions, "actions")],
                           _seq(request.context_actions, "context_actions") or None, _options(request.options),
                           deadline=_deadline(context), principal=current_principal(), info=m)
        rid, events, truncated = await self.dp.predict(inp)
        enc = inp.options.frame_encoding
        steps = []
        for ev in events:
            e = _event(ev, enc)
            steps.append(pb.StepResult(step=e.step, frame=e.frame if ev.frame is not None else None,
                                       reward=e.reward, done=e.done, tokens=e.tokens,
                                       confidence=e.confidence if e.HasField("confidence") else None,
                                       ended=ev.ended))
        return pb.PredictResponse(request_id=rid, steps=steps, truncated=truncated)

    @maps_errors
    async def Rollout(self, request, context):
        check(request)
        m = self.dp.precheck(request.model, len(request.context), [len(c.actions) for c in request.candidates],
                             len(request.context_actions.actions))
        cands = [_seq(c, f"candidates[{k}]") for k, c in enumerate(request.candidates)]
        inp = RolloutInput(request.model, _frames(request.context), cands,
                           _seq(request.context_actions, "context_actions") or None, _options(request.options),
                           deadline=_deadline(context), principal=current_principal(), info=m)
        _, events, reach = await self.dp.start_rollout(inp)
        enc = inp.options.frame_encoding
        async for ev in events:  # a cancelled RPC closes this iterator, which cancels the request
            if ev.final:
                raise_for(ev)
                if ev.message:  # e.g. stop_on_done: which candidates ended early, in the trailing metadata
                    context.set_trailing_metadata((("worldserve-final-message", ev.message),))
                if reach is not None:  # anytime: the last message says how far each candidate got
                    yield pb.RolloutEvent(request_id=ev.request_id,
                                          end=pb.RolloutEnd(steps=reach.steps, truncated=reach.truncated))
                return
            yield _event(ev, enc)

    @maps_errors
    async def Session(self, request_iterator, context):
        """open, then actions; a bad, second-open or malformed message ends the stream with INVALID_ARGUMENT, and
        so does no `open` within server.session_open_timeout_s (its session place comes back)."""
        it = request_iterator.__aiter__()
        wait = self.dp.server.session_open_timeout_s
        try:
            first = await asyncio.wait_for(it.__anext__(), wait)
        except StopAsyncIteration:
            raise InvalidArgument("the Session stream ended before its `open` message", "open") from None
        except TimeoutError:
            raise InvalidArgument(f"no `open` message within the session open deadline of {wait:g} s "
                                  "(server.session_open_timeout_s)", "open") from None
        check(first)
        if first.WhichOneof("kind") != "open":
            raise InvalidArgument("the first Session message must be `open`", "open")
        o = first.open
        m = self.dp.precheck(o.model, len(o.context), None, len(o.context_actions.actions))
        opts = _options(o.options)
        req, events = await self.dp.open_session(RolloutInput(
            o.model, _frames(o.context), [], _seq(o.context_actions, "context_actions") or None,
            opts, deadline=_deadline(context), principal=current_principal(), info=m))
        enc = opts.frame_encoding

        async def inbox():
            async for msg in it:
                check(msg)
                kind = msg.WhichOneof("kind")
                if kind == "open":
                    raise InvalidArgument("a second `open`: a Session takes one `open`, then actions", "open")
                if kind != "action":
                    raise InvalidArgument("a Session message must be `open` or `action`", "kind")
                yield _action(msg.action, "action")

        async for ev in session_events(self.dp, req, events, inbox()):
            yield _event(ev, enc)

    @maps_errors
    async def VectorSession(self, request_iterator, context):
        """N sessions in lockstep: the first message opens them (open + a reset per env), each later message steps or
        resets every env; one answer per message, all N computed in one engine step."""
        it = request_iterator.__aiter__()
        wait = self.dp.server.session_open_timeout_s
        try:
            first = await asyncio.wait_for(it.__anext__(), wait)
        except StopAsyncIteration:
            raise InvalidArgument("the VectorSession stream ended before its `open` message", "open") from None
        except TimeoutError:
            raise InvalidArgument(f"no `open` message within the session open deadline of {wait:g} s "
                                  "(server.session_open_timeout_s)", "open") from None
        check(first)
        if not first.HasField("open"):
            raise InvalidArgument("the first VectorSession message must carry `open`", "open")
        o = first.open
        m = self.dp.model(o.model)
        opts = _options(o.options)
        vec = VectorSessions(self.dp, m, opts, int(o.num_envs), current_principal(), _deadline(context))
        release = hold_sessions(vec.n)  # N sessions against the server's and the key's max_sessions, N tokens
        try:
            msg = first
            while True:
                inputs = self._env_inputs(msg, m)
                if msg is not first:  # a reset opens a session: one token each, like a Session call
                    for _ in range(sum(isinstance(x, EnvStart) for x in inputs)):
                        take_token()
                outs = await vec.exchange(inputs)
                yield pb.VectorResponse(envs=[pb.EnvOutput(opened=x) if isinstance(x, str)
                                              else pb.EnvOutput(step=_event(x, opts.frame_encoding)) for x in outs])
                try:
                    msg = await it.__anext__()
                except StopAsyncIteration:
                    return
                check(msg)
                if msg.HasField("open"):
                    raise InvalidArgument("a second `open`: a VectorSession takes one `open`, then steps", "open")
        finally:
            try:
                await vec.close()  # shielded: goes on if this call is cancelled, but this await does not
            finally:
                release()

    def _env_inputs(self, msg: pb.VectorRequest, m: ModelInfo) -> list:
        out = []
        for i, e in enumerate(msg.envs):
            kind = e.WhichOneof("kind")
            if kind == "action":
                out.append(_action(e.action, f"envs[{i}].action"))
            elif kind == "reset":
                r = e.reset
                where = f"envs[{i}].reset"
                self.dp.precheck(m.name, len(r.context), None, len(r.context_actions.actions))
                out.append(EnvStart(_frames(r.context), _seq(r.context_actions, f"{where}.context_actions") or None,
                                    int(r.seed)))
            else:
                raise InvalidArgument(f"envs[{i}]: neither an action nor a reset", f"envs[{i}]")
        return out


def _handlers(servicer: WorldModelServicer, max_items: int) -> dict:
    """The generated table, with deserializers that count a request's items before parsing it."""
    return {
        "ListModels": grpc.unary_unary_rpc_method_handler(
            servicer.ListModels, request_deserializer=guarded(pb.ListModelsRequest, max_items),
            response_serializer=pb.ListModelsResponse.SerializeToString),
        "Predict": grpc.unary_unary_rpc_method_handler(
            servicer.Predict, request_deserializer=guarded(pb.PredictRequest, max_items),
            response_serializer=pb.PredictResponse.SerializeToString),
        "Rollout": grpc.unary_stream_rpc_method_handler(
            servicer.Rollout, request_deserializer=guarded(pb.RolloutRequest, max_items),
            response_serializer=pb.RolloutEvent.SerializeToString),
        "Session": grpc.stream_stream_rpc_method_handler(
            servicer.Session, request_deserializer=guarded(pb.SessionMessage, max_items),
            response_serializer=pb.RolloutEvent.SerializeToString),
        "VectorSession": grpc.stream_stream_rpc_method_handler(
            servicer.VectorSession, request_deserializer=guarded(pb.VectorRequest, max_items),
            response_serializer=pb.VectorResponse.SerializeToString),
    }


async def start_grpc(dp: DataPlane, srv: ServerSettings, interceptors=()) -> tuple[grpc.aio.Server, int,
                                                                                  health.HealthServicer]:
    """Keepalive, limits and TLS from settings (see conn.py); interceptors e.g. auth.GrpcGate."""
    credentials = grpc_credentials(srv)
    server = grpc.aio.server(interceptors=list(interceptors), options=grpc_options(srv),
                             maximum_concurrent_rpcs=srv.grpc_max_concurrent_rpcs or None)
    handlers = _handlers(WorldModelServicer(dp), srv.max_request_items)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    hs = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    addr = f"{srv.host}:{srv.grpc_port}"
    bound = server.add_secure_port(addr, credentials) if credentials else server.add_insecure_port(addr)
    await server.start()
    return server, bound, hs


async def set_serving(hs, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE):
        r = hs.set(name, status)
        if asyncio.iscoroutine(r):
            await r
