"""Which (device, backend, precision) combinations can serve: checked at start-up, before any weight is loaded.

    check_supported(ms)   raise Unsupported naming the combination and why it cannot work, or return None

A combination that cannot work must stop the process at start-up with a message that names it, never at the
first request. What each backend serves:

    eager        cpu: fp32, bf16, int8             cuda: fp32, fp16, bf16, int8, fp8 (compute capability >= 8.9)
    compile      as eager
    onnxruntime  cpu: fp32, int8                   (CPUExecutionProvider; no bf16 / fp16 kernels worth serving)
    tensorrt     cuda with tensorrt importable: fp32, fp16, bf16, int8, fp8 (check_trt_precision)

Defaults and what runs in which dtype (settings.default_precision, compute_dtype):

    cuda   bf16 by default; TF32 for any fp32 matmul / convolution (configure_device). int8 and fp8 quantize the
           dynamics' linears and run everything else in bf16: activations, attention, the KV cache, the logits.
    cpu    fp32 by default; int8 keeps fp32 activations (its W8A8 FBGEMM path is the one gated in the quality
           table); bf16 where chosen.

    performance_warnings(ms) / model_performance_warnings(model, ms)   combinations that serve but cannot be fast,
           named at start-up (the loader logs them as warnings).
"""

from __future__ import annotations

import torch

from ..model.config import ConfigurationError
from ..wire import BACKENDS, PRECISIONS

# TensorRT: the builder flags each serving precision needs (checked at start-up, set by trt_backend)
PRECISION_FLAGS = {
    "fp32": ("TF32",),
    "fp16": ("FP16",),
    "bf16": ("BF16",),
    "int8": ("INT8", "FP16"),
    "fp8": ("FP8", "FP16"),
}

class Unsupported(ConfigurationError):
    """A backend / precision / device combination that cannot serve; the message names it and why."""


def _combo(ms) -> str:
    return f"--device {ms.device} --backend {ms.backend} --precision {ms.precision}"


def problem(ms) -> str | None:
    """Why `ms` (ModelSettings) cannot serve, or None when it can."""
    try:
        dev = torch.device(ms.device)
    except RuntimeError as e:
        return f"device {ms.device!r} is not a torch device ({e})"
    if ms.backend not in BACKENDS:
        return f"unknown backend {ms.backend!r}; choose one of {BACKENDS}"
    if ms.precision not in PRECISIONS:
        return f"unknown precision {ms.precision!r}; choose one of {PRECISIONS}"
    if dev.type not in ("cpu", "cuda"):
        return f"device {ms.device}: worldserve serves on 'cpu' or 'cuda'"
    if dev.type == "cuda" and not torch.cuda.is_available():
        return f"device {ms.device}: torch sees no CUDA GPU here (torch {torch.__version__})"
    p = ms.precision
    if dev.type == "cpu":
        if p == "fp16":
            return "fp16 runs on a GPU only (CPU fp16 matmuls are emulated and slower than fp32); use bf16 or int8"
        if p == "fp8":
            return "fp8 needs an NVIDIA GPU of compute capability >= 8.9 (Ada, Hopper); on the CPU use int8 or bf16"
    else:
        cap = torch.cuda.get_device_capability(dev)
        if p == "fp8" and cap < (8, 9):
            return f"fp8 needs compute capability >= 8.9 (Ada, Hopper); this GPU has {cap[0]}.{cap[1]}; " \
                "use int8 or bf16"
        if p == "bf16" and not torch.cuda.is_bf16_supported():
            return f"bf16 needs compute capability >= 8.0; this GPU has {cap[0]}.{cap[1]}; use fp16"
    if ms.backend == "onnxruntime":
        if dev.type != "cpu":
            return "backend onnxruntime runs on the CPU (CPUExecutionProvider); on a GPU use tensorrt or compile"
        if p not in ("fp32", "int8"):
            return f"backend onnxruntime serves fp32 or int8, not {p} (its CPU kernels have no {p} matmul); " \
                   f"use --backend eager or compile for {p}"
    if ms.backend == "tensorrt":
        if dev.type != "cuda":
            return "backend tensorrt needs an NVIDIA GPU (--device cuda)"
        try:
            import tensorrt as trt
        except ImportError:
            return "backend tensorrt needs the tensorrt package (pip install 'worldserve[tensorrt]'); " \
                "it is not importable here"
        why = check_trt_precision(p, trt.__version__, {n for n in dir(trt.BuilderFlag) if n.isupper()},
                                  torch.cuda.get_device_capability(dev))
        if why:
            return why
    if getattr(ms, "triton_kernels", False) and dev.type != "cuda" and not _triton_interpreted():
        return "--triton: the Triton kernels run on CUDA tensors (on the CPU only under TRITON_INTERPRET=1, for tests)"
    return None


def compute_dtype(precision: str, device: str | torch.device) -> torch.dtype:
    """The dtype activations, attention, the KV cache and the logits run in for a serving precision on a device:
    bf16 around int8 / fp8 matmuls on CUDA, fp32 around them on the CPU (the gated W8A8 path)."""
    cuda = torch.device(device).type == "cuda"
    return {"fp16": torch.float16, "bf16": torch.bfloat16,
            "int8": torch.bfloat16 if cuda else torch.float32,
            "fp8": torch.bfloat16}.get(precision, torch.float32)


def configure_device(ms) -> None:
    """Process-wide math settings for serving on ms.device: on CUDA, TF32 tensor cores for whatever runs in fp32
    (an fp32 model, the reward / done heads, fp32 parts of a user's model). Called once by the loader."""
    if torch.device(ms.device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def performance_warnings(ms, cpu_flags: str | None = None) -> list[str]:
    """Why `ms` (ModelSettings) serves but cannot be fast, one sentence per reason naming the combination's part."""
    dev, p, out = torch.device(ms.device).type, ms.precision, []
    if dev == "cuda":
        if p == "fp32":
            out.append("fp32 on CUDA keeps an fp32 KV cache and fp32 logits (TF32 matmuls only): about half of "
                       "bf16's throughput; bf16 is the CUDA default")
        if p == "int8":
            out.append("int8 on CUDA is weight-only (bf16 compute): it halves weight memory but not the step's "
                       "FLOPs, so at many rows it is no faster than bf16; prefer bf16, or fp8 on compute "
                       "capability >= 8.9")
            try:
                import triton  # noqa: F401
            except ImportError:
                out.append("int8 on CUDA without Triton dequantizes every weight in every call (the reference); "
                           "install triton (it ships with the CUDA torch wheel)")
    else:
        flags = _cpu_flags() if cpu_flags is None else cpu_flags
        if p == "bf16" and not any(f in flags for f in (" avx512_bf16", " amx_bf16")):
            out.append("bf16 on a CPU without AVX-512 BF16 / AMX is emulated: slower than fp32 here")
        if p == "int8" and not any(f in flags for f in (" avx512_vnni", " avx_vnni", " amx_int8")):
            out.append("int8 on a CPU without VNNI runs FBGEMM's slow path (reduced range, no int8 dot products)")
    return out


def model_performance_warnings(model, ms) -> list[str]:
    """Layers of the served model with no fast path under `ms`: fp8 layers torch._scaled_mm cannot take (a dimension
    not divisible by 16) run the dequantize reference."""
    slow = [n for n, m in model.named_modules() if getattr(m, "scaled_mm", True) is False]
    if ms.precision == "fp8" and torch.device(ms.device).type == "cuda" and slow:
        return [f"fp8: {len(slow)} layer(s) have a dimension not divisible by 16 and run the dequantize reference "
                f"({', '.join(slow[:4])}{', ...' if len(slow) > 4 else ''})"]
    return []


def _triton_interpreted() -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction

        from ..kernels.fsq import _fsq_kernel
    except ImportError:
        return False
    return isinstance(_fsq_kernel, InterpretedFunction)


def check_supported(ms) -> None:
    """Stop at start-up (Unsupported, with the reason) when `ms` cannot serve."""
    why = problem(ms)
    if why:
        raise Unsupported(f"unsupported configuration {_combo(ms)}: {why}")


def precision_flags(precision: str) -> tuple[str, ...]:
    """Names of the trt.BuilderFlag members to set for a serving precision."""
    if precision not in PRECISION_FLAGS:
        raise ValueError(f"TensorRT precision must be one of {sorted(PRECISION_FLAGS)}, not {precision!r}")
    return PRECISION_FLAGS[precision]


MIN_CAPABILITY = {"bf16": (8, 0), "fp8": (8, 9)}  # below these, TensorRT has no kernels for the precision


def check_trt_precision(precision: str, version: str, flags: set[str], capability: tuple[int, int]) -> str | None:
    """Why the installed TensorRT (version, names of its BuilderFlag members) cannot build `precision` on a GPU of
    `capability`, or None when it can. Checked at start-up, before any export or build."""
    if precision not in PRECISION_FLAGS:
        return f"TensorRT precision must be one of {sorted(PRECISION_FLAGS)}, not {precision!r}"
    missing = [f for f in PRECISION_FLAGS[precision] if f not in flags]
    if missing:
        return (f"the installed TensorRT {version} has no builder flag {'/'.join(missing)} needed for {precision} "
                f"(bf16 needs TensorRT >= 9, fp8 >= 8.6); upgrade TensorRT or choose another precision")
    need = MIN_CAPABILITY.get(precision)
    if need and tuple(capability) < need:
        return (f"TensorRT {precision} needs compute capability >= {need[0]}.{need[1]}; this GPU has "
                f"{capability[0]}.{capability[1]}")
    return None


def model_problem(model, ms) -> str | None:
    """Why `model` cannot serve under `ms` (ModelSettings), or None: int8 / fp8 quantize the token model's dynamics
    linears and the compile / ONNX / TensorRT backends trace its tokenizer + dynamics graphs, so a model of another
    kind (the denoiser, a user's model) serves eager at fp32 / fp16 / bf16 only, and a token model with a frame head
    (MaskGIT / autoregressive passes: `fill`, which those graphs lack) serves eager at any precision."""
    kind = f"model {model.spec.name!r} ({type(model).__name__}, output {model.spec.output!r})"
    if getattr(model, "dynamics", None) is not None:
        if getattr(model, "frame_head", None) is not None and ms.backend != "eager":
            return f"{kind} decodes its frames in {model.spec.decoding} passes of a frame head; --backend " \
                f"{ms.backend} builds only the trunk's one-pass step graph: serve this model with --backend eager"
        return None
    if ms.precision in ("int8", "fp8"):
        return f"{kind}: --precision {ms.precision} quantizes the token model's dynamics; this model has none " \
               "(use fp32, fp16 or bf16)"
    if ms.backend != "eager":
        return f"{kind}: --backend {ms.backend} builds the token model's graphs; serve this model with --backend eager"
    return None


def check_model_supported(model, ms) -> None:
    """Stop at start-up (Unsupported, naming the combination) when this model cannot serve under `ms`."""
    why = model_problem(model, ms)
    if why:
        raise Unsupported(f"unsupported configuration {_combo(ms)}: {why}")
