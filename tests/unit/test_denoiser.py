"""The shipped continuous-latent model (models/denoiser): it loads through its `architecture`, beats copy-last on
held-out episodes, and its seeded noise (the engine's counter-based streams) is fork- and batch-invariant."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import ROOT
from worldserve.engine.engine import Engine, complete
from worldserve.lab.evaluate import CONTEXT, evaluate, heldout_episodes
from worldserve.messages import RolloutRequest
from worldserve.model.denoiser import DenoisingWorldModel
from worldserve.model.io import load_model_dir
from worldserve.settings import EngineSettings

DENOISER = ROOT / "models" / "denoiser"


@pytest.fixture(scope="module")
def model():
    m = load_model_dir(DENOISER)
    assert isinstance(m, DenoisingWorldModel) and m.spec.output == "latent"
    return m


def test_beats_copy_last_on_heldout_episodes(model):
    r = evaluate(model, heldout_episodes(12))
    for s in (1, 4, 8):
        assert r.model_psnr[s] > r.baseline_psnr[s] + 1.0, (s, r.model_psnr, r.baseline_psnr)
    assert r.recon_psnr > 45
    assert r.done_acc >= 0.85


def frames(events, rid):
    return {(e.candidate, e.step): e.frame for e in events if e.request_id == rid and not e.final}


def test_seeded_fork_and_batch_invariance(model):
    ep = heldout_episodes(3)
    f, a = ep[0][0], ep[0][1]
    acts = np.stack([a[CONTEXT - 1 : CONTEXT + 3], np.zeros(4, np.int64), np.full(4, 2)])  # [3, 4]

    def eng():
        return Engine(model, EngineSettings(max_slots=16))

    fork = frames(complete(eng(), [RolloutRequest("f", "denoiser", f[:CONTEXT], acts, seed=21)]), "f")
    noisy = [RolloutRequest(f"n{i}", "denoiser", e[0][:2], acts[:2, :3], seed=i) for i, e in enumerate(ep[1:])]
    batched = frames(complete(eng(), [*noisy, RolloutRequest("f", "denoiser", f[:CONTEXT], acts, seed=21)]), "f")
    assert fork.keys() == batched.keys() and len(fork) == 12
    for key in fork:  # alone or beside other requests: the same frames
        np.testing.assert_array_equal(fork[key], batched[key])
    for k in range(3):  # candidate k of a fork seeded 21 == a single request seeded 21 + k
        single = frames(complete(eng(), [RolloutRequest("s", "denoiser", f[:CONTEXT], acts[k : k + 1], seed=21 + k)]),
                        "s")
        for s in range(4):
            np.testing.assert_array_equal(single[(0, s)], fork[(k, s)])


def test_a_calibrated_done_head_is_applied_and_the_uncalibrated_config_is_unchanged(model):
    """done_scale / done_bias (lab/calibrate.py writes them) turn the done logit before the sigmoid, as for token
    models; identity is the default and stays out of config.json."""
    import copy
    import dataclasses

    import torch

    from worldserve.model.protocol import Noise

    assert "done_scale" not in model.cfg.to_dict()
    cal = copy.copy(model)
    cal.cfg = dataclasses.replace(model.cfg, done_scale=2.0, done_bias=-1.0)
    assert cal.cfg.to_dict()["done_scale"] == 2.0

    def done(m):
        state = m.allocate_state(2)
        slots = torch.arange(2)
        m.prefill(state, slots, torch.zeros(2, 1, model.cfg.latent_ch, *model.cfg.grid))
        noise = Noise(torch.tensor([1, 2]), torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64))
        return m.step(state, slots, torch.tensor([0, 2]), noise=noise)[2]

    p, q = done(model), done(cal)
    logit = torch.log(p / (1 - p))
    torch.testing.assert_close(q, torch.sigmoid(2.0 * logit - 1.0), atol=1e-5, rtol=1e-4)


def test_the_stochastic_worlds_denoiser_keeps_its_balls_at_its_steps_and_loses_them_at_two():
    """models/dynamic-denoiser through the engine on held-out states: at its served 16 steps most sampled next frames
    hold the world's balls; at 2 steps the ODE lands near the posterior mean and the balls blur away (the card's
    knob table, at small K)."""
    import torch

    from worldserve.lab.fidelity import balls, heldout_states, sample_model
    from worldserve.lab.knobs import configure

    torch.set_num_threads(1)
    den = load_model_dir(ROOT / "models" / "dynamic-denoiser")
    assert den.cfg.denoise_steps == 16
    right = {}
    for steps in (2, 16):
        eng = Engine(configure(den, f"denoise_steps={steps}"),
                     EngineSettings(max_slots=32, max_queue=2, max_candidates=32))
        ok = []
        for j, st in enumerate(heldout_states(3, 1)):
            frames, _ = sample_model(eng, st, 32, seed=j * 32)
            ok.append(float((balls(frames[:, 0]).sum((1, 2)) == len(st.env.obstacles)).mean()))
        right[steps] = float(np.mean(ok))
    assert right[16] >= 0.7 and right[2] <= 0.1, right
