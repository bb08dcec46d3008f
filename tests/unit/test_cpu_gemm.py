"""runtime/cpu_gemm.py: bf16 linears on the CPU give a row the same bits alone and in any batch, in the form the load
probe picks for this CPU (on AMX CPUs oneDNN runs GEMMs of fewer than 128 rows through another kernel, which rounds a
few outputs of tiny's K >= 512 layers differently)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import ROOT
from worldserve.model.io import load_model_dir
from worldserve.runtime.cpu_gemm import PaddedLinear, pad_small_gemms, padded_linear, probe
from worldserve.runtime.loader import with_precision


@torch.no_grad()
@pytest.mark.parametrize("k, n", [(128, 384), (512, 128), (1152, 128)])  # tiny's qkv, fc2, neighbourhood layer
def test_the_probed_form_gives_a_row_the_same_bits_alone_and_in_any_batch(k, n):
    torch.manual_seed(0)
    lin = nn.Linear(k, n).bfloat16()
    form = probe(lin.weight, lin.bias)
    if form == "none":  # this CPU keeps neither form invariant for these weights: the load warns, nothing to hold
        pytest.skip(f"bf16 {k}x{n} is not batch-invariant on this CPU in either form")
    fn = padded_linear if form == "padded" else F.linear
    x = torch.randn(64 * 64, k, generator=torch.Generator().manual_seed(7)).bfloat16()  # not the probe's data
    full = fn(x, lin.weight, lin.bias)
    for m in (1, 16, 48, 64, 65, 100, 127, 128, 192, 1000):
        for o in range(0, 1024, m):
            assert torch.equal(fn(x[o : o + m], lin.weight, lin.bias), full[o : o + m]), (form, m, o)
    assert torch.equal(fn(x[:64].view(1, 64, k), lin.weight, lin.bias), full[:64].view(1, 64, -1))  # [B, N, K]
    torch.testing.assert_close(padded_linear(x[:64], lin.weight, lin.bias), F.linear(x[:64], lin.weight, lin.bias))


@torch.no_grad()
def test_bf16_cpu_model_probed_and_one_row_steps_equal_the_rows_in_a_batch():
    torch.set_num_threads(1)
    ref = load_model_dir(ROOT / "models" / "tiny")
    forms = pad_small_gemms(copy.deepcopy(ref).to(torch.bfloat16))
    names = {n for n, m in ref.named_modules() if isinstance(m, nn.Linear)}
    assert set().union(*forms.values()) == names and not forms["none"]  # every linear probed; tiny invariant here
    model = with_precision(ref, "bf16")  # what serve loads: the same forms applied
    assert {n for n, m in model.named_modules() if isinstance(m, PaddedLinear)} == set(forms["padded"])
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
