"""The worlds the reference models are trained on, by name (torch-free: the gymnasium client starts from them)."""

from __future__ import annotations

from .dynamic_env import DynamicObstaclesEnv
from .minigrid_env import RandomLayoutEnv

ENVS = {"minigrid": RandomLayoutEnv, "dynamic": DynamicObstaclesEnv}  # deterministic / stochastic world
