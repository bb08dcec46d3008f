"""`RemoteWorldEnv`: a gymnasium.Env whose world is a served world model (a gRPC session), so an RL agent can be
trained inside the served world ("in imagination") and evaluated on the real environment.

    env = RemoteWorldEnv("127.0.0.1:50051", "tiny")
    obs, info = env.reset(seed=0)          # real context frames from the environment, a fresh session
    obs, reward, terminated, truncated, info = env.step(2)

reset(seed) starts a session from real context frames (by default: the first frame of a real MiniGrid layout
drawn with that seed) with the session's sampling seed derived from it, so a seeded episode replays exactly.
Observations are uint8 [H, W, 3]; terminated is the model's done probability > 0.5; truncated after `max_steps`.

`RemoteVectorEnv` is gymnasium's vector env over N such sessions on one gRPC channel: a step sends the N actions
first and then takes the N frames, so the server computes them in one engine step (one round trip for all N, not
N round trips), with gymnasium's next-step autoreset; it behaves exactly as `SyncVectorEnv` of N RemoteWorldEnvs
with the same seeds.
"""

from __future__ import annotations

from collections.abc import Callable

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space, concatenate, create_empty_array

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
                 max_steps: int = 64, render_mode: str | None = "rgb_array", client: GrpcClient | None = None):
        self._own_client = client is None  # a vector env shares one channel between its sessions
        self.client = client or GrpcClient(target)
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
        self.send(action)
        return self.receive()

    def send(self, action) -> None:
        """The first half of step(): the action goes out, nothing is waited for."""
        if self._session is None:
            raise RuntimeError("call reset() before step()")
        a = np.asarray(action, np.float32).tolist() if isinstance(self.action_space, spaces.Box) else int(action)
        self._session.send(a)

    def receive(self):
        """The second half of step(): its frame, reward, terminated, truncated, info."""
        ev = self._session.receive()
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
        if self._own_client:
            self.client.close()


class RemoteVectorEnv(VectorEnv):
    """N sessions of a served world model stepped together (gymnasium's vector API, next-step autoreset).

        envs = RemoteVectorEnv("127.0.0.1:50051", "tiny", num_envs=16)
        obs, infos = envs.reset(seed=0)              # uint8 [16, H, W, 3]; env i is seeded seed + i
        obs, rewards, terminated, truncated, infos = envs.step(actions)
    """

    metadata = {"render_modes": ["rgb_array"], "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(self, target: str, model: str, num_envs: int, context_fn: ContextFn | None = None,
                 temperature: float = 1.0, max_steps: int = 64):
        self.client = GrpcClient(target)
        self.envs = [RemoteWorldEnv(target, model, context_fn, temperature, max_steps, client=self.client)
                     for _ in range(num_envs)]
        self.num_envs = num_envs
        self.single_observation_space = self.envs[0].observation_space
        self.single_action_space = self.envs[0].action_space
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.render_mode = "rgb_array"
        self._autoreset = np.zeros(num_envs, bool)
        self._obs = create_empty_array(self.single_observation_space, num_envs)

    def reset(self, *, seed: int | list[int | None] | None = None, options: dict | None = None):
        seeds = [None if seed is None else seed + i for i in range(self.num_envs)] if not isinstance(seed, list) \
            else seed
        infos: dict = {}
        obs = []
        for i, (env, s) in enumerate(zip(self.envs, seeds, strict=True)):
            o, info = env.reset(seed=s, options=options)
            obs.append(o)
            infos = self._add_info(infos, info, i)
        self._autoreset[:] = False
        return concatenate(self.single_observation_space, obs, self._obs).copy(), infos

    def step(self, actions):
        actions = list(actions) if not isinstance(actions, np.ndarray) else actions
        for i, env in enumerate(self.envs):  # 1. every action goes out before any frame is waited for
            if not self._autoreset[i]:
                env.send(actions[i])
        obs, infos = [], {}
        rewards = np.zeros(self.num_envs, np.float64)
        terminated = np.zeros(self.num_envs, bool)
        truncated = np.zeros(self.num_envs, bool)
        for i, env in enumerate(self.envs):  # 2. then the frames, computed together in one engine step
            if self._autoreset[i]:  # next-step autoreset: this step resets the env, its action is ignored
                o, info = env.reset()
            else:
                o, rewards[i], terminated[i], truncated[i], info = env.receive()
            obs.append(o)
            infos = self._add_info(infos, info, i)
        self._autoreset = terminated | truncated
        return (concatenate(self.single_observation_space, obs, self._obs).copy(), rewards, terminated, truncated,
                infos)

    def render(self):
        return tuple(env.render() for env in self.envs)

    def close_extras(self, **kwargs) -> None:
        for env in self.envs:
            env.close()
        self.client.close()
