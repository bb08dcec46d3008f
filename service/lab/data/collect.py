"""Collect MiniGrid episodes into one .npz: frames, actions, rewards, dones, episode offsets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from .envs import ENVS
from .minigrid_env import episode_epsilon, run_episode

HELDOUT_SEED0 = 1_000_000  # held-out episodes use seeds from here on; training never sees them


def collect(n_episodes: int, seed0: int = 0, desc: str = "collect", env: str = "minigrid"):
    frames, actions, rewards, dones, frame_off, act_off = [], [], [], [], [0], [0]
    for s in tqdm(range(seed0, seed0 + n_episodes), desc=desc, unit="ep", mininterval=2):
        f, a, r, d = run_episode(s, episode_epsilon(s), env_cls=ENVS[env])
        frames.append(f)
        actions.append(a)
        rewards.append(r)
        dones.append(d)
        frame_off.append(frame_off[-1] + len(f))
        act_off.append(act_off[-1] + len(a))
    return {
        "frames": np.concatenate(frames),  # uint8 [sum(T+1), 64, 64, 3]
        "actions": np.concatenate(actions),  # int64 [sum(T)]
        "rewards": np.concatenate(rewards),  # float32 [sum(T)]
        "dones": np.concatenate(dones),  # bool [sum(T)]
        "frame_offsets": np.asarray(frame_off, np.int64),  # [E+1]
        "action_offsets": np.asarray(act_off, np.int64),  # [E+1]
        "seeds": np.arange(seed0, seed0 + n_episodes, dtype=np.int64),
    }


def save(data: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **data)


def load(path: Path) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def episodes(data: dict):
    """Yield (frames [T+1,H,W,3], actions [T], rewards [T], dones [T]) per episode."""
    fo, ao = data["frame_offsets"], data["action_offsets"]
    for i in range(len(fo) - 1):
        yield (data["frames"][fo[i] : fo[i + 1]], data["actions"][ao[i] : ao[i + 1]],
               data["rewards"][ao[i] : ao[i + 1]], data["dones"][ao[i] : ao[i + 1]])
