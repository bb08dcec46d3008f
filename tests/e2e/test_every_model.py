"""The core serving flows against every shipped architecture (token model and continuous-latent model), in both
queue modes: predict, seeded fork == single requests, sessions, cancellation freeing slots."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tests.conftest import E2E_MODELS, metric_value

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("model", E2E_MODELS)
def test_predict_close_to_the_real_world(server, real_frames, model):
    g = server.grpc_client()
    try:
        frames = g.predict(model, real_frames[:4], [2, 2, 1], context_actions=[2, 2, 0])
    finally:
        g.close()
    assert frames.shape == (3, 64, 64, 3) and frames.dtype == np.uint8
    assert np.abs(frames[0].astype(int) - real_frames[4]).mean() < 8  # both learned the same world


@pytest.mark.parametrize("model", E2E_MODELS)
def test_seeded_fork_equals_single_requests(server, real_frames, model):
    cands = [[2, 2, 0], [0, 2, 2], [1, 1, 2]]
    rest = server.rest()

    def frames(cs, seed):
        return {(e.candidate, e.step): e.frame for e in rest.rollout(model, real_frames[:2], cs, seed=seed,
                                                                     temperature=1.0, frame_encoding="raw")}

    fork = frames(cands, 40)
    for k, c in enumerate(cands):
        single = frames([c], 40 + k)
        for s in range(3):
            np.testing.assert_array_equal(single[(0, s)], fork[(k, s)])


@pytest.mark.parametrize("model", E2E_MODELS)
def test_session_steps_frame_by_frame(server, real_frames, model):
    with server.rest().session(model, real_frames[:1]) as s:
        evs = [s.step(a) for a in (2, 2, 0)]
    assert [e.step for e in evs] == [0, 1, 2] and all(e.frame.shape == (64, 64, 3) for e in evs)


@pytest.mark.parametrize("model", E2E_MODELS)
def test_cut_off_rollout_frees_its_slots(server, real_frames, model):
    g = server.grpc_client()
    call = g.rollout_call(model, real_frames[:1], [[2] * 64] * 8, frames="none")
    next(call)
    call.cancel()
    g.close()
    t0 = time.time()
    while metric_value(server.metrics_urls, "worldserve_active_slots") > 0 and time.time() - t0 < 10:
        time.sleep(0.1)
    assert metric_value(server.metrics_urls, "worldserve_active_slots") == 0
