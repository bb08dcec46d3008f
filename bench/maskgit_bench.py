"""What MaskGIT passes cost (issue 19): frames/s by pass count, and the engine's own overhead per pass.

    .venv/bin/python -m bench.maskgit_bench [--rows 64] [--base-rows 4] [--passes 1 2 4 8 16] [--frames 4]

1. Frames/s by pass count: the engine (service/engine/engine.py + engine/frames.py, the serving path) runs one
   request of --rows candidates, latent-only (no frame decoding: the passes' cost alone), temperature 1, the model's
   passes set to P (lab/knobs.configure: same weights, only the decoding knob). Timed from the first complete frame
   of every row to the last (admission and prefill excluded): frames/s = rows x frames / seconds.
   - tiny scale: the shipped models/maskgit (d=128 trunk, 2-layer d=128 head, 64 codes);
   - base scale: the `base` preset (d=512, 8 layers, FSQ 64,000 codes, continuous actions) with a frame head of 2
     layers d=512, random weights (speed only; no base-scale MaskGIT preset exists in model/config.py).
2. The engine's own overhead per pass at --rows rows: engine seconds per frame at P passes = a + b P (least squares
   over the pass counts); b is the engine's time per pass. The bare frame-head call (`model.fill` at the same rows,
   median of --reps) is a model pass; overhead per pass = b - fill (the pass's sampling and unmasking, inputs,
   bookkeeping), as a share of the fill. Goal <= 5 %. The bare trunk call (`model.begin`) is shown beside `a`.
One thread; every figure of the report comes from one run (the machine is shared: compare within a run).
Written to bench/reports/maskgit_bench.md and printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from worldserve.engine.engine import Engine
from worldserve.lab.knobs import configure
from worldserve.messages import FrameMode, RolloutRequest
from worldserve.model.config import PRESETS
from worldserve.model.io import load_model_dir
from worldserve.model.maskgit import unmask_pass
from worldserve.model.world_model import build
from worldserve.settings import EngineSettings

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "bench" / "reports" / "maskgit_bench.md"


def base_maskgit():
    """The base preset with a MaskGIT frame head (random weights), 8 passes by default."""
    cfg = dataclasses.replace(PRESETS["base"], name="base-maskgit", decoding="maskgit", passes=8, head_layers=2,
                              head_d_model=512, head_heads=8, schedule="sequential", confidence="max",
                              choice_noise=0.0)
    return build(cfg, seed=0).eval()


def _actions(model, rows: int, horizon: int) -> np.ndarray:
    sp = model.spec
    if sp.action_dim:
        return np.zeros((rows, horizon, sp.action_dim), np.float32)  # continuous [K, T, A]
    return np.zeros((rows, horizon), np.int64)  # discrete [K, T]


def engine_seconds_per_frame(model, rows: int, frames: int) -> float:
    """Engine seconds per frame (all rows) in steady state: one request of `rows` candidates, latent-only."""
    eng = Engine(model, EngineSettings(max_slots=rows, max_queue=4, max_candidates=rows))
    sp = model.spec
    ctx = np.zeros((2, sp.height, sp.width, 3), np.uint8)
    eng.submit(RolloutRequest("b", sp.name, ctx, _actions(model, rows, frames + 1), frames=FrameMode.NONE,
                              temperature=1.0))
    seen, t0 = 0, None
    while True:
        evs = eng.step()
        seen += sum(1 for e in evs if not e.final)
        if t0 is None and seen >= rows:  # every row has its first frame: steady state from here
            t0, seen = time.perf_counter(), 0
        if any(e.final for e in evs):
            break
    assert seen == rows * frames, (seen, rows, frames)
    return (time.perf_counter() - t0) / frames


def _median_s(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


@torch.no_grad()
def bare_calls(model, rows: int, reps: int) -> tuple[float, float, float]:
    """Seconds of the bare trunk call (`begin`), the bare frame-head call (`fill`, half the frame known) and the
    pass's sampling and unmasking (`unmask_pass` over fill's logits, temperature 1) at `rows` rows."""
    state = model.allocate_state(rows)
    slots = torch.arange(rows)
    sp = model.spec
    acts = torch.zeros(rows, sp.action_dim) if sp.action_dim else torch.zeros(rows, dtype=torch.int64)
    model.begin(state, slots, acts)
    n = sp.tokens_per_frame
    partial = torch.zeros(rows, n, dtype=torch.int64)
    known = torch.arange(n).expand(rows, n) < n // 2
    trunk = _median_s(lambda: model.begin(state, slots, acts), reps)
    fill = _median_s(lambda: model.fill(state, slots, partial, known), reps)
    logits = model.fill(state, slots, partial, known)
    z, one = torch.zeros(rows, dtype=torch.int64), torch.ones(rows)
    after = torch.full((rows,), n // 2 + 1, dtype=torch.int64)
    unmask = _median_s(lambda: unmask_pass(logits, partial, known, after, one, slots, z, z, z, sp.confidence,
                                           sp.choice_noise), reps)
    return trunk, fill, unmask


def fit(ps: list[int], ts: list[float]) -> tuple[float, float]:
    b, a = np.polyfit(np.asarray(ps, float), np.asarray(ts, float), 1)
    return float(a), float(b)


def bench(name: str, model, rows: int, passes: list[int], frames: int, reps: int) -> list[str]:
    trunk, fill, unmask = bare_calls(model, rows, reps)
    per_frame = {}
    lines = [f"### {name}: {rows} rows, vocabulary {model.spec.vocab_size}, default {model.spec.passes} passes", "",
             "| passes | frames/s | engine ms / frame | ms / frame per pass |", "|---|---|---|---|"]
    for p in passes:
        s = engine_seconds_per_frame(configure(model, f"passes={p}"), rows, frames)
        per_frame[p] = s
        lines.append(f"| {p} | {rows / s:.1f} | {1e3 * s:.1f} | {1e3 * s / p:.1f} |")
        print(lines[-1], flush=True)
    a, b = fit(list(per_frame), list(per_frame.values()))
    over = b - fill
    lines += ["", f"Engine time per frame = {1e3 * a:.1f} ms + {1e3 * b:.2f} ms x passes (least squares over "
              f"{', '.join(map(str, passes))} passes). Bare calls at {rows} rows (median of {reps}): trunk (`begin`) "
              f"{1e3 * trunk:.1f} ms, frame head (`fill`) {1e3 * fill:.2f} ms, the pass's sampling and unmasking "
              f"(`unmask_pass`, model/maskgit.py) {1e3 * unmask:.2f} ms. **Engine overhead per pass: {1e3 * over:.2f} "
              f"ms = {over / fill:+.1%} of a model pass** (goal <= 5 %), of which `unmask_pass` "
              f"{unmask / fill:.1%}, the engine's own bookkeeping {(over - unmask) / fill:+.1%}. Frames/s at 1 pass vs "
              f"{passes[-1]} passes: {per_frame[passes[-1]] / per_frame[passes[0]]:.1f}x.", ""]
    print("\n".join(lines[-2:]), flush=True)
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=64, help="rows of the tiny-scale model (the overhead goal's 64)")
    p.add_argument("--base-rows", type=int, default=4, help="rows of the base-scale model (0: skip it)")
    p.add_argument("--passes", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    p.add_argument("--frames", type=int, default=4, help="frames timed per pass count")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    lines = ["# MaskGIT passes: frames/s and the engine's overhead per pass", "",
             f"Command: `python -m bench.maskgit_bench --rows {a.rows} --base-rows {a.base_rows} --passes "
             f"{' '.join(map(str, a.passes))} --frames {a.frames} --reps {a.reps} --threads {a.threads}` "
             f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, main at {rev.strip()}, CPU, "
             f"{a.threads} thread(s), one run on a shared machine: compare within a table).", "",
             "Latent-only rollouts (no frame decoding), temperature 1, steady state (admission and prefill "
             "excluded). A frame costs the trunk once plus one frame-head pass per MaskGIT pass "
             "(engine/frames.py: one `fill` per engine iteration for every row, whatever pass it is at).", ""]
    lines += bench("tiny scale (models/maskgit, shipped)", load_model_dir(ROOT / "models" / "maskgit").eval(),
                   a.rows, a.passes, a.frames, a.reps)
    if a.base_rows:
        lines += bench("base scale (base preset + a 2-layer d=512 frame head, random weights)", base_maskgit(),
                       a.base_rows, a.passes, max(1, a.frames // 2), max(3, a.reps // 4))
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text("\n".join(lines) + "\n")
    print(f"wrote {REPORT}")


if __name__ == "__main__":
    main()
