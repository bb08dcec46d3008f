"""Post-hoc calibration of the done head (lab/calibrate.py, config done_scale / done_bias): the identity by default
(every uncalibrated model bit-unchanged), the same calibrated done on every backend, a fit that recovers a known
miscalibration, and the shipped maskgit's rare-collision rate closer to the world's than without it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tests.conftest import ROOT
from worldserve.lab.calibrate import CalibData, compose, fit, implied, logit, nll, rates
from worldserve.model.config import PRESETS, ModelConfig
from worldserve.model.dynamics import rowwise_linear
from worldserve.model.io import load_config, load_model_dir
from worldserve.model.world_model import build


def small(**kw) -> ModelConfig:
    return dataclasses.replace(PRESETS["tiny"], d_model=64, n_layers=2, n_heads=4, window=4, **kw)


def test_identity_by_default_bit_for_bit():
    cfg = small()
    assert (cfg.done_scale, cfg.done_bias) == (1.0, 0.0)
    # an uncalibrated config writes (and keys exports) exactly as before; an old config.json loads as the identity
    assert "done_scale" not in cfg.to_dict() and "done_bias" not in cfg.to_dict()
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    cal = dataclasses.replace(cfg, done_scale=0.5, done_bias=-1.25)
    assert ModelConfig.from_dict(cal.to_dict()) == cal
    m = build(cfg, seed=3)
    h = torch.randn(2, 3, cfg.tokens_per_frame, cfg.d_model)
    _, _, done = m.dynamics.heads(h)
    pooled = m.dynamics.ln_f(h).mean(2)
    assert torch.equal(done, rowwise_linear(pooled, m.dynamics.done_head).squeeze(-1).float())
    # the shipped token models: tiny (the deterministic world) keeps the identity; the stochastic world's two were
    # fitted by `worldserve calibrate`
    assert (load_config(ROOT / "models" / "tiny").done_scale, load_config(ROOT / "models" / "tiny").done_bias) == (
        1.0, 0.0)
    for name in ("dynamic", "maskgit"):
        c = load_config(ROOT / "models" / name)
        assert 0 < c.done_scale < 1 and c.done_bias < 0, (name, c.done_scale, c.done_bias)
    with pytest.raises(ValueError, match="done_scale"):
        dataclasses.replace(cfg, done_scale=0.0).validate()


def test_calibration_applies_on_every_path(tmp_path):
    """The cached step, the full forward and the ONNX graph all give sigmoid(a * logit + b) of the same weights."""
    from worldserve.runtime.onnx_backend import OnnxWorldModel
    from worldserve.runtime.parity import lockstep
    from worldserve.settings import ModelSettings

    a, b = 0.6, -1.5
    raw, cal = build(small(), seed=2), build(small(done_scale=a, done_bias=b), seed=2)
    cfg = raw.cfg
    torch.manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 5, cfg.tokens_per_frame))
    actions = torch.randint(0, cfg.n_actions, (2, 5))
    _, _, d_raw = raw.dynamics(tokens, actions)
    _, _, d_cal = cal.dynamics(tokens, actions)
    torch.testing.assert_close(d_cal, a * d_raw + b)
    onnx = OnnxWorldModel.build(cal, ModelSettings(artifact_dir=tmp_path))
    slots = torch.tensor([1, 0])

    def steps(ref, model):  # (done of ref, done of model) per step, from the same prefilled context
        c_ref, c_mod = ref.allocate_cache(3), model.allocate_cache(3)
        for c, m in ((c_ref, ref), (c_mod, model)):
            m.prefill(c, slots, tokens[:, :2], actions[:, :1])
        return [(r[2], o[2]) for r, o in lockstep(ref, model, c_ref, c_mod, slots, [actions[:, f] for f in (2, 3, 4)])]

    for p_raw, p_cal in steps(raw, cal):  # done probabilities [B]
        torch.testing.assert_close(torch.logit(p_cal.double()), a * torch.logit(p_raw.double()) + b, atol=1e-4,
                                   rtol=1e-4)
    for p_cal, p_onnx in steps(cal, onnx):
        torch.testing.assert_close(p_onnx, p_cal, atol=1e-5, rtol=1e-4)


def synthetic(a: float, b: float, s: int = 400, k: int = 16, h: int = 4, n: int = 400, seed: int = 0) -> CalibData:
    """Futures' done logits with a spread of states (rare to common) and world hits drawn from the rate that
    sigmoid(a * logit + b) implies: a model whose done head is off by (a, b)."""
    rng = np.random.default_rng(seed)
    level = rng.uniform(-9.0, 0.0, (s, 1, 1))  # a state's risk
    lg = level + rng.normal(0.0, 1.0, (s, k, h))
    p = implied(torch.from_numpy(lg), torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))
    return CalibData(lg, rng.binomial(n, p.numpy()).astype(np.int64), np.full(s, n, np.int64))


def test_fit_recovers_a_known_miscalibration():
    data = synthetic(0.7, -0.9)  # the head over-predicts: the truth is a flatter, lower curve
    before, world = rates(data)
    assert before > 1.2 * world  # the miscalibration is visible in the pooled rate
    a, b = fit(data)
    assert abs(a - 0.7) < 0.05 and abs(b + 0.9) < 0.2, (a, b)
    after, _ = rates(data, a, b)
    assert abs(after - world) < 0.03 * world, (after, world)
    assert nll(data, a, b) < nll(data, 1.0, 0.0)
    a1, b1 = fit(synthetic(1.0, 0.0, seed=1))  # a calibrated head stays (about) the identity
    assert abs(a1 - 1.0) < 0.05 and abs(b1) < 0.2, (a1, b1)


def test_a_refit_composes_with_the_calibration_in_place():
    data = synthetic(0.7, -0.9, s=200)
    a, b = fit(data)
    a0, b0 = 1.3, 0.4  # fitting again on logits served through (a0, b0) lands on the same raw calibration
    shifted = CalibData(a0 * data.logits + b0, data.hits, data.n)
    a2, b2 = compose(*fit(shifted), a0, b0)
    assert abs(a2 - a) < 1e-3 and abs(b2 - b) < 1e-2, (a, b, a2, b2)
    assert abs(logit(np.array([0.25]))[0] - np.log(1 / 3)) < 1e-12


def test_shipped_maskgit_rare_rate_is_closer_to_the_worlds():
    """On 2 held-out rare states (fixed seeds), K = 64 futures through the engine: the calibrated done head's implied
    collision rate is nearer the world's than the raw head's (the same futures: the done head does not steer them)."""
    from worldserve.engine.engine import Engine
    from worldserve.lab.fidelity import collision_prob, rare_states, sample_model
    from worldserve.settings import EngineSettings

    torch.set_num_threads(1)
    model = load_model_dir(ROOT / "models" / "maskgit")
    a, b = model.cfg.done_scale, model.cfg.done_bias
    assert (a, b) != (1.0, 0.0), "models/maskgit ships a fitted calibration (worldserve calibrate)"
    states, world = rare_states(2, 64, world_k=1024)
    assert len(states) == 2 and 0 < world <= 0.1
    eng = Engine(model, EngineSettings(max_slots=64, max_queue=4, max_candidates=64))
    cal, raw = [], []
    for j, st in enumerate(states):
        _, done = sample_model(eng, st, 64, j * 64)  # calibrated probabilities [K, H]
        raw_done = 1 / (1 + np.exp(-(logit(done) - b) / a))  # the same futures under the identity
        cal.append(collision_prob(done))
        raw.append(collision_prob(raw_done))
    r_cal, r_raw = float(np.concatenate(cal).mean()), float(np.concatenate(raw).mean())
    assert abs(r_cal - world) < 0.5 * abs(r_raw - world), (r_cal, r_raw, world)
