"""CPU runtime benchmark: backend (eager / compile / onnxruntime) x precision (fp32 / bf16 / int8) on tiny and base.

    .venv/bin/python -m bench.runtime_bench [--presets tiny base] [--batches 1 64] [--base-batches 1 16]

Every configuration is built the way `worldserve serve` builds it (runtime.loader.prepare on the preset's random
weights); a combination the loader refuses at start-up is listed with the reason. For each preset and batch, all
configurations are measured in interleaved rounds (one step of each, then the next round), so a change in the
machine's load hits every configuration alike and the ratios within a table are comparable even on a shared
machine. Per configuration:

    step latency    one `model.step` over the batch, full KV window (8 frames) to attend to (median of --reps)
    frame latency   step + sampling (the engine's sampler, temperature 1) + decode of every row
    frame / step    how much of a frame is the model step
    frames/s        batch / frame latency
    vs fp32         frames/s over eager fp32 of the same preset and batch (same rounds)

Written to bench/out/runtime_cpu.json and bench/out/runtime_cpu.md and printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from worldserve.model.config import ConfigurationError
from worldserve.model.sampling import sample
from worldserve.runtime.host_malloc import tune_malloc
from worldserve.runtime.loader import prepare
from worldserve.settings import ModelSettings

BACKENDS = ("eager", "compile", "onnxruntime")
PRECISIONS = ("fp32", "bf16", "int8")
OUT = Path(__file__).resolve().parent / "out"


class Runner:
    """One configuration at one batch: its cache prefilled with a full window, then step + sample + decode."""

    def __init__(self, model, batch: int, seed: int = 0):
        cfg = model.cfg
        self.model, self.batch, self.i = model, batch, 0
        g = torch.Generator().manual_seed(seed)
        self.cache = model.allocate_cache(batch)
        self.slots = torch.arange(batch)
        tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.window, cfg.tokens_per_frame), generator=g)
        acts, known = model.unknown_actions(batch, cfg.window - 1)
        model.prefill(self.cache, self.slots, tokens, acts, known)  # a full window: steady-state attention cost
        if cfg.continuous:
            self.acts = [torch.rand(batch, cfg.action_dim, generator=g) * 2 - 1 for _ in range(8)]
        else:
            self.acts = [torch.randint(0, cfg.n_actions, (batch,), generator=g) for _ in range(8)]
        self.zeros, self.temp = torch.zeros(batch, dtype=torch.int64), torch.ones(batch)
        self.start = self.cache.frames.clone()

    @torch.no_grad()
    def once(self) -> tuple[float, float]:
        """(step seconds, frame seconds); the cache's frame counters are reset so every call sees a full window."""
        self.cache.frames.copy_(self.start)
        a = self.acts[self.i % len(self.acts)]
        t0 = time.perf_counter()
        logits, _, _ = self.model.step(self.cache, self.slots, a)
        t1 = time.perf_counter()
        nxt = sample(logits, self.temp, self.zeros, self.zeros, self.zeros + self.i)
        self.cache.last_tokens[self.slots] = nxt
        self.model.decode(nxt)
        t2 = time.perf_counter()
        self.i += 1
        return t1 - t0, t2 - t0


def build(preset: str, backend: str, precision: str, artifact_dir: Path):
    ms = ModelSettings(preset=preset, backend=backend, precision=precision, artifact_dir=artifact_dir, warmup=False)
    t0 = time.perf_counter()
    try:
        model = prepare(ms)
    except ConfigurationError as e:  # refused at start-up (runtime/support.py): reported, not measured
        return None, str(e), 0.0
    return model, "", time.perf_counter() - t0


def measure_preset(preset: str, batches: list[int], configs, a) -> list[dict]:
    models, rows = {}, []
    for backend, precision in configs:
        model, refused, build_s = build(preset, backend, precision, Path(a.artifact_dir))
        if model is None:
            rows.append({"preset": preset, "backend": backend, "precision": precision, "refused": refused})
            print(f"{preset:5s} {backend:11s} {precision:5s} refused: {refused}", flush=True)
            continue
        models[(backend, precision)] = (model, build_s)
    for b in batches:
        runners, first = {}, {}
        for key, (model, _) in models.items():
            runners[key] = Runner(model, b)
            t0 = time.perf_counter()
            runners[key].once()  # first frame: compiles this shape for `compile`
            first[key] = time.perf_counter() - t0
            for _ in range(a.warmup - 1):
                runners[key].once()
        times = {key: [] for key in runners}
        for _ in range(a.reps):  # interleaved rounds
            for key, r in runners.items():
                times[key].append(r.once())
        base_fps = None
        for (backend, precision), ts in times.items():
            step_s = statistics.median(t[0] for t in ts)
            frame_s = statistics.median(t[1] for t in ts)
            row = {"preset": preset, "backend": backend, "precision": precision, "batch": b, "step_ms": 1e3 * step_s,
                   "frame_ms": 1e3 * frame_s, "frame_over_step": frame_s / step_s, "frames_per_s": b / frame_s,
                   "build_s": models[(backend, precision)][1], "first_frame_s": first[(backend, precision)],
                   "reps": a.reps}
            if (backend, precision) == ("eager", "fp32"):
                base_fps = row["frames_per_s"]
            row["vs_fp32"] = row["frames_per_s"] / base_fps if base_fps else float("nan")
            rows.append(row)
            print(f"{preset:5s} {backend:11s} {precision:5s} batch {b:3d}: step {row['step_ms']:9.2f} ms, frame "
                  f"{row['frame_ms']:9.2f} ms, {row['frames_per_s']:8.1f} frames/s, x{row['vs_fp32']:.2f} vs fp32",
                  flush=True)
        del runners
    return rows


def table(rows: list[dict]) -> str:
    out = ["| preset | backend | precision | batch | step (ms) | frame (ms) | frame / step | frames/s | vs eager fp32 "
           "| build (s) | first frame (s) |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "refused" in r:
            continue
        out.append(f"| {r['preset']} | {r['backend']} | {r['precision']} | {r['batch']} | {r['step_ms']:.1f} | "
                   f"{r['frame_ms']:.1f} | {r['frame_over_step']:.2f} | {r['frames_per_s']:.1f} | "
                   f"{r['vs_fp32']:.2f}x | {r['build_s']:.1f} | {r['first_frame_s']:.1f} |")
    refused = sorted({f"- {r['preset']} {r['backend']} {r['precision']}: {r['refused']}" for r in rows
                      if "refused" in r})
    return "\n".join(out) + ("\n\nRefused at start-up:\n" + "\n".join(refused) if refused else "")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "base"])
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    p.add_argument("--batches", nargs="+", type=int, default=[1, 64], help="batch sizes for tiny")
    p.add_argument("--base-batches", nargs="+", type=int, default=[1, 16], help="batch sizes for base / large")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--artifact-dir", default="artifacts")
    p.add_argument("--out", default=str(OUT))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    tune_malloc()  # as every engine process does: no page faults in the timed steps
    configs = [(b, pr) for b in a.backends for pr in a.precisions]
    if ("eager", "fp32") in configs:  # the reference first: every other row is compared with it
        configs.remove(("eager", "fp32"))
        configs.insert(0, ("eager", "fp32"))
    t0 = time.time()
    rows = []
    for preset in a.presets:
        rows += measure_preset(preset, a.batches if preset == "tiny" else a.base_batches, configs, a)
    meta = {
        "command": "python -m bench.runtime_bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": a.threads,
        "torch": torch.__version__, "load_average_at_end": os.getloadavg(), "minutes": (time.time() - t0) / 60,
        "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "runtime_cpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    md = table(rows) + f"\n\n{meta['cores']} cores, {a.threads} thread(s), torch {meta['torch']}, {meta['time']}, " \
        f"{meta['minutes']:.0f} min, load average at end {meta['load_average_at_end'][0]:.2f}; median of {a.reps} " \
        f"interleaved rounds after {a.warmup} warm-up frames.\n"
    (out / "runtime_cpu.md").write_text(md)
    print("\n" + md)


if __name__ == "__main__":
    main()
