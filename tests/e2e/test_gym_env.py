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
