"""int8 x int8 matmuls on the CPU (W8A8, VNNI) for Int8Linear, batch-invariant.

    w8a8_linear(x [..., K] float, packed, bias [N] | None) -> [..., N] (x.dtype)

Weights: int8 per output channel (Int8Linear's weight_q / scale), prepacked once for FBGEMM
(torch.ops.quantized.linear_prepack). Activations: quantized on the fly to 8 bits *per row*. FBGEMM's dynamic
linear picks one scale per call from the whole input's min / max, so a row's result would depend on the other
rows of the batch (a request's frames would change with what else is being served). Here every row is first
divided by its own absmax (so it lies in [-1, 1]) and one extra row holding +1 and -1 is appended: the range
FBGEMM sees is then exactly [-1, 1] in every call, its quantization parameters are constants, and the integer
GEMM is exact. Each row's output is multiplied back by its absmax and the bias added in one pass:

    y[m] = absmax(x[m]) * (W_q (x[m] / absmax(x[m]))_q) * scale + bias

The reference is Int8Linear.reference (weight-only dequantization, fp32 activations); the parity test
(tests/unit/test_cpu_fast.py) bounds the difference, and the quality gate covers the served model.
Without VNNI, FBGEMM's u8 x s8 pairs can saturate int16 unless the activation range is halved: reduce_range.
"""

from __future__ import annotations

import functools
import warnings
from collections import OrderedDict
from pathlib import Path

import torch


@functools.cache
def available() -> bool:
    """FBGEMM's quantized linear is compiled into this torch (x86 CPUs)."""
    return "fbgemm" in torch.backends.quantized.supported_engines


@functools.cache
def has_vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in (" avx512_vnni", " avx_vnni", " amx_int8"))


_PACKS: OrderedDict = OrderedDict()  # (weight ptr/version, scale ptr/version, shape) -> (weight, scale, packed)
MAX_PACKS = 256


def packed_for(weight_q: torch.Tensor, scale: torch.Tensor):
    """FBGEMM's packed form of (weight_q, scale), made once and reused. The entry holds the tensors themselves, so
    their storage cannot be freed and its address reused while cached; an in-place change (load_state_dict)
    bumps the version and repacks."""
    key = (weight_q.data_ptr(), weight_q._version, scale.data_ptr(), scale._version, tuple(weight_q.shape))
    hit = _PACKS.get(key)
    if hit is None:
        hit = _PACKS[key] = (weight_q, scale, prepack(weight_q, scale))
        while len(_PACKS) > MAX_PACKS:
            _PACKS.popitem(last=False)
    else:
        _PACKS.move_to_end(key)
    return hit[2]


@torch.library.custom_op("worldserve::w8a8_linear", mutates_args=())
def w8a8_op(x: torch.Tensor, weight_q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] float (CPU), weight_q int8 [N, K], scale fp32 [N], bias [N] | None -> [..., N] (x.dtype).
    One op, so torch.compile keeps the FBGEMM call (it cannot trace into the packed weight)."""
    return w8a8_linear(x, packed_for(weight_q, scale), bias, weight_q.shape[0])


@w8a8_op.register_fake
def _(x, weight_q, scale, bias):
    return x.new_empty(*x.shape[:-1], weight_q.shape[0])


def prepack(weight_q: torch.Tensor, scale: torch.Tensor):
    """int8 [N, K] + fp32 scale [N] -> FBGEMM packed weight (no bias: it is added after the row rescale)."""
    zero = torch.zeros(weight_q.shape[0], dtype=torch.int64)
    with warnings.catch_warnings():  # quantized tensors are deprecated in favour of torchao; still supported
        warnings.simplefilter("ignore")
        qw = torch._make_per_channel_quantized_tensor(weight_q.cpu(), scale.double().cpu(), zero, 0)
        return torch.ops.quantized.linear_prepack(qw, None)


@functools.cache
def _edge(k: int) -> torch.Tensor:
    e = torch.zeros(k)
    e[0], e[1] = 1.0, -1.0
    return e


def w8a8_linear(x: torch.Tensor, packed, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    # x float [..., K] (CPU) -> [..., N] in x.dtype
    k = x.shape[-1]
    x2 = x.reshape(-1, k).float()
    m = x2.shape[0]
    amax = x2.abs().amax(1, keepdim=True).clamp_(min=1e-30)  # [M, 1] (linalg.vector_norm(inf) is 20x slower)
    buf = torch.empty(m + 1, k)
    torch.div(x2, amax, out=buf[:m])
    buf[m] = _edge(k)  # pins FBGEMM's per-call range to [-1, 1]
    y = torch.ops.quantized.linear_dynamic(buf, packed, not has_vnni())[:m]  # fp32 [M, N]
    y = torch.addcmul(bias.float(), y, amax, out=y) if bias is not None else y.mul_(amax)
    return y.view(*x.shape[:-1], out_features).to(x.dtype)
