"""Redis worker liveness: heartbeat, reclaiming a dead worker's entries, dead letters, error reporting.

A worker proves it is alive with `worldserve:alive:{id}` (SET PX alive_ttl, refreshed several times per
TTL; expiry judged by Redis's own clock, so host clocks never matter). A survivor that finds a consumer
with pending entries and no alive key claims those entries at once (failover ~ alive_ttl, not the
claim-idle time); the claim-idle scan stays as a fallback. A worker that finds its own alive key gone
(it stalled past the TTL and may have been taken for dead) gives up the requests another worker took.
Mixed into Worker (service/worker/worker.py), whose attributes it uses.
"""

from __future__ import annotations

import asyncio
import logging
import time

from .. import metrics
from ..messages import ErrorCode, RolloutEvent, pack, unpack
from ..queue import redis_common as rc

log = logging.getLogger("worldserve.worker")
DELCONSUMER_IDLE_MS = 600_000  # a dead consumer with nothing pending is removed from the group after this


class Liveness:
    def __init__(self) -> None:
        hb = self.q.heartbeat_s
        self.alive_ttl_s = min(3.0, max(1.5, 3 * hb))  # failover detection time
        self.beat_s = min(hb, self.alive_ttl_s / 3)
        self.redis_offset: float | None = None  # Redis clock - this host's clock (s)
        self.alive_once = asyncio.Event()
        self._last_error: dict[str, tuple[str, float]] = {}

    # ---- heartbeat --------------------------------------------------------------------------------
    async def _heartbeat(self) -> None:
        backoff = rc.Backoff()
        info = self.info.to_json()
        while True:
            try:
                t0 = time.time()
                sec, usec = await self.r.time()
                redis_now = sec + usec / 1e6
                self.redis_offset = redis_now - (t0 + time.time()) / 2
                async with self.r.pipeline(transaction=False) as pipe:
                    pipe.set(rc.alive_key(self.id), b"1", px=int(self.alive_ttl_s * 1000), get=True)
                    pipe.zadd(rc.workers_key(self.model), {self.id: redis_now})
                    pipe.hset(rc.MODELS, self.model, info)
                    was_alive, *_ = await pipe.execute()
                if was_alive is None and self.alive_once.is_set():
                    await self._reconcile()
                if not self.alive_once.is_set():
                    await rc.ensure_group(self.r, self.model)  # the stream exists before any scan of it
                    await self._resume_own()
                    self.alive_once.set()
                mine = [f.entry_id for f in self.inflight.values()]
                if mine:  # reset idle time of what we are still working on
                    await self.r.xclaim(self.key, self.group, self.id, 0, mine, justid=True)
                summary = await self.r.xpending(self.key, self.group)
                metrics.REDIS_PENDING.labels(self.model).set(summary["pending"])
                metrics.SESSIONS.labels(self.model).set(sum(f.req.session for f in self.inflight.values()))
                self._recovered("heartbeat")
                self.connected = True
                backoff.reset()
                await asyncio.sleep(self.beat_s)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001
                await self._on_error(e, backoff, "heartbeat")

    async def _resume_own(self) -> None:
        """Entries pending under our consumer name from a previous life (a restart with a fixed --name):
        nobody else reclaims them while our alive key exists, so we rerun them (or dead-letter them)."""
        own = await self.r.xpending_range(self.key, self.group, "-", "+", 1000, consumername=self.id)
        if own:
            log.warning("worker %s resumes %d requests left pending under its name", self.id, len(own))
            await self._take(own, 0)

    async def _reconcile(self) -> None:
        """Our alive key was gone: a stall past its TTL (a survivor may have claimed entries from us: drop
        those runs) or a Redis restart (nothing is owned by anyone: keep running, the front ends re-add)."""
        held = list(self.inflight.items())
        async with self.r.pipeline(transaction=False) as pipe:
            for _, f in held:
                pipe.xpending_range(self.key, self.group, f.entry_id, f.entry_id, 1)
            owners = await pipe.execute()
        me = self.id.encode()
        lost = [rid for (rid, _), p in zip(held, owners, strict=True) if p and p[0]["consumer"] != me]
        log.warning("worker %s: its alive key had expired (stall past %.1fs or a Redis restart); %d of its "
                    "requests were taken over by other workers", self.id, self.alive_ttl_s, len(lost))
        for rid in lost:
            self.inflight.pop(rid)
            self.disowned.add(rid)
            self.engine.cancel(rid)

    async def _leave(self) -> None:
        """Remove our liveness at once (survivors reclaim whatever we still hold without waiting)."""
        try:
            async with self.r.pipeline(transaction=False) as pipe:
                pipe.delete(rc.alive_key(self.id))
                pipe.zrem(rc.workers_key(self.model), self.id)
                await asyncio.wait_for(pipe.execute(), 2.0)
        except (TimeoutError, *rc.TRANSIENT):
            pass

    # ---- reclaim ----------------------------------------------------------------------------------
    async def _reclaimer(self) -> None:
        backoff = rc.Backoff()
        await self.alive_once.wait()
        last_idle_scan = 0.0
        while True:
            try:
                await asyncio.sleep(0.25)
                await self._reclaim_dead()
                if time.monotonic() - last_idle_scan > max(0.2, self.q.claim_idle_ms / 4000):
                    last_idle_scan = time.monotonic()
                    stale = await self.r.xpending_range(self.key, self.group, "-", "+", 64,
                                                        idle=self.q.claim_idle_ms)
                    await self._take([p for p in stale if p["consumer"].decode() != self.id], self.q.claim_idle_ms)
                self._recovered("reclaimer")
                backoff.reset()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001
                await self._on_error(e, backoff, "reclaimer")

    async def _reclaim_dead(self) -> None:
        """Pending entries of consumers without an alive key: claimed at once."""
        consumers = [c for c in await self.r.xinfo_consumers(self.key, self.group) if c["name"].decode() != self.id]
        if not consumers:
            return
        async with self.r.pipeline(transaction=False) as pipe:
            for c in consumers:
                pipe.exists(rc.alive_key(c["name"].decode()))
            alive = await pipe.execute()
        for c, up in zip(consumers, alive, strict=True):
            if up:
                continue
            if c["pending"] == 0:
                if c["idle"] > DELCONSUMER_IDLE_MS:
                    await self.r.xgroup_delconsumer(self.key, self.group, c["name"])
                continue
            pend = await self.r.xpending_range(self.key, self.group, "-", "+", 64, consumername=c["name"])
            # min idle: half the TTL, so two survivors never both claim (a claim resets the idle time)
            await self._take(pend, int(self.alive_ttl_s * 500), dead=c["name"].decode())

    async def _take(self, pending: list[dict], min_idle_ms: int, dead: str | None = None) -> None:
        for p in pending:
            eid = p["message_id"]
            if p["times_delivered"] >= self.q.max_deliveries:
                claimed = await self.r.xclaim(self.key, self.group, self.id, min_idle_ms, [eid])
                if claimed and claimed[0][1]:
                    fields = claimed[0][1]
                    rid = fields.get(b"id", b"").decode(errors="replace") or _peek_id(fields)
                    await self._bury(eid, fields, rid, ErrorCode.UNAVAILABLE,
                                     f"request failed on {p['times_delivered']} delivery attempts (its workers "
                                     "died); moved to the dead-letter stream", deliveries=p["times_delivered"])
            elif self._has_room():
                for ceid, fields in await self.r.xclaim(self.key, self.group, self.id, min_idle_ms, [eid]):
                    if fields:
                        if dead:
                            log.warning("worker %s is dead (alive key gone); claimed %s", dead, ceid.decode())
                        await self._accept(ceid, fields, reclaimed=True)

    async def _bury(self, eid: bytes, fields: dict, rid: str | None, code: ErrorCode, message: str,
                    deliveries: int = 0) -> None:
        """Dead-letter an entry raw (its bytes, id and why), tell its client if known, ACK it."""
        async with self.r.pipeline(transaction=False) as pipe:
            pipe.xadd(rc.deadletter_key(self.model),
                      {"m": fields.get(b"m", b""), "id": rid or "", "entry": eid, "error": message,
                       "deliveries": deliveries, "worker": self.id}, maxlen=10000, approximate=True)
            if rid:
                pipe.xadd(rc.results_key(rid), {"m": _pack_end(rid, code, message), "t": str(time.time())})
                pipe.expire(rc.results_key(rid), self.q.result_ttl_s)
            pipe.xack(self.key, self.group, eid)
            pipe.xdel(self.key, eid)
            await pipe.execute()
        metrics.REDIS_DEAD_LETTERED.inc()
        log.error("dead-lettered entry %s (request %s): %s", eid.decode(), rid or "unknown", message)

    # ---- errors -----------------------------------------------------------------------------------
    async def _on_error(self, e: Exception, backoff: rc.Backoff, where: str) -> None:
        """Retry with backoff; the reason is logged when it changes (and every 30 s while it lasts)."""
        if rc.is_nogroup(e):
            reason = "consumer group missing (redis restarted?); recreating"
            try:
                await rc.ensure_group(self.r, self.model)
            except Exception:  # noqa: BLE001
                pass
        else:
            reason = rc.describe(e, self.q.url)
        if isinstance(e, rc.TRANSIENT):
            self.connected = False
        last = self._last_error.get(where)
        if last is None or last[0] != reason or time.monotonic() - last[1] > 30:
            self._last_error[where] = (reason, time.monotonic())
            if isinstance(e, rc.TRANSIENT) or rc.is_nogroup(e):
                log.warning("%s: %s; retrying", where, reason)
            else:
                log.error("%s: %s; retrying", where, reason, exc_info=e)
        await backoff.sleep()

    def _recovered(self, where: str) -> None:
        if self._last_error.pop(where, None) is not None:
            log.warning("%s: redis reachable again", where)


def _pack_end(rid: str, code: ErrorCode, message: str) -> bytes:
    return pack(RolloutEvent.end(rid, code, message))


def _peek_id(fields: dict) -> str | None:
    try:
        return unpack(fields[b"m"]).id
    except Exception:  # noqa: BLE001
        return None
