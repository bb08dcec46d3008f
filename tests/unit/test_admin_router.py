"""api/admin.py on its own (no torch, a recording loader): the admin scope on every route, the model roots, the
pinned sha256 and the name rules are all settled before the loader is called."""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import SecretStr

from worldserve.api.admin import admin_router
from worldserve.api.auth import Gate, HttpGate
from worldserve.api.http import _error_handlers
from worldserve.queue.local import LocalQueue
from worldserve.settings import AuthSettings

PLAIN, ADMIN = "plain", "root"


def model(d, name: str, weights: bytes = b"w" * 64):
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"name": name}))
    (d / "model.safetensors").write_bytes(weights)
    return d, hashlib.sha256(weights).hexdigest()


@pytest.fixture
def env(tmp_path):
    calls = []

    def loader(model_dir, pin):
        calls.append((model_dir, pin))
        name = json.loads((model_dir / "config.json").read_text())["name"]
        return SimpleNamespace(stop=lambda: None), SimpleNamespace(name=name)  # an engine that is never started

    root = tmp_path / "root"
    root.mkdir()
    q = LocalQueue(loader=loader, model_roots=[root.resolve()])
    app = FastAPI()
    _error_handlers(app)
    app.include_router(admin_router(SimpleNamespace(queue=q)))
    gate = Gate(AuthSettings(api_keys=[SecretStr(PLAIN)], admin_keys=[SecretStr(ADMIN)]), 8)
    app.add_middleware(HttpGate, gate=gate)
    return SimpleNamespace(client=TestClient(app), root=root, calls=calls, tmp=tmp_path, open=app)


def post(env, d, pin, key=ADMIN):
    return env.client.post("/v1/admin/models", json={"dir": str(d), "weights_sha256": pin},
                           headers={"authorization": f"Bearer {key}"})


def test_every_admin_route_needs_the_admin_scope(env):
    d, pin = model(env.root / "a", "a")
    assert post(env, d, pin, key=PLAIN).status_code == 403
    h = {"authorization": f"Bearer {PLAIN}"}
    assert env.client.delete("/v1/admin/models/a", headers=h).status_code == 403
    assert env.client.get("/v1/admin/whatever", headers=h).status_code == 403
    assert env.calls == []
    # without the gate (open mode) the router's own dependency refuses: nobody is an admin without a key
    app = FastAPI()
    _error_handlers(app)
    app.include_router(admin_router(SimpleNamespace(queue=LocalQueue(loader=lambda *a: 1 / 0))))
    r = TestClient(app).post("/v1/admin/models", json={"dir": str(d), "weights_sha256": pin})
    assert r.status_code == 403 and r.json()["error"]["code"] == "PERMISSION_DENIED"


def test_roots_pin_and_names_before_the_loader(env):
    outside, pin_o = model(env.tmp / "outside", "o")
    (env.root / "link").symlink_to(outside)
    refusals = [post(env, p, pin_o) for p in (outside, env.tmp / "missing", env.root / "link", "/", env.root / "..")]
    assert {r.status_code for r in refusals} == {403} and len({r.text for r in refusals}) == 1
    d, pin = model(env.root / "a", "a")
    r = post(env, d, "0" * 64)
    assert r.status_code == 400 and r.json()["error"]["field"] == "weights_sha256"
    assert env.calls == []
    r = post(env, d, pin.upper())
    assert r.status_code == 201 and r.json() == {"name": "a", "weights_sha256": pin}
    assert env.calls == [(d.resolve(), pin)]
    dup, _ = model(env.root / "dup", "a", b"other")
    assert post(env, dup, "1" * 64).status_code == 409  # served: refused before even the hash
    assert env.client.delete("/v1/admin/models/a", headers={"authorization": f"Bearer {ADMIN}"}).status_code == 200
    other, pin2 = model(env.root / "other", "a", b"other weights")
    r = post(env, other, pin2)
    assert r.status_code == 409 and "new name" in r.text
    assert post(env, d, pin).status_code == 201  # the same weights may come back
    assert len(env.calls) == 2
    nameless = env.root / "nameless"
    nameless.mkdir()
    (nameless / "config.json").write_text("{}")
    assert post(env, nameless, pin).status_code == 400
