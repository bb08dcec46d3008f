"""Batch-invariant, counter-based sampling (pure PyTorch reference).

Every random number is a hash of (seed, candidate, step, token, vocab entry): no generator state,
so a rollout samples the same tokens alone or inside any batch, and a rerun on another worker
reproduces it exactly. Gumbel-max over the logits turns the uniforms into a categorical sample.
"""

from __future__ import annotations

import torch

M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # int64 tensor holding uint32 values -> uint32 values (lowbias32 hash, Wellons)
    x = x & M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def uniform(seed: torch.Tensor, candidate: torch.Tensor, step: torch.Tensor, n_tokens: int, vocab: int):
    """seed, candidate, step: int64 [B] -> float32 [B, n_tokens, vocab] in (0, 1)."""
    dev = seed.device
    seed = seed[:, None, None]
    h = _mix32((seed & M32) ^ 0x9E3779B9)
    h = _mix32(h ^ ((seed >> 32) & M32))
    h = _mix32(h ^ candidate[:, None, None])
    h = _mix32(h ^ (step[:, None, None] * 0x85EBCA6B))
    tok = torch.arange(n_tokens, device=dev, dtype=torch.int64)[None, :, None]
    voc = torch.arange(vocab, device=dev, dtype=torch.int64)[None, None, :]
    h = _mix32(h ^ (tok * 0xC2B2AE35))
    h = _mix32(h ^ voc)
    # 24 high-quality bits -> (0, 1)
    return ((h >> 8).to(torch.float32) + 0.5) / float(1 << 24)


def sample(logits, temperature, seed, candidate, step):
    """logits float [B, N, V]; temperature float [B] (0 = greedy); seed/candidate/step int64 [B].

    Returns int64 [B, N].
    """
    b, n, v = logits.shape
    greedy = logits.argmax(-1)
    u = uniform(seed, candidate, step, n, v)
    gumbel = -torch.log(-torch.log(u))
    t = temperature.clamp(min=1e-6).to(logits.dtype)[:, None, None]
    sampled = (logits.float() / t + gumbel).argmax(-1)
    return torch.where((temperature > 0)[:, None], sampled, greedy)
