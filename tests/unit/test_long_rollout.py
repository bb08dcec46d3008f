"""A 1000-step session (the window is 8 frames: 125x the model's memory) stays well-formed: finite rewards and
done probabilities, no blank frames, the agent always drawn, and frames that move while the real world moves."""

from __future__ import annotations

import numpy as np

from tests.conftest import MODEL_DIR
from worldserve.engine.engine import Engine
from worldserve.lab.data.minigrid_env import Simulator
from worldserve.messages import ErrorCode, Priority, RolloutRequest, SessionAction
from worldserve.model.io import load_model_dir
from worldserve.settings import EngineSettings

STEPS = 1000
AGENT_RED = np.array([255, 0, 0], np.uint8)


def test_thousand_step_session_stays_well_formed():
    model = load_model_dir(MODEL_DIR)
    rng = np.random.default_rng(5)
    sim = Simulator(seed=31337, max_steps=10**6)
    # turns only: the agent never walks into lava or the goal, so the real world never ends and always changes
    acts = rng.integers(0, 2, STEPS)
    truth = [sim.frame()] + [sim.step(int(x))[0] for x in acts]
    events = []
    eng = Engine(model, EngineSettings(max_slots=2))
    eng.submit(RolloutRequest("long", "tiny", truth[0][None], np.zeros((1, 0), np.int64), session=True,
                              priority=Priority.INTERACTIVE, seed=1, temperature=1.0))
    for x in acts:
        eng.act(SessionAction("long", np.asarray(x)))
    eng.act(SessionAction("long", np.zeros(0), close=True))
    while not any(e.final for e in events):
        events.extend(eng.step())
    assert events[-1].error == ErrorCode.OK
    got = [e for e in events if not e.final]
    assert [e.step for e in got] == list(range(STEPS))
    frames = np.stack([e.frame for e in got])  # uint8 [STEPS, 64, 64, 3]
    assert np.isfinite([e.reward for e in got]).all() and np.isfinite([e.done for e in got]).all()
    assert all(e.done < 0.5 for e in got)  # turning on the spot never ends an episode
    assert (frames.reshape(STEPS, -1).max(1) > 0).all(), "a blank frame"
    agent = (frames == AGENT_RED).all(-1).any((1, 2))
    assert agent.mean() >= 0.99, f"agent missing in {int((~agent).sum())} frames"
    moved_true = np.array([not np.array_equal(truth[i + 1], truth[i]) for i in range(STEPS)])
    moved = np.array([not np.array_equal(frames[i], frames[i - 1] if i else truth[0]) for i in range(STEPS)])
    assert moved[moved_true].mean() >= 0.9, "frames froze while the world moved"
    match = np.array([np.array_equal(frames[i], truth[i + 1]) for i in range(STEPS)])
    print(f"exact frames over {STEPS} steps: {match.mean():.1%}")
