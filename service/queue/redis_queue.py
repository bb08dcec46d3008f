"""Front-end side of Redis mode: XADD requests, one reader task for every request's result stream.

Delivery to the client is exactly once: events are keyed by (candidate, step) and a step already
delivered (a reclaimed request rerun by another worker, seeded, so identical) is dropped. A request
whose entry Redis lost (restart without persistence) is re-added; a request that outlives its
deadline gets DEADLINE_EXCEEDED from the front end itself, so no client ever hangs.

Deadlines go out as durations (seconds left, entry field d) and worker liveness is judged on Redis's
clock, so clock skew between hosts never matters. Interactive sessions get no default deadline (they
end on close or the engine's idle timeout). While Redis cannot be reached (down, wrong password) model
look-ups fail with UNAVAILABLE naming the reason, never "model not found".
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from .. import metrics
from ..errors import InvalidArgument, QueueFull, Unavailable
from ..messages import ErrorCode, ModelInfo, RolloutEvent, RolloutRequest, SessionAction, pack, unpack
from ..settings import QueueSettings
from . import redis_common as rc

log = logging.getLogger("worldserve.redis.frontend")


@dataclass
class Pending:
    req: RolloutRequest
    entry_id: bytes
    out: asyncio.Queue
    last_id: bytes = b"0"
    delivered: set = field(default_factory=set)
    done: bool = False
    acts: int = 0  # session actions sent (their sequence numbers)


class RedisQueue:
    def __init__(self, q: QueueSettings, request_timeout_s: float = 600.0):
        self.q = q
        self.id = f"fe-{uuid.uuid4().hex[:8]}"
        self.request_timeout_s = request_timeout_s
        self.r = rc.connect(q)
        self._pending: dict[str, Pending] = {}
        self._models: dict[str, ModelInfo] = {}
        self._live_models: set[str] = set()
        self._tasks: list[asyncio.Task] = []
        self._connected = False
        self._closed = False
        self._error: str | None = None  # why Redis cannot be used right now (logged when it changes)
        self._reader_ok = False  # the result reader's last read succeeded: /readyz says so

    # ---- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        log.warning("front end %s using %s", self.id, rc.redacted(self.q.url))
        self._tasks = [asyncio.create_task(self._reader()), asyncio.create_task(self._watch())]

    async def close(self) -> None:
        self._closed = True
        for t in self._tasks:
            t.cancel()
        if self._tasks:  # bounded: a command cancelled mid-flight inside redis-py can stay "cancelling"
            await asyncio.wait(self._tasks, timeout=2.0)
        try:
            await asyncio.wait_for(self.r.aclose(), 2.0)
        except (TimeoutError, *rc.TRANSIENT):
            pass

    def models(self) -> list[ModelInfo]:
        if not self._connected and self._error is not None:
            raise Unavailable(f"queue unavailable: {self._error}")
        return [m for n, m in self._models.items() if n in self._live_models]

    def ready(self) -> bool:
        """Connected, a live worker for some model, and the result reader reading (a front end that could
        take requests but not deliver their results is not ready)."""
        return self._connected and self._reader_ok and bool(self._live_models)

    def alive(self) -> bool:
        """The process can go on while its loops run (Redis outages are waited out, not fatal)."""
        return bool(self._tasks) and not any(t.done() for t in self._tasks)

    def _failed(self, e: BaseException, where: str) -> None:
        reason = rc.describe(e)  # for clients: no address
        if isinstance(e, rc.TRANSIENT):
            self._connected = False
        if where == "result reader":
            self._reader_ok = False
        if reason != self._error:
            self._error = reason
            log.warning("%s: %s; retrying", where, rc.describe(e, self.q.url))

    def _ok(self) -> None:
        if self._error is not None:
            log.warning("redis reachable again")
            self._error = None
        self._connected = True

    def _entry(self, req: RolloutRequest) -> dict:
        return {"m": pack(req), "id": req.id, "d": rc.encode_remaining(req.deadline)}

    # ---- submit ---------------------------------------------------------------------------------
    async def submit(self, req: RolloutRequest) -> AsyncIterator[RolloutEvent]:
        if req.deadline is None and not req.session:  # sessions end on close or idle, not at a deadline
            req.deadline = time.time() + self.request_timeout_s
        if req.id in self._pending:
            raise InvalidArgument(f"request id {req.id!r} is already in flight", "id")
        key = rc.requests_key(req.model)
        try:
            if await self.r.xlen(key) >= self.q.stream_maxlen:
                metrics.REQUESTS.labels(req.model, "rejected").inc()
                raise QueueFull(f"queue full ({self.q.stream_maxlen} requests outstanding); retry later")
            p = Pending(req, b"", asyncio.Queue())
            self._pending[req.id] = p
            p.entry_id = await self.r.xadd(key, self._entry(req))
            await self._wake()
        except rc.ERRORS as e:  # unreachable, out of memory (noeviction), read-only replica, ...: 503, nothing left
            self._pending.pop(req.id, None)
            self._failed(e, "submit")
            raise Unavailable(f"queue unavailable: {rc.describe(e)}") from e
        return self._events(p)

    async def _events(self, p: Pending) -> AsyncIterator[RolloutEvent]:
        try:
            while True:
                ev = await p.out.get()
                yield ev
                if ev.final:
                    return
        finally:
            self._pending.pop(p.req.id, None)
            if not p.done:  # client went away: tell the worker to free the slots
                p.done = True
                await self._cancel(p.req)
            elif not self._closed:
                asyncio.create_task(self._cleanup(p.req.id))

    async def _cleanup(self, rid: str) -> None:
        try:
            await self.r.delete(rc.results_key(rid), rc.session_key(rid))
        except rc.ERRORS:
            pass  # the keys expire anyway

    async def _cancel(self, req: RolloutRequest) -> None:
        try:
            async with self.r.pipeline(transaction=False) as pipe:
                pipe.set(rc.cancelled_key(req.id), b"1", ex=self.q.result_ttl_s)
                pipe.publish(rc.CANCEL_CHANNEL, req.id.encode())
                pipe.delete(rc.results_key(req.id))
                await pipe.execute()
        except rc.ERRORS as e:
            log.warning("could not propagate cancel of %s (%s)", req.id, rc.describe(e))

    async def act(self, action: SessionAction) -> None:
        p = self._pending.get(action.request_id)
        if p is None:
            return
        n, p.acts = p.acts, p.acts + 1
        try:  # bounded: a moved session replays its stream, so one longer than session_maxlen cannot move
            async with self.r.pipeline(transaction=False) as pipe:
                pipe.xadd(rc.session_key(action.request_id), {"m": pack(action), "n": str(n)},
                          maxlen=self.q.session_maxlen, approximate=False)
                pipe.expire(rc.session_key(action.request_id), self.q.result_ttl_s)
                await pipe.execute()
        except rc.ERRORS as e:
            raise Unavailable(f"queue unavailable: {rc.describe(e)}") from e

    async def _wake(self) -> None:
        await self.r.xadd(rc.wake_key(self.id), {"w": b"1"}, maxlen=10, approximate=True)

    # ---- the one reader task ----------------------------------------------------------------
    def _deliver(self, p: Pending, ev: RolloutEvent) -> None:
        if p.done:
            return
        if ev.final:
            p.done = True
        else:
            key = (ev.candidate, ev.step)
            if key in p.delivered:  # a rerun after reclaim: already delivered once
                return
            p.delivered.add(key)
        p.out.put_nowait(ev)

    async def _reader(self) -> None:
        backoff = rc.Backoff()
        wake_id = b"0-0"
        lost_check = False
        while True:
            try:
                streams = {rc.wake_key(self.id): wake_id}
                for rid, p in list(self._pending.items()):
                    if not p.done:
                        streams[rc.results_key(rid)] = p.last_id
                if lost_check:  # after a reconnect: re-add requests whose entries Redis lost
                    await self._readd_lost()
                    lost_check = False
                resp = await self.r.xread(streams, block=self.q.block_ms, count=256)
                self._ok()
                self._reader_ok = True
                backoff.reset()
                now = time.time()
                for key, entries in resp or []:
                    key = key.decode()
                    if key == rc.wake_key(self.id):
                        wake_id = entries[-1][0]
                        continue
                    rid = key.rsplit(":", 1)[1]
                    p = self._pending.get(rid)
                    if p is None:
                        continue
                    for eid, fields in entries:
                        p.last_id = eid
                        if b"t" in fields:
                            metrics.REDIS_HOP.observe(max(0.0, now - float(fields[b"t"])))
                        self._deliver(p, unpack(fields[b"m"]))
            except asyncio.CancelledError:
                raise
            except rc.ERRORS as e:  # any Redis error (unreachable, OOM, ...): not ready until a read succeeds
                self._failed(e, "result reader")
                lost_check = True
                wake_id = b"0"
                await backoff.sleep()
            except Exception:  # noqa: BLE001 - keep the reader alive whatever one message does
                log.exception("result reader error")
                self._reader_ok = False
                await backoff.sleep()

    async def _readd_lost(self) -> None:
        for p in list(self._pending.values()):
            if p.done:
                continue
            key = rc.requests_key(p.req.model)
            if not p.entry_id or not await self.r.xrange(key, p.entry_id, p.entry_id):
                p.entry_id = await self.r.xadd(key, self._entry(p.req))
                log.warning("request %s was lost by redis; re-added", p.req.id)

    async def _watch(self) -> None:
        """Model list from live workers, and the front end's own deadline enforcement."""
        while True:
            try:
                sec, usec = await self.r.time()  # workers stamp their liveness with Redis's clock too
                now = sec + usec / 1e6
                raw = await self.r.hgetall(rc.MODELS)
                live = set()
                for name, info in raw.items():
                    name = name.decode()
                    self._models[name] = ModelInfo.from_json(info)
                    n = await self.r.zcount(rc.workers_key(name), now - 3 * self.q.heartbeat_s, "+inf")
                    if n:
                        live.add(name)
                    metrics.REDIS_STREAM_LEN.labels(name).set(await self.r.xlen(rc.requests_key(name)))
                self._live_models = live
                self._ok()
            except asyncio.CancelledError:
                raise
            except rc.ERRORS as e:
                self._failed(e, "model watch")
            except Exception:  # noqa: BLE001
                log.exception("watch error")
            now = time.time()
            for p in list(self._pending.values()):
                if not p.done and p.req.deadline is not None and now > p.req.deadline + 1.0:
                    # the worker should have ended it; if it cannot reach us, we do
                    self._deliver(p, RolloutEvent.end(p.req.id, ErrorCode.DEADLINE_EXCEEDED,
                                                      "deadline exceeded (no answer from a worker in time)"))
            await asyncio.sleep(min(0.5, self.q.heartbeat_s))
