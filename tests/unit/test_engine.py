"""The engine loop without a server: scheduling, fork, batch invariance, cancel, deadlines, priorities."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from worldserve.engine.engine import Engine
from worldserve.errors import QueueFull
from worldserve.messages import ErrorCode, FrameMode, Priority, RolloutRequest, SessionAction
from worldserve.model.config import PRESETS
from worldserve.model.world_model import build
from worldserve.settings import EngineSettings

CFG = dataclasses.replace(PRESETS["tiny"], d_model=64, n_layers=2, n_heads=4)


@pytest.fixture(scope="module")
def model():
    return build(CFG, seed=3)


def make(model, slots=16, queue=64):
    events = []
    return Engine(model, EngineSettings(max_slots=slots, max_queue=queue)), events


def ctx(n=2, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)


def run(eng, events, until_final: int, max_steps=10_000):
    for _ in range(max_steps):
        if sum(e.final for e in events) >= until_final:
            return
        events.extend(eng.step())
    raise AssertionError("engine did not finish")


def frames_of(events, rid):
    return {(e.candidate, e.step): e.frame for e in events if e.request_id == rid and not e.final}


def test_fork_and_batch_invariance(model):
    acts = np.random.default_rng(0).integers(0, 3, (4, 5))
    eng, ev = make(model)
    eng.submit(RolloutRequest("alone", "tiny", ctx(), acts, seed=9, temperature=1.0))
    run(eng, ev, 1)
    alone = frames_of(ev, "alone")
    eng2, ev2 = make(model)
    for i in range(3):  # noise around it, different contexts and lengths
        eng2.submit(RolloutRequest(f"n{i}", "tiny", ctx(1 + i, seed=i + 5), acts[:, :3], seed=i, temperature=1.0))
    eng2.submit(RolloutRequest("batched", "tiny", ctx(), acts, seed=9, temperature=1.0))
    run(eng2, ev2, 4)
    batched = frames_of(ev2, "batched")
    assert alone.keys() == batched.keys() and len(alone) == 20
    for k in alone:
        np.testing.assert_array_equal(alone[k], batched[k])
    # candidate k of the fork == a single request seeded 9 + k
    eng3, ev3 = make(model)
    for k in range(4):
        eng3.submit(RolloutRequest(f"s{k}", "tiny", ctx(), acts[k : k + 1], seed=9 + k, temperature=1.0))
    run(eng3, ev3, 4)
    for k in range(4):
        for s in range(5):
            np.testing.assert_array_equal(frames_of(ev3, f"s{k}")[(0, s)], alone[(k, s)])


def test_frame_modes_and_event_order(model):
    eng, ev = make(model)
    acts = np.zeros((2, 4), np.int64)
    eng.submit(RolloutRequest("last", "tiny", ctx(), acts, frames=FrameMode.LAST))
    eng.submit(RolloutRequest("none", "tiny", ctx(), acts, frames=FrameMode.NONE))
    run(eng, ev, 2)
    last = [e for e in ev if e.request_id == "last" and not e.final]
    assert [e.step for e in last if e.frame is not None] == [3, 3]
    assert all(e.frame is None for e in ev if e.request_id == "none")
    for rid in ("last", "none"):
        for c in range(2):
            assert [e.step for e in ev if e.request_id == rid and e.candidate == c and not e.final] == [0, 1, 2, 3]
        assert [e.final for e in ev if e.request_id == rid][-1]


def test_cancel_frees_slots_within_one_step(model):
    eng, ev = make(model, slots=8)
    eng.submit(RolloutRequest("long", "tiny", ctx(), np.zeros((8, 64), np.int64), frames=FrameMode.NONE))
    for _ in range(3):
        ev.extend(eng.step())
    assert eng.free_slots() == 0
    eng.cancel("long")
    ev.extend(eng.step())
    assert eng.free_slots() == 8
    final = [e for e in ev if e.final]
    assert len(final) == 1 and final[0].error == ErrorCode.CANCELLED
    n_before = len(ev)
    ev.extend(eng.step())
    assert len(ev) == n_before


def test_deadline_finishes_with_error(model):
    eng, ev = make(model, slots=4)
    # the deadline must fall mid-rollout ("after" N steps), not while admitting on a loaded machine: 0.3 s, 400 steps
    eng.submit(RolloutRequest("d", "tiny", ctx(), np.zeros((2, 400), np.int64), deadline=time.time() + 0.3))
    t0 = time.time()
    run(eng, ev, 1)
    assert time.time() - t0 < 2
    final = ev[-1]
    assert final.final and final.error == ErrorCode.DEADLINE_EXCEEDED and "after" in final.message
    assert eng.free_slots() == 4


def test_priorities_and_bounded_queue(model):
    eng, ev = make(model, slots=2, queue=3)
    eng.submit(RolloutRequest("running", "tiny", ctx(), np.zeros((2, 3), np.int64)))
    ev.extend(eng.step())  # occupies both slots
    eng.submit(RolloutRequest("bulk", "tiny", ctx(), np.zeros((2, 3), np.int64), priority=Priority.BULK))
    eng.submit(RolloutRequest("normal", "tiny", ctx(), np.zeros((2, 3), np.int64)))
    eng.submit(RolloutRequest("inter", "tiny", ctx(), np.zeros((2, 3), np.int64), priority=Priority.INTERACTIVE))
    with pytest.raises(QueueFull):
        eng.submit(RolloutRequest("over", "tiny", ctx(), np.zeros((1, 3), np.int64)))
    run(eng, ev, 4)
    order = [e.request_id for e in ev if e.final]
    assert order == ["running", "inter", "normal", "bulk"]


def test_session_steps_only_when_actions_arrive(model):
    eng, ev = make(model, slots=2)
    eng.submit(RolloutRequest("s", "tiny", ctx(1), np.zeros((1, 0), np.int64), session=True,
                              priority=Priority.INTERACTIVE))
    for _ in range(3):
        ev.extend(eng.step())
    assert not ev  # no action, no step
    for a in (2, 1, 2):
        eng.act(SessionAction("s", np.asarray(a)))
    for _ in range(5):
        ev.extend(eng.step())
    assert [e.step for e in ev] == [0, 1, 2] and all(e.frame is not None for e in ev)
    eng.act(SessionAction("s", np.zeros(0), close=True))
    ev.extend(eng.step())
    assert ev[-1].final and ev[-1].error == ErrorCode.OK and eng.free_slots() == 2


def test_session_action_sent_with_the_open_is_not_lost(model):
    eng, ev = make(model, slots=2)
    eng.submit(RolloutRequest("s2", "tiny", ctx(1), np.zeros((1, 0), np.int64), session=True))
    eng.act(SessionAction("s2", np.asarray(2)))  # same engine step as the submit
    for _ in range(3):
        ev.extend(eng.step())
    assert [e.step for e in ev if not e.final] == [0]


def test_sessions_waiting_for_a_slot_time_out(model):
    events = []
    eng = Engine(model, EngineSettings(max_slots=1, session_idle_s=0.2))
    eng.submit(RolloutRequest("long", "tiny", ctx(), np.zeros((1, 64), np.int64), frames=FrameMode.NONE))
    events.extend(eng.step())  # the only slot is taken
    eng.submit(RolloutRequest("s", "tiny", ctx(1), np.zeros((1, 0), np.int64), session=True))
    events.extend(eng.step())  # still waiting: the rollout holds the slot for 64 steps
    assert not any(e.final and e.request_id == "s" for e in events)
    time.sleep(0.3)  # past session_idle_s, however fast the machine steps (64 quick steps could free the slot)
    events.extend(eng.step())
    (f,) = [e for e in events if e.final and e.request_id == "s"]
    assert f.error == ErrorCode.DEADLINE_EXCEEDED and "waiting" in f.message
    assert not any(e.final and e.request_id == "long" for e in events)  # the rollout goes on


def test_a_duplicate_request_id_is_refused_and_leaks_nothing(model):
    from worldserve.errors import InvalidArgument

    eng, ev = make(model, slots=4)
    eng.submit(RolloutRequest("dup", "tiny", ctx(), np.zeros((2, 3), np.int64)))
    with pytest.raises(InvalidArgument):
        eng.submit(RolloutRequest("dup", "tiny", ctx(), np.zeros((2, 3), np.int64)))
    ev.extend(eng.step())
    with pytest.raises(InvalidArgument):  # admitted: still refused
        eng.submit(RolloutRequest("dup", "tiny", ctx(), np.zeros((2, 3), np.int64)))
    run(eng, ev, 1)
    assert eng.free_slots() == 4 and [e.request_id for e in ev if e.final] == ["dup"]
