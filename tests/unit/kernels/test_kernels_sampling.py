"""Triton sampling kernel vs the PyTorch reference (worldserve.model.sampling): identical uniforms and tokens."""

import pytest
import torch

from worldserve.engine.sampler import Sampler
from worldserve.kernels.sampling import triton_sample, triton_uniform
from worldserve.model.sampling import sample, uniform

SEED = torch.tensor([0, 1, 2**40 + 7, 2**62 + 12345, 99, 2**63 - 1])
CAND = torch.tensor([0, 3, 1, 0, 7, 2**33])
STEP = torch.tensor([0, 1, 5, 10**6, 3, 2**40])
TEMP = torch.tensor([0.0, 1.0, 0.5, 2.0, 1e-8, 0.7])


def test_interpreted():
    from worldserve.kernels import sampling

    assert type(sampling._sample_kernel).__name__ == "InterpretedFunction", "kernel compiled before TRITON_INTERPRET"


@pytest.mark.parametrize("n,v", [(8, 125), (3, 3000)])
def test_uniform_bit_identical(n, v):
    # [B, n, v] from the same uint32 hash chain: equal bit for bit, including 64-bit seeds and huge steps
    assert torch.equal(triton_uniform(SEED, CAND, STEP, n, v), uniform(SEED, CAND, STEP, n, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,v", [(16, 125), (4, 3000)])  # 3000: three vocabulary blocks per row
def test_sample_matches_reference(dtype, n, v):
    g = torch.Generator().manual_seed(v)
    logits = (torch.randn(len(SEED), n, v, generator=g) * 3).to(dtype)  # [B, N, V]
    out = triton_sample(logits, TEMP, SEED, CAND, STEP)
    assert out.dtype == torch.int64 and out.shape == (len(SEED), n)
    assert torch.equal(out, sample(logits, TEMP, SEED, CAND, STEP))


def test_greedy_ties_take_the_first_index():
    logits = torch.zeros(2, 3, 2500)
    logits[:, :, 7] = 1.0
    logits[:, :, 2100] = 1.0  # same max in a later block
    zeros = torch.zeros(2, dtype=torch.int64)
    out = triton_sample(logits, torch.zeros(2), zeros, zeros, zeros)
    assert torch.equal(out, sample(logits, torch.zeros(2), zeros, zeros, zeros))
    assert (out == 7).all()


def test_non_contiguous_logits_and_engine_sampler():
    logits = torch.randn(4, 125, 16).transpose(1, 2)  # [B, N, V] with a strided vocabulary axis
    seed, cand, step = torch.arange(4) * 11, torch.zeros(4, dtype=torch.int64), torch.arange(4)
    temp = torch.full((4,), 1.0)
    ref = sample(logits, temp, seed, cand, step)
    assert torch.equal(triton_sample(logits, temp, seed, cand, step), ref)
    assert torch.equal(Sampler(use_triton=True)(logits, temp, seed, cand, step), ref)
