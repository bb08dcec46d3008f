"""Load the model for serving and apply the chosen backend / precision to it."""

from __future__ import annotations

import logging

import torch

from ..model.config import PRESETS, ConfigurationError
from ..model.io import WEIGHTS, ModelLoadError, load_model_dir, sha256_file
from ..model.world_model import WorldModel, build
from ..settings import ModelSettings

log = logging.getLogger("worldserve.runtime")


def load_model(ms: ModelSettings, weights_sha256: str | None = None) -> WorldModel:
    """The model of `ms` (preset, quantized directory or model directory). `weights_sha256`: the sha256 an
    operator pinned for the directory's model.safetensors (checked before anything is built); user code
    loads only with ms.trust_remote_code (model/registry.py)."""
    if ms.preset:
        if weights_sha256 is not None:
            raise ConfigurationError("a preset has no weights file to check against weights_sha256")
        if ms.preset not in PRESETS:
            raise ConfigurationError(f"unknown preset {ms.preset!r}; choose one of {sorted(PRESETS)}")
        model = build(PRESETS[ms.preset], seed=0)
    elif (ms.dir / "quantization.json").exists():  # written by `worldserve quantize` (the token model only)
        from .quantize import load_quantized

        if weights_sha256 is not None:
            actual = sha256_file(ms.dir / WEIGHTS)
            if actual != weights_sha256.lower():
                raise ModelLoadError(f"{ms.dir / WEIGHTS}: sha256 {actual[:12]}… is not the pinned weights_sha256 "
                                     f"({weights_sha256[:12]}…)")
        return load_quantized(ms.dir, ms.device).eval()
    else:
        model = load_model_dir(ms.dir, trust_remote_code=ms.trust_remote_code, weights_sha256=weights_sha256)
    return model.to(ms.device).eval()


def with_precision(model: WorldModel, precision: str, copy: bool = True) -> WorldModel:
    """The model at `precision`, its other tensors in support.compute_dtype(precision, device): fp32 is the model
    itself; fp16 / bf16 convert weights and cache (a copy unless copy=False); int8 / fp8 quantize the dynamics'
    linears (always a new model), then on CUDA cast the rest to bf16 (quantized weights and scales keep their
    dtypes). A model that is already quantized (a `worldserve quantize` directory) is only cast. bf16 on the CPU:
    each linear in the form that keeps it batch-invariant here, probed (cpu_gemm.pad_small_gemms)."""
    import copy as copy_

    from .support import compute_dtype

    device = next(model.parameters()).device
    dtype = compute_dtype(precision, device)
    if precision in ("int8", "fp8"):
        from .quantize import quantize_model

        if getattr(model, "quantization", None) is None:
            model = quantize_model(model, precision)
        elif copy:
            model = copy_.deepcopy(model)
        return model.to(dtype) if dtype != torch.float32 else model
    if dtype != torch.float32:
        model = (copy_.deepcopy(model) if copy else model).to(dtype)
        if dtype == torch.bfloat16 and device.type == "cpu":  # a row's bits the same alone and in a batch
            from .cpu_gemm import MIN_M, pad_small_gemms

            forms = pad_small_gemms(model)
            if forms["padded"]:
                log.info("bf16 on this CPU: %d linears run at least %d GEMM rows (batch invariance: "
                         "runtime/cpu_gemm.py)", len(forms["padded"]), MIN_M)
            if forms["none"]:
                log.warning("bf16 on this CPU is not batch-invariant for %s: a row may round differently alone "
                            "than in a batch (runtime/cpu_gemm.py)", ", ".join(forms["none"]))
    return model


def serving_model(ms: ModelSettings, weights_sha256: str | None = None) -> WorldModel:
    """The model `serve` runs before its backend is applied: checked, loaded, at its precision. `worldserve export`
    builds its artifacts from exactly this (so the artifact key, weights hash included, is the one serve asks for)."""
    from . import support

    support.check_supported(ms)
    support.configure_device(ms)
    for why in support.performance_warnings(ms):
        log.warning("slow configuration --device %s --backend %s --precision %s: %s", ms.device, ms.backend,
                    ms.precision, why)
    model = load_model(ms, weights_sha256)
    support.check_model_supported(model, ms)  # a non-token model asked for int8 / a compiled backend: refused
    model = with_precision(model, ms.precision, copy=False)
    for why in support.model_performance_warnings(model, ms):
        log.warning("slow configuration --precision %s: %s", ms.precision, why)
    return model


def prepare(ms: ModelSettings, weights_sha256: str | None = None) -> WorldModel:
    """The serving model: weights loaded, then the backend and precision applied to it.

    With ms.auto (neither backend nor precision named), the model directory's serving.json pin is applied first if it
    still holds on this machine, else the device default (runtime/choose.py); `ms` is resolved in place (backend,
    precision, auto off), so the caller's ModelInfo reports what serves.
    An unsupported (device, backend, precision) stops here, before anything is loaded (support.py).
    `weights_sha256`: an operator's pin of the weights file (load_model).
    """
    if ms.auto:
        apply_choice(ms)
    model = serving_model(ms, weights_sha256)
    if ms.backend == "compile":
        from .compiled import compile_model

        model = compile_model(model, ms)
    elif ms.backend == "onnxruntime":
        from .onnx_backend import OnnxWorldModel

        model = OnnxWorldModel.build(model, ms)
    elif ms.backend == "tensorrt":
        from .trt_backend import TrtWorldModel

        model = TrtWorldModel.build(model, ms, defer=True)  # profiles for every bucket up to the cache's slots
    torch.set_grad_enabled(False)
    return model


def choose_config(ms: ModelSettings, features: set[str] | None = None):
    """runtime/choose.choose with its quick gate: the pinned precision vs fp32 (both eager) on a few frames."""
    from .choose import choose

    return choose(ms, _quick_gate, features)


def _quick_gate(ms: ModelSettings, pin: dict) -> str | None:
    from .choose import gate_problem, quick_parity
    from .support import model_problem

    ref = load_model(ms.model_copy(update={"backend": "eager", "precision": "fp32"}))
    why = model_problem(ref, ms.model_copy(update={"backend": pin["backend"], "precision": pin["precision"]}))
    if why:
        return f"cannot serve here: {why}"
    return gate_problem(quick_parity(ref, with_precision(ref, pin["precision"], copy=True)), pin.get("quick_gate"))


def apply_choice(ms: ModelSettings):
    """Resolve `ms` in place (backend, precision; auto off: choose_config) and log what serves and why; prepare calls
    it, so that whoever built the engine reports what it serves (ModelInfo.backend / precision)."""
    c = choose_config(ms)
    name = ms.preset or ms.dir.name
    (log.warning if "refused" in c.why else log.info)(c.line(name))
    ms.backend, ms.precision, ms.auto = c.backend, c.precision, False
    return c
