"""A model repository served by one `serve`: every model directory side by side (the token model and the
continuous-latent denoiser), and models loaded and unloaded through the admin API without a restart (admin keys
only, from the admin model roots, weights pinned by sha256; tests/e2e/test_admin.py has the refusals)."""

from __future__ import annotations

import hashlib
import json
import shutil

import httpx
import numpy as np
import pytest

from tests.conftest import ROOT, start_server

pytestmark = pytest.mark.e2e
KEY = "repo-key-0123456789"
ADMIN_KEY = "repo-admin-key-0123456789"


@pytest.fixture(scope="module")
def repo_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("repo")
    repo = tmp / "models"
    repo.mkdir()
    for name in ("tiny", "denoiser"):
        shutil.copytree(ROOT / "models" / name, repo / name)
    drop = tmp / "drop"  # the admin model root: what an admin may load while serving
    drop.mkdir()
    extra = drop / "tiny2"  # the same weights under another name: a model to load while serving
    shutil.copytree(ROOT / "models" / "tiny", extra)
    cfg = json.loads((extra / "config.json").read_text())
    (extra / "config.json").write_text(json.dumps({**cfg, "name": "tiny2"}))
    srv = start_server(tmp, "--model-repo", str(repo), "--max-slots", "8",
                       env={"WORLDSERVE_AUTH__API_KEYS": KEY, "WORLDSERVE_AUTH__ADMIN_KEYS": ADMIN_KEY,
                            "WORLDSERVE_SERVER__ADMIN_API": "true", "WORLDSERVE_SERVER__ADMIN_MODEL_ROOTS": str(drop)})
    srv.key = KEY
    yield srv, extra
    srv.stop()


def test_every_model_of_the_repository_is_served(repo_server, real_frames):
    srv, _ = repo_server
    models = {m["name"]: m for m in srv.rest().models()}
    assert set(models) == {"tiny", "denoiser"}
    assert models["tiny"]["vocab_size"] == 64 and models["denoiser"]["vocab_size"] == 0
    g = srv.grpc_client()
    try:
        for name in ("tiny", "denoiser"):
            frames = g.predict(name, real_frames[:4], [2, 0, 2], context_actions=[2, 2, 0])
            assert frames.shape == (3, 64, 64, 3)
            # both are trained on the same world: the first predicted frame is close to the real one
            assert np.abs(frames[0].astype(int) - real_frames[4]).mean() < 8, name
    finally:
        g.close()


def test_load_and_unload_without_a_restart(repo_server, real_frames):
    srv, extra = repo_server
    url = srv.http + "/v1/admin/models"
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    body = {"dir": str(extra), "weights_sha256": hashlib.sha256((extra / "model.safetensors").read_bytes()).hexdigest()}
    assert httpx.post(url, json=body, timeout=60).status_code == 401  # strangers may not
    assert httpx.post(url, json=body, headers=srv.headers, timeout=60).status_code == 403  # nor ordinary keys
    r = httpx.post(url, json=body, headers=admin, timeout=120)
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "tiny2"
    rest = srv.rest()
    assert {m["name"] for m in rest.models()} == {"tiny", "denoiser", "tiny2"}
    assert rest.predict("tiny2", real_frames[:1], [2]).shape == (1, 64, 64, 3)
    again = httpx.post(url, json=body, headers=admin, timeout=120)
    assert again.status_code == 409 and "tiny2" in again.text  # one name, one model
    assert httpx.post(url, json={**body, "dir": "/nonexistent"}, headers=admin).status_code == 403  # not a root
    assert httpx.delete(url + "/tiny2", headers=srv.headers).status_code == 403
    assert httpx.delete(url + "/tiny2", headers=admin).json() == {"unloaded": "tiny2"}
    assert {m["name"] for m in rest.models()} == {"tiny", "denoiser"}
    r = httpx.post(srv.http + "/v1/models/tiny2/predict", headers=srv.headers,
                   json={"context": [], "actions": [2]})
    assert r.status_code in (400, 404)
