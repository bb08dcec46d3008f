"""Redis workers whose engine fails: per-request failures are answered, a dead engine hands its work to a
survivor, a request that kills engines is dead-lettered, a corrupt entry is dead-lettered raw.

Workers run in this process (each in its own thread and event loop) on the real tiny model wrapped by
tests/faults.PoisonedModel; the front end is the real RedisQueue; Redis is a real redis-server.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import numpy as np
import pytest

from tests.conftest import MODEL_DIR, start_redis
from tests.faults import PoisonedModel, poison_frame
from worldserve.messages import ErrorCode, RolloutRequest, pack, unpack
from worldserve.settings import QueueSettings

pytestmark = pytest.mark.integration
MODEL = "tiny"
KEY, GROUP, DEADLETTER = f"worldserve:requests:{MODEL}", f"workers:{MODEL}", f"worldserve:deadletter:{MODEL}"


@pytest.fixture(scope="module")
def model():
    from worldserve.model.io import load_model_dir

    return load_model_dir(MODEL_DIR)


@pytest.fixture
def redis_server(tmp_path):
    r = start_redis(tmp_path)
    yield r
    r.stop()


def settings(redis) -> QueueSettings:
    return QueueSettings(url=redis.url, heartbeat_s=0.3, block_ms=300, claim_idle_ms=15000)


class WorkerThread:
    """A Worker (real engine) on its own event loop; `code` is its exit status once run() ends."""

    def __init__(self, model, redis, poisoned: bool = False, always: bool = False, fatal_after: int = 3):
        from worldserve.engine.engine import Engine, EngineConfig

        m = PoisonedModel(model, always=always) if poisoned else model
        self.engine = Engine(m, EngineConfig(max_slots=8, max_consecutive_failures=fatal_after), emit=lambda e: None)
        self.q, self.code, self.worker = settings(redis), None, None
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.thread.start()
        assert self.started.wait(10)

    def _main(self) -> None:
        from worldserve.worker import Worker

        async def main():
            self.loop, self.stop = asyncio.get_running_loop(), asyncio.Event()
            self.worker = Worker(self.engine, self.engine.info(), self.q)
            self.started.set()
            await self.worker.run(self.stop, grace_s=2)

        try:
            asyncio.run(main())
            self.code = 0
        except SystemExit as e:
            self.code = e.code

    def wait_ready(self, timeout: float = 20) -> None:
        t0 = time.time()
        while not self.worker.ready():
            assert time.time() - t0 < timeout and self.thread.is_alive(), "worker not ready"
            time.sleep(0.05)

    def shutdown(self) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.stop.set)
            self.thread.join(20)


def request(ctx, seed: int, k: int = 2, h: int = 6) -> RolloutRequest:
    acts = np.random.default_rng(seed).integers(0, 3, (k, h))
    return RolloutRequest(uuid.uuid4().hex, MODEL, ctx, acts, seed=seed, temperature=1.0)


def collect(redis, reqs: list[RolloutRequest], timeout: float = 60) -> list[list]:
    """Each request through the real Redis front end: its events, last one final."""
    from worldserve.queue.redis_queue import RedisQueue

    async def one(fe, r):
        return [ev async for ev in await fe.submit(r)]

    async def main():
        fe = RedisQueue(settings(redis))
        await fe.start()
        try:
            return await asyncio.wait_for(asyncio.gather(*[one(fe, r) for r in reqs]), timeout)
        finally:
            await fe.close()

    return asyncio.run(main())


def reference(model, reqs):
    from worldserve.engine.engine import Engine, EngineConfig, complete

    evs = complete(Engine(model, EngineConfig(max_slots=16), emit=lambda e: None), reqs)
    return {(e.request_id, e.candidate, e.step): e.frame for e in evs if not e.final}


def start_collect(redis, reqs, out: dict) -> threading.Thread:
    t = threading.Thread(target=lambda: out.update(events=collect(redis, reqs)), daemon=True)
    t.start()
    return t


def test_per_request_failure_is_answered_acked_and_not_retried(model, redis_server, real_frames):
    w = WorkerThread(model, redis_server, poisoned=True)
    try:
        w.wait_ready()
        bad = request(np.concatenate([real_frames[:1], poison_frame()[None]]), 1)
        good = request(real_frames[:2], 2)
        t0 = time.time()
        ev_bad, ev_good = collect(redis_server, [bad, good])
        assert ev_bad[-1].final and ev_bad[-1].error == ErrorCode.INTERNAL and "injected fault" in ev_bad[-1].message
        assert ev_good[-1].error == ErrorCode.OK and len(ev_good) == 2 * 6 + 1
        assert time.time() - t0 < 10
        r = redis_server.client()
        assert r.xpending(KEY, GROUP)["pending"] == 0 and r.xlen(DEADLETTER) == 0
        assert w.worker.ready() and w.engine.alive()
        (again,) = collect(redis_server, [request(real_frames[:1], 3)])  # the next request is served
        assert again[-1].error == ErrorCode.OK
    finally:
        w.shutdown()
    assert w.code == 0


def test_dead_engine_leaves_its_work_to_a_survivor_and_exits_nonzero(model, redis_server, real_frames):
    dying = WorkerThread(model, redis_server, poisoned=True, always=True, fatal_after=1)
    dying.wait_ready()
    reqs = [request(real_frames[:2], 10 + i) for i in range(2)]
    out: dict = {}
    client = start_collect(redis_server, reqs, out)
    dying.thread.join(20)
    assert not dying.thread.is_alive() and dying.code == 70, dying.code
    assert not dying.worker.ready()
    r = redis_server.client()
    assert not r.exists(f"worldserve:alive:{dying.worker.id}")  # no heartbeat: survivors reclaim at once
    pend = r.xpending_range(KEY, GROUP, "-", "+", 10)
    assert pend and all(p["consumer"].decode() == dying.worker.id for p in pend)  # left untouched
    survivor = WorkerThread(model, redis_server)
    try:
        client.join(60)
        assert not client.is_alive()
        want = reference(model, reqs)
        for req, evs in zip(reqs, out["events"], strict=True):
            assert evs[-1].error == ErrorCode.OK, evs[-1]
            got = [e for e in evs if not e.final]
            assert len(got) == 2 * 6 == len({(e.candidate, e.step) for e in got})
            for e in got:
                np.testing.assert_array_equal(e.frame, want[(req.id, e.candidate, e.step)])
        assert r.xpending(KEY, GROUP)["pending"] == 0
    finally:
        survivor.shutdown()


def test_request_that_kills_engines_is_dead_lettered_after_max_deliveries(model, redis_server, real_frames):
    poison = request(np.concatenate([real_frames[:1], poison_frame()[None]]), 20)
    out: dict = {}
    client = None
    for i in range(3):  # every worker that takes it dies (max_deliveries = 3)
        w = WorkerThread(model, redis_server, poisoned=True, fatal_after=1)
        if client is None:
            w.wait_ready()
            client = start_collect(redis_server, [poison], out)
        w.thread.join(30)
        assert w.code == 70, f"worker {i} did not die"
    healthy = WorkerThread(model, redis_server)
    try:
        client.join(30)
        (evs,) = out["events"]
        assert evs[-1].final and evs[-1].error == ErrorCode.UNAVAILABLE and "dead-letter" in evs[-1].message
        r = redis_server.client()
        (dl,) = [f for _, f in r.xrange(DEADLETTER)]
        assert dl[b"id"].decode() == poison.id and int(dl[b"deliveries"]) == 3
        assert unpack(dl[b"m"]).id == poison.id
        assert r.xpending(KEY, GROUP)["pending"] == 0
        (ok,) = collect(redis_server, [request(real_frames[:1], 21)])  # the survivor serves on
        assert ok[-1].error == ErrorCode.OK
    finally:
        healthy.shutdown()


def test_corrupt_or_foreign_entries_are_dead_lettered_raw_and_their_clients_told(model, redis_server, real_frames):
    w = WorkerThread(model, redis_server)
    try:
        w.wait_ready()
        r = redis_server.client()
        bad_shape = request(real_frames[:1], 30)
        bad_shape.context = real_frames[:1, :32]  # frames of another size
        entries = {
            "garbage": r.xadd(KEY, {"m": b"\x05\x00\x00\x00{not json", "id": "garbage"}),
            "anonymous": r.xadd(KEY, {"m": b"\xff" * 7}),  # no id: dead-lettered, nobody to tell
            bad_shape.id: r.xadd(KEY, {"m": pack(bad_shape), "id": bad_shape.id}),
        }
        t0 = time.time()
        while r.xlen(DEADLETTER) < 3:
            assert time.time() - t0 < 10, "corrupt entries were not dead-lettered"
            time.sleep(0.05)
        dead = {f[b"entry"]: f for _, f in r.xrange(DEADLETTER)}
        assert set(dead) == set(entries.values())
        assert dead[entries["anonymous"]][b"m"] == b"\xff" * 7  # raw bytes kept
        end = unpack(r.xrange("worldserve:results:garbage")[-1][1][b"m"])
        assert end.final and end.error == ErrorCode.INTERNAL and "unpacked" in end.message
        end = unpack(r.xrange(f"worldserve:results:{bad_shape.id}")[-1][1][b"m"])
        assert end.final and end.error == ErrorCode.INVALID_ARGUMENT and "context" in end.message
        assert r.xpending(KEY, GROUP)["pending"] == 0
        assert w.worker.ready()
        (ok,) = collect(redis_server, [request(real_frames[:1], 31)])
        assert ok[-1].error == ErrorCode.OK
    finally:
        w.shutdown()
