"""CPU runtime benchmark: eager, torch.compile, ONNX Runtime, int8 (eager and ONNX Runtime) on tiny and base.

    .venv/bin/python -m bench.runtime_bench [--presets tiny base] [--batches 1 64] [--base-batches 1 8]

For each preset and backend, at each batch size: the dynamics step latency (ms, median of --reps after
--warmup steps) and frames/s = batch / (step + sampling + decode), i.e. finished frames out of the model.
Random weights of the preset (the compute is what is measured). Written to bench/out/runtime_cpu.json and
bench/out/runtime_cpu.md and printed. All rows are measured in one run on one machine state.
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

from worldserve.model.config import PRESETS
from worldserve.model.dynamics import advance
from worldserve.model.sampling import sample
from worldserve.model.world_model import build
from worldserve.settings import ModelSettings

BACKENDS = ("eager", "compile", "onnxruntime", "int8", "onnxruntime-int8")
OUT = Path(__file__).resolve().parent / "out"


def make(preset: str, backend: str, artifact_dir: Path):
    model = build(PRESETS[preset], seed=0)
    if backend == "compile":
        from worldserve.runtime.compiled import compile_model

        return compile_model(model)
    if backend in ("int8", "onnxruntime-int8"):
        from worldserve.runtime.quantize import quantize_model

        model = quantize_model(model, "int8", inplace=True)
    if backend.startswith("onnxruntime"):
        from worldserve.runtime.onnx_backend import OnnxWorldModel

        return OnnxWorldModel.build(model, ModelSettings(backend="onnxruntime", artifact_dir=artifact_dir))
    return model


@torch.no_grad()
def measure(model, batch: int, warmup: int, reps: int) -> dict:
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    cache = model.allocate_cache(batch)
    slots = torch.arange(batch)
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.window, cfg.tokens_per_frame), generator=g)
    acts, known = model.unknown_actions(batch, cfg.window - 1)
    model.prefill(cache, slots, tokens, acts, known)  # a full window: steady-state attention cost
    if cfg.continuous:
        step_acts = [torch.rand(batch, cfg.action_dim, generator=g) * 2 - 1 for _ in range(warmup + reps)]
    else:
        step_acts = [torch.randint(0, cfg.n_actions, (batch,), generator=g) for _ in range(warmup + reps)]
    zeros, temp = torch.zeros(batch, dtype=torch.int64), torch.ones(batch)
    step_t, frame_t, first = [], [], 0.0
    for i, a in enumerate(step_acts):
        t0 = time.perf_counter()
        logits, _, _ = model.step(cache, slots, a)
        t1 = time.perf_counter()
        nxt = sample(logits, temp, zeros, zeros, zeros + i)
        advance(cache, slots, nxt)
        model.decode(nxt)
        t2 = time.perf_counter()
        if i == 0:
            first = t2 - t0  # includes compilation for the compile backend
        if i >= warmup:
            step_t.append(t1 - t0)
            frame_t.append(t2 - t0)
    step_s, frame_s = statistics.median(step_t), statistics.median(frame_t)
    return {"step_ms": 1e3 * step_s, "frame_ms": 1e3 * frame_s, "frames_per_s": batch / frame_s, "reps": reps,
            "first_frame_s": first}


def table(rows: list[dict]) -> str:
    out = ["| preset | backend | batch | step latency (ms) | frame latency (ms) | frames/s | build (s) "
           "| first frame (s) |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['preset']} | {r['backend']} | {r['batch']} | {r['step_ms']:.2f} | {r['frame_ms']:.2f} | "
                   f"{r['frames_per_s']:.1f} | {r['build_s']:.1f} | {r['first_frame_s']:.1f} |")
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "base"])
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--batches", nargs="+", type=int, default=[1, 64], help="batch sizes for tiny")
    p.add_argument("--base-batches", nargs="+", type=int, default=[1, 64], help="batch sizes for base / large")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--artifact-dir", default="artifacts")
    p.add_argument("--out", default=str(OUT))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = []
    for preset in a.presets:
        batches = a.batches if preset == "tiny" else a.base_batches
        for backend in a.backends:
            t0 = time.perf_counter()
            model = make(preset, backend, Path(a.artifact_dir))
            build_s = time.perf_counter() - t0
            for b in batches:
                t1 = time.perf_counter()
                r = {"preset": preset, "backend": backend, "batch": b, "build_s": build_s,
                     **measure(model, b, a.warmup, a.reps)}
                r["measure_s"] = time.perf_counter() - t1
                rows.append(r)
                print(f"{preset:5s} {backend:12s} batch {b:3d}: step {r['step_ms']:9.2f} ms, "
                      f"{r['frames_per_s']:8.1f} frames/s  (build {build_s:.0f} s, measured in {r['measure_s']:.0f} s)",
                      flush=True)
            del model
    meta = {
        "command": "python -m bench.runtime_bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": a.threads,
        "torch": torch.__version__, "load_average_at_end": os.getloadavg(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "runtime_cpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    md = table(rows) + f"\n\n{meta['cores']} cores, {a.threads} threads, torch {meta['torch']}, load average at end " \
        f"{meta['load_average_at_end'][0]:.2f}; median of {a.reps} steps after {a.warmup} warmup.\n"
    (out / "runtime_cpu.md").write_text(md)
    print("\n" + md)


if __name__ == "__main__":
    main()
