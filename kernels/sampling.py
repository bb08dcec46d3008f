"""Batch-invariant Gumbel-max sampling in one Triton kernel (reference: worldserve.model.sampling).

    triton_sample(logits [B, N, V], temperature [B], seed [B], candidate [B], step [B]) -> int64 [B, N]
    triton_uniform(seed [B], candidate [B], step [B], n_tokens, vocab) -> float32 [B, N, V]

One program per (row b, token n) walks the vocabulary in blocks, hashing (seed, candidate, step, token,
vocab entry) with the same lowbias32 chain as the reference (uint32 arithmetic, wrapping multiplies), so
the uniforms are bit-identical; the Gumbel transform -log(-log(u)) and the running first-index argmax
follow the reference operation by operation. No [B, N, V] noise tensor is materialised.
The uniforms are exactly equal to the reference's. The logs are computed in fp64 and rounded once to fp32
(the correctly rounded logf), which torch.log matches except in rare last-bit cases; a token could then
differ only if two candidates of a row were also within that last bit of each other.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .device import require_device

GOLDEN = 0x9E3779B9
STEP_MUL = 0x85EBCA6B
TOKEN_MUL = 0xC2B2AE35
M32 = 0xFFFFFFFF


@triton.jit
def _mix32(x):
    # uint32 -> uint32 (lowbias32, Wellons); multiplies wrap mod 2**32 like the reference's & 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = x * tl.full(x.shape, 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full(x.shape, 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _token_hash(keys_ptr, b, n):
    # per-(row, token) prefix of the reference's hash chain -> uint32 scalar
    # keys int64 [B, 5]: uint32 words seed lo, seed hi, candidate, step * STEP_MUL; temperature bits (see _keys)
    seed_lo = tl.load(keys_ptr + b * 5 + 0).to(tl.uint32)
    seed_hi = tl.load(keys_ptr + b * 5 + 1).to(tl.uint32)
    cand = tl.load(keys_ptr + b * 5 + 2).to(tl.uint32)
    step_mul = tl.load(keys_ptr + b * 5 + 3).to(tl.uint32)
    tok_mul = n.to(tl.uint32) * tl.full([], 0xC2B2AE35, tl.uint32)
    h = _mix32(seed_lo ^ tl.full(seed_lo.shape, 0x9E3779B9, tl.uint32))
    h = _mix32(h ^ seed_hi)
    h = _mix32(h ^ cand)
    h = _mix32(h ^ step_mul)
    return _mix32(h ^ tok_mul)


@triton.jit
def _uniform(h_tok, voc):
    # h_tok uint32 scalar, voc int32 [BLOCK] -> float32 [BLOCK] in (0, 1)
    h = _mix32(h_tok ^ voc.to(tl.uint32))
    return ((h >> 8).to(tl.float32) + 0.5) / 16777216.0


@triton.jit
def _sample_kernel(logits_ptr, out_ptr, temp_ptr, keys_ptr, n_tokens, vocab, stride_b, stride_n,
                   BLOCK_V: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // n_tokens
    n = pid % n_tokens
    h_tok = _token_hash(keys_ptr, b, n)
    temp = tl.load(temp_ptr + b)
    t = tl.load(keys_ptr + b * 5 + 4).to(tl.uint32).to(tl.float32, bitcast=True)  # clamped, in logits' dtype
    row = logits_ptr + b * stride_b + n * stride_n
    best = tl.full([], float("-inf"), tl.float32)
    best_i = tl.full([], 0, tl.int32)
    for start in range(0, vocab, BLOCK_V):
        voc = start + tl.arange(0, BLOCK_V)
        m = voc < vocab
        x = tl.load(row + voc, mask=m, other=float("-inf")).to(tl.float32)
        if temp > 0:
            u = _uniform(h_tok, voc)
            # each log in fp64 rounded once to fp32: the correctly rounded logf the reference's two logs give
            l1 = tl.log(u.to(tl.float64)).to(tl.float32)
            g = -(tl.log(-l1.to(tl.float64)).to(tl.float32))
            x = x / t + g
        x = tl.where(m, x, float("-inf"))
        blk_best, blk_i = tl.max(x, 0, return_indices=True, return_indices_tie_break_left=True)
        better = blk_best > best  # strict: an earlier block keeps a tie (first index, as torch.argmax)
        best_i = tl.where(better, blk_i + start, best_i)
        best = tl.where(better, blk_best, best)
    tl.store(out_ptr + pid, best_i.to(tl.int64))


@triton.jit
def _uniform_kernel(out_ptr, keys_ptr, n_tokens, vocab, BLOCK_V: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // n_tokens
    n = pid % n_tokens
    h_tok = _token_hash(keys_ptr, b, n)
    for start in range(0, vocab, BLOCK_V):
        voc = start + tl.arange(0, BLOCK_V)
        tl.store(out_ptr + pid * vocab + voc, _uniform(h_tok, voc), mask=voc < vocab)


def _keys(seed, candidate, step, temperature=None, dtype=torch.float32) -> torch.Tensor:
    """int64 [B, 5]: the reference's per-row hash inputs reduced to uint32 words, and the clamped temperature.

    The reference computes in int64 then masks to 32 bits, so (x * C) & M32 only needs the low words.
    """
    b = seed.shape[0]
    t = torch.ones(b, device=seed.device) if temperature is None else temperature
    t = t.clamp(min=1e-6).to(dtype).float()  # the reference divides by the temperature cast to the logits dtype
    return torch.stack([
        seed & M32, (seed >> 32) & M32, candidate & M32, (step * STEP_MUL) & M32,
        t.view(torch.int32).to(torch.int64) & M32,
    ], 1).contiguous()


def triton_uniform(seed, candidate, step, n_tokens: int, vocab: int) -> torch.Tensor:
    # seed, candidate, step int64 [B] -> float32 [B, n_tokens, vocab]; equals model.sampling.uniform bit for bit
    require_device(_uniform_kernel, seed)
    b = seed.shape[0]
    out = torch.empty(b, n_tokens, vocab, dtype=torch.float32, device=seed.device)
    if out.numel():
        _uniform_kernel[(b * n_tokens,)](out, _keys(seed, candidate, step), n_tokens, vocab,
                                         BLOCK_V=min(1024, triton.next_power_of_2(vocab)))
    return out


def triton_sample(logits, temperature, seed, candidate, step) -> torch.Tensor:
    """logits float [B, N, V]; temperature float [B] (0 = greedy); seed / candidate / step int64 [B] -> int64 [B, N]."""
    b, n, v = logits.shape
    require_device(_sample_kernel, logits)
    if logits.stride(2) != 1:
        logits = logits.contiguous()
    out = torch.empty(b, n, dtype=torch.int64, device=logits.device)
    if out.numel():
        keys = _keys(seed, candidate, step, temperature.float(), logits.dtype)
        _sample_kernel[(b * n,)](logits, out, temperature.float().contiguous(), keys, n, v,
                                 logits.stride(0), logits.stride(1), BLOCK_V=min(1024, triton.next_power_of_2(v)),
                                 enable_fp_fusion=False)
    return out
