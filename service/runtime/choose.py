"""The serving configuration a model gets when the operator names none: its pin, or the device default.

`worldserve tune MODEL_DIR` (cli/tune.py) times the backend x precision candidates this machine supports through the
engine, judges each with the quality gate (model/quality.py) and writes the winner, the figures and the machine
features it depends on to MODEL_DIR/serving.json, one row per device type:

    {"version": 1, "pins": {"cpu": {"backend": "eager", "precision": "bf16", "needs": ["avx512_bf16|amx_bf16"],
     "weights_sha256": "...", "quick_gate": {"min_token_agreement": 0.99, "min_frame_psnr_db": 40.0},
     "why": "...", "measured": {...}}}}

At start-up (loader.prepare -> loader.apply_choice, when ModelSettings.auto: neither --backend nor --precision was
named) the pin is served only if
    1. the pin was measured on these weights (weights_sha256),
    2. this machine has every feature it needs (`needs`: each entry a '|'-separated list of alternatives),
    3. the combination can serve here at all (support.problem / model_problem),
    4. a quick gate on a few frames passes: the pinned precision vs fp32, both eager, in lockstep (token models:
       greedy token agreement and decoded-frame PSNR, runtime/parity.py; other models: the PSNR of
       decode(encode(frames)) against fp32's), seconds, not minutes.
Otherwise the device default (settings.default_precision, eager) serves, and the reason is logged as a warning.
An explicit --backend / --precision (flag or env) always wins: the pin is not read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

PIN_FILE = "serving.json"
PIN_VERSION = 1
QUICK_GATE = {"min_token_agreement": 0.99, "min_frame_psnr_db": 40.0}  # tune writes these unless told otherwise
QUICK_STEPS, QUICK_BATCH = 4, 2  # the quick gate's lockstep: greedy steps x rows (a few frames, seconds)

# machine features a (device type, precision, backend) needs to be worth serving; '|' = any of them
CPU_FEATURES = ("avx512_bf16", "amx_bf16", "avx512_vnni", "avx_vnni", "amx_int8", "avx512f", "avx2")
NEEDS = {("cpu", "bf16"): "avx512_bf16|amx_bf16", ("cpu", "int8"): "avx512_vnni|avx_vnni|amx_int8",
         ("cuda", "bf16"): "cuda_bf16", ("cuda", "fp8"): "cuda_fp8"}


@dataclass
class Choice:
    backend: str
    precision: str
    source: str  # "named" (flag / env) | "pin" (serving.json) | "default" (the device default)
    why: str

    def line(self, name: str) -> str:
        return (f"model {name}: serving --backend {self.backend} --precision {self.precision} "
                f"({self.source}: {self.why})")


def machine_features(device: str, cpu_flags: str | None = None) -> set[str]:
    """What this machine offers that a pin may need: CPU instruction-set flags, or CUDA capabilities."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return set()
        out = {"cuda"}
        if torch.cuda.is_bf16_supported():
            out.add("cuda_bf16")
        if torch.cuda.get_device_capability(dev) >= (8, 9):
            out.add("cuda_fp8")
        try:
            import tensorrt  # noqa: F401

            out.add("tensorrt")
        except ImportError:
            pass
        return out
    if cpu_flags is None:
        from .support import _cpu_flags

        cpu_flags = _cpu_flags()
    words = set(cpu_flags.split())
    return {f for f in CPU_FEATURES if f in words}


def needs(device: str, backend: str, precision: str) -> list[str]:
    """The features (each 'a|b': any of them) a configuration needs on `device` to be the fast choice."""
    kind = torch.device(device).type
    out = ["cuda"] if kind == "cuda" else []
    if (kind, precision) in NEEDS:
        out.append(NEEDS[(kind, precision)])
    if backend == "tensorrt":
        out.append("tensorrt")
    return out


def missing(need: list[str], have: set[str]) -> list[str]:
    return [n for n in need if not set(n.split("|")) & have]


def read_pin(model_dir: Path, device: str) -> dict | None:
    """The pin of `model_dir` for `device`'s type, or None; a malformed file raises ValueError naming it."""
    path = Path(model_dir) / PIN_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        pin = doc.get("pins", {}).get(torch.device(device).type)
        if pin is not None and not (isinstance(pin.get("backend"), str) and isinstance(pin.get("precision"), str)):
            raise ValueError("a pin needs 'backend' and 'precision' strings")
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{path}: not a serving pin ({e})") from e
    return pin


def write_pin(model_dir: Path, device: str, pin: dict) -> Path:
    """Set `device`'s row of MODEL_DIR/serving.json (other devices' rows are kept)."""
    path = Path(model_dir) / PIN_FILE
    doc = json.loads(path.read_text()) if path.is_file() else {}
    doc["version"] = PIN_VERSION
    doc.setdefault("pins", {})[torch.device(device).type] = pin
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)
    return path


@torch.no_grad()
def quick_parity(ref, cand) -> dict[str, float]:
    """The pinned precision vs fp32 on a few frames: token models in lockstep (runtime/parity.py); other models
    through their latent round trip. -> {"token_agreement" (token models), "frame_psnr"}."""
    from ..model.quality import psnr
    from .parity import parity

    if getattr(ref, "dynamics", None) is not None:
        r = parity(ref, cand, steps=QUICK_STEPS, batch=QUICK_BATCH)
        return {"token_agreement": r["token_agreement"], "frame_psnr": r["frame_psnr"]}
    s = ref.spec
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (QUICK_BATCH * 2, s.height, s.width, 3), dtype=torch.uint8, generator=g)
    a = ref.decode(ref.encode(frames.to(ref.device))).float().cpu()  # uint8 [B, H, W, 3] -> float
    b = cand.decode(cand.encode(frames.to(cand.device))).float().cpu()
    return {"frame_psnr": psnr(float(((a - b) ** 2).mean()))}


def gate_problem(r: dict[str, float], gate: dict) -> str | None:
    """Why the quick figures `r` fail the pin's gate, or None."""
    g = {**QUICK_GATE, **(gate or {})}
    if "token_agreement" in r and r["token_agreement"] < g["min_token_agreement"]:
        return f"token agreement with fp32 {100 * r['token_agreement']:.2f}% < {100 * g['min_token_agreement']:.2f}%"
    if r["frame_psnr"] < g["min_frame_psnr_db"]:
        return f"decoded frames {r['frame_psnr']:.1f} dB PSNR vs fp32 < {g['min_frame_psnr_db']:.1f} dB"
    return None


def pin_problem(ms, pin: dict, features: set[str] | None = None) -> str | None:
    """Why `pin` cannot serve under `ms` on this machine before any weight is loaded (weights, features, support),
    or None."""
    from ..model.io import WEIGHTS, sha256_file
    from .support import problem

    want = pin.get("weights_sha256")
    w = Path(ms.dir) / WEIGHTS
    if want and w.is_file() and sha256_file(w) != want:
        return f"the pin was measured on other weights (weights_sha256 {want[:12]}…); run `worldserve tune` again"
    have = machine_features(ms.device) if features is None else features
    need = pin["needs"] if "needs" in pin else needs(ms.device, pin["backend"], pin["precision"])  # [] = nothing
    lack = missing(need, have)
    if lack:
        return f"this machine lacks {', '.join(lack)} (the pin needs it to be fast)"
    why = problem(ms.model_copy(update={"backend": pin["backend"], "precision": pin["precision"]}))
    return f"cannot serve here: {why}" if why else None


def choose(ms, quick_gate, features: set[str] | None = None) -> Choice:
    """What `ms` (ModelSettings) serves: the named configuration, the model directory's pin (checked: weights,
    features, support, then `quick_gate(ms, pin)` -> why it fails or None, run only for a pin that is not the
    default) or the device default. loader.choose_config supplies the quick gate (it loads the model)."""
    from ..settings import default_precision

    if not getattr(ms, "auto", False):
        return Choice(ms.backend, ms.precision, "named", "--backend / --precision (flag or env) named it")
    default = Choice("eager", default_precision(ms.device), "default", "")
    if ms.preset:
        default.why = "a preset has no serving.json pin"
        return default
    try:
        pin = read_pin(ms.dir, ms.device)
    except ValueError as e:
        default.why = f"pin refused: {e}"
        return default
    kind = torch.device(ms.device).type
    if pin is None:
        default.why = f"no {kind} pin in {Path(ms.dir) / PIN_FILE} (`worldserve tune {ms.dir}` writes one)"
        return default
    why = pin_problem(ms, pin, features)
    if why is None and (pin["backend"], pin["precision"]) != (default.backend, default.precision):
        why = quick_gate(ms, pin)
    if why:
        default.why = f"pin {pin['backend']} {pin['precision']} refused: {why}"
        return default
    return Choice(pin["backend"], pin["precision"], "pin", pin.get("why") or f"{PIN_FILE} for {kind}")
