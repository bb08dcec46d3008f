"""The one data plane behind the REST, WebSocket and gRPC adapters: validate, build typed requests,
submit to the queue, gather or stream events. Adapters only translate wire formats.

Nothing reaches the queue unvalidated; every problem raises a domain error naming the field.

Streams (Drainer): every event stream handed out is tracked, so that on SIGTERM the in-flight rollouts get the
grace period and whatever is left (and every session, at once) ends with a final UNAVAILABLE event: a last NDJSON
line, a gRPC status, a WebSocket close frame (1012); a client that stops reading is cut off. The hot path costs a
dict entry per request and two attribute writes per event: a stream that waits for its next event is woken by
cancelling the task that waits (Task.uncancel keeps the task alive). No torch.

Cost (issue 18.8): cost = candidates x horizon, x 2 when frames come back every step (frames="all"), in
candidate-steps (one engine slot for one engine step; a frame each step adds the decoder, the image encoding and
its bytes: about as much again). Sessions cost 0 (paced by the player; bounded by slots, open sessions and rate).
Checked before anything is decoded or submitted: above the key's max_request_cost (0: the server's
server.max_request_cost), or above its max_cost_in_flight, a request is InvalidArgument (400) naming the cost and
the limit; a key whose requests in flight would cost more than its max_cost_in_flight together gets RateLimited
(429 + Retry-After), given back when the request ends.

Context frames are decoded off the event loop (a small thread pool) after every cheap check, within a time budget
per frame (server.max_image_decode_ms; images.py refuses PNGs of pathological chunk counts before decoding).
"""

from __future__ import annotations

import asyncio
import math
import os
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..errors import InvalidArgument, NotFound, Unavailable, from_code
from ..messages import ErrorCode, FrameMode, ModelInfo, Priority, RolloutEvent, RolloutRequest, SessionAction
from ..settings import ServerSettings
from ..wire import ENCODINGS
from .anytime import Reach, anytime
from .auth import Principal, capped_priority, take_slots
from .errors import RateLimited
from .images import decode_frame

MAX_SEED = 2**63 - 1
MAX_TEMPERATURE = 10.0
CONTINUOUS_LIMIT = 1.0  # continuous actions are normalised to [-1, 1]
MAX_DEADLINE_MS = 86_400_000
DECODE_THREADS = min(4, os.cpu_count() or 1)  # image decoding off the event loop, bounded


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
    anytime: bool = False  # at deadline_ms the rollout ends OK with the steps reached so far (see Reach)
    common_random_numbers: bool = False  # randomness keyed by the action prefix: equal prefixes computed once


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


# ---- cost: per request and per key in flight ---------------------------------------------------
def request_cost(req: RolloutRequest) -> int:
    """candidates x horizon, x 2 with a frame every step; 0 for a session."""
    return 0 if req.session else req.candidates * req.horizon * (2 if req.frames == FrameMode.ALL else 1)


class CostMeter:
    """Candidate-steps in flight per key (by key name)."""

    def __init__(self, max_request_cost: int):
        self.max_request_cost = max_request_cost  # the server's
        self.in_flight: dict[str, int] = {}

    def check(self, req: RolloutRequest, who: Principal | None) -> int:
        """-> the request's cost; InvalidArgument when it is over what one request of this key may cost."""
        cost = request_cost(req)
        lim = who.limits if who is not None else None
        limit, whose = (lim.max_request_cost, "this key's") if lim and lim.max_request_cost else (
            self.max_request_cost, "the server's")
        if lim and lim.max_cost_in_flight and lim.max_cost_in_flight < limit:
            limit, whose = lim.max_cost_in_flight, "this key's in-flight"
        if cost > limit:
            how = f"{req.candidates} candidates x {req.horizon} steps" + (
                " x 2 for a frame every step" if req.frames == FrameMode.ALL else "")
            raise InvalidArgument(f"this request costs {cost} candidate-steps ({how}), over {whose} limit of {limit} "
                                  "per request: ask for fewer candidates, a shorter horizon or frames 'last'/'none'",
                                  "candidates")
        return cost

    def take(self, cost: int, who: Principal | None):
        """Count `cost` against the key (RateLimited over its max_cost_in_flight); -> an idempotent release
        function, or None when nothing is counted."""
        if who is None or not cost or not who.limits.max_cost_in_flight:
            return None
        cap, now = who.limits.max_cost_in_flight, self.in_flight.get(who.name, 0)
        if now + cost > cap:
            raise RateLimited(f"this request costs {cost} candidate-steps and this key has {now} in flight; its "
                              f"limit is {cap} (max_cost_in_flight): retry when one of its requests has ended", 1.0,
                              "candidates")
        self.in_flight[who.name] = now + cost
        done = []

        def release() -> None:
            if not done:
                done.append(True)
                self.in_flight[who.name] -= cost
                if self.in_flight[who.name] <= 0:
                    del self.in_flight[who.name]

        return release


class DataPlane:
    def __init__(self, queue, server: ServerSettings):
        self.queue, self.server = queue, server
        self.drainer = Drainer()  # tracks every event stream handed out, for the drain on SIGTERM
        self.costs = CostMeter(server.max_request_cost)
        self._decoder = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="decode")

    # ---- models ---------------------------------------------------------------------------------
    def models(self) -> list[ModelInfo]:
        return self.queue.models()

    def model(self, name: str) -> ModelInfo:
        for m in self.queue.models():
            if m.name == name:
                return m
        known = ", ".join(m.name for m in self.queue.models()) or "none loaded"
        raise NotFound(f"model {name!r} not found (available: {known})", "model")

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

    def check_action(self, m: ModelInfo, a, where: str) -> object:
        """One action, checked (InvalidArgument naming `where`). -> float32 [A] | int."""
        return self._action(m, a, where)

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

    def build(self, inp: RolloutInput, session: bool = False, decode: bool = True) -> RolloutRequest:
        """Validate everything and build the typed request; its cost is checked before the context frames, which
        are decoded last (decode=False: left empty, for the calls to decode off the event loop)."""
        if self.drainer.draining:
            raise Unavailable(SHUTDOWN)
        o = inp.options
        ca = inp.context_actions
        if ca is not None and not isinstance(ca, list | tuple):
            raise InvalidArgument("context_actions: must be a list of actions", "context_actions")
        horizons = None if session else [len(c) if isinstance(c, list | tuple) else -1 for c in inp.candidates]
        m = inp.info = inp.info or self.precheck(inp.model, len(inp.context), horizons, len(ca or ()), inp.single)
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
        if o.anytime and not session and not (isinstance(dl, int) and dl > 0):
            raise InvalidArgument("options.anytime needs options.deadline_ms (> 0): the deadline it answers at",
                                  "options.anytime")
        if o.frame_encoding not in ENCODINGS:
            raise InvalidArgument("options.frame_encoding must be raw, png or jpeg", "options.frame_encoding")
        deadline = inp.deadline
        if o.deadline_ms:
            d = time.time() + o.deadline_ms / 1000
            deadline = d if deadline is None else min(deadline, d)
        if deadline is None and not session:  # a backstop in every mode: nothing waits for ever (sessions end idle)
            deadline = time.time() + self.server.request_timeout_s
        who = inp.principal
        req = RolloutRequest(
            id=uuid.uuid4().hex, model=m.name, context=np.zeros((0, m.height, m.width, 3), np.uint8),
            actions=actions, context_actions=ctx_actions,
            frames=FrameMode(o.frames), return_tokens=bool(o.return_tokens), seed=int(o.seed),
            stop_on_done=bool(o.stop_on_done) and not session,
            common_random_numbers=bool(o.common_random_numbers) and not session,
            temperature=float(t), deadline=deadline,
            priority=capped_priority(Priority.INTERACTIVE if session else Priority(o.priority), who),
            session=session, tenant=who.name if who is not None else "",
            weight=who.limits.weight if who is not None else 1.0,
        )
        self.costs.check(req, who)
        if decode:
            req.context = self._decode(inp, m)
        return req

    def _decode(self, inp: RolloutInput, m: ModelInfo) -> np.ndarray:
        """-> uint8 [C, H, W, 3]: every context frame, each within the decode-time budget."""
        s = self.server
        return np.stack([decode_frame(f.encoding, f.data, f.height, f.width, (m.height, m.width), s.max_image_pixels,
                                      s.max_image_bytes, f"context[{i}]", s.max_image_decode_ms)
                         for i, f in enumerate(inp.context)])

    async def _decode_off_loop(self, inp: RolloutInput, m: ModelInfo) -> np.ndarray:
        """PNG / JPEG decoding in the decode threads: a slow image never stalls the event loop (/healthz, streams)."""
        if all(f.encoding == "raw" for f in inp.context):  # a copy: no thread hop needed
            return self._decode(inp, m)
        return await asyncio.get_running_loop().run_in_executor(self._decoder, self._decode, inp, m)

    # ---- calls ----------------------------------------------------------------------------------
    async def _start(self, inp: RolloutInput, session: bool = False
                     ) -> tuple[RolloutRequest, AsyncIterator[RolloutEvent]]:
        """Validate (cost included), count the key's slots and cost in flight, decode the frames off the event loop,
        enqueue; the stream is tracked (drain, slow consumers) and gives the key's slots and cost back at its end."""
        req = self.build(inp, session, decode=False)
        who = inp.principal
        releases = []
        try:
            releases.append(take_slots(1 if session else req.candidates, who))
            releases.append(self.costs.take(request_cost(req), who))
            req.context = await self._decode_off_loop(inp, inp.info)
            events = await self.queue.submit(req)
        except BaseException:
            _release_all(releases)
            raise
        on_end = (lambda: _release_all(releases)) if any(releases) else None
        return req, self.drainer.track(req.id, events, session=req.session, on_end=on_end)

    async def rollout(self, inp: RolloutInput) -> tuple[RolloutRequest, AsyncIterator[RolloutEvent]]:
        """Validate and enqueue (errors raise here, before any event); events end with a final one."""
        req, events, _ = await self.start_rollout(inp)
        return req, events

    async def start_rollout(self, inp: RolloutInput
                            ) -> tuple[RolloutRequest, AsyncIterator[RolloutEvent], Reach | None]:
        """rollout(), and with options.anytime the Reach that says at the end how far each candidate got (else
        None): the adapters put it on the final NDJSON line / the last gRPC message."""
        req, events = await self._start(inp)
        if not inp.options.anytime:
            return req, events, None
        reach = Reach.of(req)
        return req, anytime(events, reach, req), reach

    async def predict(self, inp: RolloutInput) -> tuple[str, list[RolloutEvent], bool]:
        """-> (request id, its events, truncated: an anytime deadline came before the last step)."""
        if len(inp.candidates) != 1:
            raise InvalidArgument("actions: predict takes exactly one action sequence", "actions")
        inp.single = True
        req, events, reach = await self.start_rollout(inp)
        out = []
        try:
            async for ev in events:
                if ev.final:
                    raise_for(ev)
                else:
                    out.append(ev)
        finally:  # cancelled (client gone): closing the stream cancels the request and frees its slots
            await events.aclose()
        return req.id, out, bool(reach and reach.truncated and reach.truncated[0])

    async def open_session(self, inp: RolloutInput) -> tuple[RolloutRequest, AsyncIterator[RolloutEvent]]:
        return await self._start(inp, session=True)

    async def act(self, req: RolloutRequest, action) -> None:
        m = self.model(req.model)
        a = self._action(m, action, "action")
        await self.queue.act(SessionAction(req.id, np.asarray(a)))

    async def close_session(self, req: RolloutRequest) -> None:
        await self.queue.act(SessionAction(req.id, np.zeros(0), close=True))


def _release_all(releases: list) -> None:
    for release in releases:
        if release is not None:
            release()


def raise_for(ev: RolloutEvent) -> None:
    """A final event that carries an error becomes the matching domain error."""
    if ev.error != ErrorCode.OK:
        raise from_code(ev.error, ev.message)
