"""Token sampler used by the engine: the PyTorch reference, or the Triton kernel when enabled."""

from __future__ import annotations

import torch

from ..model.sampling import sample


class Sampler:
    def __init__(self, use_triton: bool = False):
        self.fn = sample
        if use_triton:
            from ..kernels.sampling import triton_sample

            self.fn = triton_sample

    def __call__(self, logits, temperature, seed, candidate, step) -> torch.Tensor:
        # logits [B, N, V]; the rest [B] -> int64 [B, N]
        return self.fn(logits, temperature, seed, candidate, step)
