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

from .. import metrics

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


class _EngineProxy:
    """What the local queue calls on an engine, for an engine in another process: submit / act / cancel are sent;
    `fatal` is why the process is gone, while it is. A full queue is refused here, at once, as an in-process engine
    refuses it (REST 429 before the stream starts): requests sent that have had no event yet count as waiting, at
    most engine.max_queue (sessions, which answer only actions, are left to the engine). Any other refusal inside the
    process comes back as the request's final event."""

    def __init__(self, host: ProcessHost, max_queue: int):
        self._host = self.process_host = host
        self.max_queue = max_queue
        self.waiting: set[str] = set()  # request ids sent without an event back yet (reader thread discards)
        self._acts: list = []  # session actions of this loop pass, sent together (ACTS) at its end

    @property
    def fatal(self) -> str | None:
        return self._host.down

    def submit(self, req) -> None:
        from ..errors import Unavailable

        if self._host.down is not None or not self._host.started():
            raise Unavailable(f"engine process of {self._host.name!r} is not running ({self._host.down}); retry")
        if not req.session:
            if len(self.waiting) >= self.max_queue:
                from ..errors import QueueFull

                metrics.REQUESTS.labels(self._host.info.name if self._host.info else self._host.name, "rejected").inc()
                raise QueueFull(f"queue full ({self.max_queue} requests waiting); retry later")
            self.waiting.add(req.id)
        try:
            self.flush()  # what was sent before goes first
            self._host.send_msg(req)
        except Exception:
            self.waiting.discard(req.id)
            raise

    def act(self, action) -> None:
        """Called in the loop: the actions of one loop pass (a vector env's N pumps) go as one ACTS frame, so the
        engine process takes them in one step, as an in-process engine does."""
        self._acts.append(action)
        if len(self._acts) == 1:
            self._host._loop.call_soon(self.flush)

    def flush(self) -> None:
        from . import ipc

        acts, self._acts = self._acts, []
        if acts:
            try:
                self._host.send_frame(ipc.ACTS, ipc.encode_msgs(acts))
            except Exception as e:  # noqa: BLE001 - the process is gone: its death ends these sessions (on_exit)
                log.warning("engine process of %s: %d session actions not delivered: %s", self._host.name, len(acts), e)

    def cancel(self, request_id: str) -> None:
        from ..messages import Cancel

        self.waiting.discard(request_id)
        self.flush()
        self._host.send_msg(Cancel(request_id))

    def alive(self) -> bool:
        return self._host.down is None

    def stop(self) -> None:
        self._host.stop()


class ProcessHost:
    """An engine in its own process (engine/process.py), with EngineHost's interface for the local queue.

    A process that dies (a crash, an OOM kill, SIGKILL) is seen at once as EOF on its socket: `on_exit` runs in the
    loop (the queue ends that model's open requests with a status), `down` says why (/healthz 503, new work
    UNAVAILABLE), and the process is started again after `restart_backoff_s` (doubling up to 30 s while it keeps
    dying before it is ready). Other models' processes are not touched.

        host = ProcessHost("tiny", config)    # config: what engine/process.py needs (settings, weights pin)
        info = host.spawn()                   # blocking: the process built its engine and said READY
        host.start(loop, on_events, on_exit)
    """

    def __init__(self, name: str, config: dict, restart_backoff_s: float = 0.5, ready_timeout_s: float = 600):
        self.name, self.config = name, config
        self.backoff, self.ready_timeout_s = restart_backoff_s, ready_timeout_s
        self.engine = _EngineProxy(self, config.get("settings", {}).get("engine", {}).get("max_queue", 1 << 30))
        self.info = None
        self.error: BaseException | None = None
        self.down: str | None = "not started"
        self.restarts = 0
        self.proc = None
        self._sock = None
        self._send_lock = threading.Lock()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_events: Callable | None = None
        self._on_exit: Callable | None = None
        self._reader: threading.Thread | None = None
        self._fresh = asyncio.Event()  # set (in the loop) when the process answers METRICS_NOW

    # ---- the process ----------------------------------------------------------------------------------------
    def spawn(self):
        """Start the process and wait for READY; returns its ModelInfo. Raises the build's own error (FAILED: a
        ServiceError, as in-process) or RuntimeError if the process dies first."""
        import json
        import socket
        import subprocess
        import sys

        from ..messages import ModelInfo
        from . import ipc

        ours, theirs = socket.socketpair()
        proc = subprocess.Popen([sys.executable, "-m", "worldserve.engine.process", str(theirs.fileno())],
                                pass_fds=[theirs.fileno()])
        theirs.close()
        try:
            ipc.send(ours, ipc.CONFIG, json.dumps(self.config).encode())
            ours.settimeout(self.ready_timeout_s)
            kind, payload = ipc.recv(ours)
            ours.settimeout(None)
        except (OSError, ipc.Closed) as e:
            ours.close()
            code = _wait(proc, 5)
            raise RuntimeError(f"engine process of {self.name!r} ended before it was ready (exit code {code}): "
                               f"{type(e).__name__}: {e}; its log is above") from e
        if kind == ipc.FAILED:  # the engine could not be built: the same error an in-process build raises
            ours.close()
            _wait(proc, 10)
            raise ipc.decode_failure(payload)
        if kind != ipc.READY:
            raise RuntimeError(f"engine process of {self.name!r} answered frame kind {kind} instead of READY")
        self.info, self.proc, self._sock, self.down = ModelInfo.from_json(payload), proc, ours, None
        return self.info

    def send_msg(self, msg) -> None:
        from ..messages import pack
        from . import ipc

        self.send_frame(ipc.MSG, pack(msg))

    def send_frame(self, kind: int, payload: bytes) -> None:
        from . import ipc

        try:
            with self._send_lock:  # the engine process reads continuously: a send waits at most for a buffer
                ipc.send(self._sock, kind, payload)
        except (OSError, AttributeError) as e:
            from ..errors import Unavailable

            raise Unavailable(f"engine process of {self.name!r} is gone: {e}") from e

    # ---- EngineHost's interface ---------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop, on_events: Callable[[list, bool], None],
              on_exit: Callable[[], None] | None = None) -> None:
        self._loop, self._on_events, self._on_exit = loop, on_events, on_exit
        if self.proc is None:
            self.spawn()
        self._start_reader()

    def _start_reader(self) -> None:
        self._reader = threading.Thread(target=self._read, args=(self._sock, self.proc),
                                        name=f"engine-proc-{self.name}", daemon=True)
        self._reader.start()

    def _read(self, sock, proc) -> None:  # reader thread: one per process life
        from . import ipc

        try:
            while True:
                kind, payload = ipc.recv(sock)
                if kind == ipc.EVENTS:
                    events, fatal = ipc.decode_events(payload)
                    for ev in events:  # started (or ended): no longer waiting
                        self.engine.waiting.discard(ev.request_id)
                    if events:
                        self._loop.call_soon_threadsafe(self._on_events, events, fatal)
                elif kind in (ipc.METRICS, ipc.METRICS_FRESH):
                    metrics.set_remote(self.name, payload.decode())
                    if kind == ipc.METRICS_FRESH:
                        self._loop.call_soon_threadsafe(self._fresh.set)
        except (ipc.Closed, OSError):
            pass
        metrics.set_remote(self.name, None)  # a dead process's gauges (slots, sessions) are not current
        self.engine.waiting.clear()  # its requests end now (on_exit)
        code = _wait(proc, 10)
        self.down = f"engine process exited with code {code}"
        if not self._stopping:
            log.error("engine process of %s died (exit code %s): its requests end now; restarting", self.name, code)
        if self._on_exit is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._on_exit)
        sock.close()
        self._respawn()

    def _respawn(self) -> None:  # reader thread, after a death
        import time

        wait = self.backoff
        while not self._stopping:
            time.sleep(wait)
            if self._stopping:
                return
            try:
                self.spawn()
            except Exception as e:  # noqa: BLE001 - a failed start (dead process or refused build): try again
                log.error("%s; next try in %.1f s", e, min(30.0, wait * 2))
                wait = min(30.0, wait * 2)
                continue
            self.restarts += 1
            log.warning("engine process of %s is back (restart %d)", self.name, self.restarts)
            self._start_reader()
            return

    async def refresh_metrics(self, timeout: float = 1.0) -> None:
        """Before a /metrics answer: the process's figures as of now (else up to ipc.METRICS_EVERY_S old)."""
        from ..errors import Unavailable
        from . import ipc

        if self.down is not None or self._sock is None:
            return
        self._fresh.clear()
        try:
            self.send_frame(ipc.METRICS_NOW, b"")
            await asyncio.wait_for(self._fresh.wait(), timeout)
        except (Unavailable, TimeoutError):
            pass  # a busy or dying process: the last figures it sent

    def started(self) -> bool:
        return self._reader is not None

    def alive(self) -> bool:
        return self._reader is None or self.down is None

    def dead(self) -> str | None:
        return self.down if self._reader is not None else None

    def stop(self) -> None:
        from . import ipc

        self._stopping = True
        try:
            with self._send_lock:
                ipc.send(self._sock, ipc.STOP)
        except (OSError, AttributeError):
            pass

    async def close(self, timeout: float = 10) -> None:
        self.stop()
        if self.proc is not None:
            await asyncio.to_thread(_wait, self.proc, timeout)


def _wait(proc, timeout: float):
    """The process's exit code, killing it if it does not end within `timeout`."""
    import subprocess

    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
