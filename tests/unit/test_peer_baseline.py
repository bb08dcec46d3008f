"""The benchmark's LitServe peer (bench/peer_litserve.py) computes what the engine computes: same greedy frames,
rewards and done for the same input, also when LitServe hands predict() several requests at once. And the
engine-vs-bare-step bench (bench/load_engine.py) steps every row it claims to time."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import MODEL_DIR
from worldserve.engine.engine import Engine
from worldserve.messages import FrameMode, RolloutRequest
from worldserve.model.io import load_model_dir
from worldserve.settings import EngineSettings

pytest.importorskip("litserve", reason="the peer baseline needs litserve (the bench extra)")


@pytest.fixture(scope="module")
def model():
    return load_model_dir(MODEL_DIR)


def context(n: int, seed: int) -> np.ndarray:
    from worldserve.lab.data.minigrid_env import Simulator

    sim = Simulator(seed=seed)
    frames = [sim.frame()]
    for i in range(n - 1):
        frames.append(sim.step((2, 1, 2, 0)[i % 4])[0])
    return np.stack(frames)


def engine_rollout(model, req: RolloutRequest):
    events = []
    eng = Engine(model, EngineSettings(max_slots=8))
    eng.submit(req)
    while not any(e.final for e in events):
        events.extend(eng.step())
    steps = [e for e in events if not e.final]
    k, h = req.candidates, req.horizon
    frames = np.zeros((k, h, *req.context.shape[1:]), np.uint8)
    rew, done = np.zeros((k, h)), np.zeros((k, h))
    for e in steps:
        frames[e.candidate, e.step], rew[e.candidate, e.step], done[e.candidate, e.step] = e.frame, e.reward, e.done
    return frames, rew, done


def test_peer_predict_matches_engine_greedy(model):
    from bench.peer_litserve import WorldModelAPI, png_b64

    api = WorldModelAPI(model_dir=str(MODEL_DIR), max_batch_size=4)
    api.setup("cpu")
    cases = [(context(3, 5), [[2, 2, 1, 2], [0, 2, 2, 1]], [2, 2]), (context(1, 9), [[1, 2, 2, 0]], None)]
    decoded = [api.decode_request({"context": [png_b64(f) for f in c], "candidates": cands, "context_actions": ca,
                                   "frames": "all"}) for c, cands, ca in cases]
    outs = api.predict(decoded)  # both requests in one predict(): LitServe's batching path
    assert len(outs) == 2
    for (c, cands, ca), out in zip(cases, outs, strict=True):
        req = RolloutRequest("r", "tiny", c, np.asarray(cands, np.int64), frames=FrameMode.ALL,
                             context_actions=None if ca is None else np.asarray(ca, np.int64))
        frames, rew, done = engine_rollout(model, req)
        got = np.stack([np.stack(f) for f in out["frames"]])
        assert got.shape == frames.shape
        assert (got == frames).all(), "peer greedy frames differ from the engine's"
        np.testing.assert_allclose(out["rewards"], rew, atol=1e-5)
        np.testing.assert_allclose(out["dones"], done, atol=1e-5)
        enc = api.encode_response(out)  # JSON-ready
        assert len(enc["frames"]) == len(cands) and isinstance(enc["rewards"][0][0], float)


def test_engine_vs_bare_step_steps_every_row(model):
    from bench.load_engine import engine_vs_step

    r = engine_vs_step(model, context(2, 1), batch=4, steps=2, frames="all")
    assert r["batch"] == 4 and r["engine_ms"] > 0 and r["bare_ms"] > 0
    assert r["efficiency"] == pytest.approx(r["bare_ms"] / r["engine_ms"])
