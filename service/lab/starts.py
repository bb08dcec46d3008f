"""Start frames for the /play page, per world: service/api/static/starts/<world>/seed<N>.png + index.json.

Each PNG is the first observation (64x64 RGB) of a layout of that world (lab/data/envs.ENVS: `minigrid`, the
deterministic random-layout world; `dynamic`, the same layouts with two random-walking balls) from held-out seeds
(3,000,000 on: never trained on, and apart from the planner's evaluation seeds), kept only where the goal can be
reached. index.json says which world each shipped model was trained on, so /play starts a model from frames of its
own world (a model it does not know starts from `default`'s):

    {"worlds": {"minigrid": [{"file": "minigrid/seed3000000.png", "seed": 3000000}, ...], "dynamic": [...]},
     "models": {"tiny": "minigrid", "dynamic": "dynamic", ...}, "default": "minigrid"}

Deterministic: rerunning rewrites the same files.

    .venv/bin/python -m worldserve.lab.starts [--n 8] [--seed0 3000000]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

from ..client.gym import WORLDS  # the world each shipped model was trained on, named once
from .data.envs import ENVS
from .data.minigrid_env import Simulator, expert_action

OUT = Path(__file__).resolve().parents[1] / "api" / "static" / "starts"
DEFAULT_WORLD = "minigrid"


def starts(world: str, n: int, seed0: int) -> list[tuple[int, Image.Image]]:
    """n (seed, first frame) of `world`, from seed0 on, layouts whose goal is reachable."""
    out, seed = [], seed0
    while len(out) < n:
        sim = Simulator(seed, env_cls=ENVS[world])
        if expert_action(sim.env) is not None:
            out.append((seed, Image.fromarray(sim.frame())))
        seed += 1
    return out


def write(out: Path, n: int, seed0: int) -> dict:
    index = {"worlds": {}, "models": dict(WORLDS), "default": DEFAULT_WORLD}
    for world in ENVS:
        (out / world).mkdir(parents=True, exist_ok=True)
        index["worlds"][world] = []
        for seed, img in starts(world, n, seed0):
            name = f"{world}/seed{seed}.png"
            img.save(out / name, optimize=True)
            index["worlds"][world].append({"file": name, "seed": seed})
    (out / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return index


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--seed0", type=int, default=3_000_000)
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args(argv)
    index = write(a.out, a.n, a.seed0)
    print(f"wrote {sum(map(len, index['worlds'].values()))} start frames of {len(index['worlds'])} worlds and "
          f"index.json to {a.out}")


if __name__ == "__main__":
    main()
