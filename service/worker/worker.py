"""Worker side of Redis mode: engine + model, no public API.

Loops (asyncio; the engine runs in its own thread):
  reader      XREADGROUP while the engine has slots left for what it took (load spreads); starts after
              the first heartbeat, and the worker is not ready until it has joined the group and read
  publisher   engine events (one list per engine step) -> XADD to each request's result stream, a step
              (or several) per pipeline, buffered across outages; on a request's final event XACK + XDEL
  heartbeat   (worker_liveness) alive key with a TTL, liveness on Redis's clock, model info, touch of
              our own pending entries
  reclaimer   (worker_liveness) entries of a worker whose alive key is gone are claimed at once and
              rerun (seeded, so identical), or dead-lettered after max_deliveries
  watchdog    engine thread ended or engine.fatal set: stop heartbeating, reading and touching our
              entries (survivors reclaim them), flush what was computed, exit EXIT_ENGINE_DEAD
  cancels     pub/sub cancel channel -> engine.cancel
  sessions    each session's action stream, read from the start (a rebuilt session replays it)

Failures: a request the engine ends with INTERNAL while it stays alive is forwarded and ACKed (never
retried); INTERNAL ends from an engine that died are dropped, the entries left for another worker; an
entry that cannot be unpacked or does not fit the model is dead-lettered raw, its client told why.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass

from .. import metrics
from ..engine.host import EngineHost
from ..errors import QueueFull
from ..messages import ErrorCode, ModelInfo, RolloutEvent, RolloutRequest, check_request, pack, unpack
from ..queue import redis_common as rc
from ..settings import QueueSettings
from .liveness import Liveness

log = logging.getLogger("worldserve.worker")
EXIT_ENGINE_DEAD = 70  # the process exits with this when its engine died (the orchestrator restarts it)
HOLD_INTERNAL_S = 0.2  # an INTERNAL end is published once the engine is seen alive this long after it


@dataclass
class InFlight:
    entry_id: bytes
    req: RolloutRequest
    session_last: bytes = b"0"


class Worker(Liveness):
    def __init__(self, engine, info: ModelInfo, q: QueueSettings):
        self.engine, self.info, self.q = engine, info, q
        self.id = q.worker_name or f"w-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
        self.model = info.name
        self.key, self.group = rc.requests_key(self.model), rc.group_name(self.model)
        self.r = rc.connect(q)
        self.inflight: dict[str, InFlight] = {}
        self.disowned: set[str] = set()  # requests another worker took over: our events for them are dropped
        self.out: asyncio.Queue = asyncio.Queue()  # (events of one step, engine fatal when emitted)
        self._held: list[tuple[float, RolloutEvent]] = []  # INTERNAL ends waiting for proof of a live engine
        self.accepting = True
        self.connected = False
        self.joined = False  # consumer group exists and we have read from it
        self.dead: str | None = None  # why the engine died
        self.host = EngineHost(engine, info.name)
        self._loop: asyncio.AbstractEventLoop | None = None
        Liveness.__init__(self)

    # ---- engine thread -> loop ----------------------------------------------------------------
    def _on_events(self, events: list[RolloutEvent], fatal: bool) -> None:
        """All events of one engine step (one call per step); published together in one pipeline."""
        self.out.put_nowait((events, fatal))

    def engine_dead(self) -> str | None:
        if self.dead is None:
            self.dead = self.host.dead()
        return self.dead

    def ready(self) -> bool:
        return self.connected and self.joined and self.accepting and self.dead is None

    async def run(self, stop: asyncio.Event, grace_s: float) -> None:
        """Serve until `stop` (drain, return) or engine death (flush, raise SystemExit(EXIT_ENGINE_DEAD))."""
        self._loop = asyncio.get_running_loop()
        self.host.start(self._loop, self._on_events)
        log.warning("worker %s serving %s from %s", self.id, self.model, rc.redacted(self.q.url))
        loops = dict(reader=self._reader(), publisher=self._publisher(), heartbeat=self._heartbeat(),
                     reclaimer=self._reclaimer(), cancels=self._cancels(), sessions=self._sessions())
        tasks = {name: asyncio.create_task(c, name=name) for name, c in loops.items()}
        watchdog, stopped = asyncio.create_task(self._watchdog()), asyncio.create_task(stop.wait())
        await asyncio.wait({watchdog, stopped}, return_when=asyncio.FIRST_COMPLETED)
        watchdog.cancel()
        stopped.cancel()
        if self.engine_dead():
            await self._die(tasks)
            raise SystemExit(EXIT_ENGINE_DEAD)
        self.accepting = False  # drain: finish what we hold, take nothing new
        t0 = time.time()
        while self.inflight and time.time() - t0 < grace_s and not self.engine_dead():
            await asyncio.sleep(0.05)
        while (not self.out.empty() or self._held) and time.time() - t0 < grace_s + 2:
            await asyncio.sleep(0.05)
        await self._cancel_all(tasks.values())
        await self._leave()
        await self.host.close()
        await self._close_client()

    async def _watchdog(self) -> None:
        while not self.engine_dead():
            await asyncio.sleep(0.05)

    async def _die(self, tasks: dict[str, asyncio.Task]) -> None:
        """Engine gone: no more heartbeats, reads or touches of our pending entries; publish what was
        computed before the death (finished requests are ACKed), then leave so survivors reclaim the rest."""
        self.accepting = False
        log.error("engine died (%s): worker %s stops heartbeating and reading; %d requests left pending for "
                  "another worker; exiting with status %d", self.dead, self.id, len(self.inflight), EXIT_ENGINE_DEAD)
        await self._cancel_all([t for n, t in tasks.items() if n != "publisher"])
        t0 = time.time()
        while (not self.out.empty() or self._held) and time.time() - t0 < 3:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)  # the publisher's last pipeline
        await self._cancel_all([tasks["publisher"]])
        await self._leave()
        await self._close_client()

    async def _close_client(self) -> None:
        try:
            await asyncio.wait_for(self.r.aclose(), 2.0)
        except (TimeoutError, *rc.TRANSIENT):
            pass

    @staticmethod
    async def _cancel_all(tasks) -> None:
        tasks = list(tasks)
        for t in tasks:
            t.cancel()
        if tasks:  # bounded: a command cancelled mid-flight inside redis-py can stay "cancelling"
            await asyncio.wait(tasks, timeout=2.0)

    # ---- taking work ------------------------------------------------------------------------------
    def _has_room(self) -> bool:
        # one entry per read, as long as the requests taken so far leave slots free: a burst of finished
        # rollouts is refilled within one engine step, and a worker never holds work it has no slots for
        return self.accepting and self.dead is None and self.engine.room() > 0

    async def _accept(self, entry_id: bytes, fields: dict, reclaimed: bool = False) -> None:
        rid = fields.get(b"id", b"").decode(errors="replace") or None
        try:
            req = unpack(fields[b"m"])
        except Exception as e:  # noqa: BLE001 - a corrupt entry is buried, never retried
            await self._bury(entry_id, fields, rid, ErrorCode.INTERNAL,
                             f"request entry could not be unpacked ({type(e).__name__}: {e})")
            return
        problem = check_request(req, self.info)
        if problem:
            await self._bury(entry_id, fields, rid or getattr(req, "id", None), ErrorCode.INVALID_ARGUMENT,
                             f"invalid request: {problem}")
            return
        if b"d" in fields:  # deadline as a duration, re-anchored on our clock (None: no deadline)
            req.deadline = rc.reanchor(rc.decode_remaining(fields[b"d"]), entry_id, time.time(), self.redis_offset)
        if await self.r.exists(rc.cancelled_key(req.id)):
            await self._publish([RolloutEvent.end(req.id, ErrorCode.CANCELLED, "cancelled by the client")],
                                {req.id: entry_id})
            return
        held = self.inflight.get(req.id)
        if held is not None:  # the same request again (re-added after Redis lost it): one run, one set of slots
            if held.entry_id != entry_id:
                old, held.entry_id = held.entry_id, entry_id
                async with self.r.pipeline(transaction=False) as pipe:
                    pipe.xack(self.key, self.group, old)
                    pipe.xdel(self.key, old)
                    await pipe.execute()
                log.warning("request %s arrived again as %s; kept running once", req.id, entry_id.decode())
            return
        if reclaimed:
            req.attempt += 1
            metrics.REDIS_RECLAIMED.inc()
            log.warning("reclaimed request %s (attempt %d)", req.id, req.attempt + 1)
        t0 = time.monotonic()
        while req.id in self.disowned and time.monotonic() - t0 < 2:  # our cancelled run ends first
            await asyncio.sleep(0.01)
        self.disowned.discard(req.id)
        try:  # in flight only once the engine took it: a refused submit never strands the entry
            self.engine.submit(req)
        except QueueFull:  # raced with our own room check: left pending, a worker with room reclaims it
            log.warning("engine queue full: request %s left for reclaim", req.id)
            return
        except Exception as e:  # noqa: BLE001 - answered and acknowledged, never stranded
            code = e.code if isinstance(getattr(e, "code", None), ErrorCode) else ErrorCode.INTERNAL
            await self._publish([RolloutEvent.end(req.id, code, f"the engine could not take the request: {e}")],
                                {req.id: entry_id})
            return
        self.inflight[req.id] = InFlight(entry_id, req)
        if reclaimed and await self.r.exists(rc.cancelled_key(req.id)):  # cancelled while we were taking it over:
            self.engine.cancel(req.id)  # the pub/sub message went to nobody (a moved session's client closed)
        if req.session:
            await self.r.xadd(rc.wake_key(self.id), {"w": b"1"}, maxlen=10, approximate=True)

    async def _reader(self) -> None:
        backoff = rc.Backoff()
        await self.alive_once.wait()  # our alive key exists before we hold anything: never mistaken for dead
        ensured = False
        while True:
            try:
                if not ensured:
                    await rc.ensure_group(self.r, self.model)
                    ensured = True
                if not self._has_room():
                    await asyncio.sleep(0.001)
                    continue
                resp = await self.r.xreadgroup(self.group, self.id, {self.key: ">"}, count=1, block=self.q.block_ms)
                if not self.joined:
                    log.warning("worker %s joined group %s and takes work", self.id, self.group)
                self.connected = self.joined = True
                backoff.reset()
                for _, entries in resp or []:
                    for eid, fields in entries:
                        await self._accept(eid, fields)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - every failure ends in a retry with backoff
                if rc.is_nogroup(e):
                    ensured = self.joined = False
                await self._on_error(e, backoff, "reader")

    # ---- results ------------------------------------------------------------------------------------
    def _sort(self, item: tuple[list[RolloutEvent], bool]) -> list[RolloutEvent]:
        """Events to publish now; INTERNAL ends are held (or dropped: the engine died emitting them)."""
        events, fatal = item
        now, keep = self._loop.time(), []
        for ev in events:
            if ev.request_id in self.disowned:
                if ev.final:
                    self.disowned.discard(ev.request_id)
            elif ev.final and ev.error == ErrorCode.INTERNAL and ev.request_id in self.inflight:
                if not fatal:
                    self._held.append((now + HOLD_INTERNAL_S, ev))
            else:
                keep.append(ev)
        return keep

    def _release(self) -> list[RolloutEvent]:
        now = self._loop.time()
        due = [ev for t, ev in self._held if t <= now]
        self._held = [(t, ev) for t, ev in self._held if t > now]
        if due and self.engine_dead():
            return []  # the engine died right after: these requests go to another worker
        return due

    async def _next_batch(self) -> list[RolloutEvent]:
        while True:
            batch = self._release()
            if not batch and self.out.empty():
                if self._held:
                    await asyncio.sleep(0.02)
                    continue
                batch.extend(self._sort(await self.out.get()))
            while not self.out.empty() and len(batch) < 512:  # whole steps only: one pipeline per step
                batch.extend(self._sort(self.out.get_nowait()))
            if batch:
                return batch

    async def _publisher(self) -> None:
        backoff = rc.Backoff()
        batch: list[RolloutEvent] = []
        while True:
            try:
                if not batch:
                    batch = await self._next_batch()
                acks = {ev.request_id: self.inflight[ev.request_id].entry_id
                        for ev in batch if ev.final and ev.request_id in self.inflight}
                await self._publish(batch, acks)
                for ev in batch:  # finals of requests we no longer track (warm-up) just drop
                    if ev.final:
                        self.inflight.pop(ev.request_id, None)
                batch = []
                backoff.reset()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - keep the batch and retry: events are never dropped
                await self._on_error(e, backoff, "publisher")

    async def _publish(self, events: list[RolloutEvent], acks: dict[str, bytes]) -> None:
        now = str(time.time()).encode()
        async with self.r.pipeline(transaction=False) as pipe:
            touched = set()
            for ev in events:
                k = rc.results_key(ev.request_id)
                pipe.xadd(k, {"m": pack(ev), "t": now})
                touched.add(k)
            for k in touched:
                pipe.expire(k, self.q.result_ttl_s)
            for eid in acks.values():
                pipe.xack(self.key, self.group, eid)
                pipe.xdel(self.key, eid)
            await pipe.execute()

    # ---- cancel, sessions -------------------------------------------------------------------------
    async def _cancels(self) -> None:
        backoff = rc.Backoff()
        while True:
            try:
                async with self.r.pubsub() as ps:
                    await ps.subscribe(rc.CANCEL_CHANNEL)
                    backoff.reset()
                    async for msg in ps.listen():
                        if msg.get("type") == "message":
                            rid = msg["data"].decode()
                            if rid in self.inflight:
                                self.engine.cancel(rid)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001
                await self._on_error(e, backoff, "cancels")

    async def _history_lost(self, f: InFlight, first: int) -> None:
        """A session rebuilt here whose action stream was trimmed: its seeded replay cannot be exact, so it
        ends with UNAVAILABLE (the client reopens it) instead of silently diverging."""
        rid = f.req.id
        self.disowned.add(rid)  # the engine's own CANCELLED end is dropped
        self.engine.cancel(rid)
        self.inflight.pop(rid, None)
        await self._publish([RolloutEvent.end(rid, ErrorCode.UNAVAILABLE, (
            f"session moved to another worker after more than {self.q.session_maxlen} actions (its history starts "
            f"at action {first}): it cannot be replayed exactly; open a new session"))], {rid: f.entry_id})

    async def _sessions(self) -> None:
        backoff = rc.Backoff()
        wake_id = b"0-0"
        while True:
            try:
                streams = {rc.wake_key(self.id): wake_id}
                for rid, f in self.inflight.items():
                    if f.req.session:
                        streams[rc.session_key(rid)] = f.session_last
                resp = await self.r.xread(streams, block=self.q.block_ms, count=256)
                for key, entries in resp or []:
                    key = key.decode()
                    if key == rc.wake_key(self.id):
                        wake_id = entries[-1][0]
                        continue
                    f = self.inflight.get(key.rsplit(":", 1)[1])
                    if f is None:
                        continue
                    for eid, fields in entries:
                        if f.session_last == b"0" and int(fields.get(b"n", b"0")) != 0:
                            await self._history_lost(f, int(fields[b"n"]))  # a moved session past session_maxlen
                            break
                        f.session_last = eid
                        self.engine.act(unpack(fields[b"m"]))
                backoff.reset()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001
                await self._on_error(e, backoff, "sessions")
