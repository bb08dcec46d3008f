"""Runtime subcommands: `export` (build backend artifacts), `quantize` (quantize + quality gate + save) and `tune`
(measure and pin the fastest gated configuration: cli/tune.py)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..settings import EngineSettings


def _say(t0: float):
    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    return say


def cmd_export(a) -> None:
    import torch

    from ..runtime.loader import serving_model
    from ..settings import ModelSettings

    torch.set_num_threads(a.threads)
    say = _say(time.perf_counter())
    ms = ModelSettings(dir=Path(a.model_dir), device=a.device, backend=a.backend, precision=a.precision,
                       artifact_dir=Path(a.artifact_dir))
    say(f"loading {a.model_dir} on {a.device} at {ms.precision}")
    if a.backend == "tensorrt":
        try:
            import tensorrt  # noqa: F401
        except ImportError as e:
            raise SystemExit("backend 'tensorrt' needs the tensorrt package and an NVIDIA GPU "
                             "(pip install 'worldserve[tensorrt]'); it is not importable here") from e
    model = serving_model(ms)  # exactly the model `serve` loads at this precision (same weights hash, same key)
    if a.backend == "onnxruntime":
        from ..runtime.onnx_backend import OnnxWorldModel

        built = OnnxWorldModel.build(model, ms, say=say)
    else:
        from ..runtime.trt_backend import TrtWorldModel

        built = TrtWorldModel.build(model, ms, max_batch=a.max_slots, say=say)  # = serve's engine_max_batch
    if a.check_steps:
        from ..runtime.parity import parity

        say(f"checking against eager {ms.precision} ({a.check_steps} greedy steps, batch 4)")
        r = parity(model, built, a.check_steps)
        say(f"token agreement {100 * r['token_agreement']:.2f}%, max |logit diff| {r['max_logit_diff']:.2e}, "
            f"decoded frames {r['frame_psnr']:.1f} dB PSNR")
    say("done")


def cmd_quantize(a) -> None:
    import torch

    from ..model.io import load_model_dir, model_hash, sha256_file
    from ..runtime.quantize import quantize_model, save_quantized

    torch.set_num_threads(a.threads)
    say = _say(time.perf_counter())
    src = Path(a.model_dir)
    out = Path(a.out) if a.out else src.with_name(f"{src.name}-{a.precision}")
    say(f"loading {src}")
    model = load_model_dir(src, device=a.device)
    q = quantize_model(model, a.precision, progress=lambda i, n, name: say(f"  [{i}/{n}] {name}"))
    fp_bytes = sum(p.numel() * p.element_size() for p in model.dynamics.parameters())
    q_bytes = sum(t.numel() * t.element_size() for t in q.dynamics.state_dict().values())
    say(f"dynamics weights {fp_bytes / 1e6:.2f} MB -> {q_bytes / 1e6:.2f} MB")
    verdict = "not checked (--episodes 0)"
    if a.episodes:
        from ..lab.evaluate import evaluate, heldout_episodes, table
        from ..model.quality import gate_verdict, passes_gate

        say(f"quality gate: {a.episodes} held-out episodes, fp32 vs {a.precision}")
        eps = heldout_episodes(a.episodes)
        ref, res = evaluate(model, eps), evaluate(q, eps)
        ok = passes_gate(ref.model_psnr, res.model_psnr)
        print(table(ref) + "\n\n" + table(res, a.precision), flush=True)
        verdict = gate_verdict(ref.model_psnr, res.model_psnr, a.precision)
        say(verdict)
        if not ok and not a.force:
            say(f"not writing {out} (use --force to write it anyway)")
            sys.exit(1)
    source_sha = sha256_file(src / "model.safetensors")
    card = (f"# {model.cfg.name} — {a.precision} weight-only quantization\n\n"
            f"- Source: {src} (weights_sha256 {source_sha})\n"
            f"- Quantized layers: the dynamics transformer's linears (blocks + vocabulary head), per output channel\n"
            f"- Quality: {verdict}\n"
            f"- Made by: `worldserve quantize {src} --precision {a.precision}`\n")
    digest = save_quantized(q, out, source_sha, card)
    say(f"wrote {out} (sha256 {digest[:16]}…, source {model_hash(src)})")


def add_commands(sub) -> None:
    e = sub.add_parser("export", help="build backend artifacts (ONNX / TensorRT) for a model directory",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("model_dir")
    e.add_argument("--backend", choices=["onnxruntime", "tensorrt"], default="onnxruntime")
    e.add_argument("--precision", choices=["fp32", "fp16", "bf16", "int8", "fp8"],
                   help="default: the device's serving default (bf16 on cuda, fp32 on cpu), as `serve`")
    e.add_argument("--device", default="cpu", help="cpu for onnxruntime, cuda for tensorrt")
    e.add_argument("--max-slots", type=int, default=EngineSettings().max_slots,
                   help="the serving engine's max_slots: TensorRT profiles for every bucket up to it (as `serve`)")
    e.add_argument("--artifact-dir", default="artifacts")
    e.add_argument("--check-steps", type=int, default=8, help="greedy steps compared with eager (0: skip)")
    e.add_argument("--threads", type=int, default=2)
    e.set_defaults(fn=cmd_export)

    q = sub.add_parser("quantize", help="quantize a model directory, check it on held-out rollouts, save it",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    q.add_argument("model_dir")
    q.add_argument("--precision", choices=["int8", "fp8"], default="int8")
    q.add_argument("--out", help="output directory (default: MODEL_DIR-PRECISION next to MODEL_DIR)")
    q.add_argument("--episodes", type=int, default=16, help="held-out episodes for the 0.5 dB gate (0: skip)")
    q.add_argument("--force", action="store_true", help="write the output even if the gate fails")
    q.add_argument("--device", default="cpu")
    q.add_argument("--threads", type=int, default=2)
    q.set_defaults(fn=cmd_quantize)

    from .tune import add_command as add_tune

    add_tune(sub, _say)
