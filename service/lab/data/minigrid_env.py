"""The real environment: MiniGrid with random layouts, rendered full-grid at 64x64 (8 px per cell).

An 8x8 grid (6x6 interior) gets random walls, lava, a goal and a start pose each episode, so one
token of the 8x8 tokenizer covers exactly one cell. Actions: 0 turn left, 1 turn right, 2 forward.
Reward on reaching the goal: 1 - 0.9 * steps / max_steps (MiniGrid's rule); lava ends the episode
with reward 0. After the episode ends the world is absorbing: the last frame repeats with done = 1.
"""

from __future__ import annotations

import copy
from collections import deque

import numpy as np
from minigrid.core.grid import Grid
from minigrid.core.mission import MissionSpace
from minigrid.core.world_object import Goal, Lava, Wall
from minigrid.minigrid_env import MiniGridEnv

GRID = 8
TILE = 8
N_ACTIONS = 3
ACTION_NAMES = ("left", "right", "forward")
DIR_VEC = ((1, 0), (0, 1), (-1, 0), (0, -1))  # MiniGrid's agent_dir 0..3


class RandomLayoutEnv(MiniGridEnv):
    def __init__(self, max_steps: int = 64, **kw):
        super().__init__(mission_space=MissionSpace(mission_func=lambda: "reach the goal"), grid_size=GRID,
                         max_steps=max_steps, see_through_walls=True, **kw)

    def _gen_grid(self, width, height):
        rng = self.np_random
        self.grid = Grid(width, height)
        self.grid.wall_rect(0, 0, width, height)
        interior = [(x, y) for x in range(1, width - 1) for y in range(1, height - 1)]
        order = rng.permutation(len(interior))
        cells = [interior[i] for i in order]
        self.agent_pos = cells[0]
        self.agent_dir = int(rng.integers(0, 4))
        goal = cells[1]
        self.put_obj(Goal(), *goal)
        n_walls, n_lava = int(rng.integers(0, 6)), int(rng.integers(0, 4))
        for x, y in cells[2 : 2 + n_walls]:
            self.put_obj(Wall(), x, y)
        for x, y in cells[2 + n_walls : 2 + n_walls + n_lava]:
            self.put_obj(Lava(), x, y)
        self.mission = "reach the goal"

    def frame(self) -> np.ndarray:
        # uint8 [64, 64, 3]
        return self.get_frame(highlight=False, tile_size=TILE)

    def clone(self, seed: int):
        """A copy of this state whose future randomness comes from `seed` (a stochastic world's sampled future;
        a deterministic world's copy is the same future whatever the seed)."""
        env = copy.deepcopy(self)
        env.np_random = np.random.default_rng(seed)
        return env


# ---- reading a frame back: what a policy (or a check) sees in a real or a predicted frame ----------------------
EMPTY, WALL, LAVA, GOAL, AGENT, BALL = range(6)  # cell kinds, by the colour of the cell's centre pixel


def read_cells(frame: np.ndarray) -> np.ndarray:
    """uint8 [64, 64, 3] -> int64 [8, 8] cell kinds indexed [y, x] (the centre pixel's nearest colour)."""
    c = frame[TILE // 2 :: TILE, TILE // 2 :: TILE].astype(np.int64)  # [8, 8, 3]
    colours = np.array([(0, 0, 0), (100, 100, 100), (113, 56, 0), (0, 255, 0), (255, 0, 0), (0, 0, 255)])
    return ((c[:, :, None, :] - colours[None, None]) ** 2).sum(-1).argmin(-1)


def read_agent(frame: np.ndarray) -> tuple[int, int, int] | None:
    """uint8 [64, 64, 3] -> (x, y, dir) of the agent, or None if no cell shows it. The triangle's base is the
    heavier side of its tile: its red centroid sits opposite the direction it points to."""
    ys, xs = np.nonzero(read_cells(frame) == AGENT)
    if len(xs) != 1:
        return None
    x, y = int(xs[0]), int(ys[0])
    t = frame[y * TILE : (y + 1) * TILE, x * TILE : (x + 1) * TILE].astype(np.int64)
    ry, rx = np.nonzero((t[..., 0] > 160) & (t[..., 1] < 100) & (t[..., 2] < 100))
    dx, dy = (TILE - 1) / 2 - rx.mean(), (TILE - 1) / 2 - ry.mean()  # points away from the centroid
    d = (0 if dx > 0 else 2) if abs(dx) >= abs(dy) else (1 if dy > 0 else 3)
    return x, y, d


def expert_action(env: RandomLayoutEnv) -> int | None:
    """Shortest-path action to the goal avoiding walls and lava (BFS over x, y, dir); None if unreachable."""
    start = (*env.agent_pos, env.agent_dir)

    def free(x, y):
        c = env.grid.get(x, y)
        return c is None or c.type == "goal"

    prev = {start: None}
    q = deque([start])
    while q:
        s = q.popleft()
        x, y, d = s
        c = env.grid.get(x, y)
        if c is not None and c.type == "goal":
            while prev[s] is not None and prev[s][0] != start:
                s = prev[s][0]
            return prev[s][1] if prev[s] is not None else None
        dx, dy = DIR_VEC[d]
        for a, ns in ((0, (x, y, (d - 1) % 4)), (1, (x, y, (d + 1) % 4)), (2, (x + dx, y + dy, d))):
            if a == 2 and not free(x + dx, y + dy):
                continue
            if ns not in prev:
                prev[ns] = (s, a)
                q.append(ns)
    return None


def run_episode(seed: int, epsilon: float, max_steps: int = 64, pad: int = 8, env_cls=RandomLayoutEnv):
    """One episode of `env_cls` (this layout env or a subclass) under an epsilon-expert policy.

    Returns frames uint8 [T+1, 64, 64, 3], actions int64 [T], rewards float32 [T], dones bool [T].
    A terminated episode is padded with `pad` absorbing steps (same frame, reward 0, done 1).
    """
    env = env_cls(max_steps=max_steps)
    env.reset(seed=seed)
    rng = np.random.default_rng(seed + 7_777_777)
    frames, actions, rewards, dones = [env.frame()], [], [], []
    terminated = False
    for _ in range(max_steps):
        a = expert_action(env)
        if a is None or rng.random() < epsilon:
            a = int(rng.integers(0, N_ACTIONS))
        _, r, terminated, truncated, _ = env.step(a)
        frames.append(env.frame())
        actions.append(a)
        rewards.append(float(r))
        dones.append(bool(terminated))
        if terminated or truncated:
            break
    if terminated:
        for _ in range(pad):
            frames.append(frames[-1])
            actions.append(int(rng.integers(0, N_ACTIONS)))
            rewards.append(0.0)
            dones.append(True)
    env.close()
    return (np.stack(frames), np.asarray(actions, np.int64), np.asarray(rewards, np.float32),
            np.asarray(dones, bool))


def episode_epsilon(seed: int) -> float:
    # varied behaviour: near-expert, noisy and random episodes, fixed per seed
    return (0.05, 0.25, 0.5, 1.0)[seed % 4]


class Simulator:
    """The true environment as a step-able object for planners (copyable state)."""

    def __init__(self, seed: int, max_steps: int = 64, env_cls: type = RandomLayoutEnv):
        self.env = env_cls(max_steps=max_steps)
        self.env.reset(seed=seed)
        self.done = False

    def clone(self, seed: int) -> Simulator:
        """This state with its own future randomness (RandomLayoutEnv.clone)."""
        other = copy.copy(self)
        other.env = self.env.clone(seed)
        return other

    def frame(self) -> np.ndarray:
        return self.env.frame()

    def step(self, action: int, render: bool = True) -> tuple[np.ndarray | None, float, bool]:
        """-> (frame uint8 [64, 64, 3], or None when not `render`; reward; terminated)."""
        if self.done:
            return self.frame() if render else None, 0.0, True
        _, r, term, trunc, _ = self.env.step(int(action))
        self.done = bool(term or trunc)
        return self.frame() if render else None, float(r), bool(term)
