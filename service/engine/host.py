"""One engine host: runs an engine's loop in its own thread and hands each step's events to an asyncio loop.

Used by the local queue (embedded `serve`) and the Redis worker alike, so the thread, the hand-over and the
death report are written once. No torch here: the engine is passed in.

    host = EngineHost(engine, name="tiny")
    host.start(loop, on_events=route)      # route(events, fatal) runs in `loop`, once per engine step
    ...
    await host.close()                     # stop the loop, join the thread
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

log = logging.getLogger("worldserve.engine")


class EngineHost:
    def __init__(self, engine, name: str = "engine"):
        self.engine, self.name = engine, name
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None  # the thread's own crash (the engine ends requests itself)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_events: Callable | None = None
        self._on_exit: Callable | None = None

    def start(self, loop: asyncio.AbstractEventLoop, on_events: Callable[[list, bool], None],
              on_exit: Callable[[], None] | None = None) -> None:
        """Run the engine in a thread; `on_events(events, fatal)` and `on_exit()` are called in `loop`."""
        self._loop, self._on_events, self._on_exit = loop, on_events, on_exit
        self.thread = threading.Thread(target=self._main, name=f"engine-{self.name}", daemon=True)
        self.thread.start()

    def _deliver(self, events: list) -> None:  # engine thread, once per step
        if events:
            self._loop.call_soon_threadsafe(self._on_events, list(events), self.engine.fatal is not None)

    def _main(self) -> None:  # engine thread
        try:
            self.engine.run(self._deliver)
        except BaseException as e:  # noqa: BLE001 - reported by dead(); the owner ends the requests
            self.error = e
            log.exception("engine thread %s crashed", self.name)
        finally:
            if self._on_exit is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._on_exit)

    def started(self) -> bool:
        return self.thread is not None

    def alive(self) -> bool:
        """Not started yet, or running with a live engine."""
        return self.thread is None or (self.thread.is_alive() and self.engine.alive())

    def dead(self) -> str | None:
        """Why the engine cannot serve any more, or None."""
        err = self.engine.fatal or self.error
        if err is not None:
            return f"{type(err).__name__}: {err}"
        if self.thread is not None and not self.thread.is_alive():
            return "engine thread ended"
        return None

    def stop(self) -> None:
        self.engine.stop()

    async def close(self, timeout: float = 10) -> None:
        self.engine.stop()
        if self.thread is not None:
            await asyncio.to_thread(self.thread.join, timeout)
