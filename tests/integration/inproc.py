"""In-process Redis workers and front end for integration tests: a Worker on the real tiny model (optionally
wrapped by tests/faults.PoisonedModel) in its own thread and event loop, the real RedisQueue as the client."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import numpy as np

from tests.faults import PoisonedModel
from worldserve.messages import RolloutRequest
from worldserve.settings import QueueSettings

MODEL = "tiny"
KEY, GROUP, DEADLETTER = f"worldserve:requests:{MODEL}", f"workers:{MODEL}", f"worldserve:deadletter:{MODEL}"


def settings(redis) -> QueueSettings:
    return QueueSettings(url=redis.url, heartbeat_s=0.3, block_ms=300, claim_idle_ms=15000)


class WorkerThread:
    """A Worker (real engine) on its own event loop; `code` is its exit status once run() ends."""

    def __init__(self, model, redis, poisoned: bool = False, always: bool = False, fatal_after: int = 3,
                 name: str | None = None):
        from worldserve.engine.engine import Engine
        from worldserve.settings import EngineSettings

        m = PoisonedModel(model, always=always) if poisoned else model
        self.engine = Engine(m, EngineSettings(max_slots=8, max_consecutive_failures=fatal_after))
        self.q, self.code, self.worker = settings(redis), None, None
        self.q.worker_name = name
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.thread.start()
        assert self.started.wait(10)

    def _main(self) -> None:
        from worldserve.worker.worker import Worker

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
    from worldserve.engine.engine import Engine, complete
    from worldserve.settings import EngineSettings

    evs = complete(Engine(model, EngineSettings(max_slots=16)), reqs)
    return {(e.request_id, e.candidate, e.step): e.frame for e in evs if not e.final}


def start_collect(redis, reqs, out: dict) -> threading.Thread:
    t = threading.Thread(target=lambda: out.update(events=collect(redis, reqs)), daemon=True)
    t.start()
    return t
