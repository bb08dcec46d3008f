"""Weight quantization applied to a loaded WorldModel: int8 weight-only (CPU, GPU) and fp8 (Hopper / Ada).

    quantize_model(model, "int8")  every nn.Linear of the dynamics transformer (blocks + vocabulary head)
                                   becomes an Int8Linear: int8 weights [out, in], one fp32 scale per output
                                   channel (symmetric, absmax / 127). On the CPU the matmul runs int8 x int8
                                   (FBGEMM, VNNI) with activations quantized per row (int8_cpu.py); the
                                   reference keeps activations in the model dtype (weight-only).
    quantize_model(model, "fp8")   the same layers as Fp8Linear: float8_e4m3fn weights + per-channel scales;
                                   on a GPU with compute capability >= 8.9 the matmul runs in fp8
                                   (torch._scaled_mm, activations scaled per row). Anywhere else: an error.

The model keeps its interface (encode / prefill / step / decode); the tokenizer, embeddings, LayerNorms and
the 1-wide reward / done heads stay in the model's dtype. On CUDA the loader (runtime/loader.py: with_precision)
then casts everything else to bf16 (support.compute_dtype): activations, attention, the KV cache and the logits
run in bf16 around the quantized matmuls; a quantized layer keeps its storage (int8 / float8 weights, fp32 scales)
through any later `.to(dtype)` (`_apply` below restores it), so the cast never re-rounds a weight or a scale.

Each quantized module has a plain PyTorch reference forward (dequantize the weight, then F.linear); `forward`
takes a faster path where one exists and never the reference on a served device:
    int8 on the CPU   W8A8 FBGEMM (int8_cpu.py), one custom op: eager and torch.compile alike
    int8 on CUDA      the Triton weight-only kernel (kernels/int8_matmul.py), one custom op: eager and
                      torch.compile alike (compile keeps the op; it never traces the dequantize reference)
    fp8 on CUDA       torch._scaled_mm (compute capability >= 8.9, both dims divisible by 16)
The reference runs only while exporting (ONNX / TensorRT: DequantizeLinear + MatMul, the Q/DQ form TensorRT
fuses), in the parity tests, and where no fast path exists (support.model_performance_warnings names the layers
at start-up).
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)
import torch.nn.functional as F
from torch import nn

from ..model.world_model import WorldModel
from . import int8_cpu
from .fp8_qdq import dequantize_fp8

VARIANTS = ("int8", "fp8")
SKIP = ("act_emb", "reward_head", "done_head")  # tiny or input-side layers: not worth the error
FP8_MAX = 448.0  # largest finite float8_e4m3fn
QUANT_FILE = "quantization.json"


def _exporting() -> bool:
    return torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting() or torch.jit.is_tracing()


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # w float [N, K] -> int8 [N, K], fp32 scale [N] (symmetric per output channel, range -127..127)
    scale = w.detach().float().abs().amax(1).clamp(min=1e-12) / 127.0
    q = torch.round(w.detach().float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class _KeepStorage(nn.Module):
    """A quantized layer's weight and scale keep their dtypes under module.to(dtype) / .half() / .bfloat16():
    only device moves apply to them (float8 counts as floating point to torch, so a plain cast would round the
    weights to bf16 and the scales with them)."""

    STORAGE: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        before = {n: getattr(self, n) for n in self.STORAGE}
        out = super()._apply(fn, recurse)
        for n, t in before.items():
            now = getattr(self, n)
            if now.dtype != t.dtype:
                setattr(self, n, t.to(now.device))  # buffers re-registered by name (register_buffer semantics)
        self._placed()
        return out

    def _placed(self) -> None:
        """Decide the fast path for where the weights now live (once: no device query inside a compiled graph)."""


@functools.cache
def _cuda_int8_op():
    """torch.ops.worldserve.int8_matmul (the Triton kernel as one custom op), or None without Triton."""
    try:
        from ..kernels import int8_matmul  # noqa: F401  (registers the op)
    except ImportError:
        return None
    return torch.ops.worldserve.int8_matmul


def int8_linear_reference(x, weight_q, scale, bias=None):
    """The definition: x [..., K] float; weight_q int8 [N, K]; scale fp32 [N]; bias [N] -> [..., N] (x.dtype)."""
    zero = torch.zeros(weight_q.shape[0], dtype=torch.int64, device=weight_q.device)  # symmetric: zero points 0
    w = torch.ops.quantized_decomposed.dequantize_per_channel(weight_q, scale, zero, 0, -127, 127, torch.int8)
    return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


class Int8Linear(_KeepStorage):
    STORAGE = ("weight_q", "scale")

    def __init__(self, weight_q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = weight_q.shape[1], weight_q.shape[0]
        self.register_buffer("weight_q", weight_q)  # int8 [N, K]
        self.register_buffer("scale", scale.float())  # fp32 [N]
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.use_triton = True  # on CUDA: the Triton kernel (False: the reference, for comparisons)
        # CPU: int8 x int8 through FBGEMM with activations quantized per row (int8_cpu.py); False = the reference
        self.w8a8 = self.in_features >= 2 and int8_cpu.available()
        self._placed()

    def _placed(self) -> None:
        self.cuda_op = _cuda_int8_op() if self.weight_q.is_cuda else None

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> Int8Linear:
        q, s = quantize_int8(lin.weight)
        return cls(q, s, lin.bias)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear_reference(x, self.weight_q, self.scale, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [..., K] -> [..., N]
        if self.use_triton and self.cuda_op is not None and x.is_cuda and not _exporting():  # eager and compile
            y = self.cuda_op(x.reshape(-1, self.in_features), self.weight_q, self.scale, self.bias)  # [M, N]
            return y.view(*x.shape[:-1], self.out_features)
        if self.w8a8 and x.device.type == "cpu" and not _exporting():  # eager and torch.compile (one custom op)
            return torch.ops.worldserve.w8a8_linear(x, self.weight_q, self.scale, self.bias)
        return self.reference(x)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 per-channel"


def fp8_supported(device: torch.device | str) -> bool:
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 9)


class Fp8Linear(_KeepStorage):
    STORAGE = ("weight_f8", "scale")

    def __init__(self, weight_f8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = weight_f8.shape[1], weight_f8.shape[0]
        self.register_buffer("weight_f8", weight_f8)  # float8_e4m3fn [N, K]
        self.register_buffer("scale", scale.float())  # fp32 [N]
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.scaled_mm = self._can_scaled_mm()  # decided once: no device query inside compiled graphs

    def _can_scaled_mm(self) -> bool:
        # torch._scaled_mm needs both matrix dimensions divisible by 16 (tiny's 125-entry head is not)
        return fp8_supported(self.weight_f8.device) and self.in_features % 16 == 0 and self.out_features % 16 == 0

    def _placed(self) -> None:
        self.scaled_mm = self._can_scaled_mm()

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> Fp8Linear:
        w = lin.weight.detach().float()
        scale = w.abs().amax(1).clamp(min=1e-12) / FP8_MAX
        return cls((w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale, lin.bias)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        # weight-only dequantization: x [..., K] -> [..., N]
        w = dequantize_fp8(self.weight_f8, self.scale)  # exported as DequantizeLinear (Q/DQ), see fp8_qdq.py
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.scaled_mm or _exporting():  # torch.compile keeps _scaled_mm; ONNX / TensorRT get the reference
            return self.reference(x)
        # W8A8 on tensor cores: activations scaled per row, weights per column; bf16 out
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        xs = x2.abs().amax(1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX  # [M, 1]
        xq = (x2.float() / xs).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        y = torch._scaled_mm(xq, self.weight_f8.t(), scale_a=xs, scale_b=self.scale[None, :],
                             out_dtype=torch.bfloat16)  # [M, N]
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, float8_e4m3fn per-channel"


def target_layers(model: WorldModel) -> list[str]:
    """Names of the dynamics' nn.Linear modules that get quantized."""
    return [name for name, mod in model.dynamics.named_modules()
            if isinstance(mod, nn.Linear) and name.split(".")[-1] not in SKIP]


def quantize_model(model: WorldModel, variant: str, inplace: bool = False, use_triton: bool = True,
                   progress=None) -> WorldModel:
    """A copy of `model` (or `model` itself with inplace=True) with its dynamics linears quantized.

    progress: optional callable(i, total, name) called after each layer (the CLI prints it).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown quantization variant {variant!r}; choose one of {VARIANTS}")
    device = next(model.parameters()).device
    if variant == "fp8" and not fp8_supported(device):
        where = (f"a GPU of compute capability {torch.cuda.get_device_capability(device)}"
                 if device.type == "cuda" else f"device {device}")
        raise RuntimeError(f"fp8 needs an NVIDIA GPU of compute capability >= 8.9 (Ada, Hopper); the model is on "
                           f"{where}. Use int8 (CPU and GPU) instead.")
    if not inplace:
        model = copy.deepcopy(model)
    names = target_layers(model)
    for i, name in enumerate(names):
        parent_name, _, attr = name.rpartition(".")
        parent = model.dynamics.get_submodule(parent_name) if parent_name else model.dynamics
        lin = getattr(parent, attr)
        q = Int8Linear.from_linear(lin) if variant == "int8" else Fp8Linear.from_linear(lin)
        if variant == "int8":
            q.use_triton = use_triton
        setattr(parent, attr, q.to(device))
        if progress:
            progress(i + 1, len(names), name)
    model.quantization = variant
    return model.eval()


def quantization_of(model) -> str:
    """'int8' / 'fp8' for a quantized model, else its parameter dtype name ('fp32', 'bf16', 'fp16')."""
    if getattr(model, "quantization", None):
        return model.quantization
    dtype = next(model.parameters()).dtype
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def save_quantized(model: WorldModel, out: Path, source_sha256: str, card_body: str) -> str:
    """Write a quantized model directory: config.json, model.safetensors (quantized tensors), MODEL_CARD.md,
    quantization.json. Returns the weights' sha256."""
    from ..model.io import save_model_dir

    digest = save_model_dir(model, out, card_body)
    meta = {"precision": model.quantization, "layers": target_layers_quantized(model), "source_sha256": source_sha256}
    (Path(out) / QUANT_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return digest


def target_layers_quantized(model: WorldModel) -> list[str]:
    return [name for name, mod in model.dynamics.named_modules() if isinstance(mod, Int8Linear | Fp8Linear)]


def load_quantized(model_dir: str | Path, device: str = "cpu") -> WorldModel:
    """Load a directory written by save_quantized (sha256 checked against the card, tensors against the config)."""
    from safetensors.torch import load_file

    from ..model.io import WEIGHTS, ModelLoadError, card_sha256, load_config, sha256_file

    model_dir = Path(model_dir)
    meta = json.loads((model_dir / QUANT_FILE).read_text())
    cfg = load_config(model_dir)
    wpath = model_dir / WEIGHTS
    if card_sha256(model_dir) != sha256_file(wpath):
        raise ModelLoadError(f"{wpath}: sha256 does not match the model card: truncated, corrupt or replaced")
    model = quantize_model(WorldModel(cfg).to(device), meta["precision"], inplace=True)  # structure, then weights
    state = load_file(str(wpath), device=str(device))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ModelLoadError(f"{wpath}: does not match {QUANT_FILE} / config: {e}") from e
    return model.eval()
