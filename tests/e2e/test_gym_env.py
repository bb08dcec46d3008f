"""RemoteWorldEnv: a gymnasium.Env over a gRPC session of the real server, checked by gymnasium's env checker."""

from __future__ import annotations

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from tests.conftest import MODEL_DIR, start_server
from worldserve.client.gym import RemoteWorldEnv


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("gym"), "--model-dir", str(MODEL_DIR), "--max-slots", "8")
    yield s
    s.stop()


def test_passes_gymnasiums_env_checker(srv):
    env = RemoteWorldEnv(srv.grpc, "tiny", temperature=1.0, max_steps=16)
    try:
        check_env(env, skip_render_check=False)
    finally:
        env.close()


def test_an_episode_in_the_served_world(srv):
    env = RemoteWorldEnv(srv.grpc, "tiny", max_steps=8)
    try:
        obs, info = env.reset(seed=7)
        assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8
        first = obs.copy()
        frames, done, steps = [], False, 0
        while not done:
            obs, reward, terminated, truncated, info = env.step(2)  # forward
            frames.append(obs)
            done, steps = terminated or truncated, steps + 1
            assert 0.0 <= info["done_probability"] <= 1.0
        assert steps <= 8 and env.observation_space.contains(obs)
        obs2, _ = env.reset(seed=7)  # the same seed: the same start and the same world
        np.testing.assert_array_equal(obs2, first)
        np.testing.assert_array_equal(env.step(2)[0], frames[0])
    finally:
        env.close()


def test_vector_env_equals_gymnasiums_sync_vector_env_over_the_same_sessions(srv):
    # N sessions stepped together (one round trip for all N) behave exactly as gymnasium's SyncVectorEnv of N
    # RemoteWorldEnvs: same observations, rewards, terminations and next-step autoresets for the same seeds
    from gymnasium.vector import SyncVectorEnv

    from worldserve.client.gym import RemoteVectorEnv

    n, steps = 4, 12
    fast = RemoteVectorEnv(srv.grpc, "tiny", num_envs=n, max_steps=5)
    ref = SyncVectorEnv([lambda: RemoteWorldEnv(srv.grpc, "tiny", max_steps=5) for _ in range(n)])
    try:
        assert fast.observation_space == ref.observation_space and fast.action_space == ref.action_space
        o1, _ = fast.reset(seed=11)
        o2, _ = ref.reset(seed=11)
        np.testing.assert_array_equal(o1, o2)
        rng = np.random.default_rng(0)
        resets = 0
        for _ in range(steps):
            a = rng.integers(0, 3, n)
            got, want = fast.step(a), ref.step(a)
            np.testing.assert_array_equal(got[0], want[0])  # frames: sampled tokens, exact in any batch
            np.testing.assert_allclose(got[1], want[1], atol=1e-6)  # rewards: float heads, batch-size rounding
            np.testing.assert_array_equal(got[2], want[2])
            np.testing.assert_array_equal(got[3], want[3])
            resets += int((got[2] | got[3]).sum())
        assert resets >= n, "every env truncates at 5 steps: autoreset must have run"
        assert fast.observation_space.contains(got[0])
    finally:
        fast.close()
        ref.close()


def test_vector_env_steps_all_envs_in_one_engine_step_and_replays_seeded(srv):
    from tests.conftest import metric_value
    from worldserve.client.gym import RemoteVectorEnv

    n, steps = 6, 8
    env = RemoteVectorEnv(srv.grpc, "tiny", num_envs=n, max_steps=10**6)
    try:
        first, _ = env.reset(seed=3)
        env.step(np.zeros(n, int))  # every session admitted
        c0 = metric_value(srv.http, "worldserve_batch_size_count")
        rng = np.random.default_rng(1)
        acts = [rng.integers(0, 3, n) for _ in range(steps)]
        run1 = [env.step(a)[0] for a in acts]
        engine_steps = metric_value(srv.http, "worldserve_batch_size_count") - c0
        # one message of N actions -> one engine step for all N (N round trips would give about N x steps)
        assert engine_steps <= 1.5 * steps, engine_steps
        again, _ = env.reset(seed=3)  # seeded replay: the same starts and the same sampled worlds
        np.testing.assert_array_equal(again, first)
        env.step(np.zeros(n, int))
        for a, want in zip(acts, run1, strict=True):
            np.testing.assert_array_equal(env.step(a)[0], want)
    finally:
        env.close()


def test_vector_env_runs_under_gymnasiums_vector_wrappers(srv):
    from gymnasium.wrappers.vector import RecordEpisodeStatistics

    from worldserve.client.gym import RemoteVectorEnv

    env = RecordEpisodeStatistics(RemoteVectorEnv(srv.grpc, "tiny", num_envs=3, max_steps=3))
    try:
        obs, _ = env.reset(seed=0)
        ended = []
        for _ in range(4):
            obs, r, term, trunc, info = env.step(env.action_space.sample())
            assert env.observation_space.contains(obs) and r.shape == (3,)
            if "episode" in info:
                ended.append(info["_episode"])
        assert ended and np.any(ended), "every env truncates at 3 steps: the wrapper must have seen episodes end"
    finally:
        env.close()


def test_vector_session_refuses_what_it_cannot_serve(srv):
    """num_envs over the model's max_candidates, a wrong number of inputs, a bad action, an action before a reset:
    INVALID_ARGUMENT naming the field; every session of the stream is closed after it (no slot held)."""
    import time

    from tests.conftest import metric_value
    from worldserve.client.client import GrpcClient, Reset, ServerError
    from worldserve.lab.data.minigrid_env import Simulator

    ctx = Simulator(seed=1).frame()[None]
    c = GrpcClient(srv.grpc)
    cap = next(m for m in c.models() if m.name == "tiny").max_candidates
    cases = [(cap + 1, [Reset(ctx)] * (cap + 1), None, "num_envs"),
             (2, [Reset(ctx)], None, "envs"),
             (2, [Reset(ctx), Reset(ctx)], [0, 7], "envs[1].action"),
             (2, [Reset(ctx), 1], None, "envs[1]")]
    try:
        for n, first, second, field in cases:
            with c.vector_session("tiny", n) as v, pytest.raises(ServerError) as ei:
                v.exchange(first)
                v.exchange(second)
            assert ei.value.code == "INVALID_ARGUMENT" and field in ei.value.message, (field, ei.value)
    finally:
        c.close()
    t0 = time.time()
    while metric_value(srv.http, "worldserve_active_slots") and time.time() - t0 < 10:
        time.sleep(0.1)
    assert metric_value(srv.http, "worldserve_active_slots") == 0


def test_vector_env_closed_right_after_an_autoreset_holds_no_slot(srv):
    """Envs reset by the last step (their new sessions never stepped) and the client gone: every session ends."""
    import time

    from tests.conftest import metric_value
    from worldserve.client.gym import RemoteVectorEnv

    env = RemoteVectorEnv(srv.grpc, "tiny", num_envs=3, max_steps=1)
    env.reset(seed=0)
    env.step(np.zeros(3, int))  # every env truncates at 1 step
    env.step(np.zeros(3, int))  # ... so this step resets them all: new sessions, never stepped
    env.close()
    t0 = time.time()
    while metric_value(srv.http, "worldserve_active_slots") and time.time() - t0 < 10:
        time.sleep(0.1)
    assert metric_value(srv.http, "worldserve_active_slots") == 0
