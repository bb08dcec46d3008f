"""A stochastic world: MiniGrid random layouts with obstacles that random-walk (Dynamic-Obstacles rules).

Each episode: the random layout of `minigrid_env` plus `n_obstacles` blue balls. After the agent acts, every
ball in turn draws one of five moves uniformly (stay, +x, -x, +y, -y); a move into a wall, lava, the goal or another
ball leaves it in place; a move onto the agent is a collision. The agent walking forward into a ball is a collision
too. A collision ends the episode with reward -1. Rendering and actions are those of `minigrid_env` (64x64, one
token per cell), so the tiny token architecture models it unchanged; what the model must learn is the odds.
"""

from __future__ import annotations

import numpy as np
from minigrid.core.world_object import Ball

from .minigrid_env import RandomLayoutEnv

MOVES = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))  # stay, +x, -x, +y, -y
COLLISION_REWARD = -1.0


class DynamicObstaclesEnv(RandomLayoutEnv):
    def __init__(self, n_obstacles: int = 2, max_steps: int = 64, **kw):
        self.n_obstacles = n_obstacles
        self.obstacles: list[Ball] = []
        super().__init__(max_steps=max_steps, **kw)

    def _gen_grid(self, width, height):
        super()._gen_grid(width, height)
        self.obstacles = []
        free = [(x, y) for x in range(1, width - 1) for y in range(1, height - 1)
                if self.grid.get(x, y) is None and (x, y) != tuple(self.agent_pos)]
        for i in self.np_random.permutation(len(free))[: self.n_obstacles]:
            ball = Ball("blue")
            self.put_obj(ball, *free[i])
            self.obstacles.append(ball)

    def move_obstacles(self, rng: np.random.Generator) -> bool:
        """One random-walk move per ball, in order. -> True when a ball moved onto the agent (a collision)."""
        hit = False
        for ball in self.obstacles:
            dx, dy = MOVES[int(rng.integers(len(MOVES)))]
            x, y = ball.cur_pos
            tx, ty = x + dx, y + dy
            if (dx, dy) == (0, 0):
                continue
            if (tx, ty) == tuple(self.agent_pos):
                hit = True
            elif self.grid.get(tx, ty) is None:
                self.grid.set(x, y, None)
                self.put_obj(ball, tx, ty)
        return hit

    def step(self, action):
        fwd = self.grid.get(*self.front_pos)
        if action == self.actions.forward and fwd is not None and fwd.type == "ball":
            self.step_count += 1  # walked into a ball
            return self.gen_obs(), COLLISION_REWARD, True, self.step_count >= self.max_steps, {"collision": True}
        obs, reward, terminated, truncated, info = super().step(action)
        if terminated:
            return obs, reward, terminated, truncated, info
        if self.move_obstacles(self.np_random):
            return self.gen_obs(), COLLISION_REWARD, True, truncated, {"collision": True}
        return self.gen_obs(), reward, terminated, truncated, info

    def obstacle_cells(self) -> list[tuple[int, int]]:
        return [tuple(int(v) for v in b.cur_pos) for b in self.obstacles]
