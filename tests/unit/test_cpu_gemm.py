"""runtime/cpu_gemm.py: bf16 linears on the CPU give a row the same bits alone and in any batch (on AMX CPUs oneDNN
runs GEMMs of fewer than 128 rows through another kernel, which rounds a few outputs differently)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.conftest import ROOT
from worldserve.model.io import load_model_dir
from worldserve.runtime.cpu_gemm import MIN_M, PaddedLinear, pad_small_gemms
from worldserve.runtime.loader import with_precision


@torch.no_grad()
@pytest.mark.parametrize("k", [128, 512, 1152])
def test_a_row_has_the_same_bits_alone_and_in_any_batch(k):
    torch.manual_seed(0)
    lin = pad_small_gemms(nn.Sequential(nn.Linear(k, 128))).bfloat16()[0]
    assert isinstance(lin, PaddedLinear)
    x = torch.randn(64 * 64, k).bfloat16()
    full = lin(x)
    for m in (1, 16, 48, 64, 65, 100, 127, MIN_M, 192, 1000):
        assert torch.equal(lin(x[:m]), full[:m]), f"rows 0..{m} alone differ from the same rows in {len(x)}"
    assert torch.equal(lin(x[:64].view(1, 64, k)), full[:64].view(1, 64, -1))  # [B, N, K] as the model calls it
    torch.testing.assert_close(lin(x[:64]), nn.functional.linear(x[:64], lin.weight, lin.bias))  # the same layer


@torch.no_grad()
def test_bf16_cpu_model_is_padded_and_one_row_steps_equal_the_rows_in_a_batch():
    torch.set_num_threads(1)
    ref = load_model_dir(ROOT / "models" / "tiny")
    model = with_precision(ref, "bf16")
    assert all(type(m) is not nn.Linear for m in model.modules())  # every plain linear padded
    assert all(type(m) is nn.Linear for m in ref.modules() if isinstance(m, nn.Linear))  # the fp32 model untouched
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    b = 8
    tokens = torch.randint(0, cfg.vocab_size, (b, 3, cfg.tokens_per_frame), generator=g)
    acts = torch.randint(0, cfg.n_actions, (b, 2), generator=g)
    step_acts = torch.randint(0, cfg.n_actions, (b,), generator=g)

    def step(rows):
        cache = model.allocate_cache(b)
        model.prefill(cache, rows, tokens[rows], acts[rows])
        return model.step(cache, rows, step_acts[rows])

    batch = step(torch.arange(b))
    for i in range(b):
        for got, want in zip(step(torch.tensor([i])), batch, strict=True):
            assert torch.equal(got, want[i : i + 1]), f"row {i} alone differs from row {i} in a batch of {b}"
