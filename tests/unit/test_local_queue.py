"""The in-process queue serving several models side by side: routing by model, add and remove while serving."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest

from worldserve.engine.engine import Engine
from worldserve.errors import NotFound
from worldserve.messages import ErrorCode, RolloutRequest, SessionAction
from worldserve.model.config import PRESETS
from worldserve.model.world_model import build
from worldserve.queue.local import LocalQueue
from worldserve.settings import EngineSettings


def engine(name: str, seed: int):
    model = build(dataclasses.replace(PRESETS["tiny"], name=name, d_model=32, n_layers=1, n_heads=2), seed=seed)
    eng = Engine(model, EngineSettings(max_slots=4))
    return eng, eng.info()


def ctx():
    return np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)


async def collect(events):
    return [ev async for ev in events]


def test_two_models_each_served_by_its_own_engine():
    async def main():
        q = LocalQueue()
        await q.add_model(*engine("a", 1))
        await q.add_model(*engine("b", 2))
        await q.start()
        assert sorted(m.name for m in q.models()) == ["a", "b"] and q.ready()
        acts = np.zeros((1, 3), np.int64)
        ea, eb = await asyncio.gather(collect(await q.submit(RolloutRequest("ra", "a", ctx(), acts))),
                                      collect(await q.submit(RolloutRequest("rb", "b", ctx(), acts))))
        assert [e.step for e in ea if not e.final] == [0, 1, 2] and ea[-1].error == ErrorCode.OK
        assert [e.step for e in eb if not e.final] == [0, 1, 2] and eb[-1].error == ErrorCode.OK
        # different weights, different worlds: the two engines really are two models
        assert any(not np.array_equal(x.frame, y.frame) for x, y in zip(ea[:-1], eb[:-1], strict=True))
        with pytest.raises(NotFound):
            await q.submit(RolloutRequest("rc", "c", ctx(), acts))
        await q.close()

    asyncio.run(main())


def test_unloading_a_model_ends_its_sessions_and_leaves_the_other():
    async def main():
        q = LocalQueue(*engine("a", 1))
        await q.add_model(*engine("b", 2))
        await q.start()
        sess = await q.submit(RolloutRequest("s", "a", ctx(), np.zeros((1, 0), np.int64), session=True))
        await q.act(SessionAction("s", np.asarray(2)))
        first = await sess.__anext__()
        assert first.step == 0 and not first.final
        await q.remove_model("a")
        rest = await asyncio.wait_for(collect(sess), 5)
        assert rest[-1].final and rest[-1].error == ErrorCode.UNAVAILABLE and "unloaded" in rest[-1].message
        assert [m.name for m in q.models()] == ["b"] and q.alive()
        eb = await collect(await q.submit(RolloutRequest("rb", "b", ctx(), np.zeros((1, 2), np.int64))))
        assert eb[-1].error == ErrorCode.OK
        await q.close()

    asyncio.run(main())
