"""Write real starting frames for the /play page: service/api/static/starts/*.png + index.json.

Each PNG is the first observation (64x64 RGB) of a MiniGrid layout from held-out seeds (3,000,000 on: never
trained on, and apart from the planner's evaluation seeds). Deterministic: rerunning rewrites the same files.

    .venv/bin/python tools/make_start_frames.py [--n 8] [--seed0 3000000]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

from worldserve.lab.data.minigrid_env import Simulator, expert_action

OUT = Path(__file__).resolve().parent.parent / "service" / "api" / "static" / "starts"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--seed0", type=int, default=3_000_000)
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    starts, seed = [], a.seed0
    while len(starts) < a.n:
        sim = Simulator(seed)
        if expert_action(sim.env) is not None:  # only layouts where the goal can be reached
            name = f"seed{seed}.png"
            Image.fromarray(sim.frame()).save(a.out / name, optimize=True)
            starts.append({"file": name, "seed": seed})
        seed += 1
    (a.out / "index.json").write_text(json.dumps({"starts": starts}, indent=1) + "\n")
    print(f"wrote {len(starts)} start frames and index.json to {a.out}")


if __name__ == "__main__":
    main()
