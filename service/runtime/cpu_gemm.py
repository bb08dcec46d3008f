"""bf16 linears on the CPU whose bits for a row do not depend on the batch, where this CPU allows it.

    forms = pad_small_gemms(model)   each nn.Linear of a bf16 model: plain, padded to MIN_M rows, or not invariant

oneDNN picks its bf16 matmul kernel and blocking by M, the GEMM's row count. On a CPU with AMX (seen: a Xeon with
amx_bf16, torch 2.13) a few outputs then round differently for the same row at different M: tiny's fc2 and 3x3
neighbourhood layer (K = 512, 1152) at M in ~33..127 against M >= 128, so a one-row step of tiny (M = 64 tokens)
sampled other tokens than the same row in a batch (tests/unit/test_gpu_check.py's invariance phase: 92 % equal).
With oneDNN limited to AVX-512 BF16 (ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16) the same layers agreed at every M.

Which form keeps a layer invariant depends on the CPU, the layer's shape and, through which outputs sit near a
rounding boundary, its weights. So it is measured when the model is loaded (probe), once per shape: the kernel is
chosen per shape, and the first layer of a shape stands for the others (tiny's four fc2). Every row of a
PROBE_M-row GEMM against the same row computed in GEMMs of 1 to 512 rows (a rounding difference touches few rows,
so every row is compared at every row count). It is an empirical check, not a proof.
- "plain": already invariant; nothing changes (tiny's K = 128 layers on AMX).
- "padded": invariant once a GEMM of fewer than MIN_M rows gets zero rows appended (tiny's fc2 and neighbourhood
  layer on AMX); only calls of fewer than MIN_M rows pay: tiny's one-row step 1.02-1.18x.
- "none": neither. The layer stays plain and the load logs that bf16 on this CPU is not batch-invariant for it.
  base at bf16 on AMX: 25 of its 37 linears (the blocking also changes between 128 and 4096 rows; probing base takes
  ~6 s). Fixed-size GEMM chunks (every call exactly 128 or 256 rows) were invariant for every shape tried, at 1.5-4x
  the GEMM's time, and are not built.
tests/unit/test_cpu_gemm.py checks every form the probe picks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MIN_M = 128  # GEMM rows from which oneDNN's bf16 matmul on AMX keeps one kernel for tiny's shapes
PROBE_M = 1024  # the batch a row is compared in (rows 0..63 only at fewer than 16 rows a GEMM)
PROBE_ROWS = (1, 16, 33, 64, 100, 127, 192, 512)  # the row counts compared


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


@torch.no_grad()
def probe(weight: torch.Tensor, bias: torch.Tensor | None) -> str:
    """Which form gives a row of this layer the same bits alone and in a batch here: "plain" | "padded" | "none"."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(PROBE_M, weight.shape[1], generator=g).to(weight.dtype)
    full = F.linear(x, weight, bias)
    for form, fn in (("plain", F.linear), ("padded", padded_linear)):  # every probe row, at every row count
        if all(torch.equal(fn(x[o : o + m], weight, bias), full[o : o + m])
               for m in PROBE_ROWS for o in range(0, (PROBE_M if m >= 16 else 64) - m + 1, m)):
            return form
    return "none"


def pad_small_gemms(model: nn.Module) -> dict[str, list[str]]:
    """Probe each plain nn.Linear of a bf16 model on the CPU (once per shape) and make the ones that need it
    PaddedLinear in place (quantized linears keep their own kernels). -> {form: [module names]}."""
    forms: dict[str, list[str]] = {"plain": [], "padded": [], "none": []}
    seen: dict[tuple, str] = {}
    for name, mod in model.named_modules():
        if type(mod) is not nn.Linear or mod.weight.dtype != torch.bfloat16 or mod.weight.device.type != "cpu":
            continue
        shape = (*mod.weight.shape, mod.bias is not None)
        if shape not in seen:
            seen[shape] = probe(mod.weight, mod.bias)
        forms[seen[shape]].append(name)
        if seen[shape] == "padded":
            mod.__class__ = PaddedLinear
    return forms
