"""The phases of bench/gpu_check.py, each run in its own subprocess (`python -m bench.gpu_check --phase NAME`).

Every phase appends result rows (dicts) to DIR/results.jsonl as it produces them (one line, flushed), so a phase
killed by its timeout still leaves what it measured. Shapes at the boundaries are commented as elsewhere.

    env          versions, GPU / CPU, the peak FLOP/s MFU is measured against
    parity       tiny (trained, models/tiny): CPU fp32 vs the device's fp32; each served precision / backend vs
                 strict fp32 (TF32 off) on the preset: token agreement, max |logit diff|, decoded-frame PSNR
    invariance   a seeded rollout alone vs the same rollout among rows-1 others, through the Engine
    engine       one configuration (backend:precision) at `rows` rows through the Engine: ms/step, frames/s, MFU,
                 GPU busy %, syncs per step; the bare model (step + sampler + decode, no engine) beside it
    tensorrt     TensorRT with one profile per graph (the rows bucket): parity vs eager and the engine's throughput
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
TINY_DIR = ROOT / "models" / "tiny"
# dense peaks (TFLOP/s) of the math each precision runs in, by device-name fragment: bf16/fp16 tensor cores;
# fp32 is served with TF32 (half the bf16 rate); fp8 doubles bf16 (compute capability >= 8.9); int8 weight-only
# computes in bf16
GPU_PEAK_BF16 = {"H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0,
                 "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "RTX 4090": 165.0}
GPU_SCALE = {"fp32": 0.5, "fp16": 1.0, "bf16": 1.0, "int8": 1.0, "fp8": 2.0}
CPU_PEAK_PER_CORE = {"fp32": 93.0, "bf16": 207.0, "fp16": 207.0, "int8": 207.0}  # GFLOP/s (int8: bf16's, stated)


class Results:
    def __init__(self, path: Path, phase: str):
        self.path, self.phase = path, phase

    def add(self, **row) -> None:
        row = {"phase": self.phase, "status": "ok", **row}
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=float) + "\n")
        print(json.dumps(row, default=float), flush=True)


def _version(mod: str) -> str:
    try:
        import importlib.metadata

        return importlib.metadata.version(mod)
    except Exception:
        return "absent"


def peak_flops(device: torch.device, precision: str) -> tuple[float, str]:
    """FLOP/s the MFU of `precision` on `device` is measured against, and where the figure comes from."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for frag, v in GPU_PEAK_BF16.items():
            if frag in name:
                scale = GPU_SCALE.get(precision, 1.0)
                return v * scale * 1e12, f"{name}: dense bf16 {v:.0f} TFLOP/s x {scale:g} ({precision})"
        return float("nan"), f"{name}: no peak in the table"
    cores = torch.get_num_threads()
    per = CPU_PEAK_PER_CORE.get(precision, 93.0)
    return per * cores * 1e9, f"CPU: {per:.0f} GFLOP/s per core x {cores} thread(s) ({precision})"


def phase_env(res: Results, a) -> None:
    dev = torch.device(a.device)
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": _version("triton"), "tensorrt": _version("tensorrt"), "onnxruntime": _version("onnxruntime"),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads()}
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True, timeout=10).stdout.strip()
    except Exception:
        info["commit"] = "?"
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        info |= {"gpu": p.name, "capability": f"{p.major}.{p.minor}", "gpu_mem_gib": round(p.total_memory / 2**30, 1),
                 "cudnn": torch.backends.cudnn.version()}
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception:
            info["driver"] = "?"
    else:
        flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        info["cpu_bf16"] = any(f in flags for f in (" avx512_bf16", " amx_bf16"))
        info["cpu_vnni"] = any(f in flags for f in (" avx512_vnni", " avx_vnni", " amx_int8"))
    info["peak_bf16"] = peak_flops(dev, "bf16")[1]
    res.add(config=a.device, note="; ".join(f"{k} {v}" for k, v in info.items()), **{"env": info})


# ---- building what serve builds -------------------------------------------------------------------------------
ARTIFACTS = [ROOT / "artifacts"]  # run_phase sets it from --artifact-dir


def prepared(preset: str | None, device: str, backend: str, precision: str, model_dir: Path | None = None):
    """The model exactly as `serve` prepares it (runtime.loader.prepare)."""
    from worldserve.runtime.loader import prepare
    from worldserve.settings import ModelSettings

    kw = {"dir": model_dir} if model_dir else {"preset": preset}
    ms = ModelSettings(**kw, device=device, backend=backend, precision=precision, warmup=False,
                       artifact_dir=ARTIFACTS[0])
    return prepare(ms)


def lockstep_parity(ref, model, steps: int, batch: int = 4, strict_ref: bool = True) -> dict:
    """Greedy rollout of `ref`; `model` (any device / precision / backend) is fed the same tokens, through the one
    lockstep loop (worldserve.runtime.parity). `ref` runs with TF32 off (strict fp32) when strict_ref.
    -> token agreement, max |logit diff|, decoded-frame PSNR (dB)."""
    from worldserve.runtime.parity import parity

    r = parity(ref, model, steps, batch, strict_ref=strict_ref)
    return {"token_agreement": r["token_agreement"], "max_logit_diff": r["max_logit_diff"], "psnr_db": r["frame_psnr"]}


def served_configs(device: str, quick: bool) -> list[tuple[str, str]]:
    """(backend, precision) pairs the check measures on `device`, most important first."""
    from worldserve.runtime.quantize import fp8_supported

    if torch.device(device).type == "cuda":
        fp8 = fp8_supported(device)
        return [("eager", "bf16"), ("compile", "bf16")] + ([("eager", "fp8")] if fp8 else []) + \
            [("eager", "fp32"), ("eager", "int8")] + ([("compile", "fp8")] if fp8 else [])
    return [("eager", "fp32"), ("eager", "bf16"), ("eager", "int8")] + ([] if quick else [("compile", "bf16")])


def phase_parity(res: Results, a) -> None:
    steps = 2 if a.quick else 8
    ref_cpu = prepared(None, "cpu", "eager", "fp32", TINY_DIR)
    here = prepared(None, a.device, "eager", "fp32", TINY_DIR)
    r = lockstep_parity(ref_cpu, here, steps, strict_ref=False)
    res.add(config=f"tiny (trained) CPU fp32 vs {a.device} fp32" + (" (TF32)" if here.device.type == "cuda" else ""),
            **r)
    ref = prepared(a.preset, a.device, "eager", "fp32")
    # the compiled bf16 graph last (its compile is the slow part); compiled fp8 is left to the engine phase
    configs = [c for c in served_configs(a.device, a.quick) if c[0] != "compile"] + [("compile", "bf16")]
    for backend, precision in configs if ref.device.type == "cuda" else served_configs(a.device, a.quick):
        if (backend, precision) == ("eager", "fp32") and ref.device.type != "cuda":
            continue  # the reference itself (on CUDA: TF32 vs strict fp32)
        t0 = time.perf_counter()
        try:
            m = ref if (backend, precision) == ("eager", "fp32") else prepared(a.preset, a.device, backend, precision)
            r = lockstep_parity(ref, m, steps)
            res.add(config=f"{a.preset} {backend} {precision} vs strict fp32", **r,
                    note=f"{steps} greedy steps, batch 4, {time.perf_counter() - t0:.0f} s")
        except Exception as e:  # one configuration failing leaves the others
            res.add(config=f"{a.preset} {backend} {precision} vs strict fp32", status=f"error: {type(e).__name__}",
                    note=str(e)[:200])
        if a.device.startswith("cuda"):
            torch.cuda.empty_cache()


# ---- the engine ----------------------------------------------------------------------------------------------
def _actions(spec, k: int, t: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if spec.action_dim:
        return rng.uniform(-1, 1, (k, t, spec.action_dim)).astype(np.float32)  # [K, T, A]
    return rng.integers(0, spec.n_actions, (k, t)).astype(np.int64)  # [K, T]


def _engine(model, rows: int):
    from worldserve.engine.engine import Engine
    from worldserve.runtime.batch import Sampler
    from worldserve.settings import EngineSettings

    return Engine(model, EngineSettings(max_slots=rows, max_candidates=rows, max_queue=rows * 2), sampler=Sampler())


def phase_invariance(res: Results, a) -> None:
    """The same seeded request (temperature 1) alone and among rows-1 other rows: fraction of equal tokens."""
    from worldserve.engine.engine import complete
    from worldserve.messages import FrameMode, RolloutRequest

    horizon = 3 if a.quick else 8
    for backend, precision in (("eager", "bf16"), ("eager", "fp32")) if a.device.startswith("cuda") else \
            (("eager", "fp32"), ("eager", "bf16")):
        model = prepared(a.preset, a.device, backend, precision)
        spec = model.spec
        ctx = np.random.default_rng(1).integers(0, 256, (2, spec.height, spec.width, 3), dtype=np.uint8)

        def req(i, k, seed, ctx=ctx, spec=spec):
            return RolloutRequest(f"r{i}", spec.name, ctx, _actions(spec, k, horizon, seed), frames=FrameMode.NONE,
                                  return_tokens=True, seed=seed, temperature=1.0)

        def tokens_of(events, rid):
            return np.stack([e.tokens for e in sorted((e for e in events if e.request_id == rid and not e.final),
                                                      key=lambda e: e.step)])  # [T, N]

        eng = _engine(model, a.rows)
        alone = tokens_of(complete(eng, [req("a", 1, 7)]), "ra")
        mixed = tokens_of(complete(eng, [req("b", 1, 7), req("c", a.rows - 1, 8)]), "rb")
        eq = alone == mixed
        res.add(config=f"{a.preset} {backend} {precision}: 1 row vs {a.rows} rows", token_agreement=float(eq.mean()),
                note=f"first step {eq[0].mean():.4f}, frames identical {float(eq.all(1).mean()):.3f} over {horizon} "
                     "steps (temperature 1, seeded)")
        del eng, model


def _gpu_busy_ms(fn, n: int) -> float:
    """Device time of the kernels fn() runs, per call (torch.profiler, n calls)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    from torch.autograd import DeviceType

    total_us = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA)
    return total_us / 1e3 / n


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def phase_engine(res: Results, a) -> None:
    backend, precision = a.config.split(":")
    t0 = time.perf_counter()
    measure_engine(res, a, prepared(a.preset, a.device, backend, precision), backend, precision, t0)


def measure_engine(res: Results, a, model, backend: str, precision: str, t0: float) -> None:
    """The engine at a.rows rows of one request (frames every step) vs the bare model, one row of results."""
    from worldserve.messages import FrameMode, RolloutRequest
    from worldserve.model.dynamics import advance
    from worldserve.runtime.batch import Sampler

    warm, steps = (1, 2) if a.quick else (5, 20)
    dev = model.device
    spec, rows = model.spec, a.rows
    flops = model.flops_per_frame()
    step_flops = (flops["dynamics_step"] + flops.get("decode", 0.0)) * rows
    peak, peak_src = peak_flops(dev, precision)
    eng = _engine(model, rows)
    w = spec.context_window  # a full window of context: every measured step attends to W frames (steady state)
    ctx = np.random.default_rng(1).integers(0, 256, (w, spec.height, spec.width, 3), dtype=np.uint8)
    horizon = min(spec.max_horizon, warm + steps + 10)
    eng.submit(RolloutRequest("bench", spec.name, ctx, _actions(spec, rows, horizon, 3), frames=FrameMode.ALL, seed=1,
                              temperature=1.0))
    # the bare model beside it: step + the same sampler + advance + decode of every row, no engine
    sampler, cache = Sampler(), model.allocate_cache(rows)
    slots = torch.arange(rows, device=dev)
    toks = torch.randint(0, spec.vocab_size, (rows, w, spec.tokens_per_frame), device=dev)  # int64 [B, W, N]
    acts, known = model.unknown_actions(rows, w - 1, dev)
    model.prefill(cache, slots, toks, acts, known)
    act = torch.as_tensor(_actions(spec, rows, 1, 5)[:, 0], device=dev)  # [B] | [B, A]
    z, temp = torch.zeros(rows, dtype=torch.int64, device=dev), torch.ones(rows, device=dev)

    def bare():
        logits, _, _ = model.step(cache, slots, act)
        nxt = sampler(logits, temp, z, z, z)
        advance(cache, slots, nxt)
        model.decode(nxt)

    def timed(fn) -> float:
        t = time.perf_counter()
        fn()
        _sync(dev)
        return (time.perf_counter() - t) * 1e3

    for _ in range(warm):  # admission (encode, prefill, fork) + compile / warm-up of the rows bucket
        eng.step()
        bare()
    _sync(dev)
    e_ms, b_ms = [], []
    for _ in range(steps):  # interleaved, medians: a shared machine's load hits both alike
        e_ms.append(timed(eng.step))
        b_ms.append(timed(bare))
    eng_ms, bare_ms = float(np.median(e_ms)), float(np.median(b_ms))
    row = {"ms_step": eng_ms, "frames_s": rows / eng_ms * 1e3, "mfu": step_flops / (eng_ms / 1e3) / peak,
           "engine_vs_bare": bare_ms / eng_ms}
    busy_err = ""
    if dev.type == "cuda":  # (engine.syncs counts nothing on the CPU: no row there)
        from worldserve.engine.syncs import syncs_per_step

        c = syncs_per_step(eng, steps=3)  # sync debug mode's flagged calls + the step's one device -> host wait
        row["syncs_step"] = c.per_step
        busy_err = f"syncs: {c.flagged} flagged + {c.waits} waits in 3 steps; "
        try:
            row["gpu_busy"] = _gpu_busy_ms(eng.step, 3) / eng_ms
        except Exception as e:
            busy_err += f"GPU busy n/a (profiler: {type(e).__name__}: {str(e)[:80]}); "
    res.add(config=f"{a.preset} {backend} {precision} @ {rows} rows", **row,
            note=f"{busy_err}bare {bare_ms:.2f} ms/step; MFU vs {peak_src}; median of {steps} interleaved steps "
                 f"after {warm}; {time.perf_counter() - t0:.0f} s incl. build")


def phase_tensorrt(res: Results, a) -> None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        res.add(config="tensorrt", status="skipped", note="tensorrt is not installed (pip install "
                "'worldserve[tensorrt]')")
        return
    if not a.device.startswith("cuda"):
        res.add(config="tensorrt", status="skipped", note="TensorRT needs --device cuda")
        return
    from worldserve.runtime import trt_backend
    from worldserve.settings import ModelSettings

    precision = "bf16"
    eager = prepared(a.preset, a.device, "eager", precision)
    ms = ModelSettings(preset=a.preset, device=a.device, backend="tensorrt", precision=precision, warmup=False,
                       artifact_dir=ARTIFACTS[0])
    t0 = time.perf_counter()
    built = trt_backend.TrtWorldModel.build(eager, ms, a.rows, say=print, only=[a.rows])  # one profile per graph
    r = lockstep_parity(eager, built, 4, strict_ref=False)
    res.add(config=f"{a.preset} tensorrt {precision} vs eager {precision}", **r,
            note=f"one profile ({a.rows}) per graph, built in {time.perf_counter() - t0:.0f} s")
    measure_engine(res, a, built, "tensorrt", precision, t0)


PHASES = {"env": phase_env, "parity": phase_parity, "invariance": phase_invariance, "engine": phase_engine,
          "tensorrt": phase_tensorrt}


def run_phase(a) -> None:
    torch.set_grad_enabled(False)
    ARTIFACTS[0] = Path(a.artifact_dir)
    if a.threads:
        torch.set_num_threads(a.threads)
    PHASES[a.phase](Results(Path(a.out) / "results.jsonl", a.phase), a)
    sys.stdout.flush()
