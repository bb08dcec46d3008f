"""The sampler's device path (model/sampling._sample_all: what CUDA runs, every row drawn, greedy rows by `where`,
no host read) gives the same tokens as the CPU path (greedy rows skipped by a host read) and as the plain reference;
it runs on CPU tensors here, so it is checked without a GPU."""

from __future__ import annotations

import pytest
import torch

from worldserve.model.sampling import _sample_all, sample, sample_reference


@pytest.mark.parametrize("vocab", [16, 1000])  # one block; several blocks of the two-level scan
def test_device_path_equals_the_cpu_path_and_the_reference(vocab):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(6, 64, vocab, generator=g) * 2
    t = torch.tensor([0.0, 1.0, 0.5, 0.0, 2.0, 1.0])
    seed, cand, step = torch.arange(6) * 31 + 7, torch.arange(6) % 2, torch.full((6,), 3)
    got = _sample_all(logits, t, seed, cand, step, None)
    assert torch.equal(got, sample(logits, t, seed, cand, step))
    assert torch.equal(got[t == 0], logits[t == 0].argmax(-1))
    agree = (got == sample_reference(logits, t, seed, cand, step)).float().mean()
    assert agree > 0.99  # float32 blocks vs float64 one scan: a boundary case may differ, nothing more
    draw = torch.arange(6) + 1
    assert torch.equal(_sample_all(logits, t, seed, cand, step, draw), sample(logits, t, seed, cand, step, draw))
