"""Token sampler used by the engine: the chunked PyTorch sampler, or the Triton kernel.

On CUDA tensors the Triton kernel is the default (one program per token, no [B, N, V] temporaries); on the CPU
the chunked PyTorch sampler (worldserve.model.sampling.sample). `use_triton=True` forces the kernel (tests run
it on the CPU under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch

from ..model.sampling import sample


def _triton():
    try:
        from ..kernels.sampling import triton_sample
    except ImportError:  # triton not installed: the PyTorch sampler everywhere
        return None
    return triton_sample


class Sampler:
    def __init__(self, use_triton: bool = False):
        self.forced = _triton() if use_triton else None
        if use_triton and self.forced is None:
            raise RuntimeError("triton kernels requested but triton is not installed (pip install triton)")
        self._cuda = None

    def __call__(self, logits, temperature, seed, candidate, step) -> torch.Tensor:
        # logits [B, N, V]; the rest [B] -> int64 [B, N]
        if self.forced is not None:
            return self.forced(logits, temperature, seed, candidate, step)
        if logits.is_cuda:
            if self._cuda is None:
                self._cuda = _triton() or sample
            return self._cuda(logits, temperature, seed, candidate, step)
        return sample(logits, temperature, seed, candidate, step)
