"""The end-of-world draw of stop_on_done and the gym env: model/sampling.done_thresholds."""

import torch

from worldserve.model.sampling import done_thresholds, token_uniform


def test_done_thresholds_are_half_when_greedy_and_a_fair_seeded_draw_when_sampled():
    seed = torch.arange(40_000, dtype=torch.int64) * 7919
    step = torch.arange(40_000, dtype=torch.int64) % 16
    greedy = done_thresholds(seed, step, torch.zeros(40_000))
    assert torch.equal(greedy, torch.full((40_000,), 0.5))
    u = done_thresholds(seed, step, torch.ones(40_000))
    assert bool(((u > 0) & (u < 1)).all())
    for p in (0.02, 0.1, 0.3, 0.7):  # a world ends with probability done: P(done > u) = done
        assert abs(float((u < p).float().mean()) - p) < 0.01, p
    # counter-based: a row's draw depends on its own keys only (any batch, any order)
    perm = torch.randperm(40_000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(done_thresholds(seed[perm], step[perm], torch.ones(40_000)), u[perm])
    # not the token stream of the same (seed, step): the end is independent of the frame's tokens
    tok = token_uniform(seed, torch.zeros_like(seed), step, 1)[:, 0]
    assert abs(float(torch.corrcoef(torch.stack([u, tok]))[0, 1])) < 0.02
