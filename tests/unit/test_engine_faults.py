"""Failure paths of the engine and the in-process queue: every affected request ends with a status, the others are
served, an engine that cannot go on says so (alive() False), and a wedged engine never hangs a client."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import numpy as np
import pytest

from tests.faults import PoisonedModel, poison_frame
from worldserve.engine.engine import Engine, complete
from worldserve.errors import Unavailable
from worldserve.messages import ErrorCode, ModelInfo, RolloutRequest
from worldserve.model.config import PRESETS
from worldserve.model.world_model import build
from worldserve.queue.local import LocalQueue
from worldserve.settings import EngineSettings

CFG = dataclasses.replace(PRESETS["tiny"], d_model=64, n_layers=2, n_heads=4)


@pytest.fixture(scope="module")
def model():
    return build(CFG, seed=3)


def ctx(n=2, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)


def req(rid, context, k=3, h=4, **kw):
    acts = np.random.default_rng(len(rid)).integers(0, 3, (k, h))
    return RolloutRequest(rid, "tiny", context, acts, seed=5, temperature=1.0, **kw)


def frames(events, rid):
    return {(e.candidate, e.step): e.frame for e in events if e.request_id == rid and not e.final}


def final(events, rid):
    (f,) = [e for e in events if e.request_id == rid and e.final]
    return f


def test_poisoned_request_ends_internal_and_the_batch_is_served(model):
    pm = PoisonedModel(model)
    eng = Engine(pm, EngineSettings(max_slots=16))
    bad = np.concatenate([ctx(1, 1), poison_frame()[None]])
    ev = complete(eng, [req("good1", ctx(2, 2)), req("bad", bad), req("good2", ctx(2, 3), k=2)])
    f = final(ev, "bad")
    assert f.error == ErrorCode.INTERNAL and "injected fault" in f.message
    assert not frames(ev, "bad")
    for rid in ("good1", "good2"):
        assert final(ev, rid).error == ErrorCode.OK
    # the good requests came out exactly as they do alone (the failed step left nothing behind)
    alone = complete(Engine(model, EngineSettings(max_slots=16)), [req("good1", ctx(2, 2))])
    a, b = frames(alone, "good1"), frames(ev, "good1")
    assert a.keys() == b.keys() and len(a) == 12
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    # the engine goes on: all slots back, the next request served
    assert eng.alive() and eng.free_slots() == 16
    assert final(complete(eng, [req("next", ctx(1, 4))]), "next").error == ErrorCode.OK


def test_an_engine_that_cannot_go_on_ends_everything_and_stops(model):
    eng = Engine(PoisonedModel(model, always=True), EngineSettings(max_slots=4, max_consecutive_failures=3))
    got = []
    for i in range(8):  # two admitted at a time (2 slots each): three failing steps use six, two still wait
        eng.submit(req(f"r{i}", ctx(1, i), k=2))
    t = threading.Thread(target=eng.run, args=(got.extend,))
    t.start()
    t.join(10)
    assert not t.is_alive(), "run() must return once the engine is fatal"
    assert not eng.alive() and eng.fatal is not None
    assert sorted(e.request_id for e in got if e.final) == [f"r{i}" for i in range(8)]
    assert all(e.error == ErrorCode.INTERNAL for e in got if e.final)
    with pytest.raises(Unavailable):
        eng.submit(req("late", ctx(1)))


def _info(model) -> ModelInfo:
    return Engine(model, EngineSettings(max_slots=1)).info()


async def _collect(q, r):
    out = []
    async for ev in await q.submit(r):
        out.append(ev)
    return out


def test_local_queue_reports_engine_death(model):
    async def main():
        engine = Engine(PoisonedModel(model, always=True), EngineSettings(max_slots=4, max_consecutive_failures=1))
        q = LocalQueue(engine, _info(model))
        await q.start()
        evs = await asyncio.wait_for(asyncio.gather(*[_collect(q, req(f"r{i}", ctx(1, i), k=1)) for i in range(3)]),
                                     10)
        assert all(e[-1].final and e[-1].error == ErrorCode.INTERNAL for e in evs)
        for _ in range(100):
            if not q.alive():
                break
            await asyncio.sleep(0.02)
        assert not q.alive() and not q.ready()
        with pytest.raises(Unavailable):
            await q.submit(req("late", ctx(1)))
        await q.close()

    asyncio.run(main())


class Wedged:
    """A model whose step blocks until released: the engine thread is stuck inside the model."""

    def __init__(self, model):
        self.m, self.release = PoisonedModel(model), threading.Event()

    def __getattr__(self, name):
        return getattr(self.m, name)

    def step(self, *a, **kw):
        self.release.wait(30)
        return self.m.step(*a, **kw)


def test_local_queue_enforces_deadlines_when_the_engine_is_stuck(model):
    async def main():
        wm = Wedged(model)
        q = LocalQueue(Engine(wm, EngineSettings(max_slots=4)), _info(model))
        await q.start()
        t0 = time.monotonic()
        evs = await asyncio.wait_for(_collect(q, req("d", ctx(1), k=1, deadline=time.time() + 0.3)), 10)
        assert evs[-1].final and evs[-1].error == ErrorCode.DEADLINE_EXCEEDED
        assert time.monotonic() - t0 < 3
        wm.release.set()
        await q.close()

    asyncio.run(main())


def test_stop_on_done_ends_a_candidate_at_the_done_step():
    from tests.conftest import MODEL_DIR
    from worldserve.lab.evaluate import CONTEXT, heldout_episodes
    from worldserve.model.io import load_model_dir

    model = load_model_dir(MODEL_DIR)
    # an episode that ends within 6 steps after its context
    ep = next(e for e in heldout_episodes(80)
              if not e[3][: CONTEXT - 1].any() and e[3][CONTEXT - 1 : CONTEXT + 5].any())
    f, a, _, d = ep
    h = 10
    true = np.resize(a[CONTEXT - 1 :], h)  # the episode's own actions: the world ends
    spin = np.zeros(h, np.int64)  # turning left on the spot never ends it
    req = RolloutRequest("s", "tiny", f[:CONTEXT], np.stack([true, spin]), context_actions=a[: CONTEXT - 1],
                         stop_on_done=True)
    eng = Engine(model, EngineSettings(max_slots=4))
    ev = complete(eng, [req])
    c0 = [e for e in ev if e.candidate == 0 and not e.final]
    c1 = [e for e in ev if e.candidate == 1 and not e.final]
    end = int(np.argmax(d[CONTEXT - 1 :]))  # the step the episode ends at
    assert [e.step for e in c0] == list(range(end + 1)) and c0[-1].done > 0.5
    assert [e.step for e in c1] == list(range(h)) and all(e.done < 0.5 for e in c1)
    fin = ev[-1]
    assert fin.final and fin.error == ErrorCode.OK and f"candidate 0 at step {end}" in fin.message
    assert eng.free_slots() == 4


def test_the_failure_budget_counts_failing_steps_not_the_poisoned_requests_of_one_step(model):
    # three poisoned requests in ONE step with a budget of 3 failing steps: each ends INTERNAL alone, the good one
    # is served, the engine goes on (it used to count 3 failures and die for everyone)
    eng = Engine(PoisonedModel(model), EngineSettings(max_slots=16, max_consecutive_failures=3))
    bad = np.concatenate([ctx(1, 1), poison_frame()[None]])
    ev = complete(eng, [req(f"bad{i}", bad, k=1) for i in range(3)] + [req("good", ctx(2, 2), k=1)])
    assert all(final(ev, f"bad{i}").error == ErrorCode.INTERNAL for i in range(3))
    assert final(ev, "good").error == ErrorCode.OK
    assert eng.alive() and eng.free_slots() == 16


def test_a_request_without_a_deadline_gets_the_backstop_in_embedded_mode(model):
    # a predict that names no deadline, on a wedged engine: it ends DEADLINE_EXCEEDED at server.request_timeout_s
    # instead of waiting for ever (Redis mode had its own 600 s bound; embedded mode had none)
    from worldserve.api.dataplane import DataPlane, RolloutInput, WireFrame
    from worldserve.errors import DeadlineExceeded
    from worldserve.settings import ServerSettings

    async def main():
        wm = Wedged(model)
        q = LocalQueue(Engine(wm, EngineSettings(max_slots=4)), _info(model))
        await q.start()
        dp = DataPlane(q, ServerSettings(request_timeout_s=0.5))
        frame = WireFrame("raw", ctx(1)[0].tobytes(), 64, 64)
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await asyncio.wait_for(dp.predict(RolloutInput("tiny", [frame], [[2, 2]])), 10)
        assert time.monotonic() - t0 < 4
        wm.release.set()
        await q.close()

    asyncio.run(main())
