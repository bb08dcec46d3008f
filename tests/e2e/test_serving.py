"""End-to-end: the real server as a subprocess, real MiniGrid frames, REST + gRPC + sessions."""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import pytest

from tests.conftest import metric_value
from worldserve.client.client import Event, ServerError

pytestmark = pytest.mark.e2e
MODEL = "tiny"


def inprocess_frames(context, actions, seed, temperature, candidates=1):
    """The engine's own result, no server: frames uint8 [K, T, H, W, 3]."""
    from tests.conftest import MODEL_DIR
    from worldserve.engine.engine import Engine, complete
    from worldserve.messages import RolloutRequest
    from worldserve.model.io import load_model_dir
    from worldserve.settings import EngineSettings

    eng = Engine(load_model_dir(MODEL_DIR), EngineSettings(max_slots=64))
    acts = np.asarray(actions, np.int64)
    events = complete(eng, [RolloutRequest("r", MODEL, np.asarray(context), acts, seed=seed, temperature=temperature)])
    out = np.zeros((acts.shape[0], acts.shape[1], 64, 64, 3), np.uint8)
    for e in events:
        if not e.final:
            out[e.candidate, e.step] = e.frame
    return out


def metric(server, name: str) -> float:
    """Summed over the processes that run engines (the server itself, or the workers)."""
    return metric_value(server.metrics_urls, name)


def test_rest_predict_equals_inprocess_engine(server, real_frames):
    ctx, actions = real_frames[:3], [2, 1, 2, 2, 0, 2]
    rest = server.rest()
    got = rest.predict(MODEL, ctx, actions, seed=7, temperature=1.0)
    want = inprocess_frames(ctx, [actions], seed=7, temperature=1.0)[0]
    assert got.shape == (6, 64, 64, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)
    # gRPC agrees with REST
    g = server.grpc_client()
    np.testing.assert_array_equal(g.predict(MODEL, ctx, actions, seed=7, temperature=1.0), got)


def test_grpc_rollout_streams_every_candidate_and_step_in_order(server, real_frames):
    g = server.grpc_client()
    k, h = 5, 7
    rng = np.random.default_rng(0)
    cands = rng.integers(0, 3, (k, h)).tolist()
    events = list(g.rollout(MODEL, real_frames[:2], cands, seed=3, temperature=0.7))
    assert len(events) == k * h
    for c in range(k):
        assert [e.step for e in events if e.candidate == c] == list(range(h))
    assert all(e.frame is not None and e.frame.shape == (64, 64, 3) for e in events)
    # latent-only and last-frame modes
    lat = list(g.rollout(MODEL, real_frames[:2], cands, frames="none"))
    assert len(lat) == k * h and all(e.frame is None for e in lat)
    last = list(g.rollout(MODEL, real_frames[:2], cands, frames="last"))
    assert [e.step for e in last if e.frame is not None] == [h - 1] * k


def test_seeded_rollout_identical_alone_and_in_a_batch_of_32(server, real_frames):
    g = server.grpc_client()
    cands = [[2, 0, 2, 2, 1, 2, 2, 2]] * 2
    # keyed by (candidate, step): the order of one step's candidates on the wire follows their rows in the batch
    alone = {(e.candidate, e.step): e.frame for e in g.rollout(MODEL, real_frames[:4], cands, seed=11,
                                                                temperature=1.0) if isinstance(e, Event)}
    results, errors = {}, []

    def other(i):
        try:
            c = server.grpc_client()
            list(c.rollout(MODEL, real_frames[i % 8 : i % 8 + 2], [[i % 3] * 8] * 3, seed=i, temperature=1.0))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=other, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    results["batched"] = {(e.candidate, e.step): e.frame for e in g.rollout(MODEL, real_frames[:4], cands, seed=11,
                                                                             temperature=1.0) if isinstance(e, Event)}
    for t in threads:
        t.join()
    assert not errors
    assert len(alone) == len(results["batched"]) == 16
    assert alone.keys() == results["batched"].keys()
    for key, a in alone.items():
        np.testing.assert_array_equal(a, results["batched"][key], err_msg=str(key))


def test_fork_equals_separate_requests(server, real_frames):
    g = server.grpc_client()
    k, h, seed = 16, 6, 100
    rng = np.random.default_rng(1)
    cands = rng.integers(0, 3, (k, h)).tolist()
    forked = {(e.candidate, e.step): e.frame for e in g.rollout(MODEL, real_frames[:3], cands, seed=seed,
                                                                   temperature=1.0)}
    for c in range(k):  # candidate c of a fork seeded s == a single request seeded s + c
        single = g.predict(MODEL, real_frames[:3], cands[c], seed=seed + c, temperature=1.0)
        for s in range(h):
            np.testing.assert_array_equal(forked[(c, s)], single[s])


def test_cancelled_stream_frees_its_slots(server, real_frames):
    g = server.grpc_client()
    before = metric(server, "worldserve_frames_total")
    call = g.rollout_call(MODEL, real_frames[:2], [[2] * 64] * 16, frames="none")
    for i, _ in enumerate(call):
        if i == 16:  # one step of all 16 candidates seen
            break
    call.cancel()
    t0 = time.time()
    while metric(server, "worldserve_active_slots") > 0 and time.time() - t0 < 5:
        time.sleep(0.01)
    assert metric(server, "worldserve_active_slots") == 0
    produced = metric(server, "worldserve_frames_total") - before
    assert produced < 16 * 64 / 2, f"{produced} frames: cancellation did not stop the rollout"


def test_deadline_returns_partial_then_deadline_exceeded(server, real_frames):
    g = server.grpc_client()
    got = []
    t0 = time.time()
    with pytest.raises(ServerError) as ei:
        for e in g.rollout(MODEL, real_frames[:2], [[2] * 64] * 32, frames="all", deadline_ms=150):
            got.append(e)
    assert ei.value.code == "DEADLINE_EXCEEDED"
    assert time.time() - t0 < 3
    assert len(got) < 32 * 64
    # REST: the stream ends with a final line carrying the error
    rest = server.rest()
    with pytest.raises(ServerError) as ei:
        list(rest.rollout(MODEL, real_frames[:2], [[2] * 64] * 32, deadline_ms=100))
    assert ei.value.code == "DEADLINE_EXCEEDED"


@pytest.mark.parametrize("transport", ["grpc", "ws"])
def test_session_runs_100_steps(server, real_frames, transport):
    c = server.grpc_client() if transport == "grpc" else server.rest()
    pattern = [2, 2, 2, 1, 2, 2, 0, 2, 2, 2]  # mostly forward, as a player would
    with c.session(MODEL, real_frames[:2], context_actions=[2], frame_encoding="raw") as s:
        frames = [s.step(pattern[i % 10]).frame for i in range(100)]
    assert len(frames) == 100 and all(f.shape == (64, 64, 3) for f in frames)
    # the world changes when the agent moves
    assert any(not np.array_equal(frames[i], frames[i + 1]) for i in range(99))


def test_session_equals_rollout(server, real_frames):
    g = server.grpc_client()
    actions = [2, 2, 1, 2, 0, 2]
    with g.session(MODEL, real_frames[:2], seed=9, temperature=1.0) as s:
        sess = [s.step(a).frame for a in actions]
    pred = g.predict(MODEL, real_frames[:2], actions, seed=9, temperature=1.0)
    np.testing.assert_array_equal(np.stack(sess), pred)


def test_health_ready_metrics_docs(server):
    assert httpx.get(server.http + "/healthz").json()["status"] == "ok"
    assert httpx.get(server.http + "/readyz").status_code == 200
    m = "".join(httpx.get(u + "/metrics").text for u in server.metrics_urls)
    for name in ("worldserve_queue_depth", "worldserve_active_slots", "worldserve_batch_size_bucket",
                 "worldserve_step_seconds_bucket", "worldserve_frames_total", "worldserve_time_to_first_frame"):
        assert name in m
    assert httpx.get(server.http + "/docs").status_code == 200
    assert "/v1/models/{name}/rollouts" in httpx.get(server.http + "/openapi.json").json()["paths"]
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    ch = server.channel()
    resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_stop_on_done_over_rest_and_grpc(server, real_frames):
    """A candidate that walks into the goal stops there (its last step says done); the other runs to the horizon."""
    from worldserve.lab.evaluate import CONTEXT, heldout_episodes

    ep = next(e for e in heldout_episodes(80)
              if not e[3][: CONTEXT - 1].any() and e[3][CONTEXT - 1 : CONTEXT + 5].any())
    f, a, _, d = ep
    end = int(np.argmax(d[CONTEXT - 1 :]))
    cands = [np.resize(a[CONTEXT - 1 :], 8).tolist(), [0] * 8]
    rest = server.rest()
    events = list(rest.rollout("tiny", f[:CONTEXT], cands, context_actions=a[: CONTEXT - 1].tolist(), frames="none",
                               stop_on_done=True))
    assert [e.step for e in events if e.candidate == 0] == list(range(end + 1))
    assert [e.step for e in events if e.candidate == 1] == list(range(8))
    g = server.grpc_client()
    try:
        got = list(g.rollout("tiny", f[:CONTEXT], cands, context_actions=a[: CONTEXT - 1].tolist(), frames="none",
                             stop_on_done=True))
    finally:
        g.close()
    assert [e.step for e in got if e.candidate == 0] == list(range(end + 1)) and got[-1].candidate == 1


def test_the_suite_runs_with_keys(server, real_frames):
    """Every e2e test here authenticates: the same call without the key is refused."""
    assert server.key
    r = httpx.get(server.http + "/v1/models")
    assert r.status_code == 401, r.text
    assert httpx.get(server.http + "/v1/models", headers=server.headers).status_code == 200
