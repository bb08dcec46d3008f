"""Per-frame fields on every transport: confidence (issue 19 item 4) arrives alike over REST predict and rollouts,
gRPC Predict, Rollout and Session, and the WebSocket session; absent where the model gives none."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.e2e
MODEL = "tiny"
ACTIONS = [2, 2, 1, 2]


def _confidences(server, real_frames) -> dict[str, list]:
    ctx, kw = real_frames[:2], dict(seed=5, temperature=1.0, frame_encoding="raw")
    rest, g = server.rest(), server.grpc_client()
    try:
        out = {
            "rest_predict": [e.confidence for e in rest.predict_events(MODEL, ctx, ACTIONS, **kw)],
            "rest_rollout": [e.confidence for e in rest.rollout(MODEL, ctx, [ACTIONS], **kw)],
            "grpc_predict": [e.confidence for e in g.predict_events(MODEL, ctx, ACTIONS, **kw)],
            "grpc_rollout": [e.confidence for e in g.rollout(MODEL, ctx, [ACTIONS], **kw)],
        }
        with g.session(MODEL, ctx, **kw) as s:
            out["grpc_session"] = [s.step(a).confidence for a in ACTIONS]
        with rest.session(MODEL, ctx, **kw) as s:
            out["ws_session"] = [s.step(a).confidence for a in ACTIONS]
    finally:
        rest.close()
        g.close()
    return out


def test_confidence_arrives_alike_on_every_transport(server, real_frames):
    got = _confidences(server, real_frames)
    ref = got["rest_predict"]
    assert len(ref) == len(ACTIONS)
    for name, conf in got.items():
        assert len(conf) == len(ACTIONS), name
        # None (the engine gives none) on every transport, or a value on every transport and step
        assert [c is None for c in conf] == [c is None for c in ref], (name, conf, ref)
        for c, r in zip(conf, ref, strict=True):
            if c is not None:
                assert 0.0 <= c <= 1.0, (name, c)
                assert c == pytest.approx(r, abs=1e-6), (name, conf, ref)  # gRPC carries a float32


def test_confidence_absent_not_null_in_json_when_none(server, real_frames):
    """REST omits the field when the model gives none (a client reading .get('confidence') sees None alike)."""
    import base64

    import httpx

    from worldserve.api.images import encode_frame

    f = real_frames[0]
    body = {"context": [{"encoding": "png", "data": base64.b64encode(encode_frame(f, "png")).decode()}],
            "actions": [2], "options": {"frames": "none"}}
    r = httpx.post(f"{server.http}/v1/models/{MODEL}/predict", json=body, headers=server.headers, timeout=60)
    assert r.status_code == 200, r.text
    step = r.json()["steps"][0]
    c = step.get("confidence")
    assert c is None or (isinstance(c, float) and 0.0 <= c <= 1.0)
    assert "confidence" not in step or c is not None
    assert np.isfinite(step["reward"])


def _check_anytime(items, k: int, horizon: int):
    from worldserve.client.client import Event, RolloutEnd

    *events, end = items
    assert isinstance(end, RolloutEnd) and all(isinstance(e, Event) for e in events)
    assert len(end.steps) == len(end.truncated) == k
    for c in range(k):
        steps = [e.step for e in events if e.candidate == c]
        assert steps == list(range(end.steps[c])), "each candidate's steps arrive in order, none missing"
        assert end.truncated[c] == (end.steps[c] < horizon)
    assert all(e.frame is not None and e.frame.shape == (64, 64, 3) for e in events)
    return end


def test_anytime_rollout_ends_ok_at_its_deadline_with_the_steps_reached(server, real_frames):
    """A deadline far too short for K=32 x H=64 with frames: with anytime the stream ends OK at the deadline, every
    event delivered is well-formed, and the end says how far each candidate got (REST and gRPC)."""
    import time

    from worldserve.api.gen import worldserve_pb2 as pb
    from worldserve.client.client import ServerError, _pb_options, _pb_seq

    k, h = 32, 64
    # distinct random sequences: equal prefixes would be computed once (prefix sharing) and finish in time
    cands = np.random.default_rng(0).integers(0, 3, (k, h)).tolist()
    rest, g = server.rest(), server.grpc_client()
    try:
        t0 = time.time()
        end = _check_anytime(list(rest.rollout(MODEL, real_frames[:2], cands, deadline_ms=400, anytime=True)), k, h)
        assert time.time() - t0 < 10 and any(end.truncated)
        end = _check_anytime(list(g.rollout(MODEL, real_frames[:2], cands, deadline_ms=400, anytime=True,
                                            timeout=30)), k, h)
        assert any(end.truncated)
        # a deadline that leaves room: every candidate reaches its horizon, none truncated
        end = _check_anytime(list(g.rollout(MODEL, real_frames[:2], [[2, 2]] * 2, deadline_ms=60_000,
                                            anytime=True)), 2, 2)
        assert end.steps == [2, 2] and end.truncated == [False, False]
        # predict: the steps reached and `truncated`
        body = g.stub.Predict(pb.PredictRequest(model=MODEL, context=[g._frame(f) for f in real_frames[:2]],
                                                actions=_pb_seq([2] * h),
                                                options=_pb_options(deadline_ms=1, anytime=True)), timeout=30)
        assert body.truncated and len(body.steps) < h
        # anytime without a deadline to answer at: refused, naming the option
        with pytest.raises(ServerError) as ei:
            list(rest.rollout(MODEL, real_frames[:2], [[2]], anytime=True))
        assert ei.value.code == "INVALID_ARGUMENT" and "anytime" in ei.value.message
    finally:
        rest.close()
        g.close()



def test_vector_env_over_both_queue_modes(server):
    """RemoteVectorEnv over the e2e surface (keys on; in-process queue and Redis): N sessions in lockstep, next-step
    autoreset, the same seeds give the same worlds; per-step info carries the done probability (and the confidence
    when the model gives one)."""
    from worldserve.client.gym import RemoteVectorEnv

    def run():
        env = RemoteVectorEnv(server.grpc, MODEL, num_envs=3, max_steps=2, client=server.grpc_client())
        try:
            obs = [env.reset(seed=4)[0]]
            for t in range(4):
                o, r, term, trunc, info = env.step(np.array([2, 1, t % 3]))
                assert r.shape == (3,) and env.observation_space.contains(o)
                if t % 3 == 2:  # every env ended at step 2: this step resets them all (next-step autoreset)
                    assert "layout_seed" in info and "done_probability" not in info
                else:
                    p = info["done_probability"]
                    assert np.all((p >= 0) & (p <= 1))
                obs.append(o)
            return np.stack(obs)
        finally:
            env.close()

    np.testing.assert_array_equal(run(), run())


def test_ended_marks_the_step_a_world_ends_on_rest_and_grpc(server):
    """stop_on_done: the event of the step a candidate's world ends carries `ended` (REST NDJSON and gRPC alike), and
    no event after it comes; a candidate that never ends carries it nowhere."""
    from worldserve.lab.evaluate import CONTEXT, heldout_episodes

    f, a, _, d = next(e for e in heldout_episodes(80)
                      if not e[3][: CONTEXT - 1].any() and e[3][CONTEXT - 1 : CONTEXT + 5].any())
    h = 10
    acts = [np.resize(a[CONTEXT - 1 :], h).tolist(), [0] * h]  # the episode's own actions end it; spinning never
    end = int(np.argmax(d[CONTEXT - 1 :]))
    kw = dict(context_actions=a[: CONTEXT - 1].tolist(), stop_on_done=True, frames="none")
    rest, g = server.rest(), server.grpc_client()
    try:
        got = {"rest": list(rest.rollout(MODEL, f[:CONTEXT], acts, **kw)),
               "grpc": list(g.rollout(MODEL, f[:CONTEXT], acts, **kw))}
    finally:
        rest.close()
        g.close()
    for name, evs in got.items():
        c0 = [(e.step, e.ended) for e in evs if e.candidate == 0]
        c1 = [e.ended for e in evs if e.candidate == 1]
        assert c0 == [(s, s == end) for s in range(end + 1)], (name, c0)
        assert len(c1) == h and not any(c1), name
