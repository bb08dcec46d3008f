"""Where an engine step's time goes with within-frame passes, from a sampling profiler (py-spy) in one process: the
model's calls (the trunk's `begin`, the frame head's `fill`), the pass's sampling (`unmask_pass`) and everything
else the engine does (bookkeeping). The fitted per-pass figure of bench/maskgit_bench.py compares runs minutes apart;
this one splits the same run.

    .venv/bin/py-spy record -r 200 -f raw -o /tmp/prof-pass.txt -- .venv/bin/python -m bench.pass_profile run
    python -m bench.pass_profile report /tmp/prof-pass.txt

`run`: models/maskgit (fp32, 1 thread), one latent-only rollout of K = 64 candidates x 12 frames at temperature 1
(8 passes a frame: one trunk call and 7 fills).
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run() -> None:
    import numpy as np
    import torch

    from tests.unit.test_dynamic_model import _start
    from worldserve.engine.engine import Engine, complete
    from worldserve.messages import FrameMode, RolloutRequest
    from worldserve.model.io import load_model_dir
    from worldserve.settings import EngineSettings

    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    m = load_model_dir(ROOT / "models" / "maskgit")
    eng = Engine(m, EngineSettings(max_slots=64, max_candidates=64))
    acts = np.random.default_rng(0).integers(0, 3, (64, 12))
    complete(eng, [RolloutRequest("p", "maskgit", np.stack(_start(2)), acts, seed=1, temperature=1.0,
                                  frames=FrameMode.NONE)])


def report(path: str, passes: int = 8) -> None:
    tot: Counter = Counter()
    n = 0
    for line in Path(path).read_text().splitlines():
        stack, c = line.rstrip().rsplit(" ", 1)
        if "Engine.step" not in stack:
            continue
        n += int(c)
        for key in {f.split(" (")[0] for f in stack.split(";")}:
            tot[key] += int(c)
    model = tot["WorldModel.fill"] + tot["WorldModel.begin"]
    admit = tot["Engine._admit"]  # once per request (encode, prefill, fork), not per pass
    unmask = tot["unmask_pass"]
    rest = n - tot["WorldModel.fill"] - tot["WorldModel.begin"] - unmask - admit
    fills = passes - 1
    per_fill = tot["WorldModel.fill"] / fills
    fill, begin = tot["WorldModel.fill"], tot["WorldModel.begin"]
    print(f"Engine.step samples {n}: model calls {100 * model / n:.1f}% (fill {100 * fill / n:.1f}%, "
          f"begin {100 * begin / n:.1f}%), unmask_pass {100 * unmask / n:.1f}%, admission "
          f"{100 * admit / n:.1f}%, the rest {100 * rest / n:.1f}%")
    over, um = 100 * (unmask + rest) / fills / per_fill, 100 * unmask / fills / per_fill
    print(f"engine overhead per pass (unmask_pass + the rest, over {fills} fills a frame) = {over:.1f}% of a fill "
          f"(unmask_pass {um:.1f}%)")


if __name__ == "__main__":
    run() if sys.argv[1] == "run" else report(sys.argv[2])
