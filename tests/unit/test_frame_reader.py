"""Reading a frame back (cells and the agent's pose off the pixels), as the RL example's policy and checks do:
exact on real frames of both worlds, whatever the agent's direction."""

from __future__ import annotations

import numpy as np

from worldserve.lab.data.dynamic_env import DynamicObstaclesEnv
from worldserve.lab.data.minigrid_env import AGENT, BALL, GOAL, WALL, RandomLayoutEnv, Simulator, read_agent, read_cells


def test_agent_pose_and_cells_are_read_back_exactly():
    poses = 0
    for env_cls in (RandomLayoutEnv, DynamicObstaclesEnv):
        for seed in range(40):
            sim = Simulator(seed, env_cls=env_cls)
            for a in (1, 2, 1, 2, 0, 2):
                if sim.done:
                    break
                frame, e = sim.frame(), sim.env
                assert read_agent(frame) == (int(e.agent_pos[0]), int(e.agent_pos[1]), int(e.agent_dir))
                cells = read_cells(frame)
                assert cells[0].tolist() == [WALL] * 8 and (cells == AGENT).sum() == 1
                gx, gy = next((x, y) for x in range(8) for y in range(8)
                              if e.grid.get(x, y) is not None and e.grid.get(x, y).type == "goal")
                assert cells[gy, gx] == GOAL or (gx, gy) == tuple(e.agent_pos)
                if env_cls is DynamicObstaclesEnv:
                    assert (cells == BALL).sum() == len([b for b in e.obstacles if b.cur_pos is not None])
                poses += 1
                sim.step(a)
    assert poses > 300


def test_a_frame_without_an_agent_reads_as_none():
    frame = Simulator(0).frame().copy()
    frame[(read_cells(frame) == AGENT).repeat(8, 0).repeat(8, 1)] = 0
    assert read_agent(frame) is None
    assert read_agent(np.zeros((64, 64, 3), np.uint8)) is None
