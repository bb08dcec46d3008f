"""Where a Triton kernel can run: CUDA tensors, or CPU tensors under the interpreter (TRITON_INTERPRET=1)."""

from __future__ import annotations

import torch
from triton.runtime.interpreter import InterpretedFunction


def require_device(kernel, t: torch.Tensor) -> None:
    """Raise a clear error instead of a driver failure when `kernel` cannot run on t's device."""
    if not t.is_cuda and not isinstance(kernel, InterpretedFunction):
        raise RuntimeError(f"Triton kernels run on CUDA tensors (got {t.device}); on a CPU they only run under "
                           "the interpreter (TRITON_INTERPRET=1 set before import, for tests); use the PyTorch "
                           "reference path instead (no --triton)")
