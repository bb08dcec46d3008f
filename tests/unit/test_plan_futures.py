"""Planning under uncertainty without a server: each candidate is scored over M sampled futures, and on the
stochastic world (random-walking obstacles) the planner on the true simulator avoids them and wins."""

from __future__ import annotations

import numpy as np

from worldserve.lab.data.dynamic_env import DynamicObstaclesEnv
from worldserve.lab.data.minigrid_env import Simulator
from worldserve.lab.plan import CEMPlanner, MPCPolicy, PlanConfig, RandomPolicy, SimWorld, eval_seeds, evaluate


def test_each_candidate_is_scored_by_the_mean_of_its_futures():
    cfg = PlanConfig(candidates=8, horizon=4, futures=3, primitives=False)
    seen = []

    def world(rows):  # rows int64 [K*M, H]: future j of candidate k is row k*M + j
        seen.append(rows)
        rewards, dones = np.zeros(rows.shape), np.zeros(rows.shape)
        rewards[np.arange(len(rows)) % 3 == 0, 0] = 0.9  # one future in three of every candidate reaches the goal
        rewards[6, 0] = rewards[7, 0] = rewards[8, 0] = 0.9  # every future of candidate 2 does
        return rewards, dones

    action, cands, scores = CEMPlanner(cfg, seed=0).plan(world)
    assert seen[0].shape == (24, 4)
    np.testing.assert_array_equal(seen[0][::3], cands)  # M consecutive copies of each candidate
    np.testing.assert_array_equal(seen[0][1::3], cands)
    assert np.argmax(scores) == 2 and action == cands[2][0]
    np.testing.assert_allclose(np.delete(scores, 2), 0.3)
    np.testing.assert_allclose(scores[2], 0.9)


def test_the_least_confident_futures_leave_their_candidates_means():
    from worldserve.lab.plan import future_weights

    cfg = PlanConfig(candidates=8, horizon=4, futures=3, primitives=False, discard_uncertain=0.4)

    def world(rows):
        n = len(rows)
        rewards, dones = np.zeros(rows.shape), np.zeros(rows.shape)
        conf = np.full(rows.shape, 0.99)
        rewards[np.arange(n) % 3 == 0, 0] = 0.9  # the first future of every candidate reaches the goal ...
        conf[np.arange(n) % 3 == 0] = 0.5  # ... and is the one the model is least sure of
        conf[3:6] = 0.4  # candidate 1: all its futures uncertain -> it keeps them all
        conf[5, 2:] = np.nan  # steps not reached count for nothing
        return rewards, dones, conf

    _, _, scores = CEMPlanner(cfg, seed=0).plan(world)
    np.testing.assert_allclose(scores[1], 0.3)  # all kept: the plain mean
    np.testing.assert_allclose(np.delete(scores, 1), 0.0)  # the uncertain lucky future dropped everywhere else
    cfg.discard_uncertain = 0.0
    _, _, plain = CEMPlanner(cfg, seed=0).plan(world)
    np.testing.assert_allclose(plain, 0.3)
    # no confidence from the model (a latent model, the simulator): every future counts
    assert future_weights(np.full((6, 2), np.nan), 2, 3, 0.5).tolist() == [[1, 1, 1], [1, 1, 1]]
    assert future_weights(None, 2, 3, 0.5).shape == (2, 3)


def test_copies_of_a_stochastic_world_sample_different_futures_and_a_deterministic_one_does_not():
    dyn = Simulator(2_000_000, env_cls=DynamicObstaclesEnv)
    cells = {tuple(c.env.obstacle_cells()) for c in (dyn.clone(s) for s in range(16)) for _ in [c.step(0)]}
    assert len(cells) > 1
    assert dyn.env.obstacle_cells() == Simulator(2_000_000, env_cls=DynamicObstaclesEnv).env.obstacle_cells()
    det = Simulator(2_000_000)
    frames = {det.clone(s).step(2)[0].tobytes() for s in range(4)}
    assert len(frames) == 1


def test_planner_over_sampled_futures_on_the_true_stochastic_world_beats_random():
    seeds = eval_seeds(6)
    cfg = PlanConfig(candidates=16, horizon=8, futures=2)
    sim = evaluate("sim", MPCPolicy(SimWorld(), cfg), seeds, cfg=cfg, env="dynamic")
    rnd = evaluate("random", RandomPolicy(), seeds, env="dynamic")
    assert sim.success_rate >= 0.75 and sim.success_rate > rnd.success_rate, f"\n{sim.row()}\n{rnd.row()}"
    assert sim.mean_return > rnd.mean_return + 0.3, f"\n{sim.row()}\n{rnd.row()}"


def test_discard_uncertain_takes_a_fraction_below_one():
    import argparse

    import pytest

    from worldserve.cli.plan import _fraction

    assert _fraction("0.25") == 0.25 and _fraction("0") == 0.0
    for bad in ("1", "1.5", "-0.1", "half"):
        with pytest.raises(argparse.ArgumentTypeError):
            _fraction(bad)
