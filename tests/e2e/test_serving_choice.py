"""End-to-end: `serve` of a model repository chooses each model's configuration from its serving.json pin (issue 20
item 2): a pin that holds is served and shown in /v1/models; a pin whose quick gate fails is refused, the device
default is served instead and the log says why."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from tests.conftest import ROOT, start_server
from worldserve.client.client import RestClient
from worldserve.model.io import WEIGHTS, sha256_file
from worldserve.runtime.choose import write_pin

pytestmark = pytest.mark.e2e


def _copy(repo, name: str):
    d = repo / name
    d.mkdir()
    for f in ("config.json", "MODEL_CARD.md"):
        shutil.copy(ROOT / "models" / name / f, d / f)
    (d / WEIGHTS).symlink_to(ROOT / "models" / name / WEIGHTS)
    return d


@pytest.mark.parametrize("isolated", [False, True], ids=["in-process", "isolated"])
def test_serve_applies_a_pin_that_holds_and_refuses_one_that_fails(tmp_path, isolated):
    """In-process engines and isolated engine processes alike (each engine process chooses for its own model)."""
    repo = tmp_path / "models"
    repo.mkdir()
    tiny, den = _copy(repo, "tiny"), _copy(repo, "denoiser")
    write_pin(tiny, "cpu", {"backend": "eager", "precision": "bf16", "needs": [], "why": "e2e pin",
                            "weights_sha256": sha256_file(tiny / WEIGHTS)})
    # the denoiser at bf16 decodes ~52 dB from fp32: a pin that asks for 60 dB fails its quick gate
    write_pin(den, "cpu", {"backend": "eager", "precision": "bf16", "needs": [], "quick_gate": {
        "min_frame_psnr_db": 60.0}, "weights_sha256": sha256_file(den / WEIGHTS)})
    srv = start_server(tmp_path, "--model-repo", str(repo), "--max-slots", "2",
                       env={"WORLDSERVE_ENGINE__ISOLATED": "true"} if isolated else None)
    try:
        rest = RestClient(srv.http)
        info = {m["name"]: m for m in rest.models()}
        assert (info["tiny"]["backend"], info["tiny"]["precision"]) == ("eager", "bf16")
        assert (info["denoiser"]["backend"], info["denoiser"]["precision"]) == ("eager", "fp32")
        ctx = np.zeros((1, 64, 64, 3), np.uint8)
        assert rest.predict("tiny", ctx, [2, 2]).shape == (2, 64, 64, 3)
        rest.close()
    finally:
        srv.stop()
    log = srv.log.read_text()
    assert "model tiny: serving --backend eager --precision bf16 (pin: e2e pin)" in log
    assert "model denoiser: serving --backend eager --precision fp32 (default: pin eager bf16 refused: decoded " \
           "frames" in log and "< 60.0 dB" in log
