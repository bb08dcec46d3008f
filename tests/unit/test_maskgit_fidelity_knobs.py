"""Joint fidelity against the speed knobs (lab/knobs.py, issue 19 item 3): a knob setting serves the same weights
with only its decoding / precision changed, the rare-collision verdict is inside +-20 % of the world's rate or a
failure naming the rates, `worldserve fidelity --knobs` writes its table into the card, and `worldserve eval
--variant` on the stochastic world ends non-zero naming the rate of a setting that loses the rare futures.
Small K everywhere: behaviour, not the card's figures."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from worldserve.cli.main import main
from worldserve.lab.fidelity import collision_prob, mean_ci
from worldserve.lab.knobs import calls_per_frame, configure, knobs_dir, parse, rare_verdict
from worldserve.model.io import load_model_dir

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def maskgit():
    torch.set_num_threads(1)
    return load_model_dir(ROOT / "models" / "maskgit")


def test_a_knob_setting_changes_only_what_it_names(maskgit):
    v = configure(maskgit, "bf16+passes=4")
    assert v.spec.passes == 4 and next(v.parameters()).dtype == torch.bfloat16
    assert maskgit.spec.passes == 8 and next(maskgit.parameters()).dtype == torch.float32  # the model is untouched
    p = configure(maskgit, "passes=2+decode_temperature=0.5")
    assert (p.spec.passes, p.spec.decode_temperature, p.frame_head) == (2, 0.5, maskgit.frame_head)  # same weights
    assert configure(maskgit, "fp32") is maskgit
    assert parse("int8+passes=16") == ("int8", {"passes": 16})
    assert calls_per_frame(maskgit, "passes=4") == 5  # the trunk once + 4 frame-head passes
    with pytest.raises(ValueError, match="unknown knob 'steps=3'"):
        parse("steps=3")
    with pytest.raises(ValueError, match="passes must be >= 1"):
        configure(maskgit, "passes=0")


def test_a_parallel_model_has_no_passes_knob():
    dynamic = load_model_dir(ROOT / "models" / "dynamic")
    with pytest.raises(ValueError, match="one parallel pass"):
        configure(dynamic, "passes=4")


def test_the_rare_verdict_both_ways():
    ok, line = rare_verdict("passes=8", 0.026, (0.02, 0.03), 0.024)
    assert ok and "0.0260" in line and "0.0240" in line and "PASS" in line
    ok, line = rare_verdict("passes=1", 0.06, (0.05, 0.07), 0.024)
    assert not ok and "x2.50" in line and "OUTSIDE" in line and "FAIL" in line
    ok, _ = rare_verdict("int8", 0.018, (0.01, 0.02), 0.024)  # 25 % too rare is a failure too
    assert not ok


def test_collision_probability_of_a_future_and_its_interval():
    done = np.array([[0.5, 0.5], [0.0, 0.0], [1.0, 0.3]])
    np.testing.assert_allclose(collision_prob(done), [0.75, 0.0, 1.0])
    m, (lo, hi) = mean_ci(collision_prob(done))
    assert 0.0 <= lo <= m <= hi <= 1.0


def test_knob_table_goes_into_the_card(tmp_path):
    d = tmp_path / "maskgit"
    shutil.copytree(ROOT / "models" / "maskgit", d)
    text = knobs_dir(d, ["passes=1", "passes=2"], None, n_states=1, k=8, rare_n=1, world_k=64, write_card=True,
                     command="test", jobs=2)
    alone = knobs_dir(d, ["passes=1", "passes=2"], None, n_states=1, k=8, rare_n=1, world_k=64, write_card=False,
                      command="test")
    assert text == alone  # the rows measured in 2 worker processes = in this one
    card = (d / "MODEL_CARD.md").read_text()
    assert "<!-- knobs:start -->" in card and "maskgit: 2 passes, fp32" in card and text in card
    assert card.rstrip().splitlines()[-1].startswith("weights_sha256:")  # the digest line stays last
    assert "Cheapest setting that holds" in text or "No setting holds" in text


def test_eval_fails_a_setting_that_loses_the_rare_futures_naming_the_rate(capsys):
    # greedy frames (decode temperature 0): the balls keep their likeliest cell, so the collisions the world gets
    # from a ball stepping onto the agent vanish from the model's futures
    with pytest.raises(SystemExit) as e:
        main(["eval", str(ROOT / "models" / "maskgit"), "--env", "dynamic", "--episodes", "2", "--no-card",
              "--variant", "decode_temperature=0", "--rare-states", "2", "--k", "16", "--world-k", "256",
              "--threads", "1"])
    msg = str(e.value.code)
    assert "decode_temperature=0 FAILS" in msg and "rare collisions" in msg and "the world's" in msg, msg


def test_eval_fails_a_denoiser_whose_few_steps_lose_the_collisions(capsys):
    # 2 Euler steps land near the posterior mean: no ball in the frame, so the done head sees no collision coming
    with pytest.raises(SystemExit) as e:
        main(["eval", str(ROOT / "models" / "dynamic-denoiser"), "--env", "dynamic", "--episodes", "2", "--no-card",
              "--variant", "denoise_steps=2", "--rare-states", "2", "--k", "16", "--world-k", "256", "--threads", "1"])
    msg = str(e.value.code)
    assert "denoise_steps=2 FAILS" in msg and "rare collisions under denoise_steps=2" in msg and "OUTSIDE" in msg, msg


def test_a_denoiser_has_a_denoising_steps_knob_and_the_engine_runs_that_many():
    from worldserve.engine.engine import Engine
    from worldserve.lab.knobs import default_knobs, label
    from worldserve.messages import FrameMode, RolloutRequest
    from worldserve.settings import EngineSettings

    den = load_model_dir(ROOT / "models" / "denoiser")
    assert default_knobs(den) == ["denoise_steps=1", "denoise_steps=2", "denoise_steps=3", "denoise_steps=5", "bf16"]
    one = configure(den, "denoise_steps=1")
    assert one.cfg.denoise_steps == 1 and den.cfg.denoise_steps == 3 and one.denoiser is den.denoiser
    assert calls_per_frame(den, "denoise_steps=5") == 5 and calls_per_frame(den, "fp32") == 3
    assert label(den, "bf16+denoise_steps=2") == "denoiser: 2 denoising steps, bf16"
    with pytest.raises(ValueError, match="denoises a frame; it has no passes knob"):
        configure(den, "passes=4")
    with pytest.raises(ValueError, match="decodes a frame in maskgit passes; it has no denoise_steps knob"):
        configure(load_model_dir(ROOT / "models" / "maskgit"), "denoise_steps=2")
    with pytest.raises(ValueError, match="denoise_steps must be >= 1"):
        configure(den, "denoise_steps=0")

    context = np.zeros((1, 64, 64, 3), np.uint8)
    calls, last = [], {}
    hook = den.denoiser.register_forward_hook(lambda *a: calls.append(1))
    try:
        for steps in (1, 2, 5):
            eng = Engine(configure(den, f"denoise_steps={steps}"), EngineSettings(max_slots=4, max_queue=2,
                                                                                  max_candidates=4))
            calls.clear()
            eng.submit(RolloutRequest(f"r{steps}", "denoiser", context, np.asarray([[2, 0]], np.int64),
                                      frames=FrameMode.ALL, seed=3, temperature=1.0))
            events = []
            while not any(e.final for e in events):
                events.extend(eng.step())
            assert len(calls) == 2 * steps  # two frames, `steps` denoiser calls each
            last[steps] = [e.frame for e in events if not e.final][-1]
    finally:
        hook.remove()
    assert not np.array_equal(last[1], last[5])  # the knob changes the samples
