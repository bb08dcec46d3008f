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


def test_a_latent_model_draws_its_worlds_end_at_any_temperature():
    """A latent model samples its futures whatever the request's temperature (its noise is always drawn), so its
    stop_on_done rows get the seeded draw, never the greedy 0.5."""
    import numpy as np

    from tests.conftest import ROOT
    from worldserve.engine.engine import Engine, complete
    from worldserve.lab.data.minigrid_env import Simulator
    from worldserve.messages import RolloutRequest
    from worldserve.model.io import load_model_dir
    from worldserve.settings import EngineSettings

    model = load_model_dir(ROOT / "models" / "denoiser")
    eng = Engine(model, EngineSettings(max_slots=4))
    seen, pack = [], eng.exec._pack
    eng.exec._pack = lambda *a, **k: seen.append(pack(*a, **k)) or seen[-1]  # observe the real inputs
    ctx = np.stack([Simulator(seed=3).frame()] * 2)
    complete(eng, [RolloutRequest("d", model.spec.name, ctx, np.array([[2, 2, 1], [0, 0, 0]]), seed=4,
                                  temperature=0.0, stop_on_done=True)])
    got = [(inp.stop_at[i], int(inp.step[i]), int(inp.seed[i])) for inp in seen for i in inp.stop_at]
    assert got and all(u != 0.5 for u, _, _ in got), got
    want = done_thresholds(torch.tensor([s for _, _, s in got]), torch.tensor([t for _, t, _ in got]),
                           torch.ones(len(got))).tolist()
    assert [u for u, _, _ in got] == want
