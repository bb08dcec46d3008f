"""Sampling: the chunked PyTorch sampler and the Triton kernel against the plain reference, and all three against
the distribution they promise (softmax(logits / t)), batch invariance, and the greedy contract."""

import pytest
import torch

from worldserve.kernels.sampling import triton_sample, triton_token_uniform
from worldserve.model import sampling
from worldserve.model.sampling import sample, sample_reference, token_uniform
from worldserve.runtime.batch import Sampler

SEED = torch.tensor([0, 1, 2**40 + 7, 2**62 + 12345, 99, 2**63 - 1])
CAND = torch.tensor([0, 3, 1, 0, 7, 2**33])
STEP = torch.tensor([0, 1, 5, 10**6, 3, 2**40])
TEMP = torch.tensor([0.0, 1.0, 0.5, 2.0, 1e-8, 0.7])


def _logits(n, v, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(len(SEED), n, v, generator=g) * 3).to(dtype)  # [B, N, V]


def test_interpreted():
    from worldserve.kernels import sampling as ks

    assert type(ks._sample_kernel).__name__ == "InterpretedFunction", "kernel compiled before TRITON_INTERPRET"


def test_token_uniform_bit_identical():
    # [B, N] from the same uint32 hash chain: equal bit for bit, including 64-bit seeds and huge steps
    u = token_uniform(SEED, CAND, STEP, 16)
    assert torch.equal(triton_token_uniform(SEED, CAND, STEP, 16), u)
    assert bool(((u > 0) & (u < 1)).all()) and len(set(u.view(-1).tolist())) == u.numel()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,v", [(16, 125), (4, 3000), (8, 64)])  # 3000: several vocabulary blocks per row
def test_chunked_and_triton_match_reference(dtype, n, v):
    logits = _logits(n, v, dtype, seed=v)
    ref = sample_reference(logits, TEMP, SEED, CAND, STEP)
    fast = sample(logits, TEMP, SEED, CAND, STEP)
    tri = triton_sample(logits, TEMP, SEED, CAND, STEP)
    assert fast.dtype == tri.dtype == torch.int64 and fast.shape == tri.shape == (len(SEED), n)
    greedy = TEMP == 0
    assert torch.equal(fast[greedy], logits[greedy].argmax(-1)) and torch.equal(tri[greedy], fast[greedy])
    # sampled rows: the same inverse CDF; they may differ only where u * total is within rounding of a boundary
    assert (fast == ref).float().mean() >= 0.99
    assert (tri == fast).float().mean() >= 0.99


def test_batch_invariant_rows_alone_or_batched():
    logits = _logits(8, 3000)
    both = sample(logits, TEMP, SEED, CAND, STEP)
    for i in range(len(SEED)):
        alone = sample(logits[i : i + 1], TEMP[i : i + 1], SEED[i : i + 1], CAND[i : i + 1], STEP[i : i + 1])
        assert torch.equal(alone[0], both[i])
    # a row's draw depends on (seed, candidate, step, token) only: reorder the batch, same tokens
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    assert torch.equal(sample(logits[perm], TEMP[perm], SEED[perm], CAND[perm], STEP[perm]), both[perm])


@pytest.mark.parametrize("fn", [sample, triton_sample, sample_reference], ids=["chunked", "triton", "reference"])
def test_frequencies_follow_softmax(fn):
    # one token, 6 entries, m independent streams (seeds): empirical frequencies vs softmax(logits / t)
    logits = torch.tensor([2.0, 0.0, -1.0, 1.0, -30.0, 0.5])
    m, t = (800 if fn is triton_sample else 4000), 0.8  # the interpreter runs one program per draw
    z = torch.zeros(m, dtype=torch.int64)
    draws = fn(logits.expand(m, 1, 6).contiguous(), torch.full((m,), t), torch.arange(m), z, z)
    freq = torch.bincount(draws.view(-1), minlength=6).double() / m
    p = torch.softmax(logits.double() / t, -1)
    assert (freq - p).abs().max() < 4 * (p * (1 - p) / m).sqrt().max()  # within 4 sigma per entry
    assert freq[4] == 0  # an entry of mass ~1e-13 is never drawn in m tries


@pytest.mark.parametrize("fn", [sample, triton_sample], ids=["chunked", "triton"])
def test_entries_without_mass_are_never_drawn(fn):
    # -inf logits (masked vocabulary) and a huge vocabulary block of nothing: never sampled, even at the tail
    logits = torch.full((4, 3, 1100), float("-inf"))
    logits[:, :, 3] = 0.0
    logits[:, :, 600] = 0.0
    logits[:, :, 1099] = -1.0
    z = torch.zeros(4, dtype=torch.int64)
    out = fn(logits, torch.ones(4), torch.arange(4) * 977, z, z)
    assert set(out.view(-1).tolist()) <= {3, 600, 1099}


def test_greedy_ties_take_the_first_index():
    logits = torch.zeros(2, 3, 2500)
    logits[:, :, 7] = 1.0
    logits[:, :, 2100] = 1.0  # same max in a later block
    zeros = torch.zeros(2, dtype=torch.int64)
    assert (triton_sample(logits, torch.zeros(2), zeros, zeros, zeros) == 7).all()
    assert (sample(logits, torch.zeros(2), zeros, zeros, zeros) == 7).all()


def test_non_contiguous_logits_and_engine_sampler():
    logits = torch.randn(4, 125, 16).transpose(1, 2)  # [B, N, V] with a strided vocabulary axis
    seed, cand, step = torch.arange(4) * 11, torch.zeros(4, dtype=torch.int64), torch.arange(4)
    temp = torch.full((4,), 1.0)
    ref = sample(logits, temp, seed, cand, step)
    assert torch.equal(sample(logits.contiguous(), temp, seed, cand, step), ref)
    assert (triton_sample(logits, temp, seed, cand, step) == ref).float().mean() >= 0.99
    assert (Sampler(use_triton=True)(logits, temp, seed, cand, step) == ref).float().mean() >= 0.99


def test_chunk_boundaries_do_not_change_a_row(monkeypatch):
    # a row's token is the same whatever chunk it falls in and whatever else that chunk holds
    logits = _logits(8, 1000, seed=5)
    temp = torch.ones(len(SEED))
    whole = sample(logits, temp, SEED, CAND, STEP)
    for bytes_ in (4000, 3 * 4000, 7 * 4000):  # 1, 3 and 7 rows per chunk
        monkeypatch.setattr(sampling, "CHUNK_BYTES", bytes_)
        assert torch.equal(sample(logits, temp, SEED, CAND, STEP), whole)
    assert sampling.block_size(64) == 64 and sampling.block_size(64000) == sampling.BLOCK
