"""A Redis worker takes an entry as in flight only once its engine took the request (issue 22, finding 8).

The worker's accept path is driven directly (no reader loop, no engine thread: LitServe's "loops tested without a
server" tier) against a real redis-server and a real engine on the real tiny model, brought by real means into the
two states where `Engine.submit` refuses: its queue full (QueueFull: the entry stays pending for a worker with
room, and this worker does not count it as its own), and dead after failing steps (any other refusal: the client
is answered at once and the entry acknowledged). Before the fix the worker recorded the request as in flight before
calling submit, so a refused submit stranded it: its heartbeat kept every other worker off the entry and the client
waited for the request timeout.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tests.conftest import MODEL_DIR, start_redis
from tests.faults import PoisonedModel
from tests.integration.inproc import GROUP, KEY, request, settings
from worldserve.messages import ErrorCode, unpack

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


def _accept_one(redis, engine, req) -> tuple[object, bytes]:
    """Queue `req` as a front end does, read it under the worker's name, run the worker's accept on it."""
    from worldserve.queue import redis_common as rc
    from worldserve.queue.redis_queue import RedisQueue
    from worldserve.worker.worker import Worker

    async def main():
        w = Worker(engine, engine.info(), settings(redis))
        try:
            await rc.ensure_group(w.r, w.model)
            await w.r.xadd(KEY, RedisQueue._entry(None, req))
            ((_, ((eid, fields),)),) = await w.r.xreadgroup(GROUP, w.id, {KEY: ">"}, count=1)
            await w._accept(eid, fields)
            return w, eid
        finally:
            await w.r.aclose()

    return asyncio.run(main())


def _results(redis, rid: str) -> list:
    from worldserve.queue import redis_common as rc

    return [unpack(f[b"m"]) for _, f in redis.client().xrange(rc.results_key(rid))]


def test_a_full_engine_leaves_the_entry_pending_for_a_worker_with_room(model, redis_server, real_frames):
    from worldserve.engine.engine import Engine
    from worldserve.settings import EngineSettings

    engine = Engine(model, EngineSettings(max_slots=8, max_queue=1))
    engine.submit(request(real_frames[:2], 1))  # the one waiting place taken (the engine is not stepping)
    req = request(real_frames[:2], 2)
    w, eid = _accept_one(redis_server, engine, req)
    assert req.id not in w.inflight  # not ours: the heartbeat must not keep a survivor off it
    pending = redis_server.client().xpending_range(KEY, GROUP, "-", "+", 10)
    assert [p["message_id"] for p in pending] == [eid]  # left pending: reclaimed by a worker with room
    assert _results(redis_server, req.id) == []  # nothing answered: it will run elsewhere, once


def test_a_dead_engine_answers_the_client_and_acknowledges_the_entry(model, redis_server, real_frames):
    from worldserve.engine.engine import Engine
    from worldserve.settings import EngineSettings

    engine = Engine(PoisonedModel(model, always=True), EngineSettings(max_slots=8, max_consecutive_failures=1))
    engine.submit(request(real_frames[:2], 1))
    engine.run(lambda events: None)  # steps until the failing steps make it fatal, ends what it holds, returns
    assert engine.fatal is not None, "the always-failing model should have made the engine fatal"
    req = request(np.asarray(real_frames[:2]), 3)
    w, _ = _accept_one(redis_server, engine, req)
    assert req.id not in w.inflight
    r = redis_server.client()
    assert r.xpending(KEY, GROUP)["pending"] == 0 and r.xlen(KEY) == 0  # acknowledged and deleted
    (end,) = _results(redis_server, req.id)
    assert end.final and end.error == ErrorCode.UNAVAILABLE and "could not take the request" in end.message
