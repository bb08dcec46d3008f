"""Each world starts from its own frames (issue 19 item 6): the gymnasium envs start a model of the stochastic ball
world (`dynamic`, `maskgit`) from frames of that world, with its two blue balls in them, and other models from plain
MiniGrid frames."""

from __future__ import annotations

import numpy as np

from worldserve.client.gym import minigrid_context, world_of
from worldserve.lab.data.envs import ENVS
from worldserve.lab.fidelity import balls  # the one reader of a ball in a frame


def test_each_model_starts_from_its_own_world():
    assert world_of("dynamic") == world_of("maskgit") == world_of("dynamic-denoiser") == "dynamic"
    assert world_of("tiny") == world_of("denoiser") == world_of("someone-elses-model") == "minigrid"
    for seed in range(5):
        ball, _ = minigrid_context(world_of("maskgit"))(seed)
        plain, _ = minigrid_context(world_of("tiny"))(seed)
        assert ball.shape == plain.shape == (1, 64, 64, 3) and ball.dtype == np.uint8
        env = ENVS["dynamic"]()
        env.reset(seed=seed)
        assert len(env.obstacle_cells()) == 2
        assert int(balls(ball[0]).sum()) == 2, "the ball world's start frame shows its two balls"
        assert int(balls(plain[0]).sum()) == 0


def test_the_play_pages_index_names_the_worlds_the_gym_env_uses():
    """/play (static/starts/index.json, written by lab/starts.py) and the gym env read one table of model -> world."""
    import json

    from tests.conftest import ROOT
    from worldserve.client.gym import WORLDS

    index = json.loads((ROOT / "service" / "api" / "static" / "starts" / "index.json").read_text())
    assert index["models"] == WORLDS and set(WORLDS.values()) <= set(index["worlds"])
    shipped = {p.parent.name for p in (ROOT / "models").glob("*/config.json")}
    assert shipped <= set(WORLDS), f"a shipped model without its world: {shipped - set(WORLDS)}"
