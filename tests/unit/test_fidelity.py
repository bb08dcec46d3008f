"""The stochastic world and the fidelity measures: balls random-walk with the stated odds, collisions end the
episode, and the occupancy TV between two independent sets of simulator futures is small (the measure itself
does not invent a difference), while a world whose balls never move is far."""

from __future__ import annotations

import numpy as np

from worldserve.lab.data.dynamic_env import COLLISION_REWARD, DynamicObstaclesEnv
from worldserve.lab.fidelity import balls, heldout_states, simulate, tv, wilson


def test_balls_are_drawn_and_read_back():
    env = DynamicObstaclesEnv()
    env.reset(seed=11)
    occ = balls(env.frame())
    assert occ.sum() == 2 and {(x, y) for y, x in zip(*np.nonzero(occ), strict=True)} == set(env.obstacle_cells())


def test_a_ball_moves_with_the_stated_odds():
    # one ball with free cells all around and the agent far: each of the 5 moves has probability 1/5
    env = DynamicObstaclesEnv(n_obstacles=1)
    env.reset(seed=3)
    for s in range(50):  # a layout whose ball has four free neighbours
        env.reset(seed=s)
        (x, y), = env.obstacle_cells()
        near = [(x + dx, y + dy) for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1))]
        if all(env.grid.get(*c) is None and c != tuple(env.agent_pos) for c in near) and \
                abs(x - env.agent_pos[0]) + abs(y - env.agent_pos[1]) > 2:
            break
    moves = [env.clone(i) for i in range(2000)]
    for e in moves:
        e.step(0)  # turn left: the agent stays, the ball walks
    counts = {}
    for e in moves:
        c = e.obstacle_cells()[0]
        counts[c] = counts.get(c, 0) + 1
    assert len(counts) == 5 and all(abs(n / 2000 - 0.2) < 0.04 for n in counts.values())


def test_walking_into_a_ball_is_a_collision():
    for s in range(200):
        env = DynamicObstaclesEnv()
        env.reset(seed=s)
        fwd = env.grid.get(*env.front_pos)
        if fwd is not None and fwd.type == "ball":
            _, r, term, _, info = env.step(2)
            assert term and r == COLLISION_REWARD and info["collision"]
            return
    raise AssertionError("no start facing a ball in 200 layouts")


def test_occupancy_tv_of_the_simulator_against_itself_is_small():
    st = heldout_states(1, 4)[0]
    a, _ = simulate(st, 200, seed=1)
    b, _ = simulate(st, 200, seed=2)
    assert tv(balls(a[:, 0]).mean(0), balls(b[:, 0]).mean(0)) < 0.1  # step 1; later steps spread: a higher floor
    frozen = np.repeat(st.context[-1][None], 200, 0)  # a "model" whose balls never move
    assert tv(balls(frozen).mean(0), balls(a[:, 3]).mean(0)) > 0.3


def test_wilson_interval():
    lo, hi = wilson(30, 1000)
    assert lo < 0.03 < hi and hi - lo < 0.025


def test_a_ball_read_from_a_continuous_models_frame_tolerates_pixel_noise_and_nothing_else():
    import numpy as np

    env = DynamicObstaclesEnv()
    env.reset(seed=1_000_007)
    frame = env.frame()
    exact = balls(frame)
    noise = np.random.default_rng(0).integers(-40, 41, frame.shape)
    noisy = np.clip(frame.astype(int) + noise, 0, 255).astype(np.uint8)  # a denoiser's decoded frame: near the colours
    assert exact.sum() == len(env.obstacles) and np.array_equal(balls(noisy), exact)
    # a ball smeared toward the floor (the posterior mean of a few-step denoiser) stops being read as one
    cy, cx = np.argwhere(exact)[0] * 8 + 4
    for blue, read in ((200, True), (191, True), (190, False), (128, False)):
        smeared = frame.copy()
        smeared[cy, cx] = (0, 0, blue)
        assert bool(balls(smeared)[cy // 8, cx // 8]) is read, blue
    # every other colour of the world stays far from a ball's blue, noise or not
    others = np.unique(frame[4::8, 4::8].reshape(-1, 3), axis=0)
    far = others[np.abs(others.astype(int) - [0, 0, 255]).max(-1) > 0]
    assert len(far) and (np.abs(far.astype(int) - [0, 0, 255]).max(-1) >= 155).all()
