"""Batch-shape bucketing: step batches are padded to 1, 2, 4, ... max so compiled graphs are reused."""

from __future__ import annotations

import torch


def bucket(n: int, max_n: int) -> int:
    b = 1
    while b < n:
        b *= 2
    return min(b, max(max_n, n))


def buckets(max_n: int) -> list[int]:
    out, b = [], 1
    while b < max_n:
        out.append(b)
        b *= 2
    return [*out, max_n]


def pad_to(x: torch.Tensor, n: int, value) -> torch.Tensor:
    # x: [B, ...] -> [n, ...], extra rows filled with `value`
    if x.shape[0] == n:
        return x
    pad = torch.full((n - x.shape[0], *x.shape[1:]), value, dtype=x.dtype, device=x.device)
    return torch.cat([x, pad])
