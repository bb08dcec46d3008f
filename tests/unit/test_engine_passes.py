"""The engine runs within-frame decoding (MaskGIT passes) batched across requests at pass granularity: the frames
equal the plain-PyTorch reference sampler (model/maskgit.sample_frame), a rollout is the same alone and in a
batch with requests at other passes, and each iteration makes ONE fill call whatever pass each row is at."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import ROOT
from worldserve.engine.engine import Engine
from worldserve.messages import FrameMode, RolloutRequest
from worldserve.model.io import load_model_dir
from worldserve.model.maskgit import sample_frame
from worldserve.settings import EngineSettings

MODEL_DIR = ROOT / "models" / "maskgit"
pytestmark = pytest.mark.skipif(not (MODEL_DIR / "model.safetensors").exists(), reason="models/maskgit not shipped")


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return load_model_dir(MODEL_DIR)


@pytest.fixture(scope="module")
def context():
    from worldserve.lab.data.dynamic_env import DynamicObstaclesEnv

    e = DynamicObstaclesEnv()
    e.reset(seed=1_000_123)
    return e.frame()[None]  # uint8 [1, 64, 64, 3]


def req(rid, context, actions, seed, temperature=1.0):
    return RolloutRequest(rid, "maskgit", context, np.asarray(actions, np.int64), frames=FrameMode.NONE,
                          return_tokens=True, seed=seed, temperature=temperature)


def run(engine, reqs, stagger=0):
    """Submit reqs (each `stagger` iterations after the last), step until all end: {(rid, k, step): tokens}."""
    events = []
    for r in reqs:
        engine.submit(r)
        for _ in range(stagger):
            events.extend(engine.step())
    while sum(e.final for e in events) < len(reqs):
        events.extend(engine.step())
    assert all(e.error.name == "OK" for e in events if e.final), [e.message for e in events if e.final]
    return {(e.request_id, e.candidate, e.step): e.tokens for e in events if not e.final}


def reference(model, context, actions, seed, temperature=1.0):
    """The reference: prefill, then per step the trunk and sample_frame's passes one after the other."""
    k, h = np.asarray(actions).shape
    state = model.allocate_state(k)
    slots = torch.arange(k)
    tokens = model.encode(torch.from_numpy(context)).view(1, 1, -1).expand(k, 1, -1).contiguous()
    acts, known = model.unknown_actions(k, 0)
    model.prefill(state, slots, tokens, acts, known)
    out = {}
    for t in range(h):
        model.begin(state, slots, torch.as_tensor(np.asarray(actions)[:, t]))
        seeds = torch.tensor([seed + i for i in range(k)])
        nxt = sample_frame(model, state, slots, seeds, torch.zeros(k, dtype=torch.int64),
                           torch.full((k,), t, dtype=torch.int64), temperature=temperature)
        model.advance(state, slots, nxt)
        for i in range(k):
            out[(i, t)] = nxt[i].numpy()
    return out


def test_engine_passes_equal_the_reference_sampler(model, context):
    actions = [[2, 0, 2], [1, 1, 2]]
    got = run(Engine(model, EngineSettings(max_slots=4)), [req("a", context, actions, seed=7)])
    want = reference(model, context, actions, seed=7)
    for (i, t), tok in want.items():
        np.testing.assert_array_equal(got[("a", i, t)], tok)


def test_a_rollout_is_the_same_alone_and_beside_requests_at_other_passes(model, context):
    a = req("a", context, [[2, 2, 1, 2]], seed=3)
    alone = run(Engine(model, EngineSettings(max_slots=8)), [a])
    others = [req(f"o{i}", context, [[i % 3] * 4, [(i + 1) % 3] * 4], seed=100 + i) for i in range(3)]
    together = run(Engine(model, EngineSettings(max_slots=8)), [others[0], a, *others[1:]], stagger=3)
    for key, tok in alone.items():
        np.testing.assert_array_equal(together[key], tok)


def test_one_fill_call_per_iteration_whatever_pass_each_row_is_at(model, context):
    eng = Engine(model, EngineSettings(max_slots=8))
    calls, passes_seen = [], []
    fill = model.fill

    def counted(state, slots, partial, known):
        calls.append(1)
        return fill(state, slots, partial, known)

    model.fill = counted
    try:
        eng.submit(req("a", context, [[2] * 3], seed=1))
        events = []
        for i in range(6 * eng.frames.passes):
            if i == 3:  # a second request joins while the first is mid-frame
                eng.submit(req("b", context, [[1] * 3], seed=2))
            before = len(calls)
            events.extend(eng.step())
            passes_seen.append({c.passes_done for c in eng.running})
            assert len(calls) - before <= 1, "more than one fill call in one iteration"
        assert any(len(p) > 1 for p in passes_seen), "rows at different passes were never active together"
    finally:
        del model.fill
