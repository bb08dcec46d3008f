"""In-process queue: each served model's engine runs in a thread of this process; events go to asyncio queues.

Several models can be served side by side (a model repository): each has its own engine, slots and queue, and a
request goes to the engine of its model. Models can be added and removed while serving.
The engine hands over each step's events in one list: one wake-up of the event loop per step, not per event.
Deadlines are enforced here too: a request whose engine does not end it by its deadline (plus a short grace)
gets DEADLINE_EXCEEDED from the queue, so a wedged engine never hangs a client. When an engine thread ends
(fatal error), every open request of that model ends with INTERNAL and `alive()` turns False (/healthz 503).

Names are promises to clients: a name served in this process keeps its weights for the life of the process.
`load_model` claims the name before anything is built (a name being served or being loaded -> ModelConflict at
once, no engine built) and refuses weights other than the ones the name was first served with (`weights`: name ->
sha256 of model.safetensors, kept after an unload): unloading `tiny` and loading other weights as `tiny` would
silently change what a live session's next request or a client's seeded rerun gets. A new version takes a new
name. Where it may load from and the weights' pin are the admin API's checks (api/admin.py, `model_roots`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..engine.host import EngineHost
from ..errors import NotFound, Unavailable
from ..messages import ErrorCode, ModelInfo, RolloutEvent, RolloutRequest, SessionAction

DEADLINE_GRACE_S = 1.0
CONFIG_NAME = "config.json"  # the engine retires expired requests itself; this is the backstop


@dataclass
class Served:
    """One served model: its engine (worldserve.engine.Engine, passed in: no torch here) run by an EngineHost (a
    thread of this process), or the proxy of an engine in its own process with its ProcessHost (engine.isolated)."""

    engine: object
    info: ModelInfo
    host: object = None  # EngineHost | ProcessHost
    requests: set[str] = field(default_factory=set)  # open request ids

    def __post_init__(self):
        if self.host is None:  # an engine in another process comes with its host
            self.host = getattr(self.engine, "process_host", None) or EngineHost(self.engine, self.info.name)

    def alive(self) -> bool:
        return self.host.alive()


class ModelConflict(ValueError):
    """A model name that is served, being loaded, or was served in this process with other weights."""


class LocalQueue:
    def __init__(self, engine=None, info: ModelInfo | None = None, loader=None, model_roots: Iterable[Path] = ()):
        # loader: (model directory, pinned weights sha256) -> (engine, info), for loading models while serving
        # (built by the caller); model_roots: the resolved directories the admin API may load from
        self.served: dict[str, Served] = {}
        self._routes: dict[str, tuple[asyncio.Queue, Served]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = False
        self.loader = loader
        self.model_roots: tuple[Path, ...] = tuple(model_roots)
        self.weights: dict[str, str | None] = {}  # every name served in this process -> its weights' sha256
        self._loading: set[str] = set()
        if engine is not None:
            self.served_now(engine, info)

    def served_now(self, engine, info: ModelInfo, weights_sha256: str | None = None, host=None) -> None:
        """Add a model before start(); `weights_sha256`: its model.safetensors' sha256 (None: no weights file,
        e.g. a preset; its name can then not be re-loaded after an unload)."""
        if info.name in self.served:
            raise ValueError(f"two models named {info.name!r}: model names must be unique")
        self.served[info.name] = Served(engine, info, host)
        self.weights[info.name] = (weights_sha256 or "").lower() or None

    def check_name(self, name: str, weights_sha256: str | None) -> None:
        """Raises ModelConflict when `name` cannot be served now with these weights (cheap: nothing is read or
        built): it is served or being loaded, or it was served in this process with other (or unknown) weights."""
        if name in self.served or name in self._loading:
            raise ModelConflict(f"model {name!r} is already {'served' if name in self.served else 'being loaded'}: "
                                "one name, one model (unload it first to re-load the same weights)")
        if name in self.weights:
            was, now = self.weights[name], (weights_sha256 or "").lower() or None
            if was is None or now != was:
                raise ModelConflict(
                    f"model name {name!r} was served in this process with "
                    f"{'weights sha256 ' + was[:12] + '…' if was else 'weights of unknown sha256 (no weights file)'}; "
                    "a name keeps its weights for the life of the process, so that no client or session gets "
                    "another model under a name it knows: load a new version under a new name")

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for s in self.served.values():
            self._start(s)
        self._ready = True

    def _start(self, s: Served) -> None:
        s.host.start(self._loop, self._route, on_exit=lambda: self._exited(s))

    def _exited(self, s: Served) -> None:  # event loop: the engine thread ended
        if s.engine.fatal is not None or s.host.error is not None:  # end whatever the engine could not
            self._end_all(s, ErrorCode.INTERNAL, f"engine failed: {s.host.dead()}")

    def _end_all(self, s: Served, code: ErrorCode, message: str) -> None:  # event loop
        for rid in list(s.requests):
            route = self._routes.get(rid)
            if route is not None:
                route[0].put_nowait([RolloutEvent.end(rid, code, message)])

    async def load_model(self, model_dir: str | Path, *, name: str, weights_sha256: str) -> ModelInfo:
        """Load a model directory with the loader (in a thread: the event loop keeps serving) and serve it as
        `name` (what its config.json says; checked against the built model). The name is claimed before anything
        is built (ModelConflict at once); `weights_sha256` is the operator's pin, checked again by the loader on
        the bytes it loads."""
        if self.loader is None:
            raise Unavailable("this queue cannot load models")
        self.check_name(name, weights_sha256)
        self._loading.add(name)
        try:
            engine, info = await asyncio.to_thread(self.loader, model_dir, weights_sha256)
            if info.name != name:  # the class named itself otherwise: the cheap check above was about another name
                raise ModelConflict(f"the model built from {CONFIG_NAME} is named {info.name!r}, not {name!r} "
                                    "(its `name`): refused, fix config.json")
            self._loading.discard(name)
            await self.add_model(engine, info, weights_sha256)
        finally:
            self._loading.discard(name)
        return info

    async def add_model(self, engine, info: ModelInfo, weights_sha256: str | None = None, host=None) -> None:
        """Serve another model without a restart (its engine built and warmed up by the caller)."""
        self.check_name(info.name, weights_sha256)
        s = Served(engine, info, host)
        self.served[info.name] = s
        self.weights[info.name] = (weights_sha256 or "").lower() or None
        if self._loop is not None:
            self._start(s)

    async def remove_model(self, name: str) -> None:
        """Stop serving a model: its open requests end with UNAVAILABLE, its engine thread stops."""
        s = self.served.pop(name, None)
        if s is None:
            raise NotFound(f"model {name!r} is not served", "model")
        self._end_all(s, ErrorCode.UNAVAILABLE, f"model {name!r} was unloaded")
        await s.host.close()

    async def close(self) -> None:
        self._ready = False
        for s in self.served.values():
            s.host.stop()
        for s in self.served.values():
            await s.host.close()

    def models(self) -> list[ModelInfo]:
        return [s.info for s in self.served.values()]

    def alive(self) -> bool:
        return all(s.alive() for s in self.served.values())

    def ready(self) -> bool:
        return self._ready and bool(self.served) and all(s.host.started() and s.alive()
                                                         for s in self.served.values())

    def _route(self, events: list[RolloutEvent], fatal: bool = False) -> None:  # event loop, once per step
        by_request: dict[str, list[RolloutEvent]] = {}
        for ev in events:
            by_request.setdefault(ev.request_id, []).append(ev)
        for rid, evs in by_request.items():
            route = self._routes.get(rid)
            if route is not None:
                route[0].put_nowait(evs)

    async def submit(self, req: RolloutRequest) -> AsyncIterator[RolloutEvent]:
        s = self.served.get(req.model)
        if s is None:
            raise NotFound(f"model {req.model!r} not found", "model")
        if not s.alive():
            raise Unavailable(f"model {req.model!r}: engine is not running; not taking work")
        q: asyncio.Queue = asyncio.Queue()
        self._routes[req.id] = (q, s)
        s.requests.add(req.id)
        try:
            s.engine.submit(req)  # QueueFull raises here, before any event
        except Exception:
            self._routes.pop(req.id, None)
            s.requests.discard(req.id)
            raise
        return self._events(req, q, s)

    async def _events(self, req: RolloutRequest, q: asyncio.Queue, s: Served) -> AsyncIterator[RolloutEvent]:
        finished = False
        try:
            while True:
                timeout = None if req.deadline is None else max(0.0, req.deadline - time.time()) + DEADLINE_GRACE_S
                try:
                    batch = await asyncio.wait_for(q.get(), timeout)
                except TimeoutError:
                    yield RolloutEvent.end(req.id, ErrorCode.DEADLINE_EXCEEDED, "deadline exceeded")
                    return
                for ev in batch:
                    yield ev
                    if ev.final:
                        finished = True
                        return
        finally:
            self._routes.pop(req.id, None)
            s.requests.discard(req.id)
            if not finished:  # client went away or deadline passed: free the slots within one step
                s.engine.cancel(req.id)

    async def refresh_metrics(self) -> None:
        """Engines in their own processes send their figures now (the /metrics answer waits for them)."""
        hosts = [s.host for s in list(self.served.values()) if hasattr(s.host, "refresh_metrics")]
        await asyncio.gather(*(h.refresh_metrics() for h in hosts))

    async def act(self, action: SessionAction) -> None:
        route = self._routes.get(action.request_id)
        if route is not None:
            route[1].engine.act(action)
