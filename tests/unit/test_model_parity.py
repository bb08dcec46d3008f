"""KV-cached stepping must give the same logits as a full-sequence forward pass."""

import pytest
import torch

from worldserve.model.config import PRESETS, ModelConfig
from worldserve.model.dynamics import advance
from worldserve.model.world_model import build


def small(continuous: bool) -> ModelConfig:
    base = PRESETS["tiny"]
    import dataclasses

    kw = dict(d_model=64, n_layers=2, n_heads=4, window=4)
    if continuous:
        kw.update(n_actions=0, action_dim=3, action_names=())
    return dataclasses.replace(base, **kw)


@pytest.mark.parametrize("continuous", [False, True])
@pytest.mark.parametrize("context", [1, 3])
def test_cached_step_matches_full_forward(continuous, context):
    cfg = small(continuous)
    m = build(cfg, seed=1)
    torch.manual_seed(0)
    b, t, n = 3, 11, cfg.tokens_per_frame  # longer than the window: exercises the ring buffer
    tokens = torch.randint(0, cfg.vocab_size, (b, t, n))
    actions = torch.randn(b, t, cfg.action_dim) if continuous else torch.randint(0, cfg.n_actions, (b, t))
    ref_logits, ref_r, ref_d = m.dynamics(tokens, actions)  # [B, T, N, V]

    cache = m.allocate_cache(6)
    slots = torch.tensor([4, 0, 2])
    m.prefill(cache, slots, tokens[:, :context], actions[:, : context - 1])
    for f in range(context - 1, t):
        logits, r, d = m.dynamics.step(cache, slots, actions[:, f])
        torch.testing.assert_close(logits, ref_logits[:, f], atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(r, ref_r[:, f], atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(d, ref_d[:, f], atol=2e-4, rtol=1e-4)
        if f + 1 < t:
            advance(cache, slots, tokens[:, f + 1])


def test_fork_copies_prefilled_context():
    cfg = small(False)
    m = build(cfg, seed=2)
    tokens = torch.randint(0, cfg.vocab_size, (1, 3, cfg.tokens_per_frame))
    acts = torch.randint(0, cfg.n_actions, (1, 2))
    cache = m.allocate_cache(5)
    m.prefill(cache, torch.tensor([0]), tokens, acts)
    cache.fork(0, torch.tensor([1, 2, 3]))
    a = torch.tensor([1, 1, 1, 1])
    logits, _, _ = m.dynamics.step(cache, torch.tensor([0, 1, 2, 3]), a)
    for i in range(1, 4):
        torch.testing.assert_close(logits[i], logits[0])


@pytest.mark.parametrize("preset", ["tiny", "base"])  # patch VQ, conv FSQ
def test_tokenizer_roundtrip_shapes(preset):
    cfg = PRESETS[preset]
    m = build(cfg)
    frames = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    tok = m.encode(frames)
    assert tok.shape == (2, cfg.tokens_per_frame) and tok.dtype == torch.int64
    assert int(tok.min()) >= 0 and int(tok.max()) < cfg.vocab_size
    out = m.decode(tok)
    assert out.shape == (2, 64, 64, 3) and out.dtype == torch.uint8
    if cfg.tokenizer != "fsq":
        return
    # the code of every token survives indices -> codes -> indices
    fsq = m.tokenizer.fsq
    idx = torch.arange(cfg.vocab_size)
    assert torch.equal(fsq.codes_to_indices(fsq.indices_to_codes(idx)), idx)
