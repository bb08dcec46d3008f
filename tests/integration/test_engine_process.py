"""Isolated engines (issue 20 item 7): each model's engine in its own process behind the local queue. A process
killed with SIGKILL mid-load ends its requests with a status at once, the queue says so (alive() False: /healthz
503), the other model keeps serving, and the process comes back by itself and serves the same frames again.
Everything here is real: two engine processes on the shipped tiny model, the real local queue, real sockets."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import numpy as np
import pytest

from tests.conftest import MODEL_DIR
from worldserve.engine.host import ProcessHost
from worldserve.errors import Unavailable
from worldserve.messages import ErrorCode, FrameMode, RolloutRequest, SessionAction
from worldserve.queue.local import LocalQueue
from worldserve.settings import EngineSettings, ModelSettings

pytestmark = pytest.mark.integration


def config(max_slots: int = 8) -> dict:
    return {"settings": {"model": ModelSettings(dir=MODEL_DIR, warmup=False).model_dump(mode="json"),
                         "engine": EngineSettings(max_slots=max_slots).model_dump(mode="json")}}


def req(rid: str, ctx, h: int = 4, k: int = 2, model: str = "tiny", **kw) -> RolloutRequest:
    acts = np.random.default_rng(len(rid)).integers(0, 3, (k, h))
    return RolloutRequest(rid, model, ctx, acts, seed=7, temperature=1.0, **kw)


async def events(q, r):
    return [ev async for ev in await q.submit(r)]


def test_killed_engine_process_ends_its_requests_others_serve_and_it_comes_back(real_frames):
    a, b = ProcessHost("tiny", config(), restart_backoff_s=0.2), ProcessHost("tiny", config())
    info_a, info_b = a.spawn(), b.spawn()
    assert info_a.name == info_b.name == "tiny"
    info_b = type(info_b)(**{**info_b.__dict__, "name": "other"})  # the same weights served under a second name
    ctx = real_frames[:2]

    async def main():
        q = LocalQueue()
        q.served_now(a.engine, info_a)
        q.served_now(b.engine, info_b)
        await q.start()
        try:
            before = await events(q, req("r1", ctx))
            assert before[-1].final and before[-1].error == ErrorCode.OK and len(before) == 2 * 4 + 1
            # a long rollout in flight on `tiny`, then its process is killed
            long = asyncio.create_task(events(q, req("long", ctx, h=60, k=8, frames=FrameMode.ALL)))
            await asyncio.sleep(1.0)
            t0 = time.time()
            os.kill(a.proc.pid, signal.SIGKILL)
            got = await asyncio.wait_for(long, 10)
            assert got[-1].final and got[-1].error == ErrorCode.INTERNAL and "engine process exited" in got[-1].message
            assert time.time() - t0 < 3, "the killed process's request must end at once"
            assert not q.alive()  # /healthz 503 while it is down
            with pytest.raises(Unavailable):
                await q.submit(req("while-down", ctx))
            other = await events(q, req("o1", ctx, model="other"))  # the other model keeps serving
            assert other[-1].error == ErrorCode.OK
            while not q.alive():  # back by itself
                assert time.time() - t0 < 60, "the engine process did not come back"
                await asyncio.sleep(0.1)
            after = await events(q, req("r1", ctx))  # the same request id and seed: the same frames
            assert after[-1].error == ErrorCode.OK and a.restarts == 1
            for x, y in zip(before[:-1], after[:-1], strict=True):
                assert (x.candidate, x.step) == (y.candidate, y.step) and np.array_equal(x.frame, y.frame)
            # a refusal inside the process comes back as the request's end (no synchronous reply over the socket)
            dup = asyncio.create_task(events(q, req("dup", ctx, h=40, k=1)))
            await asyncio.sleep(0.05)
            a.send_msg(req("dup", ctx, h=1, k=1))  # behind the queue's back: the engine itself refuses it
            ends = await asyncio.wait_for(dup, 20)
            assert ends[-1].final and ends[-1].error == ErrorCode.INVALID_ARGUMENT, ends[-1]
            # a slow consumer (a stream nobody reads) holds up no one
            slow = await q.submit(req("slow", ctx, h=60, k=4, frames=FrameMode.ALL))
            quick = await asyncio.wait_for(events(q, req("quick", ctx, h=3, k=4)), 20)
            assert quick[-1].error == ErrorCode.OK
            await slow.aclose()
            # sessions hold their slots until they close; their clients going away cancels them in the engine
            # process, so the next request runs at once (else it would wait for the 300 s idle timeout)
            sessions = []
            for i in range(8):  # every slot
                sid = f"sess{i}"
                sessions.append(await q.submit(RolloutRequest(sid, "tiny", ctx, np.zeros((1, 0), np.int64),
                                                              session=True)))
                await q.act(SessionAction(sid, np.asarray(2, np.int64)))
            for it in sessions:
                first = await asyncio.wait_for(it.__anext__(), 20)
                assert not first.final and first.step == 0
                await it.aclose()
            after_close = await asyncio.wait_for(events(q, req("after-close", ctx, h=2, k=1)), 15)
            assert after_close[-1].error == ErrorCode.OK
        finally:
            await q.close()

    asyncio.run(main())
    assert a.proc.poll() is not None and b.proc.poll() is not None  # both processes ended with the queue
