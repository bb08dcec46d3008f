"""The shipped weights beat the copy-last-frame baseline on held-out episodes generated on the fly."""

from tests.conftest import MODEL_DIR
from worldserve.evaluate import evaluate, heldout_episodes
from worldserve.model.io import load_model_dir


def test_shipped_model_beats_copy_last_frame():
    model = load_model_dir(MODEL_DIR)
    r = evaluate(model, heldout_episodes(12))
    assert r.recon_psnr >= 28.0, r
    for s, margin in ((1, 0.5), (4, 1.0), (8, 1.0)):  # shipped: +1.2 / +2.0 / +2.2 dB on 64 episodes
        assert r.model_psnr[s] >= r.baseline_psnr[s] + margin, (s, r.model_psnr, r.baseline_psnr)
    assert r.token_acc[1] >= 0.95
