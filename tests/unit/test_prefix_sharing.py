"""Prefix sharing (engine/prefix.py, issue 20 item 3): the candidates of a request whose actions so far are equal run
as one row, forked where they diverge. Every event (reward, done, frame, tokens, confidence) and every final message
is bit-equal to the same request run with sharing off (engine.share_prefixes = false), greedy and with common random
numbers, for discrete (K=16 over 3 actions) and continuous actions, MaskGIT passes and a latent model, with
stop_on_done and with preemption; and the shared run steps fewer model rows."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tests.conftest import ROOT
from worldserve.engine import prefix
from worldserve.engine.engine import Engine
from worldserve.messages import FrameMode, Priority, RolloutRequest
from worldserve.model.config import PRESETS
from worldserve.model.world_model import build
from worldserve.settings import EngineSettings

SMALL = dataclasses.replace(PRESETS["tiny"], d_model=64, n_layers=2, n_heads=4)


@pytest.fixture(scope="module")
def discrete():
    torch.set_num_threads(1)
    return build(SMALL, seed=3)


@pytest.fixture(scope="module")
def continuous():
    return build(dataclasses.replace(SMALL, n_actions=0, action_dim=4, action_names=()), seed=7)


def ctx(n=2, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)


def tree_actions(k=16, h=6, n=3, seed=0):
    """K candidates over n actions, drawn so that prefixes repeat (a planner's shape): int64 [K, H]."""
    g = np.random.default_rng(seed)
    a = g.integers(0, n, (k, h))
    a[: k // 2, : h // 2] = a[0, : h // 2]  # half share their first half
    a[k // 2 :, :1] = 1
    a[-2] = a[-1]  # two identical candidates: shared to the end
    return a


def run(model, reqs, share=True, slots=32, between=None):
    """Submit reqs, step to the end -> ({(rid, k, step): event}, {rid: final message}, rows stepped, events)."""
    eng = Engine(model, EngineSettings(max_slots=slots, share_prefixes=share))
    for r in reqs:
        eng.submit(r)
    events, n = [], 0
    while sum(e.final for e in events) < len(reqs) + (between is not None):
        events.extend(eng.step())
        n += 1
        if between is not None and n == between[0]:
            eng.submit(between[1])
    assert all(e.error.name == "OK" for e in events if e.final), [e.message for e in events if e.final]
    body = {(e.request_id, e.candidate, e.step): e for e in events if not e.final}
    assert len(body) == sum(1 for e in events if not e.final)  # no duplicate (candidate, step)
    return body, {e.request_id: e.message for e in events if e.final}, eng.rows_stepped, events


def same(a, b):
    assert a.keys() == b.keys()
    for key, x in a.items():
        y = b[key]
        assert (x.reward, x.done, x.confidence) == (y.reward, y.done, y.confidence), key
        assert (x.frame is None) == (y.frame is None) and (x.frame is None or np.array_equal(x.frame, y.frame)), key
        assert (x.tokens is None) == (y.tokens is None) and (x.tokens is None or np.array_equal(x.tokens, y.tokens))


def req(rid, actions, **kw):
    kw = {"frames": FrameMode.ALL, "return_tokens": True, "seed": 5, **kw}
    return RolloutRequest(rid, "m", ctx(), np.asarray(actions), **kw)


@pytest.mark.parametrize("kw", [{"temperature": 0.0}, {"temperature": 1.0, "common_random_numbers": True}],
                         ids=["greedy", "crn"])
def test_discrete_shared_rows_are_bit_equal_and_fewer(discrete, kw):
    a = tree_actions()
    shared, msg_s, rows_s, events = run(discrete, [req("x", a, **kw)])
    plain, msg_p, rows_p, _ = run(discrete, [req("x", a, **kw)], share=False)
    same(shared, plain)
    assert msg_s == msg_p and len(shared) == 16 * 6
    distinct = sum(len({tuple(r[: t + 1]) for r in a.tolist()}) for t in range(6))  # nodes of the radix tree
    assert rows_p == 16 * 6 and rows_s == distinct < rows_p
    steps = [(e.step, e.candidate) for e in events if not e.final]
    assert steps == sorted(steps)  # a step's events in candidate order, as without sharing


def test_sampled_without_crn_is_not_shared(discrete):
    a = tree_actions()
    shared, _, rows_s, _ = run(discrete, [req("x", a, temperature=1.0)])
    plain, _, rows_p, _ = run(discrete, [req("x", a, temperature=1.0)], share=False)
    same(shared, plain)
    assert rows_s == rows_p  # per-candidate streams: nothing to share


def test_crn_draws_equal_noise_for_equal_prefixes(discrete):
    a = tree_actions()
    body, _, _, _ = run(discrete, [req("x", a, temperature=1.0, common_random_numbers=True)], share=False)
    keys = prefix.crn_keys(req("x", a, common_random_numbers=True))  # int64 [K, T]
    for t in range(a.shape[1]):
        for i in range(16):
            for j in range(16):
                eq = bool((a[i, : t + 1] == a[j, : t + 1]).all())
                assert (keys[i, t] == keys[j, t]) == eq
                if eq:  # the same prefix and the same noise: the same frame, computed once or not
                    assert np.array_equal(body["x", i, t].tokens, body["x", j, t].tokens)


def test_continuous_shared_rows_are_bit_equal(continuous):
    g = np.random.default_rng(1)
    base = g.uniform(-1, 1, (4, 5, 4)).astype(np.float32)
    a = np.repeat(base, 3, axis=0)  # [12, 5, 4]: each sequence three times ...
    a[1::3, 3:] = g.uniform(-1, 1, (4, 2, 4))  # ... one copy diverges at step 3
    a[0::3, :2] = a[0, :2]  # and the first two steps shared more widely
    for kw in ({"temperature": 0.0}, {"temperature": 0.7, "common_random_numbers": True}):
        shared, _, rows_s, _ = run(continuous, [req("c", a, **kw)])
        plain, _, rows_p, _ = run(continuous, [req("c", a, **kw)], share=False)
        same(shared, plain)
        assert rows_s < rows_p == 12 * 5


def test_stop_on_done_ends_whole_groups():
    """The shipped tiny model on a held-out episode that ends within 6 steps: the copies of its own actions end at
    done as one group, the others go on; events and the final message equal the unshared run's."""
    from tests.conftest import MODEL_DIR
    from worldserve.lab.evaluate import CONTEXT, heldout_episodes
    from worldserve.model.io import load_model_dir

    model = load_model_dir(MODEL_DIR)
    f, a, _, d = next(e for e in heldout_episodes(80)
                      if not e[3][: CONTEXT - 1].any() and e[3][CONTEXT - 1 : CONTEXT + 5].any())
    h = 8
    true = np.resize(a[CONTEXT - 1 :], h)
    spin = np.zeros(h, np.int64)
    acts = np.stack([true, true, true, spin, spin, spin])
    acts[2, 0] = (true[0] + 1) % 3  # diverges at once
    acts[5, 2:] = 1  # diverges at step 2
    for kw in ({"temperature": 0.0}, {"temperature": 1.0, "common_random_numbers": True}):
        r = RolloutRequest("s", "tiny", f[:CONTEXT], acts, context_actions=a[: CONTEXT - 1], stop_on_done=True,
                           frames=FrameMode.LAST, seed=4, **kw)
        plain, msg_p, rows_p, _ = run(model, [r], share=False)
        shared, msg_s, rows_s, _ = run(model, [dataclasses.replace(r)])
        same(shared, plain)
        assert msg_s == msg_p and rows_s < rows_p
    assert "candidate 0 at step" in msg_p["s"] and "candidate 1 at step" in msg_p["s"]


def test_preemption_replays_shared_groups_exactly(discrete, caplog):
    """A BULK K=8 rollout fills the engine; an INTERACTIVE request takes 3 of its slots back after 2 steps (owners
    among them hand their state over) and they replay later: the bulk request's events equal its unshared run."""
    a = tree_actions(k=8, h=6)
    bulk = req("bulk", a, temperature=1.0, common_random_numbers=True, priority=Priority.BULK)
    urgent = req("urgent", a[:3, :2], temperature=0.0, priority=Priority.INTERACTIVE)
    with caplog.at_level("DEBUG", logger="worldserve.engine"):
        shared, _, _, _ = run(discrete, [bulk], slots=8, between=(2, urgent))
    assert any("preempted 3 candidates of bulk" in m for m in caplog.messages)
    alone, _, _, _ = run(discrete, [dataclasses.replace(bulk)], share=False, slots=8)
    same({k: v for k, v in shared.items() if k[0] == "bulk"}, alone)
    urgent_alone, _, _, _ = run(discrete, [dataclasses.replace(urgent)], share=False, slots=8)
    same({k: v for k, v in shared.items() if k[0] == "urgent"}, urgent_alone)


def test_an_owner_given_back_hands_its_slot_to_a_member():
    from worldserve.engine.scheduler import Chunk, Job

    j = Job(req("x", np.zeros((6, 2), np.int64)), 0, 0.0)
    c = Chunk(j, 0, [10, 11, 12, 13, 14, 15])
    c.share = {0: [0, 1], 2: [2], 3: [3, 4, 5]}
    prefix.give_back(c, [4, 5])  # members only: the owner keeps its slot
    assert c.share == {0: [0, 1], 2: [2], 3: [3]} and c.slots == [10, 11, 12, 13, 14, 15]
    prefix.give_back(c, [0, 3])  # owner 0 given back: member 1 now holds the group's state in slot 10
    assert c.slots[:2] == [11, 10] and c.share is None  # every group is one candidate: sharing ends


def test_maskgit_passes_shared_rows_are_bit_equal():
    cfg = dataclasses.replace(SMALL, decoding="maskgit", passes=3, head_layers=1, head_d_model=32, head_heads=2)
    model = build(cfg, seed=11)
    a = tree_actions(k=8, h=3)
    for kw in ({"temperature": 0.0}, {"temperature": 1.0, "common_random_numbers": True}):
        shared, _, rows_s, _ = run(model, [req("g", a, **kw)])
        plain, _, rows_p, _ = run(model, [req("g", a, **kw)], share=False)
        same(shared, plain)
        assert rows_s < rows_p


@pytest.mark.skipif(not (ROOT / "models" / "denoiser" / "model.safetensors").exists(), reason="no models/denoiser")
def test_latent_model_shares_only_with_crn():
    from worldserve.model.io import load_model_dir

    model = load_model_dir(ROOT / "models" / "denoiser")
    h, w = model.spec.height, model.spec.width
    a = tree_actions(k=8, h=3)
    c = np.random.default_rng(2).integers(0, 256, (1, h, w, 3), dtype=np.uint8)
    for kw, shares in (({"temperature": 0.0}, False), ({"temperature": 0.0, "common_random_numbers": True}, True)):
        r = RolloutRequest("d", "denoiser", c, a, frames=FrameMode.ALL, seed=1, **kw)
        shared, _, rows_s, _ = run(model, [r])
        plain, _, rows_p, _ = run(model, [dataclasses.replace(r)], share=False)
        same(shared, plain)
        assert (rows_s < rows_p) == shares


def test_rowwise_sigmoid_gives_a_row_the_same_bits_in_any_batch():
    """The model's done = sigmoid(logit) over the batch differed in its last bit between a 16-row and a 64-row step on
    AVX-512 (the scalar tail of torch's vectorized loop); sampling.rowwise_sigmoid is the batch-invariant form."""
    from worldserve.model.sampling import rowwise_sigmoid

    x = torch.randn(200, generator=torch.Generator().manual_seed(0)) * 6
    full = rowwise_sigmoid(x)
    assert torch.allclose(full, torch.sigmoid(x), rtol=0, atol=1e-7)
    for n in (1, 2, 7, 8, 16, 24, 31, 33, 64, 100):
        for lo in (0, 3, 64):
            part = x[lo : lo + n].clone()
            assert torch.equal(rowwise_sigmoid(part), full[lo : lo + n]), (n, lo)
