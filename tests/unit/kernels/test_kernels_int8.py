"""Triton weight-only int8 matmul vs the Int8Linear reference path (worldserve.runtime.quantize)."""

import pytest
import torch

from worldserve.kernels.int8_matmul import int8_matmul
from worldserve.runtime.quantize import Int8Linear, int8_linear_reference, quantize_int8


@pytest.mark.parametrize("m,k,n,bias", [(64, 128, 384, True), (37, 100, 70, False), (1, 512, 128, True)])
def test_matches_reference(m, k, n, bias):
    g = torch.Generator().manual_seed(m + k + n)
    q, s = quantize_int8(torch.randn(n, k, generator=g))
    b = torch.randn(n, generator=g) if bias else None
    x = torch.randn(m, k, generator=g)  # [M, K]
    out = int8_matmul(x, q, s, b)
    ref = int8_linear_reference(x, q, s, b)
    assert out.shape == (m, n) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-5)


def test_int8_linear_module():
    lin = torch.nn.Linear(96, 80)
    mod = Int8Linear.from_linear(lin)
    x = torch.randn(5, 7, 96)
    torch.testing.assert_close(int8_matmul(x.reshape(-1, 96), mod.weight_q, mod.scale, mod.bias).view(5, 7, 80),
                               mod.reference(x), atol=1e-4, rtol=1e-5)
