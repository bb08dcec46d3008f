"""bf16 linears on the CPU whose bits for a row do not depend on the batch.

    pad_small_gemms(model)   every nn.Linear of the model runs at least MIN_M rows (fewer: zero rows appended)

oneDNN picks its bf16 matmul kernel by M, the GEMM's row count. On a CPU with AMX (seen: Xeon with amx_bf16,
torch 2.13) M in about 33..127 runs another kernel than M >= 128, and a few outputs of a layer with K >= 512 (tiny's
fc2 and its 3x3 neighbourhood layer) round differently: a one-row step of tiny (M = 64 tokens) sampled other tokens
than the same row stepped in a batch (tests/unit/test_gpu_check.py's invariance phase: 92 % agreement), and a
vectorized env's rewards differed from the same sessions stepped one by one. With every GEMM at M >= 128 each row
goes through the one kernel that serves every batch, so a row's result is the same alone and in any batch
(tests/unit/test_cpu_gemm.py). The cost falls on steps of fewer than 128 tokens only: tiny's one-row step.
On a CPU without AMX the kernels agreed already; padding changes nothing there but the cost.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MIN_M = 128  # GEMM rows from which oneDNN's bf16 matmul keeps one kernel (AMX: M >= 128)


def padded_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x [..., K]) -> [..., N] with at least MIN_M rows in the GEMM (bf16 on the CPU; else plain)."""
    m = x.numel() // x.shape[-1]
    if m >= MIN_M or x.dtype != torch.bfloat16 or x.device.type != "cpu":
        return F.linear(x, weight, bias)
    flat = F.pad(x.reshape(m, x.shape[-1]), (0, 0, 0, MIN_M - m))  # [MIN_M, K]: the rows, then zeros
    return F.linear(flat, weight, bias)[:m].view(*x.shape[:-1], weight.shape[0])


class PaddedLinear(nn.Linear):
    """nn.Linear through padded_linear: the same parameters and state_dict keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return padded_linear(x, self.weight, self.bias)


def pad_small_gemms(model: nn.Module) -> nn.Module:
    """Every plain nn.Linear of `model` becomes a PaddedLinear in place (quantized linears keep their own kernels).
    -> model."""
    for mod in model.modules():
        if type(mod) is nn.Linear:
            mod.__class__ = PaddedLinear
    return model
