"""N sessions of one client stepped in lockstep: the server side of a vectorized RL env (gRPC VectorSession).
No torch here.

Each env is an ordinary session (data plane open_session + the one session pump, api/session.py), so the engine,
the queue modes, slots, keys and drain treat it like any other; what this adds is the lockstep: a vector step hands
every env's action over at once (one pass of the event loop, so the engine takes them in the same engine step)
and answers when every env's frame is in: one round trip for N env-steps instead of N.

Bounds: N <= the model's max_candidates (what one request may hold in slots); every env holds one session slot
against the key's max_slots (data plane); at most one action per env is in flight (the next vector step is not read
before this one is answered), so nothing a client pushes piles up.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ..errors import InvalidArgument, Unavailable
from ..messages import ModelInfo, RolloutEvent, RolloutRequest
from .dataplane import DataPlane, Options, RolloutInput, WireFrame
from .session import CLOSE, session_events

CLOSE_WAIT_S = 5.0  # how long a closing env waits for its session's end before letting go (engine gone)


@dataclass
class EnvStart:
    """A reset of one env: its new session's context and sampling seed."""

    context: list[WireFrame]
    context_actions: list | None = None
    seed: int = 0


@dataclass
class _Env:
    req: RolloutRequest
    inbox: asyncio.Queue
    events: AsyncIterator[RolloutEvent]


@dataclass
class VectorSessions:
    """The N sessions of one VectorSession call. inputs: per env an action (int | list[float]) or an EnvStart."""

    dp: DataPlane
    info: ModelInfo
    options: Options
    n: int
    principal: object = None
    deadline: float | None = None
    envs: list[_Env | None] = field(default_factory=list)

    def __post_init__(self):
        if not 1 <= self.n <= self.info.max_candidates:
            raise InvalidArgument(f"num_envs: {self.n}, must be in [1, {self.info.max_candidates}] (the model's "
                                  "max_candidates)", "num_envs")
        self.envs = [None] * self.n

    async def exchange(self, inputs: list) -> list[RolloutEvent | str]:
        """One vector step: every input checked first (a bad one steps nothing), resets started, then all actions
        handed over together and their frames awaited together. -> per env its event, or the new session id."""
        if len(inputs) != self.n:
            raise InvalidArgument(f"envs: {len(inputs)} inputs, one per env needed ({self.n})", "envs")
        acts = {}
        for i, x in enumerate(inputs):
            if isinstance(x, EnvStart):
                continue
            if self.envs[i] is None:
                raise InvalidArgument(f"envs[{i}]: an action before the env's first reset", f"envs[{i}]")
            acts[i] = self.dp.check_action(self.info, x, f"envs[{i}].action")
        out: list = [None] * self.n
        starts = [i for i, x in enumerate(inputs) if isinstance(x, EnvStart)]
        await asyncio.gather(*(self._end(i) for i in starts))  # old sessions end together (one engine step)
        for i in starts:  # one after the other: a failed open leaves no other open half-made
            out[i] = await self._open(i, inputs[i])  # (cheap: open_session submits, the engine prefills)
        for i, a in acts.items():  # no await between them: the engine takes them in one step
            self.envs[i].inbox.put_nowait(a)
        # every env's answer is awaited, errors included, before one is raised: no pump is left mid-step
        events = await asyncio.gather(*(self._next(i) for i in acts), return_exceptions=True)
        for i, ev in zip(acts, events, strict=True):
            if isinstance(ev, BaseException):
                raise ev
            ev.candidate = i
            out[i] = ev
        return out

    async def _open(self, i: int, s: EnvStart) -> str:
        o = self.options
        opts = Options(frames=o.frames, seed=s.seed, temperature=o.temperature, priority=o.priority,
                       return_tokens=o.return_tokens, frame_encoding=o.frame_encoding)
        req, events = await self.dp.open_session(RolloutInput(self.info.name, s.context, [], s.context_actions, opts,
                                                              deadline=self.deadline, principal=self.principal,
                                                              info=self.info))
        inbox: asyncio.Queue = asyncio.Queue()
        self.envs[i] = _Env(req, inbox, session_events(self.dp, req, events, _drain(inbox)))
        return req.id

    async def _next(self, i: int) -> RolloutEvent:
        try:
            return await self.envs[i].events.__anext__()
        except StopAsyncIteration:
            raise Unavailable(f"envs[{i}]: its session ended") from None

    async def _end(self, i: int) -> None:
        """Close env i's session and wait for its end (its slot comes back in the next engine step). The pump is run
        to its end, not only closed: a pump never started (a reset env closed before its first step) would otherwise
        never tell the engine, and the session would hold its slot until the idle timeout."""
        env, self.envs[i] = self.envs[i], None
        if env is None:
            return
        env.inbox.put_nowait(CLOSE)
        try:
            async with asyncio.timeout(CLOSE_WAIT_S):
                async for _ in env.events:  # the feeder hands CLOSE over; the engine's final event ends the pump
                    pass
        except Exception:  # noqa: BLE001 - an error end or a dead engine: the session is over either way
            pass
        finally:
            with contextlib.suppress(Exception):
                await env.events.aclose()

    async def close(self) -> None:
        """End every env's session. Shielded: the call being cancelled (client gone) must not cut the closing short,
        or a session would hold its slot until the idle timeout."""
        await asyncio.shield(asyncio.gather(*(self._end(i) for i in range(self.n)), return_exceptions=True))


async def _drain(inbox: asyncio.Queue):
    while True:
        item = await inbox.get()
        yield item
        if item is CLOSE:
            return
