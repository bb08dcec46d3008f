"""Patch VQ tokenizer: k-means codebook fitted on real MiniGrid frames; tokens are one-to-one with cell images."""

import numpy as np
import torch

from worldserve.lab.data.minigrid_env import run_episode
from worldserve.lab.train import fit_codebook, unique_patches
from worldserve.model.config import PRESETS
from worldserve.model.world_model import build


def _frames(seeds) -> np.ndarray:
    return np.concatenate([run_episode(s, epsilon=0.5)[0] for s in seeds])  # uint8 [F, 64, 64, 3]


def test_fitted_codebook_is_one_to_one_with_cell_images():
    cfg = PRESETS["tiny"]
    train = _frames(range(40))
    codebook, stats = fit_codebook(train, cfg.codebook_size, cfg.patch, seed=0)
    assert codebook.shape == (cfg.codebook_size, cfg.patch * cfg.patch * 3)
    assert stats["codes_used"] == stats["distinct_patches"] <= cfg.codebook_size
    m = build(cfg)
    with torch.no_grad():
        m.tokenizer.codebook.copy_(codebook)
    # unseen layouts: every cell image seen in training reconstructs exactly, and distinct cells get distinct codes
    test = torch.from_numpy(_frames(range(1000, 1010)))
    tokens = m.encode(test)  # [F, 64] int64
    assert torch.equal(m.decode(tokens), test)
    cells, _ = unique_patches(test.numpy(), cfg.patch, max_rows=10**6, seed=0)
    (h, w), p = cfg.grid, cfg.patch
    cell = torch.from_numpy(cells).reshape(-1, 1, p, 1, p, 3)  # uint8 [U, 1, p, 1, p, 3]
    # a frame made of one repeated cell image -> every token the same, and one token per distinct cell
    tiled = cell.expand(-1, h, p, w, p, 3).reshape(-1, cfg.height, cfg.width, 3)
    per_cell = m.encode(tiled)
    assert (per_cell == per_cell[:, :1]).all()
    assert len(per_cell[:, 0].unique()) == len(cells)


def test_codebook_fit_is_reproducible_and_keeps_rare_patches():
    cfg = PRESETS["tiny"]
    frames = _frames(range(12))
    a, sa = fit_codebook(frames, cfg.codebook_size, cfg.patch, seed=3)
    b, _ = fit_codebook(frames, cfg.codebook_size, cfg.patch, seed=3)
    assert torch.equal(a, b)
    # the agent cell (one in 64, four headings) is rare; every distinct patch still has its own code
    uniq, counts = unique_patches(frames, cfg.patch, max_rows=10**6, seed=0)
    assert counts.min() * 64 < counts.sum() / len(counts)
    assert sa["codes_used"] == len(uniq) and sa["patch_mse"] < 1e-12


def test_more_patches_than_codes_uses_every_code():
    # natural-image-like input: random patches, far more than codes; k-means still fills the codebook
    g = np.random.default_rng(0)
    frames = g.integers(0, 256, (40, 64, 64, 3), dtype=np.uint8)
    codebook, stats = fit_codebook(frames, 16, 8, seed=0, iters=3, max_rows=1000)
    assert stats["distinct_patches"] == 1000 and stats["codes_used"] == 16
    assert codebook.min() >= -1 and codebook.max() <= 1
