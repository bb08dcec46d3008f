"""The cached step with an older commit's attention vs this tree's, interleaved in one process.

    .venv/bin/python -m bench.step_ab --rev 506f53a [--rounds 30] [--batch 64] [--short 8] [--preset base]

`--rev`'s `model/dynamics.attention` is loaded from git (bench/load_engine.from_commit) and swapped in for this
tree's around `model.step` of the bundled model at its pin (eager bf16 on a CPU with AVX-512 BF16), on a cache
prefilled with full windows (bench/runtime_bench.Runner), and again with `--short` rows at frame 2 (windows of 3
frames: rows with masked keys). Rounds alternate the order. Prints the median step time of each and old ÷ new;
--preset: a random-weight preset at bf16 instead. Writes bench/reports/step_ab[-<preset>]-b<batch>.md
(bench/reports/step_ab.md: the run of 2026-12-07).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import worldserve.model.dynamics as dyn  # noqa: E402
from bench.load_engine import from_commit  # noqa: E402
from bench.runtime_bench import Runner  # noqa: E402
from worldserve.runtime.choose import machine_features  # noqa: E402
from worldserve.runtime.host_malloc import tune_malloc  # noqa: E402
from worldserve.runtime.loader import prepare  # noqa: E402
from worldserve.settings import ModelSettings  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rev", required=True, help="the commit whose attention is the 'old' one")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--short", type=int, default=8, help="rows at frame 2 in the second case")
    p.add_argument("--model-dir", default=str(ROOT / "models" / "tiny"))
    p.add_argument("--preset", default=None, help="a random-weight preset (e.g. base) at bf16 instead of --model-dir")
    p.add_argument("--out", default=None, help="default bench/reports/step_ab-b<batch>.md")
    a = p.parse_args()
    name = a.preset or Path(a.model_dir).name
    a.out = a.out or str(ROOT / "bench" / "reports" / f"step_ab{'-' + a.preset if a.preset else ''}-b{a.batch}.md")
    torch.set_num_threads(1)
    tune_malloc()  # as every engine process does
    ms = (ModelSettings(preset=a.preset, precision="bf16", warmup=False) if a.preset
          else ModelSettings(dir=Path(a.model_dir), warmup=False))
    model = prepare(ms)
    fns = {"old": from_commit(a.rev, "model/dynamics.py", "attention"), "new": dyn.attention}
    r = Runner(model, a.batch)
    full = r.start.clone()
    short = full.clone()
    short[: a.short] = 2
    for _ in range(3):
        r.once()
    times: dict = {}
    for i in range(a.rounds):
        for arm in ("old", "new") if i % 2 == 0 else ("new", "old"):
            dyn.attention = fns[arm]
            for case, start in (("full windows", full), (f"{a.short} short windows", short)):
                r.start = start
                times.setdefault((case, arm), []).append(r.once()[0])
    dyn.attention = fns["new"]
    t_run = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [f"## The cached step, attention of {a.rev} vs this tree", "",
             f"`python -m bench.step_ab --rev {a.rev} --rounds {a.rounds} --batch {a.batch} --short {a.short}"
             f"{' --preset ' + a.preset if a.preset else ''}` "
             f"({t_run}; {name} at {ms.backend} {ms.precision}, 1 thread, {a.batch} rows; "
             f"CPU features {', '.join(sorted(machine_features('cpu')))}).", "",
             "| case | old step (ms) | new step (ms) | old ÷ new |", "|---|---:|---:|---:|"]
    for case in dict.fromkeys(c for c, _ in times):
        o, n = (statistics.median(times[(case, x)]) for x in ("old", "new"))
        print(f"{case:18s} old {o * 1e3:7.1f} ms, new {n * 1e3:7.1f} ms, old/new {o / n:.3f}")
        lines.append(f"| {case} | {o * 1e3:.1f} | {n * 1e3:.1f} | **{o / n:.2f}** |")
    Path(a.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
