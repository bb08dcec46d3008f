"""Redis workers whose engine fails: per-request failures are answered, a dead engine hands its work to a
survivor, a request that kills engines is dead-lettered, a corrupt entry is dead-lettered raw.

Workers run in this process (each in its own thread and event loop) on the real tiny model wrapped by
tests/faults.PoisonedModel; the front end is the real RedisQueue; Redis is a real redis-server.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from tests.conftest import MODEL_DIR, start_redis
from tests.faults import poison_frame
from tests.integration.inproc import DEADLETTER, GROUP, KEY, WorkerThread, collect, reference, request, start_collect
from worldserve.messages import ErrorCode, pack, unpack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def model():
    from worldserve.model.io import load_model_dir

    return load_model_dir(MODEL_DIR)


@pytest.fixture
def redis_server(tmp_path):
    r = start_redis(tmp_path)
    yield r
    r.stop()


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


def test_worker_restarted_under_the_same_name_resumes_its_pending_entries(model, redis_server, real_frames):
    """A worker restarted with a fixed --name (a StatefulSet pod) finds entries pending under that name from
    its previous life; nobody else reclaims them while its alive key exists, so it reruns them itself."""
    r = redis_server.client()
    r.xgroup_create(KEY, GROUP, id="0", mkstream=True)
    req = request(real_frames[:1], 60, k=1, h=3)
    r.xadd(KEY, {"m": pack(req), "id": req.id, "d": b"60"})
    r.xreadgroup(GROUP, "w-fixed", {KEY: ">"}, count=1)  # taken, then the process died
    w = WorkerThread(model, redis_server, name="w-fixed")
    try:
        t0 = time.time()
        while not any(unpack(f[b"m"]).final for _, f in r.xrange(f"worldserve:results:{req.id}")):
            assert time.time() - t0 < 15, "the entry of the previous life was never rerun"
            time.sleep(0.05)
        ev = [unpack(f[b"m"]) for _, f in r.xrange(f"worldserve:results:{req.id}")]
        assert ev[-1].error == ErrorCode.OK and len(ev) == 3 + 1
        assert r.xpending(KEY, GROUP)["pending"] == 0
    finally:
        w.shutdown()


def test_worker_taken_for_dead_gives_up_what_a_survivor_took(model, redis_server, real_frames):
    """A worker silent past its alive TTL (a long GC or CPU stall) may have had its entries claimed by a survivor.
    On its next heartbeat it finds its alive key gone, drops the runs it no longer owns (slots freed, no events
    published for them: the survivor answers) and keeps the ones still pending under its name."""
    w = WorkerThread(model, redis_server)
    try:
        w.wait_ready()
        r = redis_server.client()
        taken = request(real_frames[:1], 70, k=1, h=0)  # a session: never ends by itself
        taken.session = True
        kept = request(real_frames[:1], 71, k=2, h=64)
        for q in (taken, kept):
            r.xadd(KEY, {"m": pack(q), "id": q.id, "d": b"120"})
        t0 = time.time()
        while len(w.worker.inflight) < 2:
            assert time.time() - t0 < 10
            time.sleep(0.01)
        eid = w.worker.inflight[taken.id].entry_id
        with r.pipeline() as pipe:  # as a survivor would after the TTL: the key is gone, the entry claimed
            pipe.delete(f"worldserve:alive:{w.worker.id}")
            pipe.xclaim(KEY, GROUP, "survivor", 0, [eid], justid=True)
            pipe.set("worldserve:alive:survivor", b"1", ex=60)
            pipe.execute()
        while taken.id in w.worker.inflight:
            assert time.time() - t0 < 10, "the worker kept running a request it no longer owns"
            time.sleep(0.01)
        while kept.id in w.worker.inflight:
            assert time.time() - t0 < 60
            time.sleep(0.05)
        time.sleep(0.5)
        assert not r.exists(f"worldserve:results:{taken.id}"), "events for a request the survivor owns"
        end = unpack(r.xrange(f"worldserve:results:{kept.id}")[-1][1][b"m"])
        assert end.final and end.error == ErrorCode.OK
        pend = r.xpending_range(KEY, GROUP, "-", "+", 10)
        assert [(p["message_id"], p["consumer"]) for p in pend] == [(eid, b"survivor")]
        assert w.engine.free_slots() == 8 and w.worker.ready()
    finally:
        w.shutdown()
