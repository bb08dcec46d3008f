"""`RemoteWorldEnv`: a gymnasium.Env whose world is a served world model (a gRPC session), so an RL agent can be
trained inside the served world ("in imagination") and evaluated on the real environment.

    env = RemoteWorldEnv("127.0.0.1:50051", "tiny")
    obs, info = env.reset(seed=0)          # real context frames from the environment, a fresh session
    obs, reward, terminated, truncated, info = env.step(2)

reset(seed) starts a session from real context frames (by default: the first frame of a real MiniGrid layout
drawn with that seed) with the session's sampling seed derived from it, so a seeded episode replays exactly.
Observations are uint8 [H, W, 3]; truncated after `max_steps`. terminated: at temperature > 0 drawn with the model's
done probability (one uniform a step from the env's seeded generator, so a calibrated done head ends episodes as
often as the world does and a seeded episode still replays); greedy (temperature 0): done > 0.5 (a latent model
samples its frames at any temperature: give it temperature > 0 for drawn ends too).

`RemoteVectorEnv` is gymnasium's vector env over N sessions stepped in lockstep over ONE gRPC stream
(VectorSession): each vector step is one message of N inputs (actions, and resets for the envs that autoreset) and
one answer of N outputs, computed in the same engine step on the server (one round trip for all N, not N), with
gymnasium's next-step autoreset; it behaves exactly as `SyncVectorEnv` of N RemoteWorldEnvs with the same seeds.

Each world starts from its own frames: by default the start frames come from the environment the model was trained
on (`world_of`: `dynamic`, `maskgit` and `dynamic-denoiser` are the stochastic ball world, the other shipped models
plain MiniGrid).
"""

from __future__ import annotations

from collections.abc import Callable

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space, concatenate, create_empty_array

from .client import GrpcClient, Reset

ContextFn = Callable[[int], tuple[np.ndarray, np.ndarray | None]]  # seed -> frames [C,H,W,3], actions [C-1] | None


# the world (lab/data/envs.ENVS) each shipped model (models/<name>) was trained on: its card's "Environment" line;
# /play's start frames (lab/starts.py) and `worldserve tune` read it from here
WORLDS = {"tiny": "minigrid", "denoiser": "minigrid", "dynamic": "dynamic", "maskgit": "dynamic",
          "dynamic-denoiser": "dynamic"}


def world_of(model: str) -> str:
    """The environment (lab/data/envs.ENVS) a shipped model was trained on; plain MiniGrid for any other model."""
    return WORLDS.get(model, "minigrid")


def minigrid_context(env: str = "minigrid") -> ContextFn:
    """Real start frames: the first frame of the environment's layout for a seed (no context actions)."""

    def fn(seed: int):
        from ..lab.data.envs import ENVS

        e = ENVS[env]()
        e.reset(seed=seed)
        return e.frame()[None], None

    return fn


def start(rng: np.random.Generator, context_fn: ContextFn) -> tuple[int, np.ndarray, np.ndarray | None]:
    """An episode's start: the layout and the session seed follow the env's seeded generator (replayable)."""
    layout = int(rng.integers(0, 2**31 - 1))
    frames, actions = context_fn(layout)
    return layout, frames, actions


def wire_action(space: spaces.Space, action):
    return np.asarray(action, np.float32).tolist() if isinstance(space, spaces.Box) else int(action)


def ends(ev, t: int, max_steps: int, rng: np.random.Generator, temperature: float) -> tuple[bool, bool]:
    """-> (terminated: the world ended (drawn with probability done when sampling, done > 0.5 when greedy),
    truncated: `max_steps` reached without it). One draw from the env's generator per sampled step."""
    threshold = rng.random() if temperature > 0 else 0.5
    terminated = bool(ev.done > threshold)
    return terminated, not terminated and t >= max_steps


def step_info(ev) -> dict:
    info = {"done_probability": ev.done}
    if ev.confidence is not None:
        info["confidence"] = ev.confidence
    return info


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
        self.context_fn = context_fn or minigrid_context(world_of(model))
        self.observation_space = spaces.Box(0, 255, (info.height, info.width, 3), np.uint8)
        if info.action_dim:
            self.action_space = spaces.Box(-1.0, 1.0, (info.action_dim,), np.float32)
        else:
            self.action_space = spaces.Discrete(info.n_actions)
        self._session, self._frame, self._t = None, None, 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._close_session()
        layout, frames, actions = start(self.np_random, self.context_fn)
        self._session = self.client.session(self.model, frames, actions, frames="all", seed=layout,
                                            temperature=self.temperature, priority="interactive").__enter__()
        self._frame, self._t = np.asarray(frames[-1], np.uint8), 0
        return self._frame.copy(), {"layout_seed": layout}

    def step(self, action):
        if self._session is None:
            raise RuntimeError("call reset() before step()")
        ev = self._session.step(wire_action(self.action_space, action))
        self._frame, self._t = ev.frame, self._t + 1
        terminated, truncated = ends(ev, self._t, self.max_steps, self.np_random, self.temperature)
        return self._frame.copy(), float(ev.reward), terminated, truncated, step_info(ev)

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
    """N sessions of a served world model stepped in lockstep over one gRPC VectorSession stream (gymnasium's vector
    API, next-step autoreset): one message and one answer per vector step, N frames from one engine step.

        envs = RemoteVectorEnv("127.0.0.1:50051", "tiny", num_envs=16)
        obs, infos = envs.reset(seed=0)              # uint8 [16, H, W, 3]; env i is seeded seed + i
        obs, rewards, terminated, truncated, infos = envs.step(actions)
    """

    metadata = {"render_modes": ["rgb_array"], "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(self, target: str, model: str, num_envs: int, context_fn: ContextFn | None = None,
                 temperature: float = 1.0, max_steps: int = 64, client: GrpcClient | None = None):
        self._own_client = client is None
        self.client = client or GrpcClient(target)
        info = next((m for m in self.client.models() if m.name == model), None)
        if info is None:
            raise ValueError(f"model {model!r} is not served at {target}")
        self.model, self.num_envs, self.max_steps, self.temperature = model, num_envs, max_steps, temperature
        self.context_fn = context_fn or minigrid_context(world_of(model))
        self.single_observation_space = spaces.Box(0, 255, (info.height, info.width, 3), np.uint8)
        self.single_action_space = (spaces.Box(-1.0, 1.0, (info.action_dim,), np.float32) if info.action_dim
                                    else spaces.Discrete(info.n_actions))
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.render_mode = "rgb_array"
        self._vec = self.client.vector_session(model, num_envs, frames="all", temperature=temperature,
                                               priority="interactive", frame_encoding="raw")
        self._open = False
        self._rngs: list[np.random.Generator | None] = [None] * num_envs  # per env, as each RemoteWorldEnv's
        self._t = np.zeros(num_envs, np.int64)
        self._autoreset = np.zeros(num_envs, bool)
        self._obs = create_empty_array(self.single_observation_space, num_envs)

    def _start(self, i: int, seed: int | None) -> tuple[Reset, np.ndarray, dict]:
        if seed is not None or self._rngs[i] is None:
            self._rngs[i], _ = seeding.np_random(seed)
        layout, frames, actions = start(self._rngs[i], self.context_fn)
        self._t[i] = 0
        return Reset(frames, actions, layout), np.asarray(frames[-1], np.uint8), {"layout_seed": layout}

    def _exchange(self, inputs: list) -> list:
        if not self._open:
            self._vec.__enter__()
            self._open = True
        return self._vec.exchange(inputs)

    def reset(self, *, seed: int | list[int | None] | None = None, options: dict | None = None):
        seeds = seed if isinstance(seed, list) else [None if seed is None else seed + i for i in range(self.num_envs)]
        starts = [self._start(i, s) for i, s in enumerate(seeds)]
        self._exchange([r for r, _, _ in starts])
        infos: dict = {}
        for i, (_, _, info) in enumerate(starts):
            infos = self._add_info(infos, info, i)
        self._autoreset[:] = False
        return concatenate(self.single_observation_space, [o for _, o, _ in starts], self._obs).copy(), infos

    def step(self, actions):
        inputs, obs, starts = [], [None] * self.num_envs, {}
        for i in range(self.num_envs):  # next-step autoreset: an env that ended last step restarts, its action ignored
            if self._autoreset[i]:
                starts[i] = self._start(i, None)
                inputs.append(starts[i][0])
            else:
                inputs.append(wire_action(self.single_action_space, actions[i]))
        outs = self._exchange(inputs)  # one round trip: N actions out, N frames back from one engine step
        rewards = np.zeros(self.num_envs, np.float64)
        terminated = np.zeros(self.num_envs, bool)
        truncated = np.zeros(self.num_envs, bool)
        infos: dict = {}
        for i, out in enumerate(outs):
            if i in starts:
                _, obs[i], info = starts[i]
            else:
                self._t[i] += 1
                obs[i], rewards[i] = out.frame, out.reward
                terminated[i], truncated[i] = ends(out, int(self._t[i]), self.max_steps, self._rngs[i],
                                                   self.temperature)
                info = step_info(out)
            infos = self._add_info(infos, info, i)
        self._autoreset = terminated | truncated
        return (concatenate(self.single_observation_space, obs, self._obs).copy(), rewards, terminated, truncated,
                infos)

    def render(self):
        return tuple(self._obs)

    def close_extras(self, **kwargs) -> None:
        if self._open:
            self._vec.__exit__(None, None, None)
            self._open = False
        if self._own_client:
            self.client.close()
