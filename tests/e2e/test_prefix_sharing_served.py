"""Common random numbers through the served surface (REST and gRPC, `serve` and Redis mode): sampled candidates with
equal action prefixes draw the same noise (and the engine computes them once, engine/prefix.py), the option travels
both transports to the same result, a bad value is a 422 that names it, and the planner's RemoteWorld sends the f-th
copy of a candidate (its f-th future) in its own scenario."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from worldserve.lab.plan import RemoteWorld

pytestmark = pytest.mark.e2e
MODEL = "tiny"
CANDS = [[0, 2, 2, 1], [0, 2, 2, 1], [0, 2, 1, 1], [0, 1, 2, 2], [2, 2, 2, 2], [2, 2, 0, 0]]


def _prefix(i: int, j: int) -> int:
    """Steps over which candidates i and j have taken the same actions."""
    n = 0
    while n < len(CANDS[i]) and CANDS[i][n] == CANDS[j][n]:
        n += 1
    return n


def _by_key(events) -> dict:
    return {(e.candidate, e.step): e for e in events if hasattr(e, "candidate")}


def test_common_random_numbers_share_noise_by_prefix_over_rest_and_grpc(server, real_frames):
    kw = dict(seed=21, temperature=1.0, return_tokens=True, frames="none", common_random_numbers=True)
    g = _by_key(server.grpc_client().rollout(MODEL, real_frames[:2], CANDS, **kw))
    r = _by_key(server.rest().rollout(MODEL, real_frames[:2], CANDS, **kw))
    assert g.keys() == r.keys() and len(g) == 6 * 4
    for key, e in g.items():  # the same request over either transport: the same tokens, reward, done
        assert (list(e.tokens), e.reward, e.done) == (list(r[key].tokens), r[key].reward, r[key].done)
    for i in range(6):
        for j in range(i):
            for t in range(_prefix(i, j)):  # the same prefix up to step t: the same noise, the same frame
                assert list(g[i, t].tokens) == list(g[j, t].tokens) and g[i, t].reward == g[j, t].reward


def test_a_bad_common_random_numbers_value_is_a_4xx_naming_it(server, real_frames):
    import base64

    from worldserve.api.images import encode_frame

    body = {"context": [{"encoding": "png", "data": base64.b64encode(encode_frame(real_frames[0], "png")).decode()}],
            "candidates": [[0, 1]], "options": {"common_random_numbers": "sometimes"}}
    res = httpx.post(f"{server.http}/v1/models/{MODEL}/rollouts", json=body, headers=server.headers, timeout=30)
    assert res.status_code == 422 and "common_random_numbers" in res.text  # the validation status, as for every option


def test_remote_world_sends_each_future_of_a_candidate_in_its_own_scenario(server, real_frames):
    world = RemoteWorld(server.grpc_client(), MODEL, temperature=1.0)
    assert world.crn
    cands = np.repeat(np.array(CANDS[2:5], np.int64), 2, axis=0)  # M = 2 futures of 3 candidates
    batches = world._batches(cands, 1000)
    assert [(list(rows), seed) for rows, seed in batches] == [([0, 2, 4], 1000), ([1, 3, 5], 1001)]
    world.reset(None, seed=3)
    rewards, dones, _ = world.evaluate(list(real_frames[:2]), [2], cands)
    assert rewards.shape == dones.shape == (6, 4) and world.reached == [1.0]
