"""Python client for worldserve, REST and gRPC (no torch import). Used by tests, bench and users.

    c = GrpcClient("localhost:50051")            # or RestClient("http://localhost:8000")
    frames = c.predict("tiny", context, [2, 2, 0])                      # uint8 [T, H, W, 3]
    for ev in c.rollout("tiny", context, candidates, frames="none"):    # Event per candidate and step
        ...
    with c.session("tiny", context) as s:
        frame = s.step(2).frame
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import httpx
import numpy as np

from ..api.gen import worldserve_pb2 as pb
from ..api.gen import worldserve_pb2_grpc as pbg
from ..api.images import decode_any, encode_frame
from ..wire import ENCODINGS, FRAME_MODES, PRIORITIES, PROTO_ENCODING, proto_map

_ENC = proto_map(pb.Frame.Encoding, "", ENCODINGS, PROTO_ENCODING)
_ENC_NAME = {v: k for k, v in _ENC.items()}
_MODES = proto_map(pb.FrameMode, "FRAMES_", FRAME_MODES)
_PRIO = proto_map(pb.Priority, "PRIORITY_", PRIORITIES)


@dataclass
class Event:
    candidate: int
    step: int
    reward: float
    done: float
    frame: np.ndarray | None = None  # uint8 [H, W, 3]
    tokens: list[int] | None = None
    confidence: float | None = None  # in [0, 1]: how sure the model was of the frame (None: the model gives none)
    ended: bool = False  # stop_on_done: the candidate's world ended at this step (no more events for it)


@dataclass
class RolloutEnd:
    """The last item of an anytime rollout (anytime=True): steps reached and whether the deadline cut each
    candidate (index = candidate)."""

    steps: list[int]
    truncated: list[bool]


class ServerError(Exception):
    def __init__(self, code: str, message: str, status: int | None = None):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.status = code, message, status


def _opts(frames="all", seed=0, temperature=0.0, deadline_ms=0, priority="normal", return_tokens=False,
          frame_encoding="png", stop_on_done=False, anytime=False, common_random_numbers=False) -> dict:
    """common_random_numbers: sampled candidates with equal action prefixes draw the same noise (a planner's less noisy
    comparisons) and are computed once; sent only when set (a server that predates it still takes the rest)."""
    out = dict(frames=frames, seed=seed, temperature=temperature, deadline_ms=deadline_ms, priority=priority,
               return_tokens=return_tokens, frame_encoding=frame_encoding, stop_on_done=stop_on_done, anytime=anytime)
    return {**out, "common_random_numbers": True} if common_random_numbers else out


# ---------------------------------------------------------------------------------------------- REST
def auth_headers(api_key: str | None) -> dict:
    """HTTP headers that carry an API key (REST and WebSocket)."""
    return {"authorization": f"Bearer {api_key}"} if api_key else {}


def _ndjson(r: httpx.Response) -> Iterator[bytes]:
    """The non-empty lines of an NDJSON stream as bytes (json.loads takes bytes: no text decoding of the frames'
    base64, which httpx's iter_lines does per line)."""
    parts: list[bytes] = []  # the current line's pieces (a long line in many chunks: joined once)
    for chunk in r.iter_bytes():
        if b"\n" not in chunk:
            parts.append(chunk)
            continue
        first, *lines, rest = chunk.split(b"\n")
        parts.append(first)
        yield from (ln for ln in (b"".join(parts), *lines) if ln.strip())
        parts = [rest]
    tail = b"".join(parts)
    if tail.strip():
        yield tail


class RestClient:
    def __init__(self, base_url: str, timeout: float = 120.0, context_encoding: str = "png", api_key: str | None = None,
                 verify=True):
        self.base = base_url.rstrip("/")
        self.api_key = api_key
        self.http = httpx.Client(base_url=self.base, timeout=timeout, headers=auth_headers(api_key), verify=verify)
        self.context_encoding = context_encoding

    def close(self) -> None:
        self.http.close()

    def _frame_json(self, f: np.ndarray) -> dict:
        e = self.context_encoding
        return {"encoding": e, "height": int(f.shape[0]), "width": int(f.shape[1]),
                "data": base64.b64encode(encode_frame(np.asarray(f, np.uint8), e)).decode()}

    @staticmethod
    def _event(d: dict) -> Event:
        fr = d.get("frame")
        frame = None
        if fr:
            frame = decode_any(fr["encoding"], base64.b64decode(fr["data"]), fr["height"], fr["width"])
        return Event(d["candidate"], d["step"], d["reward"], d["done"], frame, d.get("tokens"), d.get("confidence"),
                     bool(d.get("ended", False)))

    @staticmethod
    def _raise(r: httpx.Response) -> None:
        if r.status_code >= 400:
            try:
                err = r.json()["error"]
                raise ServerError(err["code"], err["message"], r.status_code)
            except (ValueError, KeyError):
                raise ServerError("HTTP", r.text, r.status_code) from None

    def models(self) -> list[dict]:
        r = self.http.get("/v1/models")
        self._raise(r)
        return r.json()["models"]

    def predict_events(self, model: str, context, actions, context_actions=None, **opts) -> list[Event]:
        body = {"context": [self._frame_json(f) for f in context], "actions": plain(actions),
                "context_actions": plain(context_actions), "options": _opts(**opts)}
        r = self.http.post(f"/v1/models/{model}/predict", json=body)
        self._raise(r)
        return [self._event(s) for s in r.json()["steps"]]

    def predict(self, model: str, context, actions, **kw) -> np.ndarray:
        return np.stack([e.frame for e in self.predict_events(model, context, actions, **kw)])

    def rollout(self, model: str, context, candidates, context_actions=None, **opts) -> Iterator[Event | RolloutEnd]:
        """Events per candidate and step; with anytime=True the last item is a RolloutEnd."""
        body = {"context": [self._frame_json(f) for f in context], "candidates": plain(candidates),
                "context_actions": plain(context_actions), "options": _opts(**opts)}
        with self.http.stream("POST", f"/v1/models/{model}/rollouts", json=body) as r:
            if r.status_code >= 400:
                r.read()
                self._raise(r)
            for line in _ndjson(r):
                d = json.loads(line)
                if d.get("final"):
                    if d["error"]:
                        raise ServerError(d["error"]["code"], d["error"]["message"])
                    if "steps_reached" in d:
                        yield RolloutEnd(d["steps_reached"], d["truncated"])
                    return
                yield self._event(d)

    def session(self, model: str, context, context_actions=None, **opts) -> WsSession:
        return WsSession(self.base.replace("http", "ws", 1) + f"/v1/models/{model}/session",
                         [self._frame_json(f) for f in context], _opts(**opts), plain(context_actions), self.api_key)


class WsSession:
    def __init__(self, url: str, context: list[dict], options: dict, context_actions=None, api_key: str | None = None):
        self.url, self.context, self.options, self.context_actions = url, context, options, context_actions
        self.api_key = api_key

    def __enter__(self) -> WsSession:
        from websockets.sync.client import connect

        self.ws = connect(self.url, max_size=2**24, additional_headers=auth_headers(self.api_key))
        self.ws.send(json.dumps({"type": "open", "context": self.context, "options": self.options,
                                 "context_actions": self.context_actions}))
        msg = json.loads(self.ws.recv())
        if msg.get("type") != "opened":
            raise ServerError(msg.get("code", "ERROR"), msg.get("message", str(msg)))
        self.id = msg["session_id"]
        return self

    def step(self, action) -> Event:
        self.ws.send(json.dumps({"type": "action", "action": plain(action)}))
        msg = json.loads(self.ws.recv())
        if msg.get("type") == "error":
            raise ServerError(msg["code"], msg["message"])
        return RestClient._event(msg)

    def __exit__(self, *exc) -> None:
        try:
            self.ws.send(json.dumps({"type": "close"}))
        finally:
            self.ws.close()


# ---------------------------------------------------------------------------------------------- gRPC
def _pb_action(a) -> pb.Action:
    if isinstance(a, list | tuple | np.ndarray):
        return pb.Action(continuous=pb.ContinuousAction(values=[float(x) for x in a]))
    return pb.Action(discrete=int(a))


def _pb_seq(seq) -> pb.ActionSequence:
    return pb.ActionSequence(actions=[_pb_action(a) for a in (seq if seq is not None else [])])


def _pb_options(frames="all", seed=0, temperature=0.0, deadline_ms=0, priority="normal", return_tokens=False,
                frame_encoding="raw", stop_on_done=False, anytime=False,
                common_random_numbers=False) -> pb.RolloutOptions:
    return pb.RolloutOptions(frames=_MODES[frames], seed=seed, temperature=temperature, deadline_ms=deadline_ms,
                             priority=_PRIO[priority], return_tokens=return_tokens,
                             frame_encoding=_ENC[frame_encoding], stop_on_done=stop_on_done, anytime=anytime,
                             common_random_numbers=common_random_numbers)


class _KeyInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                      grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds the `authorization: Bearer <key>` metadata to every call of a channel."""

    def __init__(self, api_key: str):
        self.md = ("authorization", f"Bearer {api_key}")

    def _details(self, d):
        md = [*(d.metadata or []), self.md]
        return d._replace(metadata=md) if hasattr(d, "_replace") else _Details(d, md)

    def intercept_unary_unary(self, cont, d, req):
        return cont(self._details(d), req)

    def intercept_unary_stream(self, cont, d, req):
        return cont(self._details(d), req)

    def intercept_stream_unary(self, cont, d, it):
        return cont(self._details(d), it)

    def intercept_stream_stream(self, cont, d, it):
        return cont(self._details(d), it)


class _Details(grpc.ClientCallDetails):
    def __init__(self, d, metadata):
        self.method, self.timeout, self.metadata = d.method, d.timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = d.credentials, d.wait_for_ready, d.compression


def channel(target: str, api_key: str | None = None, root_certificates: bytes | None = None, options=()):
    """A gRPC channel (TLS when root certificates are given) that sends the API key with every call. Each client its
    own connection (a local subchannel pool): gRPC would otherwise share one connection between every channel to the
    same target, and a program with many clients would pass the server's streams-per-connection limit (32) and see
    its calls refused (RST_STREAM REFUSED_STREAM -> UNAVAILABLE)."""
    opts = [("grpc.max_receive_message_length", 2**26), ("grpc.use_local_subchannel_pool", 1), *options]
    if root_certificates is not None:
        ch = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates), options=opts)
    else:
        ch = grpc.insecure_channel(target, options=opts)
    return grpc.intercept_channel(ch, _KeyInterceptor(api_key)) if api_key else ch


class GrpcClient:
    def __init__(self, target: str, context_encoding: str = "raw", api_key: str | None = None,
                 root_certificates: bytes | None = None):
        self.channel = channel(target, api_key, root_certificates)
        self.stub = pbg.WorldModelServiceStub(self.channel)
        self.context_encoding = context_encoding

    def close(self) -> None:
        self.channel.close()

    def _frame(self, f: np.ndarray) -> pb.Frame:
        f = np.asarray(f, np.uint8)
        return pb.Frame(encoding=_ENC[self.context_encoding], height=f.shape[0], width=f.shape[1],
                        data=encode_frame(f, self.context_encoding))

    @staticmethod
    def _event(e) -> Event:
        frame = None
        if e.HasField("frame"):
            frame = decode_any(_ENC_NAME[e.frame.encoding], e.frame.data, e.frame.height, e.frame.width)
        return Event(e.candidate if hasattr(e, "candidate") else 0, e.step, e.reward, e.done, frame,
                     list(e.tokens) or None, e.confidence if e.HasField("confidence") else None,
                     bool(getattr(e, "ended", False)))  # session frames carry no `ended`

    @staticmethod
    def _wrap(e: grpc.RpcError) -> ServerError:
        return ServerError(e.code().name, e.details() or "")

    def models(self) -> list:
        return list(self.stub.ListModels(pb.ListModelsRequest()).models)

    def predict_events(self, model, context, actions, context_actions=None, timeout=None, **opts) -> list[Event]:
        req = pb.PredictRequest(model=model, context=[self._frame(f) for f in context], actions=_pb_seq(actions),
                                context_actions=_pb_seq(context_actions), options=_pb_options(**opts))
        try:
            return [self._event(s) for s in self.stub.Predict(req, timeout=timeout).steps]
        except grpc.RpcError as e:
            raise self._wrap(e) from None

    def predict(self, model, context, actions, **kw) -> np.ndarray:
        return np.stack([e.frame for e in self.predict_events(model, context, actions, **kw)])

    def rollout_call(self, model, context, candidates, context_actions=None, timeout=None, **opts):
        """The raw streaming call (cancel() it to stop early)."""
        req = pb.RolloutRequest(model=model, context=[self._frame(f) for f in context],
                                candidates=[_pb_seq(c) for c in candidates],
                                context_actions=_pb_seq(context_actions), options=_pb_options(**opts))
        return self.stub.Rollout(req, timeout=timeout)

    def rollout(self, model, context, candidates, **kw) -> Iterator[Event | RolloutEnd]:
        """Events per candidate and step; with anytime=True the last item is a RolloutEnd."""
        call = self.rollout_call(model, context, candidates, **kw)
        try:
            for e in call:
                if e.HasField("end"):
                    yield RolloutEnd(list(e.end.steps), list(e.end.truncated))
                    continue
                yield self._event(e)
        except grpc.RpcError as e:
            raise self._wrap(e) from None
        finally:
            call.cancel()

    def session(self, model, context, context_actions=None, **opts) -> GrpcSession:
        return GrpcSession(self, pb.SessionOpen(model=model, context=[self._frame(f) for f in context],
                                                context_actions=_pb_seq(context_actions),
                                                options=_pb_options(**opts)))


    def vector_session(self, model, num_envs: int, **opts) -> GrpcVectorSession:
        """N sessions stepped in lockstep over one stream (one round trip per vector step); see GrpcVectorSession."""
        return GrpcVectorSession(self, pb.VectorOpen(model=model, num_envs=num_envs, options=_pb_options(**opts)))


@dataclass
class Reset:
    """A vector-session input: restart this env from these context frames with this sampling seed."""

    context: np.ndarray  # uint8 [C, H, W, 3]
    context_actions: list | None = None
    seed: int = 0


class GrpcVectorSession:
    """    with c.vector_session("tiny", 16, frames="all") as v:
            ids = v.exchange([Reset(ctx, seed=i) for i in range(16)])      # -> 16 session ids
            out = v.exchange([2] * 16)                                      # -> 16 Events (candidate = env)

    Each exchange carries one input per env (an action, or a Reset) and returns one output per env (an Event, or
    the new session id of a reset env), all N computed in one engine step on the server."""

    def __init__(self, client: GrpcClient, open_msg: pb.VectorOpen):
        import queue

        self.client, self.open_msg = client, open_msg
        self._q: queue.Queue = queue.Queue()
        self._first = True

    def _requests(self):
        while True:
            m = self._q.get()
            if m is None:
                return
            yield m

    def __enter__(self) -> GrpcVectorSession:
        self.call = self.client.stub.VectorSession(self._requests())
        return self

    def exchange(self, inputs: list) -> list:
        envs = []
        for x in inputs:
            if isinstance(x, Reset):
                envs.append(pb.EnvInput(reset=pb.EnvReset(context=[self.client._frame(f) for f in x.context],
                                                          context_actions=_pb_seq(x.context_actions), seed=x.seed)))
            else:
                envs.append(pb.EnvInput(action=_pb_action(x)))
        msg = pb.VectorRequest(envs=envs)
        if self._first:
            msg.open.CopyFrom(self.open_msg)
            self._first = False
        self._q.put(msg)
        try:
            resp = next(self.call)
        except grpc.RpcError as e:
            raise GrpcClient._wrap(e) from None
        return [o.opened if o.WhichOneof("kind") == "opened" else GrpcClient._event(o.step) for o in resp.envs]

    def __exit__(self, *exc) -> None:
        self._q.put(None)
        self.call.cancel()


class GrpcSession:
    def __init__(self, client: GrpcClient, open_msg: pb.SessionOpen):
        import queue

        self.client, self.open_msg = client, open_msg
        self._q: queue.Queue = queue.Queue()

    def _requests(self):
        yield pb.SessionMessage(open=self.open_msg)
        while True:
            a = self._q.get()
            if a is None:
                return
            yield pb.SessionMessage(action=_pb_action(a))

    def __enter__(self) -> GrpcSession:
        self.call = self.client.stub.Session(self._requests())
        return self

    def step(self, action) -> Event:
        self.send(action)
        return self.receive()

    def send(self, action) -> None:
        """Queue one action without waiting (a vectorized caller sends to every session, then receives)."""
        self._q.put(action)

    def receive(self) -> Event:
        """The next frame event (one per action sent)."""
        try:
            return GrpcClient._event(next(self.call))
        except grpc.RpcError as e:
            raise GrpcClient._wrap(e) from None

    def __exit__(self, *exc) -> None:
        self._q.put(None)
        self.call.cancel()


def plain(x):
    """numpy arrays and scalars (nested in lists) -> plain JSON values."""
    if x is None:
        return None
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, list | tuple):
        return [plain(v) for v in x]
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    return x
