"""Batch invariance as promised (docs/benchmarks-runtime.md, "Batch invariance: what is promised"): on the CPU a seeded
rollout's events are bit-equal alone and in any batch, whatever bucket each step runs in (1 row vs 16, 64), for discrete
and continuous actions: tokens, frames, reward, done and confidence (which moves with the logits' last bit, so it
also checks the logits). Continuous actions are the case that broke it: the action embedding was a GEMM over the
batch, which the CPU rounds differently at 1, 2-3 and >= 4 rows (model/dynamics.rowwise_linear)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from worldserve.engine.engine import Engine
from worldserve.messages import FrameMode, RolloutRequest
from worldserve.model.config import PRESETS
from worldserve.model.world_model import build
from worldserve.settings import EngineSettings

H = 4


@pytest.fixture(scope="module", params=["discrete", "continuous"])
def model(request):
    torch.set_num_threads(1)
    cfg = dataclasses.replace(PRESETS["tiny"], d_model=64, n_layers=2, n_heads=4)
    if request.param == "continuous":
        cfg = dataclasses.replace(cfg, n_actions=0, action_dim=4, action_names=())
    return build(cfg, seed=7)


def actions(model, k, h, seed):
    g = np.random.default_rng(seed)
    if model.cfg.continuous:
        return g.uniform(-1, 1, (k, h, model.cfg.action_dim)).astype(np.float32)
    return g.integers(0, model.cfg.n_actions, (k, h))


def run(model, reqs, exact: bool = True):
    # exact: an eager model on the CPU runs its rows unpadded; off: the power-of-two buckets of compiled backends
    eng = Engine(model, EngineSettings(max_slots=64, exact_batches=exact))
    assert eng.exec.exact == exact
    for r in reqs:
        eng.submit(r)
    events = []
    while sum(e.final for e in events) < len(reqs):
        events.extend(eng.step())
    return {(e.request_id, e.candidate, e.step): e for e in events if not e.final}


# 16 rows, 61 rows (bucket 64: where done's sigmoid took the vector path, 16 the tail), and unpadded steps of
# 11 and 36 rows (vector bodies and tails of every width)
@pytest.mark.parametrize(("n_others", "exact"), [(3, False), (12, False), (2, True), (7, True), (12, True)])
def test_a_rollout_is_bit_equal_alone_and_in_a_full_batch(model, n_others, exact):
    ctx = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    mine = RolloutRequest("x", "m", ctx, actions(model, 1, H, 1), frames=FrameMode.ALL, return_tokens=True, seed=3,
                          temperature=1.0)
    alone = run(model, [mine])  # bucket 1 every step
    others = [RolloutRequest(f"n{i}", "m", ctx[:1], actions(model, 5, H, 10 + i), seed=i, temperature=0.5 * i)
              for i in range(n_others)]
    batched = run(model, [*others, mine], exact)  # 11, 16, 36 or 61 rows: unpadded or bucket 16 / 64
    assert len(alone) == H
    for key, a in alone.items():
        b = batched[key]
        assert (a.reward, a.done, a.confidence) == (b.reward, b.done, b.confidence), key
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.frame, b.frame)
    for r in others:  # every row's reward and done, each request alone (5 rows, or bucket 8) vs in the full batch
        for key, a in run(model, [r], exact).items():
            assert (a.reward, a.done) == (batched[key].reward, batched[key].done), key
