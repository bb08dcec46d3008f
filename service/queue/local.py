"""In-process queue: the engine runs in a thread of this process; events are routed to asyncio queues."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

from ..messages import ModelInfo, RolloutEvent, RolloutRequest, SessionAction


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
        self._thread = threading.Thread(target=self.engine.run, name="engine", daemon=True)
        self._thread.start()
        self._ready = True

    async def close(self) -> None:
        self._ready = False
        self.engine.stop()
        if self._thread:
            await asyncio.to_thread(self._thread.join, 10)

    def models(self) -> list[ModelInfo]:
        return [self.info]

    def ready(self) -> bool:
        return self._ready and self._thread is not None and self._thread.is_alive()

    def _emit(self, ev: RolloutEvent) -> None:  # engine thread
        q = self._routes.get(ev.request_id)
        if q is not None:
            self._loop.call_soon_threadsafe(q.put_nowait, ev)

    async def submit(self, req: RolloutRequest) -> AsyncIterator[RolloutEvent]:
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
                ev = await q.get()
                yield ev
                if ev.final:
                    finished = True
                    return
        finally:
            self._routes.pop(req.id, None)
            if not finished:  # client went away: free the slots within one step
                self.engine.cancel(req.id)

    async def act(self, action: SessionAction) -> None:
        self.engine.act(action)
