"""RolloutEvent.confidence (issue 19.4, engine side): for every predicted frame of a token model, the mean probability
of its chosen tokens under the distribution each was sampled from (greedy rows: temperature 1), computed on the device
in the engine. Checked against the plain-PyTorch reference from the model's own logits (parallel: the step's logits;
maskgit / autoregressive: each pass's logits and the tokens it kept), in [0, 1], the same alone and in a batch, and
filled for latent-only rollouts (frames NONE) too. Small random models: fast."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from worldserve.engine.engine import Engine
from worldserve.messages import FrameMode, RolloutRequest
from worldserve.model.config import PRESETS
from worldserve.model.maskgit import schedule, unmask_pass
from worldserve.model.sampling import token_confidence, token_confidence_reference
from worldserve.model.world_model import build
from worldserve.runtime.batch import run_fixed_chunks
from worldserve.settings import EngineSettings

H = 3  # steps per rollout


@pytest.fixture(scope="module")
def parallel():
    torch.set_num_threads(1)
    return build(dataclasses.replace(PRESETS["tiny"], d_model=32, n_layers=1, n_heads=2), seed=4)


@pytest.fixture(scope="module")
def passes():
    torch.set_num_threads(1)
    cfg = dataclasses.replace(PRESETS["tiny"], name="small", d_model=32, n_layers=1, n_heads=2, decoding="maskgit",
                              passes=4, head_layers=1, head_d_model=32, head_heads=2)
    model = build(cfg, seed=0)
    with torch.no_grad():
        model.frame_head.out.weight.normal_(0, 0.5)  # not the zero start: the passes matter
    return model


def ctx(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)


def rollout(model, reqs, slots=8):
    """Run reqs in one engine: {(rid, k, step): (tokens, confidence)}."""
    eng = Engine(model, EngineSettings(max_slots=slots))
    for r in reqs:
        eng.submit(r)
    events = []
    while sum(e.final for e in events) < len(reqs):
        events.extend(eng.step())
    assert all(e.error.name == "OK" for e in events if e.final)
    return {(e.request_id, e.candidate, e.step): (e.tokens, e.confidence) for e in events if not e.final}


def req(rid, acts, seed, temperature, frames=FrameMode.NONE, tokens=True, context_seed=0):
    return RolloutRequest(rid, "m", ctx(context_seed), np.asarray(acts, np.int64), frames=frames,
                          return_tokens=tokens, seed=seed, temperature=temperature)


def prefilled(model, k, context):
    state = model.allocate_state(k)
    slots = torch.arange(k)
    tok = run_fixed_chunks(model.encode, torch.from_numpy(context)).view(1, 2, -1).expand(k, 2, -1).contiguous()
    acts, known = model.unknown_actions(k, 1)
    model.prefill(state, slots, tok, acts, known)
    return state, slots


def test_token_confidence_equals_the_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 64, 300, generator=g) * 3
    tokens = torch.randint(0, 300, (5, 64), generator=g)
    t = torch.tensor([0.0, 1.0, 0.5, 2.0, 1.0])
    got = token_confidence(logits, tokens, t)
    torch.testing.assert_close(got.double(), token_confidence_reference(logits, tokens, t), atol=1e-6, rtol=1e-5)
    assert torch.equal(token_confidence(logits[2:3], tokens[2:3], t[2:3]), got[2:3])  # rows are independent


@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.7])
def test_parallel_confidence_equals_the_reference_from_the_step_logits(parallel, temperature):
    acts = np.random.default_rng(1).integers(0, 3, (3, H))
    got = rollout(parallel, [req("a", acts, 11, temperature)])
    state, slots = prefilled(parallel, 3, ctx())
    t = torch.full((3,), temperature)
    for s in range(H):
        logits, _, _ = parallel.step(state, slots, torch.as_tensor(acts[:, s]))
        tokens = torch.stack([torch.from_numpy(got[("a", k, s)][0]) for k in range(3)])
        ref = token_confidence_reference(logits, tokens, t)
        conf = torch.tensor([got[("a", k, s)][1] for k in range(3)], dtype=torch.float64)
        torch.testing.assert_close(conf, ref, atol=1e-6, rtol=1e-5)
        assert bool(((conf > 0) & (conf <= 1)).all())
        parallel.advance(state, slots, tokens)


def test_maskgit_confidence_equals_the_reference_from_each_pass(passes):
    acts = np.random.default_rng(2).integers(0, 3, (2, H))
    got = rollout(passes, [req("a", acts, 5, 1.0)])
    spec = passes.spec
    n = spec.tokens_per_frame
    state, slots = prefilled(passes, 2, ctx())
    for s in range(H):
        passes.begin(state, slots, torch.as_tensor(acts[:, s]))
        partial, known = torch.zeros(2, n, dtype=torch.int64), torch.zeros(2, n, dtype=torch.bool)
        kept = torch.zeros(2, dtype=torch.float64)
        t = torch.full((2,), spec.decode_temperature)
        for p, k in enumerate(schedule(spec.decoding, n, spec.passes, spec.tokens_per_pass, spec.schedule)):
            logits = passes.fill(state, slots, partial, known)
            new, new_known, _ = unmask_pass(logits, partial, known, torch.full((2,), k), t, torch.tensor([5, 6]),
                                            torch.zeros(2, dtype=torch.int64), torch.full((2,), s), torch.full((2,), p),
                                            spec.confidence, spec.choice_noise)
            prob = torch.softmax(logits.double() / t[:, None, None], -1).gather(-1, new[..., None]).squeeze(-1)
            kept += torch.where(new_known & ~known, prob, 0.0).sum(1)  # the tokens this pass kept
            partial, known = new, new_known
        for i in range(2):
            assert np.array_equal(got[("a", i, s)][0], partial[i].numpy())
            assert got[("a", i, s)][1] == pytest.approx(float(kept[i] / n), abs=1e-5)
            assert 0.0 < got[("a", i, s)][1] <= 1.0
        passes.advance(state, slots, partial)


@pytest.mark.parametrize("which", ["parallel", "passes"])
def test_confidence_is_the_same_alone_and_in_a_batch_and_filled_without_frames(which, request):
    model = request.getfixturevalue(which)
    acts = np.random.default_rng(3).integers(0, 3, (2, H))
    alone = rollout(model, [req("x", acts, 9, 1.0, tokens=False)])
    others = [req(f"n{i}", acts[:, :2], i, 0.5 * i, FrameMode.ALL, context_seed=i + 1) for i in range(3)]
    batched = rollout(model, [*others, req("x", acts, 9, 1.0, tokens=False)])
    for key, (_, conf) in alone.items():
        assert conf is not None and 0.0 < conf <= 1.0  # latent-only (no frames, no tokens): still filled
        assert batched[key][1] == conf  # bit-equal
    assert all(c is not None for k, (_, c) in batched.items() if k[0] != "x")
