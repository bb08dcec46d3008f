"""Weight-only int8 matmul with per-output-channel scales, dequantization fused into the tile loop.

    int8_matmul(x [M, K] float, weight_q int8 [N, K], scale fp32 [N], bias [N] | None) -> [M, N] (x.dtype)

Reference: worldserve.runtime.quantize.int8_linear_reference (dequantize the whole weight, then F.linear).
Here each [BLOCK_K, BLOCK_N] int8 tile is loaded (a quarter of the bytes of fp32), converted to the
activation dtype in registers and accumulated in fp32; the per-channel scale is applied once to the
accumulator (sum_k x * (q * s) = s * sum_k x * q) and the bias added before the store.

    torch.ops.worldserve.int8_matmul   the same function as one custom op, so torch.compile keeps the kernel
                                       (Int8Linear's CUDA path) instead of tracing the dequantize reference

Offsets are 64-bit: row index x stride overflows int32 from 2**31 elements (e.g. 33,555 rows of the
vocabulary head at 64,000 entries: 525 rows x 64 tokens of base).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .device import require_device


@triton.jit
def _int8_matmul_kernel(x_ptr, w_ptr, s_ptr, b_ptr, out_ptr, m, n, k,
                        stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
                        HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # 64-bit: rm * stride can pass 2**31
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k, BLOCK_K):
        kk = (k0 + rk).to(tl.int64)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=(rm[:, None] < m) & (kk[None, :] < k), other=0.0)
        w = tl.load(w_ptr + rn[None, :] * stride_wn + kk[:, None] * stride_wk,
                    mask=(rn[None, :] < n) & (kk[:, None] < k), other=0)  # int8 [BLOCK_K, BLOCK_N]
        if IEEE:
            acc += tl.dot(x, w.to(x.dtype), input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    s = tl.load(s_ptr + rn, mask=rn < n, other=0.0)
    acc = acc * s[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=(rm[:, None] < m) & (rn[None, :] < n))


def int8_matmul(x: torch.Tensor, weight_q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                block_m: int = 64, block_n: int = 64, block_k: int = 64) -> torch.Tensor:
    """x float [M, K]; weight_q int8 [N, K]; scale fp32 [N]; bias [N] or None -> [M, N] in x.dtype.

    fp32 activations accumulate with IEEE fp32 products (no TF32), so the result matches the reference to
    fp32 rounding; fp16 / bf16 activations use the tensor cores.
    """
    m, k = x.shape
    require_device(_int8_matmul_kernel, x)
    n = weight_q.shape[0]
    assert weight_q.shape[1] == k and weight_q.dtype == torch.int8, "weight_q must be int8 [N, K]"
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _int8_matmul_kernel[grid](
        x, weight_q, scale.float().contiguous(), bias if bias is not None else scale, out, m, n, k,
        x.stride(0), x.stride(1), weight_q.stride(0), weight_q.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return out


@torch.library.custom_op("worldserve::int8_matmul", mutates_args=())
def int8_matmul_op(x: torch.Tensor, weight_q: torch.Tensor, scale: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] float, weight_q int8 [N, K], scale fp32 [N], bias [N] | None -> [M, N] (x.dtype): int8_matmul."""
    return int8_matmul(x.contiguous(), weight_q, scale, bias)


@int8_matmul_op.register_fake
def _(x, weight_q, scale, bias):
    return x.new_empty(x.shape[0], weight_q.shape[0])
