"""FSQ quantization to token indices in one Triton kernel (reference: worldserve.model.tokenizer.FSQ).

    fsq_indices(z float [M, D], levels) -> int64 [M]
    fsq_indices_reference(z, fsq)       the reference: codes_to_indices(quantize(z))

Per channel: bound z with tanh onto (-(L-1)/2, (L-1)/2) (shifted for even L), round half to even, then the
mixed-radix index sum((round + L // 2) * basis). The reference divides the rounded value by L // 2 and
multiplies back before its final round; that round trip is exact, so the digit is round(bound(z)) + L // 2.
tanh is computed in fp64 from exp and rounded once to fp32 (neither tl.math nor the interpreter has tanh):
that is the correctly rounded tanhf, which torch.tanh on the CPU matches except in rare last-bit cases; a
last-bit difference changes an index only when a bounded value sits within one ulp of a rounding boundary
(torch's own CPU and CUDA tanh differ in the same way).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .device import require_device

MAX_D = 16
NO_FMA = {"enable_fp_fusion": False}  # round like PyTorch: no fused multiply-add


@triton.jit
def _fsq_kernel(z_ptr, out_ptr, half_ptr, offset_ptr, shift_ptr, center_ptr, basis_ptr, m_rows, d,
                stride_m, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # 64-bit: rows * stride_m
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < m_rows
    cmask = cols < d
    mask = rmask[:, None] & cmask[None, :]
    z = tl.load(z_ptr + rows[:, None] * stride_m + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    half = tl.load(half_ptr + cols, mask=cmask, other=1.0)
    offset = tl.load(offset_ptr + cols, mask=cmask, other=0.0)
    shift = tl.load(shift_ptr + cols, mask=cmask, other=0.0)
    center = tl.load(center_ptr + cols, mask=cmask, other=0)
    basis = tl.load(basis_ptr + cols, mask=cmask, other=0)
    y = z + shift[None, :]
    # tanh in fp64, rounded once to fp32: the correctly rounded tanhf (no tanh in the interpreter / tl.math)
    a = tl.abs(y.to(tl.float64))
    e = tl.exp(-2.0 * a)
    th = ((1.0 - e) / (1.0 + e)).to(tl.float32)
    th = tl.where(y < 0, -th, th)
    zb = th * half[None, :]  # two fp32 roundings, as the reference (no fused multiply-add: see the launch)
    zb = zb - offset[None, :]
    # round half to even: floor, then up if the fraction is > 0.5, or == 0.5 and the floor is odd
    fl = tl.floor(zb)
    frac = zb - fl
    fl_i = fl.to(tl.int64)
    up = (frac > 0.5) | ((frac == 0.5) & ((fl_i & 1) == 1))
    r = fl_i + up.to(tl.int64)
    digit = r + center[None, :]
    idx = tl.sum(tl.where(mask, digit * basis[None, :], 0), axis=1)
    tl.store(out_ptr + rows, idx, mask=rmask)


def fsq_tables(levels: tuple[int, ...] | list[int], device) -> dict[str, torch.Tensor]:
    """Per-channel constants, computed exactly as FSQ.bound computes them (float32)."""
    lv = torch.tensor(levels, dtype=torch.int64, device=device)
    half = (lv - 1).to(torch.float32) / 2
    offset = torch.where(lv % 2 == 0, 0.5, 0.0).to(torch.float32)
    return {
        "half": half, "offset": offset, "shift": torch.atanh(offset / half), "center": lv // 2,
        "basis": torch.cumprod(torch.cat([torch.ones(1, dtype=torch.int64, device=device), lv[:-1]]), 0),
    }


def fsq_indices(z: torch.Tensor, levels) -> torch.Tensor:
    """z float [..., D] (encoder output, channels last) -> int64 [...] token indices."""
    d = len(levels)
    require_device(_fsq_kernel, z)
    assert z.shape[-1] == d and d <= MAX_D, f"expected {d} channels (at most {MAX_D}), got {z.shape[-1]}"
    lead = z.shape[:-1]
    z2 = z.reshape(-1, d)
    if z2.stride(1) != 1:
        z2 = z2.contiguous()
    m = z2.shape[0]
    out = torch.empty(m, dtype=torch.int64, device=z.device)
    if m:
        t = fsq_tables(levels, z.device)
        block_m = 128
        _fsq_kernel[(triton.cdiv(m, block_m),)](z2, out, t["half"], t["offset"], t["shift"], t["center"], t["basis"],
                                                m, d, z2.stride(0), BLOCK_M=block_m,
                                                BLOCK_D=triton.next_power_of_2(d), **NO_FMA)
    return out.view(lead)


def fsq_indices_reference(z: torch.Tensor, fsq) -> torch.Tensor:
    """The PyTorch reference: worldserve.model.tokenizer.FSQ (z float [..., D] -> int64 [...])."""
    return fsq.codes_to_indices(fsq.quantize(z))
