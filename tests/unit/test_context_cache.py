"""The context cache (engine/context_cache.py): prefilled contexts kept across requests. A hit must give bit-equal
events to prefilling again (token, frame-head and continuous-latent models, greedy and sampled, contexts prefilled
alone and in groups), one key's entries must never serve another key, the slots are bounded, and a failed admission
leaves no entry behind."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tests.conftest import ROOT
from worldserve.engine.context_cache import ContextCache, context_key
from worldserve.engine.engine import Engine
from worldserve.messages import ErrorCode, FrameMode, RolloutRequest
from worldserve.model.config import PRESETS
from worldserve.model.io import load_model_dir
from worldserve.model.world_model import build
from worldserve.settings import EngineSettings

SMALL = dataclasses.replace(PRESETS["tiny"], d_model=64, n_layers=2, n_heads=4)


def small(kind: str):
    torch.set_num_threads(1)
    if kind == "discrete":
        return build(SMALL, seed=3)
    if kind == "continuous":
        return build(dataclasses.replace(SMALL, n_actions=0, action_dim=4, action_names=()), seed=7)
    if kind == "maskgit":
        cfg = dataclasses.replace(SMALL, name="small", d_model=32, n_layers=1, n_heads=2, decoding="maskgit",
                                  passes=3, head_layers=1, head_d_model=32, head_heads=2)
        model = build(cfg, seed=0)
        with torch.no_grad():
            model.frame_head.out.weight.normal_(0, 0.5)
        return model
    return load_model_dir(ROOT / "models" / "denoiser")  # continuous latents, a frame history as its state


@pytest.fixture(scope="module", params=["discrete", "continuous", "maskgit", "denoiser"])
def model(request):
    return small(request.param)


def actions(model, k, h, seed):
    g = np.random.default_rng(seed)
    if model.spec.action_dim:
        return g.uniform(-1, 1, (k, h, model.spec.action_dim)).astype(np.float32)
    return g.integers(0, model.spec.n_actions, (k, h))


def contexts(model, n, c, seed=0):
    s = model.spec
    return [np.random.default_rng([seed, i]).integers(0, 256, (c, s.height, s.width, 3), dtype=np.uint8)
            for i in range(n)]


def run_waves(eng: Engine, waves: list[list[RolloutRequest]]) -> dict:
    """Each wave submitted together, stepped until all of it ended; -> (request, candidate, step) -> event."""
    out = {}
    for wave in waves:
        for r in wave:
            eng.submit(r)
        events = []
        while sum(e.final for e in events) < len(wave):
            events.extend(eng.step())
        out.update({(e.request_id, e.candidate, e.step): e for e in events})
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, x in a.items():
        y = b[key]
        assert (x.error, x.reward, x.done, x.confidence) == (y.error, y.reward, y.done, y.confidence), key
        for f in ("tokens", "frame"):
            u, v = getattr(x, f, None), getattr(y, f, None)
            assert (u is None) == (v is None), (key, f)
            if u is not None:
                np.testing.assert_array_equal(u, v, err_msg=str((key, f)))


def waves_for(model):
    """Contexts A, B, C of 3 frames (+ D of 2): A first alone, then A again (twice) beside B and C (prefilled as a
    group) and B twice in one admission, greedy and sampled, several candidates; then A, B, C, D again."""
    a, b, c = contexts(model, 3, 3)
    d = contexts(model, 1, 2, seed=1)[0]
    ca = actions(model, 1, 2, 99)[0]  # context actions of A's three frames
    t = 1.0 if model.spec.output == "latent" or getattr(model.cfg, "decoding", "parallel") == "parallel" else 0.7

    def req(rid, ctx, seed, k=2, temp=0.0, cact=None):
        return RolloutRequest(rid, "m", ctx, actions(model, k, 3, seed), context_actions=cact, frames=FrameMode.ALL,
                              return_tokens=model.spec.output != "latent", seed=seed, temperature=temp)

    return [
        [req("a1", a, 1, cact=ca)],
        [req("b1", b, 2, temp=t), req("a2", a, 3, k=3, cact=ca), req("c1", c, 4), req("a3", a, 5, temp=t, cact=ca),
         req("d1", d, 6), req("b3", b, 11, temp=t)],
        [req("a-unknown", a, 7), req("c2", c, 8, temp=t), req("b2", b, 9, k=1), req("d2", d, 10)],
    ]


def test_hits_are_bit_equal_to_prefilling_again(model):
    off = Engine(model, EngineSettings(max_slots=32, context_cache_slots=0))
    assert not off.contexts.enabled
    want = run_waves(off, waves_for(model))
    on = Engine(model, EngineSettings(max_slots=32, context_cache_slots=8))
    got = run_waves(on, waves_for(model))
    assert_same(got, want)
    assert all(e.error == ErrorCode.OK for e in got.values() if e.final)
    # wave 1: a miss; wave 2: A hits twice, B, C, D miss, B's second request copies the first's prefill (a hit);
    # wave 3: A with unknown context actions is another context (a miss), the rest hit
    assert (on.contexts.hits, on.contexts.misses) == (2 + 1 + 3, 1 + 3 + 1)
    assert off.contexts.hits == off.contexts.misses == 0


def test_a_hit_skips_the_encoder_and_the_prefill(monkeypatch):
    model = small("discrete")
    eng = Engine(model, EngineSettings(max_slots=8, context_cache_slots=2))
    calls = {"encode": 0, "prefill": 0}
    for name in calls:
        fn = getattr(model, name)

        def counted(*args, _fn=fn, _name=name, **kw):
            calls[_name] += 1
            return _fn(*args, **kw)

        monkeypatch.setattr(model, name, counted)
    ctx = contexts(model, 1, 3)[0]
    run_waves(eng, [[RolloutRequest("r0", "m", ctx, actions(model, 1, 2, 0))]])
    assert calls == {"encode": 1, "prefill": 1}
    run_waves(eng, [[RolloutRequest(f"r{i}", "m", ctx, actions(model, 2, 2, i)) for i in (1, 2)]])
    assert calls == {"encode": 1, "prefill": 1}


def test_one_key_never_hits_another_keys_context():
    model = small("discrete")
    eng = Engine(model, EngineSettings(max_slots=8, context_cache_slots=4))
    ctx = contexts(model, 1, 3)[0]

    def req(rid, tenant):
        return RolloutRequest(rid, "m", ctx, actions(model, 1, 2, 0), tenant=tenant)

    run_waves(eng, [[req("alice-1", "alice")]])
    run_waves(eng, [[req("bob-1", "bob")]])
    assert (eng.contexts.hits, eng.contexts.misses) == (0, 2)
    run_waves(eng, [[req("alice-2", "alice")], [req("bob-2", "bob")]])
    assert (eng.contexts.hits, eng.contexts.misses) == (2, 2)
    assert context_key(req("x", "alice")) != context_key(req("x", "bob"))


def test_entries_are_bounded_and_least_recently_used_go_first():
    model = small("discrete")
    eng = Engine(model, EngineSettings(max_slots=8, context_cache_slots=2))
    a, b, c = contexts(model, 3, 2)

    def req(rid, ctx):
        return RolloutRequest(rid, "m", ctx, actions(model, 1, 2, 0), return_tokens=True)

    ref = run_waves(Engine(model, EngineSettings(max_slots=8, context_cache_slots=0)), [[req("a9", a)]])
    run_waves(eng, [[req("a1", a)], [req("b1", b)], [req("a2", a)], [req("c1", c)]])  # C evicts B (A was used last)
    assert len(eng.contexts) == 2 and (eng.contexts.hits, eng.contexts.misses) == (1, 3)
    got = run_waves(eng, [[req("a3", a)], [req("b2", b)], [req("a9", a)]])  # B: a miss again, evicts C (not A)
    assert (eng.contexts.hits, eng.contexts.misses) == (3, 4)
    run_waves(eng, [[req("c2", c)]])
    assert (eng.contexts.hits, eng.contexts.misses) == (3, 5)
    assert_same({k: v for k, v in got.items() if k[0] == "a9"}, ref)
    assert eng.state.k.shape[1] == 8 + 1 + 2  # max_slots, the padding slot, the cache: nothing grows


def test_a_failed_admission_leaves_no_entry(monkeypatch):
    model = small("discrete")
    eng = Engine(model, EngineSettings(max_slots=8, context_cache_slots=2))
    ctx = contexts(model, 1, 3)[0]
    real = model.prefill

    def broken(*args, **kw):
        raise RuntimeError("prefill failed")

    monkeypatch.setattr(model, "prefill", broken)
    out = run_waves(eng, [[RolloutRequest("r0", "m", ctx, actions(model, 1, 2, 0))]])
    assert [e.error for e in out.values()] == [ErrorCode.INTERNAL]
    assert len(eng.contexts) == 0
    monkeypatch.setattr(model, "prefill", real)
    ok = run_waves(eng, [[RolloutRequest("r1", "m", ctx, actions(model, 1, 2, 0), return_tokens=True)]])
    ref = run_waves(Engine(model, EngineSettings(max_slots=8, context_cache_slots=0)),
                    [[RolloutRequest("r1", "m", ctx, actions(model, 1, 2, 0), return_tokens=True)]])
    assert_same(ok, ref)
    assert (eng.contexts.hits, len(eng.contexts)) == (0, 1)


def test_cache_bookkeeping():
    cache = ContextCache([10, 11])
    assert cache.lookup(b"a") is None
    sa = cache.insert(b"a", "t")
    sb = cache.insert(b"b", "t")
    assert {sa, sb} == {10, 11}
    assert cache.lookup(b"a") == sa  # a is now the most recently used
    assert cache.insert(b"c", "t") == sb  # b evicted
    assert cache.lookup(b"b") is None and len(cache) == 2
    cache.drop(b"c")
    assert cache.insert(b"d", "t") == sb and len(cache) == 2
    assert not ContextCache([]).enabled


def test_a_key_sending_many_contexts_evicts_its_own_entries_first():
    cache = ContextCache(list(range(4)))
    alice = {cache.insert(b"a1", "alice"), cache.insert(b"a2", "alice")}
    for i in range(10):  # bob floods: past the two free slots he churns his own entries, never alice's
        cache.insert(f"b{i}".encode(), "bob")
    assert cache.lookup(b"a1") in alice and cache.lookup(b"a2") in alice
    assert sum(cache.lookup(f"b{i}".encode()) is not None for i in range(10)) == 2
    cache.insert(b"a3", "alice")  # tied at 2 each: alice's own least recently used (a1) goes
    assert cache.lookup(b"a1") is None and cache.lookup(b"a2") is not None and cache.lookup(b"b9") is not None


def test_a_one_slot_cache_hit_and_evicted_in_one_admission_is_exact():
    """One admission that hits the only entry (A), then stores B and C into that same slot: A's copy is taken first,
    and the entry left (C) holds C."""
    model = small("discrete")
    a, b, c = contexts(model, 3, 3)

    def waves():
        def req(rid, ctx, seed):
            return RolloutRequest(rid, "m", ctx, actions(model, 2, 3, seed), return_tokens=True, seed=seed)

        return [[req("a0", a, 0)], [req("a1", a, 1), req("b1", b, 2), req("c1", c, 3)],
                [req("c2", c, 4)], [req("a2", a, 5), req("b2", b, 6)]]

    want = run_waves(Engine(model, EngineSettings(max_slots=16, context_cache_slots=0)), waves())
    eng = Engine(model, EngineSettings(max_slots=16, context_cache_slots=1))
    assert_same(run_waves(eng, waves()), want)
    assert (eng.contexts.hits, eng.contexts.misses) == (2, 5)  # a1, c2 hit; a0, b1, c1, a2, b2 miss


def test_an_admission_failing_before_the_model_runs_leaves_no_entry():
    """context_actions of the wrong length (check_request refuses them; an engine fed directly fails in admission,
    before the model runs): the request ends with INTERNAL, and sent again it fails again: no entry was made for it
    (one made before the failure would hold whatever its slot held: here bob's context), and bob's entry is intact."""
    from worldserve.messages import check_request

    model = small("discrete")
    eng = Engine(model, EngineSettings(max_slots=8, context_cache_slots=1))
    a, b = contexts(model, 2, 3)
    bob = RolloutRequest("bob", "m", a, actions(model, 1, 2, 0), tenant="bob", return_tokens=True)
    first = run_waves(eng, [[bob]])
    bad = RolloutRequest("alice", "m", b, actions(model, 1, 2, 0), context_actions=np.zeros(0, np.int64),
                         tenant="alice")
    assert check_request(dataclasses.replace(bad, model="tiny"), eng.info()) == (
        "context_actions: 0 for 3 context frames, must be 2")
    for rid in ("alice", "alice-again"):
        out = run_waves(eng, [[dataclasses.replace(bad, id=rid)]])
        assert [e.error for e in out.values()] == [ErrorCode.INTERNAL], rid
    again = run_waves(eng, [[dataclasses.replace(bob, id="bob")]])
    assert_same(again, first)
    assert (eng.contexts.hits, eng.contexts.misses, len(eng.contexts)) == (1, 3, 1)


def test_preempted_candidates_replay_from_the_cache_exactly(caplog):
    """A BULK K=8 rollout fills the engine; after 2 steps an INTERACTIVE request of the same context (a hit) takes 3 of
    its slots; they are admitted again later (hits again) and replay: every event equals the run without the cache."""
    from worldserve.messages import Priority

    model = small("discrete")
    ctx = contexts(model, 1, 3)[0]

    def go(cache_slots: int) -> tuple[dict, Engine]:
        eng = Engine(model, EngineSettings(max_slots=8, context_cache_slots=cache_slots))
        eng.submit(RolloutRequest("bulk", "m", ctx, actions(model, 8, 6, 1), return_tokens=True, seed=2,
                                  temperature=1.0, priority=Priority.BULK))
        events = eng.step() + eng.step()
        eng.submit(RolloutRequest("urgent", "m", ctx, actions(model, 3, 2, 2), return_tokens=True,
                                  priority=Priority.INTERACTIVE))
        while sum(e.final for e in events) < 2:
            events.extend(eng.step())
        return {(e.request_id, e.candidate, e.step): e for e in events}, eng

    want, _ = go(0)
    with caplog.at_level("DEBUG", logger="worldserve.engine"):
        got, eng = go(4)
    assert any("preempted 3 candidates of bulk" in m for m in caplog.messages)
    assert_same(got, want)
    assert eng.contexts.misses == 1 and eng.contexts.hits >= 2  # the urgent request and the replay


def test_tensorrt_profiles_stay_at_max_slots_beside_the_cache_slots(monkeypatch):
    """The deferred TensorRT model builds its profiles for the rows a step can carry (the engine's max_slots), not
    for every slot of the state (+ padding + the context cache): the same artifact key as `export --max-slots`."""
    from worldserve.runtime.trt_backend import DeferredTrt

    model = small("discrete")
    built = []
    monkeypatch.setattr(DeferredTrt, "_ensure", lambda self, max_batch: built.append(max_batch))
    trt = DeferredTrt(model, None, print)
    assert trt._max_batch(8 + 1 + 4) == 12  # alone: every slot but the padding one
    Engine(trt, EngineSettings(max_slots=8, context_cache_slots=4))
    assert trt.max_step_rows == 8 and built == [8]
