"""GPU benchmark in one command: eager vs torch.compile + CUDA graphs vs fp8, Triton kernels vs references.

    .venv/bin/python -m bench.gpu_bench [--presets base large] [--batch 64] [--peak-tflops 989]

Per preset (random weights, bf16 unless --dtype says otherwise) and variant:
    eager      the PyTorch model
    compile    torch.compile mode reduce-overhead (CUDA graphs), static cache addresses
    fp8        `serve --precision fp8 --backend compile`: fp8 weights, activations scaled to fp8 per row inside
               each matmul (torch._scaled_mm), bf16 everywhere else; needs capability >= 8.9
Every variant is built by runtime.loader.prepare, as `serve` builds it. bench/gpu_check.py is the short check
(<= 6 min, through the engine); this is the longer model-level sweep.
It reports single-stream frames/s (batch 1: step + sampling + decode per frame), and at --batch the step
latency, frames/s and MFU = dynamics FLOPs per step / step time / peak dense bf16 FLOP/s of the GPU.
Then each Triton kernel against its PyTorch reference (time and agreement): sampling, FSQ, int8 matmul.
Writes bench/out/gpu.json and bench/out/gpu.md. Without CUDA it stops at once with a clear message.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "out"
# dense bf16 tensor-core peak (TFLOP/s) by device name fragment; --peak-tflops overrides
PEAK_BF16 = {"H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0,
             "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "RTX 4090": 165.0}


def require_cuda() -> None:
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_bench.py needs an NVIDIA GPU: torch.cuda.is_available() is False here "
                 f"(torch {torch.__version__}). Run it on a GPU machine with a CUDA build of torch "
                 "(pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128); "
                 "the CPU numbers come from bench/runtime_bench.py.")


def peak_tflops(override: float | None) -> tuple[float, str]:
    if override:
        return override, "--peak-tflops"
    name = torch.cuda.get_device_name()
    for frag, v in PEAK_BF16.items():
        if frag in name:
            return v, f"table entry {frag!r}"
    sys.exit(f"unknown GPU {name!r}: pass --peak-tflops (dense bf16) to compute MFU")


def timed(fn, warmup: int, reps: int) -> float:
    """Median seconds of fn() measured with CUDA events after warmup calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def make(preset: str, variant: str, dtype: torch.dtype):
    """The model exactly as `serve` builds it (runtime.loader.prepare): eager / compile at --dtype, fp8 = `serve
    --precision fp8 --backend compile` (fp8 weights, bf16 activations / attention / KV cache / logits)."""
    from worldserve.runtime.loader import prepare
    from worldserve.settings import ModelSettings

    precision = "fp8" if variant == "fp8" else {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    backend = "eager" if variant == "eager" else "compile"
    return prepare(ModelSettings(preset=preset, device="cuda", backend=backend, precision=precision, warmup=False))


@torch.no_grad()
def measure(model, batch: int, warmup: int, reps: int) -> dict:
    from worldserve.model.dynamics import advance
    from worldserve.runtime.batch import Sampler

    sample = Sampler()  # the serving sampler: the Triton kernel on CUDA
    cfg = model.cfg
    cache = model.allocate_cache(batch)
    slots = torch.arange(batch, device="cuda")
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.window, cfg.tokens_per_frame), device="cuda")
    acts, known = model.unknown_actions(batch, cfg.window - 1, "cuda")
    model.prefill(cache, slots, tokens, acts, known)
    a = (torch.rand(batch, cfg.action_dim, device="cuda") if cfg.continuous
         else torch.randint(0, cfg.n_actions, (batch,), device="cuda"))
    z, temp = torch.zeros(batch, dtype=torch.int64, device="cuda"), torch.ones(batch, device="cuda")

    def step():
        model.step(cache, slots, a)

    def frame():
        logits, _, _ = model.step(cache, slots, a)
        nxt = sample(logits, temp, z, z, z)
        advance(cache, slots, nxt)
        model.decode(nxt)

    t_step = timed(step, warmup, reps)
    t_frame = timed(frame, warmup, reps)
    return {"step_ms": 1e3 * t_step, "frame_ms": 1e3 * t_frame, "frames_per_s": batch / t_frame,
            "step_flops": model.flops_per_frame()["dynamics_step"] * batch}


def _compare(name: str, fast, ref, agreement: float, warmup: int, reps: int) -> dict:
    return {"kernel": name, "agreement": agreement, "triton_ms": 1e3 * timed(fast, warmup, reps),
            "reference_ms": 1e3 * timed(ref, warmup, reps)}


@torch.no_grad()
def kernels(vocab: int, levels, warmup: int, reps: int) -> list[dict]:
    from functools import partial

    from worldserve.kernels.fsq import fsq_indices, fsq_indices_reference
    from worldserve.kernels.int8_matmul import int8_matmul
    from worldserve.kernels.sampling import triton_sample
    from worldserve.model.sampling import sample
    from worldserve.model.tokenizer import FSQ
    from worldserve.runtime.quantize import int8_linear_reference, quantize_int8

    rows = []
    b, n = 64, 64
    logits = torch.randn(b, n, vocab, device="cuda") * 3  # [B, N, V]
    seed = torch.arange(b, device="cuda") * 7919
    args = (logits, torch.ones(b, device="cuda"), seed, torch.zeros_like(seed), torch.full_like(seed, 3))
    agree = float((triton_sample(*args) == sample(*args)).float().mean())
    rows.append(_compare(f"sampling [{b}, {n}, {vocab}]", partial(triton_sample, *args), partial(sample, *args),
                         agree, warmup, reps))
    fsq = FSQ(tuple(levels)).cuda()
    zz = torch.randn(b * n * 16, len(levels), device="cuda") * 2  # [M, D]
    agree = float((fsq_indices(zz, levels) == fsq_indices_reference(zz, fsq)).float().mean())
    rows.append(_compare(f"fsq [{zz.shape[0]}, {len(levels)}]", partial(fsq_indices, zz, levels),
                         partial(fsq_indices_reference, zz, fsq), agree, warmup, reps))
    for m, k, nn in [(4096, 1024, 4096), (4096, 4096, 1024), (64, 1024, 3072)]:
        q, s = quantize_int8(torch.randn(nn, k, device="cuda"))
        mm_args = (torch.randn(m, k, device="cuda", dtype=torch.bfloat16), q, s, torch.randn(nn, device="cuda"))
        ref = int8_linear_reference(*mm_args).float()
        err = float((int8_matmul(*mm_args).float() - ref).norm() / ref.norm())
        rows.append(_compare(f"int8 matmul bf16 [{m}, {k}] x [{k}, {nn}] (1 - rel. error)",
                             partial(int8_matmul, *mm_args), partial(int8_linear_reference, *mm_args), 1.0 - err,
                             warmup, reps))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["base", "large"])
    p.add_argument("--variants", nargs="+", default=["eager", "compile", "fp8"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak of this GPU (default: from a table)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=str(OUT))
    a = p.parse_args(argv)
    require_cuda()
    from worldserve.model.config import PRESETS
    from worldserve.runtime.quantize import fp8_supported

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    peak, peak_src = peak_tflops(a.peak_tflops)
    gpu = torch.cuda.get_device_name()
    rows = []
    for preset in a.presets:
        for variant in a.variants:
            if variant == "fp8" and not fp8_supported("cuda"):
                print(f"skip fp8: {gpu} has compute capability {torch.cuda.get_device_capability()} (< 8.9)")
                continue
            t0 = time.perf_counter()
            model = make(preset, variant, dtype)
            single = measure(model, 1, a.warmup, a.reps)
            full = measure(model, a.batch, a.warmup, a.reps)
            mfu = full["step_flops"] / (full["step_ms"] / 1e3) / (peak * 1e12)
            r = {"preset": preset, "variant": variant, "dtype": a.dtype, "single_stream_fps": single["frames_per_s"],
                 "single_frame_ms": single["frame_ms"], "batch": a.batch, "step_ms": full["step_ms"],
                 "frames_per_s": full["frames_per_s"], "mfu": mfu, "wall_s": time.perf_counter() - t0}
            rows.append(r)
            print(f"{preset:5s} {variant:8s} single-stream {r['single_stream_fps']:8.1f} fps | batch {a.batch}: step "
                  f"{r['step_ms']:7.2f} ms, {r['frames_per_s']:8.1f} frames/s, MFU {100 * mfu:5.1f}%", flush=True)
            del model
            torch.cuda.empty_cache()
    cfg = PRESETS[a.presets[0]]
    krows = kernels(cfg.vocab_size, cfg.fsq_levels, a.warmup, a.reps)
    for k in krows:
        print(f"{k['kernel']:40s} triton {k['triton_ms']:8.3f} ms  reference {k['reference_ms']:8.3f} ms  "
              f"agreement {k['agreement']:.6f}")
    md = [f"GPU: {gpu}; peak dense bf16 {peak:.0f} TFLOP/s ({peak_src}); torch {torch.__version__}; "
          f"median of {a.reps} after {a.warmup} warmup.", "",
          f"| preset | variant | single-stream frames/s | step @ {a.batch} (ms) | frames/s @ {a.batch} "
          f"| MFU @ {a.batch} |",
          "|---|---|---:|---:|---:|---:|"]
    md += [f"| {r['preset']} | {r['variant']} ({r['dtype']}) | {r['single_stream_fps']:.1f} | {r['step_ms']:.2f} | "
           f"{r['frames_per_s']:.1f} | {100 * r['mfu']:.1f}% |" for r in rows]
    md += ["", "| kernel | Triton (ms) | PyTorch reference (ms) | agreement |", "|---|---:|---:|---:|"]
    md += [f"| {k['kernel']} | {k['triton_ms']:.3f} | {k['reference_ms']:.3f} | {k['agreement']:.6f} |" for k in krows]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"gpu": gpu, "peak_bf16_tflops": peak, "torch": torch.__version__, "argv": argv or sys.argv[1:]}
    (out / "gpu.json").write_text(json.dumps({"meta": meta, "rows": rows, "kernels": krows}, indent=2) + "\n")
    (out / "gpu.md").write_text("\n".join(md) + "\n")
    print("\n" + "\n".join(md))


if __name__ == "__main__":
    main()
