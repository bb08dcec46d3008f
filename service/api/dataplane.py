"""The one data plane behind the REST, WebSocket and gRPC adapters: validate, build typed requests,
submit to the queue, gather or stream events. Adapters only translate wire formats.

Nothing reaches the queue unvalidated; every problem raises a domain error naming the field.

Streams (Drainer): every event stream handed out is tracked, so that on SIGTERM the in-flight rollouts get the
grace period and whatever is left (and every session, at once) ends with a final UNAVAILABLE event: a last NDJSON
line, a gRPC status, a WebSocket close frame (1012); a client that stops reading is cut off. The hot path costs a
dict entry per request and two attribute writes per event: a stream that waits for its next event is woken by
cancelling the task that waits (Task.uncancel keeps the task alive). No torch.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np

from ..errors import InvalidArgument, NotFound, Unavailable, from_code
from ..messages import ErrorCode, FrameMode, ModelInfo, Priority, RolloutEvent, RolloutRequest, SessionAction
from ..settings import ServerSettings
from ..wire import ENCODINGS
from .auth import Principal, capped_priority, take_slots
from .images import decode_frame

MAX_SEED = 2**63 - 1
MAX_TEMPERATURE = 10.0
CONTINUOUS_LIMIT = 1.0  # continuous actions are normalised to [-1, 1]
MAX_DEADLINE_MS = 86_400_000


def _short(x, n: int = 40) -> str:
    """repr for an error message, cut (a 400-digit number or a huge list never lands in a message whole)."""
    try:
        r = repr(x) if not isinstance(x, int) or abs(x) < 10**30 else f"an integer of {len(str(abs(x)))} digits"
    except ValueError:  # over Python's int -> str digit limit
        r = "a huge integer"
    return r if len(r) <= n else r[:n] + "..."


@dataclass
class WireFrame:
    encoding: str  # raw | png | jpeg
    data: bytes
    height: int = 0
    width: int = 0


@dataclass
class Options:
    frames: FrameMode = FrameMode.ALL
    seed: int = 0
    temperature: float = 0.0
    deadline_ms: int = 0
    priority: Priority = Priority.NORMAL
    return_tokens: bool = False
    frame_encoding: str = "png"
    stop_on_done: bool = False  # a candidate stops once the model says done (rollouts; sessions ignore it)


@dataclass
class RolloutInput:
    model: str
    context: list[WireFrame]
    candidates: list[list] = field(default_factory=list)  # K sequences of actions (int | list[float])
    context_actions: list | None = None
    options: Options = field(default_factory=Options)
    deadline: float | None = None  # absolute unix time from the transport (gRPC deadline)
    single: bool = False  # predict: one sequence, called `actions` on the wire
    principal: Principal | None = None  # the calling key (auth.current_principal()); None in open mode
    info: ModelInfo | None = None  # the adapter's precheck, when it ran one before converting (never twice)


# ---- streams: graceful drain and slow consumers -----------------------------------------------
SHUTDOWN = "the server is shutting down: retry on another replica"
SLOW = "the client did not read its stream for {:.0f} s: request cancelled, slots freed"


class _Tracked:
    __slots__ = ("session", "cut", "waiting", "task", "pulled", "it", "reason")

    def __init__(self, session: bool):
        self.session, self.cut, self.waiting, self.task = session, False, False, None
        self.pulled, self.it = time.monotonic(), None
        self.reason = (ErrorCode.UNAVAILABLE, SHUTDOWN)


class Drainer:
    def __init__(self):
        self.active: dict[str, _Tracked] = {}
        self.draining = False
        self.slow_cut = 0

    def track(self, request_id: str, events: AsyncIterator[RolloutEvent], session: bool,
              on_end=None) -> AsyncIterator[RolloutEvent]:
        """-> the guarded stream; `on_end()` runs once when it ends (or is collected unstarted)."""
        t = _Tracked(session)
        self.active[request_id] = t
        gen = self._guard(request_id, events, t, on_end)
        if on_end is not None:
            weakref.finalize(gen, on_end)
        return gen

    async def _guard(self, rid: str, events: AsyncIterator[RolloutEvent], t: _Tracked, on_end=None):
        it = t.it = events.__aiter__()
        try:
            while not t.cut:
                t.task, t.waiting = asyncio.current_task(), True
                try:
                    ev = await it.__anext__()
                except StopAsyncIteration:
                    if t.cut:  # closed under us by the slow-consumer watch
                        break
                    return
                except RuntimeError:  # the watch is closing it right now
                    if not t.cut:
                        raise
                    break
                except asyncio.CancelledError:
                    if not t.cut:
                        raise
                    asyncio.current_task().uncancel()  # our own cut, not the caller's cancellation
                    break
                finally:
                    t.waiting, t.pulled = False, time.monotonic()  # busy with this event from now on
                if ev.final:
                    self.active.pop(rid, None)  # the consumer may never close us after the last event
                    yield ev
                    return
                yield ev
            await _close(it)  # cancels the request: the engine frees its slots
            self.active.pop(rid, None)
            yield RolloutEvent.end(rid, *t.reason)
        finally:
            self.active.pop(rid, None)
            if on_end is not None:
                on_end()
            await _close(it)

    def cut(self, sessions_only: bool = False) -> int:
        """End tracked streams (all, or sessions only) with UNAVAILABLE; returns how many."""
        n = 0
        for t in list(self.active.values()):
            if t.cut or (sessions_only and not t.session):
                continue
            t.cut = True
            n += 1
            if t.waiting and t.task is not None:
                t.task.cancel()
        return n

    async def watch_slow_consumers(self, slow_s: float, every_s: float = 0.5) -> None:
        """Cancel the request of a client that has not taken its next event for `slow_s` (its consumer is
        blocked writing to a socket nobody reads): the engine frees the slots at once, buffers stay
        bounded, and the stream ends with RESOURCE_EXHAUSTED if the client ever reads again."""
        while True:
            await asyncio.sleep(every_s)
            now = time.monotonic()
            for t in list(self.active.values()):
                if not t.cut and not t.waiting and now - t.pulled > slow_s and t.it is not None:
                    t.cut, t.reason = True, (ErrorCode.RESOURCE_EXHAUSTED, SLOW.format(slow_s))
                    self.slow_cut += 1
                    asyncio.create_task(_close(t.it))

    async def drain(self, grace_s: float) -> tuple[int, int]:
        """Stop taking work, end sessions, give rollouts `grace_s`, then end the rest.
        -> (streams that finished in the grace period, streams cut)."""
        self.draining = True
        before = len(self.active)
        cut = self.cut(sessions_only=True)
        end = time.monotonic() + grace_s
        while self.active and time.monotonic() < end:
            await asyncio.sleep(0.05)
        cut += self.cut()
        end = time.monotonic() + 2.0
        while self.active and time.monotonic() < end:  # let them write their last line / status
            await asyncio.sleep(0.02)
        return before - cut, cut


async def _close(it) -> None:
    aclose = getattr(it, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except RuntimeError:  # already running/closing in another task
            pass


class DataPlane:
    def __init__(self, queue, server: ServerSettings):
        self.queue, self.server = queue, server
        self.drainer = Drainer()  # tracks every event stream handed out, for the drain on SIGTERM

    # ---- models ---------------------------------------------------------------------------------
    def models(self) -> list[ModelInfo]:
        return self.queue.models()

    def model(self, name: str) -> ModelInfo:
        for m in self.queue.models():
            if m.name == name:
                return m
        known = ", ".join(m.name for m in self.queue.models()) or "none loaded"
        raise NotFound(f"model {name!r} not found (available: {known})", "model")

    async def load_model(self, model_dir: str) -> ModelInfo:
        """Admin: serve another model directory without a restart (embedded mode)."""
        load = getattr(self.queue, "load_model", None)
        if load is None:
            raise Unavailable("loading models needs the embedded server (`worldserve serve`); in Redis mode start a "
                              "worker for the model")
        try:
            return await load(model_dir)
        except (ValueError, TypeError, OSError) as e:  # a name already served, a bad directory
            raise InvalidArgument(f"cannot load {model_dir!r}: {e}", "dir") from e

    async def unload_model(self, name: str) -> None:
        unload = getattr(self.queue, "remove_model", None)
        if unload is None:
            raise Unavailable("unloading models needs the embedded server (`worldserve serve`)")
        await unload(name)

    def ready(self) -> bool:
        return not self.drainer.draining and self.queue.ready()

    def alive(self) -> bool:
        """False when the process cannot go on (engine dead): /healthz 503 so that a probe restarts it."""
        return bool(getattr(self.queue, "alive", lambda: True)())

    # ---- validation -----------------------------------------------------------------------------
    def _action(self, m: ModelInfo, a, where: str) -> object:
        """One action, checked exactly: continuous = flat list of action_dim finite numbers in [-1, 1],
        discrete = an integer in [0, n_actions). -> float32 [A] | int."""
        if m.continuous:
            if not isinstance(a, list | tuple | np.ndarray) or len(a) != m.action_dim:
                raise InvalidArgument(f"{where}: continuous action must be a flat list of {m.action_dim} numbers, "
                                      f"got {_short(a)}", where)
            vals = []
            for j, x in enumerate(a):
                if isinstance(x, bool | np.bool_) or not isinstance(x, int | float | np.integer | np.floating):
                    raise InvalidArgument(f"{where}[{j}]: continuous action values must be numbers (a flat list of "
                                          f"{m.action_dim}), got {_short(x)}", where)
                try:
                    v = float(x)
                except OverflowError:
                    v = math.inf
                if not math.isfinite(v) or abs(v) > CONTINUOUS_LIMIT:
                    raise InvalidArgument(f"{where}[{j}]: continuous action values must be finite and in [-1, 1], "
                                          f"got {_short(x)}", where)
                vals.append(v)
            return np.asarray(vals, np.float32)
        if isinstance(a, bool | np.bool_) or not isinstance(a, int | np.integer):
            raise InvalidArgument(f"{where}: discrete action must be an integer, got {_short(a)}", where)
        if not 0 <= int(a) < m.n_actions:
            raise InvalidArgument(f"{where}: action {_short(a)} out of range [0, {m.n_actions - 1}]", where)
        return int(a)

    def _actions(self, m: ModelInfo, seq: list, where: str) -> np.ndarray:
        vals = [self._action(m, a, f"{where}[{i}]") for i, a in enumerate(seq)]
        if m.continuous:
            return np.stack(vals).astype(np.float32) if vals else np.zeros((0, m.action_dim), np.float32)
        return np.asarray(vals, np.int64)

    def precheck(self, name: str, n_context: int, horizons: list[int] | None, n_context_actions: int,
                 single: bool = False) -> ModelInfo:
        """Counts only, before anything is converted or decoded: horizons = the length of each candidate
        (None for a session, -1 for a candidate that is not a list)."""
        m = self.model(name)
        if n_context < 1:
            raise InvalidArgument("context: at least one context frame is required", "context")
        if n_context > m.context_window:
            raise InvalidArgument(f"context: {n_context} frames, the model takes at most {m.context_window}", "context")
        if n_context_actions and n_context_actions != n_context - 1:
            raise InvalidArgument(f"context_actions: need {n_context - 1} (one between each pair of context "
                                  f"frames), got {n_context_actions}", "context_actions")
        if horizons is None:
            return m
        seq = "actions" if single else "candidates"
        if not horizons:
            raise InvalidArgument(f"{seq}: at least one action sequence is required", seq)
        if len(horizons) > m.max_candidates:
            raise InvalidArgument(f"candidates: {len(horizons)} sequences, at most {m.max_candidates}", "candidates")
        if -1 in horizons:
            raise InvalidArgument(f"{seq}: " + ("must be a list of actions" if single
                                                else "each candidate must be a list of actions"), seq)
        if len(set(horizons)) != 1:
            raise InvalidArgument("candidates: all action sequences must have the same length", "candidates")
        if not 1 <= horizons[0] <= m.max_horizon:
            raise InvalidArgument(f"actions: horizon {horizons[0]} must be in [1, {m.max_horizon}]", "actions")
        return m

    def build(self, inp: RolloutInput, session: bool = False) -> RolloutRequest:
        if self.drainer.draining:
            raise Unavailable(SHUTDOWN)
        o = inp.options
        ca = inp.context_actions
        if ca is not None and not isinstance(ca, list | tuple):
            raise InvalidArgument("context_actions: must be a list of actions", "context_actions")
        horizons = None if session else [len(c) if isinstance(c, list | tuple) else -1 for c in inp.candidates]
        m = inp.info or self.precheck(inp.model, len(inp.context), horizons, len(ca or ()), inp.single)
        frames = np.stack([
            decode_frame(f.encoding, f.data, f.height, f.width, (m.height, m.width), self.server.max_image_pixels,
                         self.server.max_image_bytes, f"context[{i}]")
            for i, f in enumerate(inp.context)
        ])  # uint8 [C, H, W, 3]
        if session:
            actions = self._actions(m, [], "actions")[None]  # [1, 0]: actions arrive one by one
        else:
            name = (lambda k: "actions") if inp.single else (lambda k: f"candidates[{k}]")
            actions = np.stack([self._actions(m, c, name(k)) for k, c in enumerate(inp.candidates)])
        ctx_actions = self._actions(m, ca, "context_actions") if ca else None
        if isinstance(o.seed, bool) or not isinstance(o.seed, int) or not 0 <= o.seed <= MAX_SEED:
            raise InvalidArgument(f"options.seed must be an integer in [0, 2^63-1], got {_short(o.seed)}",
                                  "options.seed")
        t = o.temperature
        if not isinstance(t, int | float) or not math.isfinite(t) or not 0 <= t <= MAX_TEMPERATURE:
            raise InvalidArgument(f"options.temperature must be in [0, {MAX_TEMPERATURE}], got {_short(t)}",
                                  "options.temperature")
        dl = o.deadline_ms
        if isinstance(dl, bool) or not isinstance(dl, int) or not 0 <= dl <= MAX_DEADLINE_MS:
            raise InvalidArgument(f"options.deadline_ms must be an integer in [0, {MAX_DEADLINE_MS}] (24 h), got "
                                  f"{_short(o.deadline_ms)}", "options.deadline_ms")
        if o.frame_encoding not in ENCODINGS:
            raise InvalidArgument("options.frame_encoding must be raw, png or jpeg", "options.frame_encoding")
        deadline = inp.deadline
        if o.deadline_ms:
            d = time.time() + o.deadline_ms / 1000
            deadline = d if deadline is None else min(deadline, d)
        return RolloutRequest(
            id=uuid.uuid4().hex, model=m.name, context=frames, actions=actions, context_actions=ctx_actions,
            frames=FrameMode(o.frames), return_tokens=bool(o.return_tokens), seed=int(o.seed),
            stop_on_done=bool(o.stop_on_done) and not session,
            temperature=float(t), deadline=deadline,
            priority=capped_priority(Priority.INTERACTIVE if session else Priority(o.priority), inp.principal),
            session=session,
        )

    # ---- calls ----------------------------------------------------------------------------------
    async def _submit(self, req: RolloutRequest, who: Principal | None) -> AsyncIterator[RolloutEvent]:
        """Enqueue; the stream is tracked (drain, slow consumers) and its slots counted against the key."""
        release = take_slots(1 if req.session else req.candidates, who)
        try:
            events = await self.queue.submit(req)
        except BaseException:
            if release is not None:
                release()
            raise
        return self.drainer.track(req.id, events, session=req.session, on_end=release)

    async def rollout(self, inp: RolloutInput) -> tuple[RolloutRequest, AsyncIterator[RolloutEvent]]:
        """Validate and enqueue (errors raise here, before any event); events end with a final one."""
        req = self.build(inp)
        return req, await self._submit(req, inp.principal)

    async def predict(self, inp: RolloutInput) -> tuple[str, list[RolloutEvent]]:
        if len(inp.candidates) != 1:
            raise InvalidArgument("actions: predict takes exactly one action sequence", "actions")
        inp.single = True
        req, events = await self.rollout(inp)
        out = []
        try:
            async for ev in events:
                if ev.final:
                    raise_for(ev)
                else:
                    out.append(ev)
        finally:  # cancelled (client gone): closing the stream cancels the request and frees its slots
            await events.aclose()
        return req.id, out

    async def open_session(self, inp: RolloutInput) -> tuple[RolloutRequest, AsyncIterator[RolloutEvent]]:
        req = self.build(inp, session=True)
        return req, await self._submit(req, inp.principal)

    async def act(self, req: RolloutRequest, action) -> None:
        m = self.model(req.model)
        a = self._action(m, action, "action")
        await self.queue.act(SessionAction(req.id, np.asarray(a)))

    async def close_session(self, req: RolloutRequest) -> None:
        await self.queue.act(SessionAction(req.id, np.zeros(0), close=True))


def raise_for(ev: RolloutEvent) -> None:
    """A final event that carries an error becomes the matching domain error."""
    if ev.error != ErrorCode.OK:
        raise from_code(ev.error, ev.message)
