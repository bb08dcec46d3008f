"""Batch-invariant sampling in one Triton kernel (reference: worldserve.model.sampling).

    triton_sample(logits [B, N, V], temperature [B], seed [B], candidate [B], step [B]) -> int64 [B, N]
    triton_token_uniform(seed [B], candidate [B], step [B], n_tokens) -> float32 [B, N]

One program per (row b, token n) walks the vocabulary in blocks of the reference's block size:
  1. max and first-index argmax (greedy rows stop here)
  2. total mass of p = exp((x - max) / t)
  3. the block whose running mass first exceeds u * total, then the first index inside it whose running
     mass (from the block's start) exceeds what is left: the reference's two-level inverse CDF, in the same order.
The per-token uniform comes from the same lowbias32 chain as the reference (uint32 arithmetic, wrapping
multiplies), bit for bit. Block sums are reduced in a different order than torch's, so a token can differ from
the reference only when u * total falls within float rounding of a boundary between two entries.
No [B, N, V] temporary is materialised. Element offsets into the logits are 64-bit (_offset): B x N x V
passes 2**31 from 525 rows of base (64 tokens x 64,000 entries).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..model.sampling import block_size
from .device import require_device

STEP_MUL = 0x85EBCA6B
M32 = 0xFFFFFFFF


@triton.jit
def _offset(i, stride):
    # 64-bit element offset i * stride: B x N x V passes 2**31 from 525 rows of base (64 tokens x 64,000)
    return i.to(tl.int64) * stride


@triton.jit
def _mix32(x):
    # uint32 -> uint32 (lowbias32, Wellons); multiplies wrap mod 2**32 like the reference's & 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = x * tl.full(x.shape, 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full(x.shape, 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _uniform(keys_ptr, b, n):
    # keys int64 [B, 4]: uint32 words seed lo, seed hi, candidate, step * STEP_MUL (see _keys) -> float32 in (0, 1)
    seed_lo = tl.load(keys_ptr + b * 4 + 0).to(tl.uint32)  # b < B: 4 * B stays far below 2**31
    seed_hi = tl.load(keys_ptr + b * 4 + 1).to(tl.uint32)
    cand = tl.load(keys_ptr + b * 4 + 2).to(tl.uint32)
    step_mul = tl.load(keys_ptr + b * 4 + 3).to(tl.uint32)
    tok_mul = n.to(tl.uint32) * tl.full([], 0xC2B2AE35, tl.uint32)
    h = _mix32(seed_lo ^ tl.full(seed_lo.shape, 0x9E3779B9, tl.uint32))
    h = _mix32(h ^ seed_hi)
    h = _mix32(h ^ cand)
    h = _mix32(h ^ step_mul)
    h = _mix32(h ^ tok_mul)
    return ((h >> 8).to(tl.float32) + 0.5) / 16777216.0


@triton.jit
def _sample_kernel(logits_ptr, out_ptr, temp_ptr, keys_ptr, n_tokens, vocab, stride_b, stride_n,
                   BLOCK_V: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // n_tokens
    n = pid % n_tokens
    row = logits_ptr + _offset(b, stride_b) + _offset(n, stride_n)
    # 1. max and its first index
    best = tl.full([], float("-inf"), tl.float32)
    best_i = tl.full([], 0, tl.int32)
    for start in range(0, vocab, BLOCK_V):
        voc = start + tl.arange(0, BLOCK_V)
        x = tl.load(row + voc, mask=voc < vocab, other=float("-inf")).to(tl.float32)
        blk_best, blk_i = tl.max(x, 0, return_indices=True, return_indices_tie_break_left=True)
        better = blk_best > best  # strict: an earlier block keeps a tie (first index, as torch.argmax)
        best_i = tl.where(better, blk_i + start, best_i)
        best = tl.where(better, blk_best, best)
    t = tl.load(temp_ptr + b)
    if t > 0:
        t = tl.maximum(t, 1e-6)
        # 2. total mass
        total = tl.full([], 0.0, tl.float32)
        for start in range(0, vocab, BLOCK_V):
            voc = start + tl.arange(0, BLOCK_V)
            x = tl.load(row + voc, mask=voc < vocab, other=float("-inf")).to(tl.float32)
            total += tl.sum(tl.exp((x - best) / t), 0)
        target = _uniform(keys_ptr, b, n) * total
        # 3. the block, then the index: first running mass above the target
        acc = tl.full([], 0.0, tl.float32)
        chosen = tl.full([], -1, tl.int32)
        last_nz = tl.full([], 0, tl.int32)
        for start in range(0, vocab, BLOCK_V):
            voc = start + tl.arange(0, BLOCK_V)
            x = tl.load(row + voc, mask=voc < vocab, other=float("-inf")).to(tl.float32)
            p = tl.exp((x - best) / t)
            s = tl.sum(p, 0)
            blk_last = tl.max(tl.where(p > 0, voc, -1), 0)
            j = tl.min(tl.where(tl.cumsum(p, 0) > target - acc, voc, vocab), 0)
            j = tl.minimum(j, blk_last)  # rounding guard: never an entry of zero mass
            take = (chosen < 0) & (acc + s > target)
            chosen = tl.where(take, j, chosen)
            last_nz = tl.maximum(last_nz, blk_last)
            acc += s
        best_i = tl.where(chosen < 0, last_nz, chosen)  # target == total by rounding: the last entry with mass
    tl.store(out_ptr + pid, best_i.to(tl.int64))


@triton.jit
def _uniform_kernel(out_ptr, keys_ptr, n_tokens):
    pid = tl.program_id(0)
    tl.store(out_ptr + pid, _uniform(keys_ptr, pid // n_tokens, pid % n_tokens))


def _keys(seed, candidate, step) -> torch.Tensor:
    """int64 [B, 4]: the reference's per-row hash inputs reduced to uint32 words.

    The reference computes in int64 then masks to 32 bits, so (x * C) & M32 only needs the low words.
    """
    return torch.stack([seed & M32, (seed >> 32) & M32, candidate & M32, (step * STEP_MUL) & M32], 1).contiguous()


def triton_token_uniform(seed, candidate, step, n_tokens: int) -> torch.Tensor:
    # seed, candidate, step int64 [B] -> float32 [B, n_tokens]; equals model.sampling.token_uniform bit for bit
    require_device(_uniform_kernel, seed)
    out = torch.empty(seed.shape[0], n_tokens, dtype=torch.float32, device=seed.device)
    if out.numel():
        _uniform_kernel[(out.numel(),)](out, _keys(seed, candidate, step), n_tokens)
    return out


def triton_sample(logits, temperature, seed, candidate, step) -> torch.Tensor:
    """logits float [B, N, V]; temperature float [B] (0 = greedy); seed / candidate / step int64 [B] -> int64 [B, N]."""
    b, n, v = logits.shape
    require_device(_sample_kernel, logits)
    if logits.stride(2) != 1:
        logits = logits.contiguous()
    out = torch.empty(b, n, dtype=torch.int64, device=logits.device)
    if out.numel():
        _sample_kernel[(b * n,)](logits, out, temperature.float().contiguous(), _keys(seed, candidate, step), n, v,
                                 logits.stride(0), logits.stride(1), BLOCK_V=block_size(v), enable_fp_fusion=False)
    return out
