"""The engine's inbox under concurrent use (issue 22, finding 8): submit, act and cancel from several threads while
the engine thread steps. Before the fix `submit` scanned the inbox for a duplicate id while the engine thread
popped it without the lock ("deque mutated during iteration", a lost or doubled request). Now every access is under
the lock and the engine takes the whole inbox per step: every request ends exactly once, none raises."""

from __future__ import annotations

import dataclasses
import threading
from collections import Counter

import numpy as np

from worldserve.engine.engine import Engine
from worldserve.errors import QueueFull
from worldserve.messages import FrameMode, RolloutRequest, SessionAction
from worldserve.model.config import PRESETS
from worldserve.model.world_model import build
from worldserve.settings import EngineSettings

CFG = dataclasses.replace(PRESETS["tiny"], d_model=32, n_layers=1, n_heads=2)


def test_concurrent_submit_act_cancel_end_every_request_once():
    model = build(CFG, seed=1)
    engine = Engine(model, EngineSettings(max_slots=16, max_queue=4096))
    ctx = np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    finals: Counter = Counter()
    lock = threading.Lock()

    def emit(events):
        with lock:
            finals.update(e.request_id for e in events if e.final)

    runner = threading.Thread(target=engine.run, args=(emit,), daemon=True)
    runner.start()
    errors: list[BaseException] = []
    submitted: list[str] = []

    def client(t: int) -> None:
        rng = np.random.default_rng(t)
        try:
            for i in range(150):
                rid = f"t{t}-{i}"
                session = i % 5 == 0
                acts = rng.integers(0, 3, (1, 0 if session else 1))
                try:
                    engine.submit(RolloutRequest(rid, "tiny", ctx, acts, seed=i, frames=FrameMode.NONE,
                                                 session=session))
                except QueueFull:
                    continue
                with lock:
                    submitted.append(rid)
                if session:
                    engine.act(SessionAction(rid, np.int64(1)))
                    engine.act(SessionAction(rid, np.int64(0), close=True))
                elif i % 3 == 0:
                    engine.cancel(rid)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    deadline = threading.Event()
    for _ in range(600):  # every submitted request ends (at most 60 s)
        with lock:
            if all(finals[r] for r in submitted):
                break
        deadline.wait(0.1)
    engine.stop()
    runner.join(10)
    assert not errors, errors
    assert engine.fatal is None
    with lock:
        assert len(submitted) > 300
        assert [r for r in submitted if finals[r] != 1] == []  # each ended exactly once
        assert set(finals) == set(submitted)
    assert not engine.jobs and engine.free_slots() == 16
