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


def with_precision(model: WorldModel, precision: str, use_triton: bool = False, copy: bool = True) -> WorldModel:
    """The model at `precision`: fp32 is the model itself; fp16 / bf16 convert weights and cache (a copy unless
    copy=False); int8 / fp8 quantize the dynamics' linears (always a new model)."""
    if precision in ("int8", "fp8"):
        from .quantize import quantize_model

        return quantize_model(model, precision, use_triton=use_triton)
    if precision in ("fp16", "bf16"):
        import copy as copy_

        dtype = torch.float16 if precision == "fp16" else torch.bfloat16
        return (copy_.deepcopy(model) if copy else model).to(dtype)
    return model


def prepare(ms: ModelSettings, weights_sha256: str | None = None) -> WorldModel:
    """The serving model: weights loaded, then the backend and precision applied to it.

    An unsupported (device, backend, precision) stops here, before anything is loaded (support.py).
    `weights_sha256`: an operator's pin of the weights file (load_model).
    """
    from .support import check_model_supported, check_supported

    check_supported(ms)
    model = load_model(ms, weights_sha256)
    check_model_supported(model, ms)  # a non-token model asked for int8 / a compiled backend: refused by name
    model = with_precision(model, ms.precision, ms.triton_kernels, copy=False)
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
