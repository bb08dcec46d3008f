"""Triton FSQ kernel vs worldserve.model.tokenizer.FSQ (bound, round, codes_to_indices)."""

import pytest
import torch

from worldserve.kernels.fsq import fsq_indices, fsq_indices_reference
from worldserve.model.config import PRESETS
from worldserve.model.tokenizer import FSQ, Tokenizer


@pytest.mark.parametrize("levels", [(5, 5, 5), (8, 8, 8, 5, 5, 5), (7, 4, 3, 2)])
def test_indices_match_reference(levels):
    g = torch.Generator().manual_seed(len(levels))
    z = torch.randn(4000, len(levels), generator=g) * 2  # [M, D], well past tanh saturation
    out = fsq_indices(z, levels)
    assert out.dtype == torch.int64 and out.shape == (4000,)
    assert torch.equal(out, fsq_indices_reference(z, FSQ(levels)))


def test_round_half_to_even_like_torch_round():
    # bounded values exactly on .5 (z chosen so tanh(z) * 2 hits +-0.5 / +-1.5 as closely as float allows)
    fsq = FSQ((5,))
    z = torch.atanh(torch.tensor([[0.25], [-0.25], [0.75], [-0.75], [0.0]]))
    assert torch.equal(fsq_indices(z, (5,)), fsq_indices_reference(z, fsq))


def test_real_encoder_output():
    # the tokenizer's own pre-quantization activations, channels last [B, h, w, D]
    cfg = PRESETS["base"]  # the presets with an FSQ tokenizer
    assert cfg.tokenizer == "fsq"
    torch.manual_seed(0)
    tok = Tokenizer(cfg).eval()
    frames = torch.randint(0, 256, (3, cfg.height, cfg.width, 3), dtype=torch.uint8)
    with torch.no_grad():
        z = tok.enc(Tokenizer.to_float(frames)).permute(0, 2, 3, 1)
    out = fsq_indices(z, cfg.fsq_levels).flatten(1)  # [B, N]
    assert torch.equal(out, tok.encode(frames))
