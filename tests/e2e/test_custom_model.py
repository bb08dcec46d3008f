"""The custom-model guide's example (examples/custom_model/scroll_world.py), served exactly as docs/custom-models.md
says: a model directory whose config.json names `scroll_world:ScrollWorld`, the real server as a subprocess, with
model.trust_remote_code on (user code is a trust decision: without it the server refuses to start)."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT, free_port, start_process, start_server

EXAMPLE = ROOT / "examples" / "custom_model"
TRUST = "WORLDSERVE_MODEL__TRUST_REMOTE_CODE"


@pytest.fixture(scope="module")
def scroll_dir(tmp_path_factory):
    import sys

    sys.path.insert(0, str(EXAMPLE))
    try:
        from scroll_world import ScrollWorld
    finally:
        sys.path.remove(str(EXAMPLE))
    from worldserve.model.io import save_model_dir

    tmp = tmp_path_factory.mktemp("scroll")
    config = {"architecture": "scroll_world:ScrollWorld", "name": "scroll", "speed": 4, "noise_std": 0.05}
    save_model_dir(ScrollWorld.from_config(config), tmp / "scroll", "# scroll world (guide example)", config)
    return tmp / "scroll"


@pytest.fixture(scope="module")
def scroll_server(scroll_dir):
    srv = start_server(scroll_dir.parent, "--model-dir", str(scroll_dir), "--max-slots", "8",
                       env={"PYTHONPATH": str(EXAMPLE), TRUST: "true"})
    yield srv
    srv.stop()


def test_user_code_needs_trust_remote_code(scroll_dir, tmp_path):
    log = tmp_path / "untrusted.log"
    proc = start_process(["serve", "--model-dir", str(scroll_dir), "--http-port", str(free_port()), "--grpc-port",
                          str(free_port())], log, {"PYTHONPATH": str(EXAMPLE), TRUST: "false"})
    assert proc.wait(60) != 0
    text = log.read_text()
    assert TRUST in text and "scroll_world:ScrollWorld" in text and "Traceback" not in text, text


def _png(frame: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _frame(d: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(d["data"]))).convert("RGB"))


def test_listed_with_its_spec(scroll_server):
    (m,) = httpx.get(scroll_server.http + "/v1/models").json()["models"]
    assert m["name"] == "scroll" and m["action_dim"] == 2 and m["height"] == 64


def test_predict_pans_the_view(scroll_server, real_frames):
    body = {"context": [{"encoding": "png", "data": _png(real_frames[0])}], "actions": [[1.0, 0.0], [0.0, -0.5]],
            "options": {"seed": 3}}
    r = httpx.post(scroll_server.http + "/v1/models/scroll/predict", json=body, timeout=60)
    assert r.status_code == 200, r.text
    steps = r.json()["steps"]
    assert [s["step"] for s in steps] == [0, 1]
    f0, f1 = _frame(steps[0]["frame"]), _frame(steps[1]["frame"])
    want0 = np.roll(real_frames[0], 4, axis=1)  # panned right by 4 px, plus seeded sensor noise (std 0.05)
    assert np.abs(f0.astype(int) - want0).mean() < 16 and np.abs(f0.astype(int) - real_frames[0]).mean() > 20
    assert np.abs(f1.astype(int) - np.roll(want0, -2, axis=0)).mean() < 24


def test_seeded_noise_is_batch_invariant(scroll_server, real_frames):
    ctx = [{"encoding": "png", "data": _png(real_frames[1])}]
    acts = [[0.5, 0.5], [-1.0, 0.0]]

    def rollout(cands, seed):
        r = httpx.post(scroll_server.http + "/v1/models/scroll/rollouts", timeout=60,
                       json={"context": ctx, "candidates": cands, "options": {"seed": seed}})
        assert r.status_code == 200, r.text
        lines = [json.loads(x) for x in r.text.splitlines()]
        assert lines[-1] == {"final": True, "error": None}
        return {(x["candidate"], x["step"]): _frame(x["frame"]) for x in lines[:-1]}

    fork = rollout([acts, acts, acts], seed=10)
    for k in range(3):  # candidate k of a request seeded 10 == a single request seeded 10 + k
        alone = rollout([acts], seed=10 + k)
        for s in range(2):
            np.testing.assert_array_equal(fork[(k, s)], alone[(0, s)])
    assert not np.array_equal(fork[(0, 0)], fork[(1, 0)])  # different streams, different noise
