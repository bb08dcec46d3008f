"""Worker side of Redis mode: engine + model, no public API.

Loops (asyncio; the engine runs in its own thread):
  reader      XREADGROUP while the engine has slots left for what it took (load spreads)
  publisher   engine events (one list per engine step) -> XADD to each request's result stream, a step
              (or several) per pipeline, buffered across outages; on a request's final event XACK + XDEL
  heartbeat   liveness in a sorted set, model info, and XCLAIM-touch of our own pending entries so
              a long rollout is never mistaken for a dead worker's
  reclaimer   entries idle longer than claim_idle_ms belong to dead workers: claim and rerun them
              (seeded, so identical), or dead-letter them after max_deliveries
  cancels     pub/sub cancel channel -> engine.cancel
  sessions    each session's action stream, read from the start (a rebuilt session replays it)
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass

from . import metrics
from .messages import ErrorCode, ModelInfo, RolloutEvent, RolloutRequest, pack, unpack
from .queue import redis_common as rc
from .settings import QueueSettings

log = logging.getLogger("worldserve.worker")


@dataclass
class InFlight:
    entry_id: bytes
    req: RolloutRequest
    session_last: bytes = b"0"


class Worker:
    def __init__(self, engine, info: ModelInfo, q: QueueSettings):
        self.engine, self.info, self.q = engine, info, q
        self.id = q.worker_name or f"w-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
        self.model = info.name
        self.key, self.group = rc.requests_key(self.model), rc.group_name(self.model)
        self.r = rc.connect(q)
        self.inflight: dict[str, InFlight] = {}
        self.out: asyncio.Queue = asyncio.Queue()
        self.accepting = True
        self.connected = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- engine thread -> loop ----------------------------------------------------------------
    def _emit(self, events: list[RolloutEvent] | RolloutEvent) -> None:
        """All events of one engine step (one call per step); published together in one pipeline."""
        if isinstance(events, RolloutEvent):  # an engine that still emits event by event
            events = [events]
        if events:
            self._loop.call_soon_threadsafe(self.out.put_nowait, list(events))

    def ready(self) -> bool:
        return self.connected and self.accepting

    async def run(self, stop: asyncio.Event, grace_s: float) -> None:
        import threading

        self._loop = asyncio.get_running_loop()
        self.engine.emit = self._emit
        thread = threading.Thread(target=self.engine.run, name="engine", daemon=True)
        thread.start()
        log.warning("worker %s serving %s from %s", self.id, self.model, rc.redacted(self.q.url))
        tasks = [asyncio.create_task(c) for c in (self._reader(), self._publisher(), self._heartbeat(),
                                                  self._reclaimer(), self._cancels(), self._sessions())]
        await stop.wait()
        self.accepting = False  # drain: finish what we hold, take nothing new
        t0 = time.time()
        while self.inflight and time.time() - t0 < grace_s:
            await asyncio.sleep(0.05)
        while not self.out.empty() and time.time() - t0 < grace_s + 2:
            await asyncio.sleep(0.05)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await self.r.zrem(rc.workers_key(self.model), self.id)
        except rc.TRANSIENT:
            pass
        self.engine.stop()
        thread.join(10)
        await self.r.aclose()

    # ---- taking work ------------------------------------------------------------------------------
    def _has_room(self) -> bool:
        # one entry per read, as long as the requests taken so far leave slots free: a burst of finished
        # rollouts is refilled within one engine step, and a worker never holds work it has no slots for
        return self.accepting and self.engine.room() > 0

    async def _accept(self, entry_id: bytes, fields: dict, reclaimed: bool = False) -> None:
        req: RolloutRequest = unpack(fields[b"m"])
        if await self.r.exists(rc.cancelled_key(req.id)):
            await self._publish([RolloutEvent.end(req.id, ErrorCode.CANCELLED, "cancelled by the client")],
                                {req.id: entry_id})
            return
        if reclaimed:
            req.attempt += 1
            metrics.REDIS_RECLAIMED.inc()
            log.warning("reclaimed request %s (attempt %d)", req.id, req.attempt + 1)
        self.inflight[req.id] = InFlight(entry_id, req)
        self.engine.submit(req)
        if req.session:
            await self.r.xadd(rc.wake_key(self.id), {"w": b"1"}, maxlen=10, approximate=True)

    async def _reader(self) -> None:
        backoff = rc.Backoff()
        await self._ensure_group()
        while True:
            try:
                if not self._has_room():
                    await asyncio.sleep(0.001)
                    continue
                resp = await self.r.xreadgroup(self.group, self.id, {self.key: ">"}, count=1, block=self.q.block_ms)
                self.connected = True
                backoff.reset()
                for _, entries in resp or []:
                    for eid, fields in entries:
                        await self._accept(eid, fields)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - every failure ends in a retry with backoff
                await self._on_error(e, backoff, "reader")

    async def _on_error(self, e: Exception, backoff: rc.Backoff, where: str) -> None:
        if rc.is_nogroup(e):
            log.warning("%s: consumer group missing (redis restarted?); recreating", where)
            await backoff.sleep()
            try:
                await self._ensure_group()
            except Exception:  # noqa: BLE001
                pass
            return
        if isinstance(e, rc.TRANSIENT):
            if self.connected:
                log.warning("%s: redis unavailable (%s); retrying", where, type(e).__name__)
            self.connected = False
        else:
            log.exception("%s error", where)
        await backoff.sleep()

    async def _ensure_group(self) -> None:
        await rc.ensure_group(self.r, self.model)

    # ---- results ------------------------------------------------------------------------------------
    async def _publisher(self) -> None:
        backoff = rc.Backoff()
        batch: list[RolloutEvent] = []
        while True:
            try:
                if not batch:  # whole steps only: a step's events always go out in one pipeline
                    batch.extend(await self.out.get())
                while not self.out.empty() and len(batch) < 512:
                    batch.extend(self.out.get_nowait())
                acks = {ev.request_id: self.inflight[ev.request_id].entry_id
                        for ev in batch if ev.final and ev.request_id in self.inflight}
                await self._publish(batch, acks)
                for rid in acks:
                    self.inflight.pop(rid, None)
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

    # ---- liveness, reclaim, cancel, sessions --------------------------------------------------
    async def _heartbeat(self) -> None:
        backoff = rc.Backoff()
        info = json.dumps(dataclasses.asdict(self.info))
        while True:
            try:
                async with self.r.pipeline(transaction=False) as pipe:
                    pipe.zadd(rc.workers_key(self.model), {self.id: time.time()})
                    pipe.hset(rc.MODELS, self.model, info)
                    await pipe.execute()
                mine = [f.entry_id for f in self.inflight.values()]
                if mine:  # reset idle time of what we are still working on
                    await self.r.xclaim(self.key, self.group, self.id, 0, mine, justid=True)
                summary = await self.r.xpending(self.key, self.group)
                metrics.REDIS_PENDING.set(summary["pending"])
                self.connected = True
                backoff.reset()
                await asyncio.sleep(self.q.heartbeat_s)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001
                await self._on_error(e, backoff, "heartbeat")

    async def _reclaimer(self) -> None:
        backoff = rc.Backoff()
        while True:
            try:
                await asyncio.sleep(max(0.2, self.q.claim_idle_ms / 4000))
                stale = await self.r.xpending_range(self.key, self.group, "-", "+", 64, idle=self.q.claim_idle_ms)
                for p in stale:
                    if p["consumer"].decode() == self.id:
                        continue
                    if p["times_delivered"] >= self.q.max_deliveries:
                        await self._dead_letter(p["message_id"], p["times_delivered"])
                    elif self._has_room():
                        for eid, fields in await self.r.xclaim(self.key, self.group, self.id,
                                                               self.q.claim_idle_ms, [p["message_id"]]):
                            if fields:
                                await self._accept(eid, fields, reclaimed=True)
                backoff.reset()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001
                await self._on_error(e, backoff, "reclaimer")

    async def _dead_letter(self, eid: bytes, deliveries: int) -> None:
        claimed = await self.r.xclaim(self.key, self.group, self.id, self.q.claim_idle_ms, [eid])
        if not claimed or not claimed[0][1]:
            return
        req = unpack(claimed[0][1][b"m"])
        await self.r.xadd(rc.deadletter_key(self.model), {"m": claimed[0][1][b"m"], "deliveries": deliveries},
                          maxlen=10000, approximate=True)
        msg = f"request failed on {deliveries} delivery attempts; moved to the dead-letter stream"
        await self._publish([RolloutEvent.end(req.id, ErrorCode.UNAVAILABLE, msg)], {req.id: eid})
        metrics.REDIS_DEAD_LETTERED.inc()
        log.error("dead-lettered %s after %d deliveries", req.id, deliveries)

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
                        f.session_last = eid
                        self.engine.act(unpack(fields[b"m"]))
                backoff.reset()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001
                await self._on_error(e, backoff, "sessions")
