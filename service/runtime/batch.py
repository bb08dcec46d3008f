"""Batch-shape bucketing, shared by the runtime backends and the engine: step batches are padded to 1, 2, 4, ...
max so compiled graphs and TensorRT profiles are reused."""

from __future__ import annotations

import torch


def pow2(n: int) -> int:
    # the smallest power of two >= n (the padded batch size compiled shapes are keyed on)
    b = 1
    while b < n:
        b *= 2
    return b


def bucket(n: int, max_n: int) -> int:
    return min(pow2(n), max(max_n, n))


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


CHUNK = 8


def run_fixed_chunks(fn, x: torch.Tensor, size: int = CHUNK) -> torch.Tensor:
    """Apply a per-row function in chunks of exactly `size` rows (the last one padded).

    CPU conv / matmul kernels pick their algorithm by batch size, so the same row can round differently
    in a batch of 1 and a batch of 16. A fixed chunk size keeps encode / decode batch-invariant.
    """
    outs = []
    for i in range(0, x.shape[0], size):
        part = x[i : i + size]
        n = part.shape[0]
        if n < size:
            part = torch.cat([part, part[:1].expand(size - n, *part.shape[1:])])
        outs.append(fn(part)[:n])
    return torch.cat(outs)
