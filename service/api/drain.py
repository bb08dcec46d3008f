"""Graceful drain: every event stream the front end hands out is tracked, so that on SIGTERM the
in-flight rollouts get the grace period and whatever is left (and every session, at once) ends with a
final UNAVAILABLE event: a last NDJSON line, a gRPC status, a WebSocket close frame (1012). No torch.

The hot path costs a dict entry per request and two attribute writes per event: a stream that waits
for its next event is woken by cancelling the task that waits (Task.uncancel keeps the task alive).
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import AsyncIterator

from ..messages import ErrorCode, RolloutEvent

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
