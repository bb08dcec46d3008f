"""Graceful drain: every event stream the front end hands out is tracked, so that on SIGTERM the
in-flight rollouts get the grace period and whatever is left (and every session, at once) ends with a
final UNAVAILABLE event: a last NDJSON line, a gRPC status, a WebSocket close frame (1012). No torch.

The hot path costs a dict entry per request and two attribute writes per event: a stream that waits
for its next event is woken by cancelling the task that waits (Task.uncancel keeps the task alive).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from ..messages import ErrorCode, RolloutEvent

SHUTDOWN = "the server is shutting down: retry on another replica"


class _Tracked:
    __slots__ = ("session", "cut", "waiting", "task")

    def __init__(self, session: bool):
        self.session, self.cut, self.waiting, self.task = session, False, False, None


class Drainer:
    def __init__(self):
        self.active: dict[str, _Tracked] = {}
        self.draining = False

    def track(self, request_id: str, events: AsyncIterator[RolloutEvent], session: bool) -> AsyncIterator[RolloutEvent]:
        t = _Tracked(session)
        self.active[request_id] = t
        return self._guard(request_id, events, t)

    async def _guard(self, rid: str, events: AsyncIterator[RolloutEvent], t: _Tracked):
        it = events.__aiter__()
        try:
            while not t.cut:
                t.task, t.waiting = asyncio.current_task(), True
                try:
                    ev = await it.__anext__()
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    if not t.cut:
                        raise
                    asyncio.current_task().uncancel()  # our own cut, not the caller's cancellation
                    break
                finally:
                    t.waiting = False
                if ev.final:
                    self.active.pop(rid, None)  # the consumer may never close us after the last event
                    yield ev
                    return
                yield ev
            await _close(it)  # cancels the request: the engine frees its slots
            self.active.pop(rid, None)
            yield RolloutEvent.end(rid, ErrorCode.UNAVAILABLE, SHUTDOWN)
        finally:
            self.active.pop(rid, None)
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
