"""`RemoteWorldEnv`: a gymnasium.Env whose world is a served world model (a gRPC session), so an RL agent can be
trained inside the served world ("in imagination") and evaluated on the real environment.

    env = RemoteWorldEnv("127.0.0.1:50051", "tiny")
    obs, info = env.reset(seed=0)          # real context frames from the environment, a fresh session
    obs, reward, terminated, truncated, info = env.step(2)

reset(seed) starts a session from real context frames (by default: the first frame of a real MiniGrid layout
drawn with that seed) with the session's sampling seed derived from it, so a seeded episode replays exactly.
Observations are uint8 [H, W, 3]; terminated is the model's done probability > 0.5; truncated after `max_steps`.
"""

from __future__ import annotations

from collections.abc import Callable

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from .client import GrpcClient

ContextFn = Callable[[int], tuple[np.ndarray, np.ndarray | None]]  # seed -> frames [C,H,W,3], actions [C-1] | None


def minigrid_context(env: str = "minigrid") -> ContextFn:
    """Real start frames: the first frame of the environment's layout for a seed (no context actions)."""

    def fn(seed: int):
        from ..lab.data.envs import ENVS

        e = ENVS[env]()
        e.reset(seed=seed)
        return e.frame()[None], None

    return fn


class RemoteWorldEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": 8}

    def __init__(self, target: str, model: str, context_fn: ContextFn | None = None, temperature: float = 1.0,
                 max_steps: int = 64, render_mode: str | None = "rgb_array"):
        self.client = GrpcClient(target)
        info = next((m for m in self.client.models() if m.name == model), None)
        if info is None:
            raise ValueError(f"model {model!r} is not served at {target}")
        self.model, self.temperature, self.max_steps, self.render_mode = model, temperature, max_steps, render_mode
        self.context_fn = context_fn or minigrid_context()
        self.observation_space = spaces.Box(0, 255, (info.height, info.width, 3), np.uint8)
        if info.action_dim:
            self.action_space = spaces.Box(-1.0, 1.0, (info.action_dim,), np.float32)
        else:
            self.action_space = spaces.Discrete(info.n_actions)
        self._session, self._frame, self._t = None, None, 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._close_session()
        layout = int(self.np_random.integers(0, 2**31 - 1))  # the layout and the session seed follow reset's seed
        frames, actions = self.context_fn(layout)
        self._session = self.client.session(self.model, frames, actions, frames="all", seed=layout,
                                            temperature=self.temperature, priority="interactive").__enter__()
        self._frame, self._t = np.asarray(frames[-1], np.uint8), 0
        return self._frame.copy(), {"layout_seed": layout}

    def step(self, action):
        if self._session is None:
            raise RuntimeError("call reset() before step()")
        a = np.asarray(action, np.float32).tolist() if isinstance(self.action_space, spaces.Box) else int(action)
        ev = self._session.step(a)
        self._frame, self._t = ev.frame, self._t + 1
        terminated = bool(ev.done > 0.5)
        truncated = not terminated and self._t >= self.max_steps
        return self._frame.copy(), float(ev.reward), terminated, truncated, {"done_probability": ev.done}

    def render(self):
        return None if self._frame is None else self._frame.copy()

    def _close_session(self) -> None:
        if self._session is not None:
            self._session.__exit__(None, None, None)
            self._session = None

    def close(self) -> None:
        self._close_session()
        self.client.close()
