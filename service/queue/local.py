"""In-process queue: the engine runs in a thread of this process; events are routed to asyncio queues.

The engine hands over each step's events in one list: one wake-up of the event loop per step, not per event.
Deadlines are enforced here too: a request whose engine does not end it by its deadline (plus a short grace)
gets DEADLINE_EXCEEDED from the queue, so a wedged engine never hangs a client. When the engine thread ends
(fatal error), every open request ends with INTERNAL and `alive()` turns False (/healthz 503).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator

from ..errors import Unavailable
from ..messages import ErrorCode, ModelInfo, RolloutEvent, RolloutRequest, SessionAction

DEADLINE_GRACE_S = 1.0  # the engine retires expired requests itself; this is the backstop


class LocalQueue:
    def __init__(self, engine, info: ModelInfo):
        # engine: worldserve.engine.Engine (passed in, so this module never imports torch)
        self.engine, self.info = engine, info
        self._routes: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = False

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.engine.emit = self._emit
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()
        self._ready = True

    def _run(self) -> None:  # engine thread
        self.engine.run()
        if self.engine.fatal is not None and self._loop is not None:  # ends whatever the engine could not
            self._loop.call_soon_threadsafe(self._end_all, f"engine failed: {self.engine.fatal}")

    def _end_all(self, message: str) -> None:
        for rid, q in list(self._routes.items()):
            q.put_nowait([RolloutEvent.end(rid, ErrorCode.INTERNAL, message)])

    async def close(self) -> None:
        self._ready = False
        self.engine.stop()
        if self._thread:
            await asyncio.to_thread(self._thread.join, 10)

    def models(self) -> list[ModelInfo]:
        return [self.info]

    def alive(self) -> bool:
        return self._thread is None or (self._thread.is_alive() and self.engine.alive())

    def ready(self) -> bool:
        return self._ready and self._thread is not None and self._thread.is_alive() and self.engine.alive()

    def _emit(self, events: list[RolloutEvent]) -> None:  # engine thread, once per step
        self._loop.call_soon_threadsafe(self._route, events)

    def _route(self, events: list[RolloutEvent]) -> None:  # event loop
        by_request: dict[str, list[RolloutEvent]] = {}
        for ev in events:
            by_request.setdefault(ev.request_id, []).append(ev)
        for rid, evs in by_request.items():
            q = self._routes.get(rid)
            if q is not None:
                q.put_nowait(evs)

    async def submit(self, req: RolloutRequest) -> AsyncIterator[RolloutEvent]:
        if not self.alive():
            raise Unavailable("engine is not running; not taking work")
        q: asyncio.Queue = asyncio.Queue()
        self._routes[req.id] = q
        try:
            self.engine.submit(req)  # QueueFull raises here, before any event
        except Exception:
            self._routes.pop(req.id, None)
            raise
        return self._events(req, q)

    async def _events(self, req: RolloutRequest, q: asyncio.Queue) -> AsyncIterator[RolloutEvent]:
        finished = False
        try:
            while True:
                timeout = None if req.deadline is None else max(0.0, req.deadline - time.time()) + DEADLINE_GRACE_S
                try:
                    batch = await asyncio.wait_for(q.get(), timeout)
                except TimeoutError:
                    finished = False  # the engine is told to cancel below
                    yield RolloutEvent.end(req.id, ErrorCode.DEADLINE_EXCEEDED, "deadline exceeded")
                    return
                for ev in batch:
                    yield ev
                    if ev.final:
                        finished = True
                        return
        finally:
            self._routes.pop(req.id, None)
            if not finished:  # client went away or deadline passed: free the slots within one step
                self.engine.cancel(req.id)

    async def act(self, action: SessionAction) -> None:
        self.engine.act(action)
