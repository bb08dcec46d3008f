"""The context cache (engine/context_cache.py) on vs off, the engine alone (no server, no clients to wait for).

    .venv/bin/python -m bench.context_cache [--chunk-s 4] [--pairs 4] [--rows 64]

A closed loop of `--rows` requests kept in flight in one engine (one finishes, the next is submitted in the same
step), each K=1 with 4 context frames (the peer bench's planners): W1 (H drawn from 4..16, latent only) and W2 (H=16,
a frame every step), every request the same context (what W1 / W2 send: planners at one state) or each its own
(`distinct`: no hit possible, the cache's cost alone). Two engines on the same model, one with the cache (its default
slots) and one without, run in alternating chunks of --chunk-s seconds (order swapped every pair), so drift of the
shared machine hits both alike. Reports frames/s of each and on ÷ off, the hits and the prefills.
Written to bench/reports/context_cache.md.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.load import context_frames  # noqa: E402
from worldserve.engine.engine import Engine  # noqa: E402
from worldserve.messages import FrameMode, RolloutRequest  # noqa: E402
from worldserve.runtime.host_malloc import tune_malloc  # noqa: E402
from worldserve.runtime.loader import prepare  # noqa: E402
from worldserve.settings import EngineSettings, ModelSettings  # noqa: E402


class Loop:
    """`rows` requests in flight in one engine; `run(seconds)` -> frames produced in that time."""

    def __init__(self, engine: Engine, workload: str, distinct: bool, rows: int, ctx: np.ndarray):
        self.eng, self.workload, self.distinct, self.rows, self.ctx = engine, workload, distinct, rows, ctx
        self.rng = np.random.default_rng(0)
        self.ids = itertools.count()
        self.prefills = 0
        self.live = 0

    def _submit(self) -> None:
        i = next(self.ids)
        h = 16 if self.workload == "W2" else int(self.rng.integers(4, 17))
        ctx = self.ctx
        if self.distinct:
            ctx = ctx.copy()
            ctx[0, 0, 0] = (i % 256, (i // 256) % 256, (i // 65536) % 256)
        frames = FrameMode.ALL if self.workload == "W2" else FrameMode.NONE
        spec = self.eng.spec
        acts = (self.rng.uniform(-1, 1, (1, h, spec.action_dim)).astype(np.float32) if spec.action_dim
                else self.rng.integers(0, spec.n_actions, (1, h)))
        self.eng.submit(RolloutRequest(f"r{i}", "m", ctx, acts, frames=frames))
        self.live += 1

    def run(self, seconds: float) -> int:
        frames, t_end = 0, time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            while self.live < self.rows:
                self._submit()
            for e in self.eng.step():
                if e.final:
                    self.live -= 1
                else:
                    frames += 1
        return frames

    def drain(self) -> None:
        while self.live:
            self.live -= sum(e.final for e in self.eng.step())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default=str(ROOT / "models" / "tiny"))
    p.add_argument("--preset", default=None, help="a random-weight preset (base, large) instead of --model-dir")
    p.add_argument("--chunk-s", type=float, default=4.0)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="default: bench/reports/context_cache[-PRESET].md")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(tune_malloc())  # as every engine process does (EngineSettings.tune_malloc)
    ms = ModelSettings(preset=a.preset, warmup=False) if a.preset else ModelSettings(dir=Path(a.model_dir),
                                                                                        warmup=False)
    model = prepare(ms)  # the model's pin, as `serve` serves it
    ctx = context_frames(8)[-4:]  # 64x64 frames: tiny's and the presets' size
    cache_slots = EngineSettings().context_cache_slots
    rows_md = []
    t_start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for workload, distinct in (("W1", False), ("W2", False), ("W1", True), ("W2", True)):
        loops = {on: Loop(Engine(model, EngineSettings(max_slots=a.rows, context_cache_slots=cache_slots if on else 0)),
                          workload, distinct, a.rows, ctx) for on in (True, False)}
        for lp in loops.values():
            lp.run(1.0)  # warm: the first requests' prefills, the allocator
        got = {on: [0, 0.0] for on in loops}
        for pair in range(a.pairs):
            for on in ((True, False) if pair % 2 == 0 else (False, True)):
                t0 = time.perf_counter()
                n = loops[on].run(a.chunk_s)
                got[on][0] += n
                got[on][1] += time.perf_counter() - t0
        for lp in loops.values():
            lp.drain()
        fps = {on: got[on][0] / got[on][1] for on in got}
        c = loops[True].eng.contexts
        label = f"{workload}{' distinct contexts' if distinct else ''}"
        print(f"{label:24s} cache on {fps[True]:7.1f} frames/s, off {fps[False]:7.1f}, on/off "
              f"{fps[True] / fps[False]:.3f} (hits {c.hits}, misses {c.misses})", flush=True)
        rows_md.append(f"| {label} | {fps[True]:.1f} | {fps[False]:.1f} | **{fps[True] / fps[False]:.2f}** | "
                       f"{c.hits} | {c.misses} |")
    md = ["## Context cache on vs off, the engine alone", "",
          f"`python -m bench.context_cache{' --preset ' + a.preset if a.preset else ''} --chunk-s {a.chunk_s:g} "
          f"--pairs {a.pairs} --rows {a.rows}` ({t_start}, "
          f"{os.cpu_count()} cores, {a.threads} torch thread(s), {platform.machine()}, torch {torch.__version__}; "
          f"{a.preset or Path(a.model_dir).name} at {ms.backend} {ms.precision}). {a.rows} K=1 requests in flight, "
          f"4 context frames each; W1: H 4-16, latent only; W2: H=16, a frame every step. The two engines "
          f"alternate in chunks of {a.chunk_s:g} s ({a.pairs} each).", "",
          "| workload | cache on frames/s | cache off frames/s | on ÷ off | hits | misses |",
          "|---|---:|---:|---:|---:|---:|",
          *rows_md, ""]
    out = Path(a.out or ROOT / "bench" / "reports" / f"context_cache{'-' + a.preset if a.preset else ''}.md")
    out.write_text("\n".join(md))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
