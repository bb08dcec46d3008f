"""Every kind of bad input gets a clear 4xx / gRPC status naming the field, never a 500 or a hang."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import start_server
from worldserve.client import GrpcClient, ServerError

pytestmark = pytest.mark.e2e


def b64png(arr: np.ndarray, mode: str | None = None) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG") if mode else Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def frame_json(arr):
    return {"encoding": "png", "data": b64png(arr)}


@pytest.fixture(scope="module")
def rest(server):
    return httpx.Client(base_url=server.http, timeout=30)


def post(rest, path, body, status, field_part):
    r = rest.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert field_part in (err.get("field") or "") + err["message"], err
    return err


def test_rest_bad_inputs(rest, real_frames):
    ok = frame_json(real_frames[0])
    p = "/v1/models/tiny/predict"
    post(rest, p, {"context": [frame_json(np.zeros((32, 32, 3), np.uint8))], "actions": [2]}, 400, "context[0]")
    gray = {"encoding": "png", "data": b64png(np.zeros((64, 64), np.uint8), "L")}
    err = post(rest, p, {"context": [gray], "actions": [2]}, 400, "context[0]")
    assert "channel" in err["message"]
    rgba = {"encoding": "png", "data": b64png(np.zeros((64, 64, 4), np.uint8), "RGBA")}
    post(rest, p, {"context": [rgba], "actions": [2]}, 400, "channel")
    raw_bad = {"encoding": "raw", "height": 64, "width": 64, "data": base64.b64encode(b"\0" * (64 * 64 * 4)).decode()}
    post(rest, p, {"context": [raw_bad], "actions": [2]}, 400, "context[0]")
    junk = {"encoding": "png", "data": base64.b64encode(b"definitely not a png").decode()}
    post(rest, p, {"context": [junk], "actions": [2]}, 400, "cannot decode")
    post(rest, p, {"context": [{"encoding": "png", "data": "***"}], "actions": [2]}, 400, "base64")
    # a decompression bomb: tiny file, huge declared size; refused from the header, never decoded
    buf = io.BytesIO()
    Image.new("L", (20000, 20000)).save(buf, format="PNG", optimize=True)
    bomb = {"encoding": "png", "data": base64.b64encode(buf.getvalue()).decode()}
    post(rest, p, {"context": [bomb], "actions": [2]}, 400, "pixel")
    post(rest, p, {"context": [ok] * 9, "actions": [2]}, 400, "context")
    post(rest, p, {"context": [], "actions": [2]}, 400, "context")
    post(rest, p, {"context": [ok], "actions": [3]}, 400, "actions[0]")
    post(rest, p, {"context": [ok], "actions": [-1]}, 400, "actions[0]")
    post(rest, p, {"context": [ok], "actions": [[0.5, 0.5]]}, 400, "actions[0]")
    post(rest, p, {"context": [ok], "actions": [2] * 65}, 400, "horizon")
    post(rest, p, {"context": [ok], "actions": []}, 400, "horizon")
    post(rest, p, {"context": [ok, ok], "actions": [2], "context_actions": [1, 1]}, 400, "context_actions")
    post(rest, p, {"context": [ok], "actions": [2], "options": {"temperature": -1}}, 400, "temperature")
    post(rest, p, {"context": [ok], "actions": [2], "options": {"seed": -5}}, 400, "seed")
    post(rest, p, {"context": [ok], "actions": [2], "options": {"frames": "some"}}, 422, "frames")
    post(rest, "/v1/models/nope/predict", {"context": [ok], "actions": [2]}, 404, "model")
    post(rest, "/v1/models/tiny/rollouts", {"context": [ok], "candidates": [[2]] * 65}, 400, "candidates")
    post(rest, "/v1/models/tiny/rollouts", {"context": [ok], "candidates": [[2, 2], [2]]}, 400, "same length")
    r = rest.post(p, content=b"{" + b" " * (17 * 1024 * 1024) + b"}", headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    r = rest.post(p, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422


def test_grpc_bad_inputs(server, real_frames):
    g = GrpcClient(server.grpc)
    cases = [
        (dict(context=[np.zeros((32, 32, 3), np.uint8)], actions=[2]), "INVALID_ARGUMENT", "context[0]"),
        (dict(context=[real_frames[0]] * 9, actions=[2]), "INVALID_ARGUMENT", "context"),
        (dict(context=[real_frames[0]], actions=[7]), "INVALID_ARGUMENT", "actions[0]"),
        (dict(context=[real_frames[0]], actions=[[0.1, 0.2]]), "INVALID_ARGUMENT", "actions[0]"),
        (dict(context=[real_frames[0]], actions=[1] * 100), "INVALID_ARGUMENT", "horizon"),
        (dict(context=[real_frames[0]], actions=[1], temperature=float("nan")), "INVALID_ARGUMENT", "temperature"),
    ]
    for kw, code, part in cases:
        with pytest.raises(ServerError) as ei:
            g.predict_events("tiny", **kw)
        assert ei.value.code == code and part in ei.value.message, (kw.keys(), ei.value)
    with pytest.raises(ServerError) as ei:
        g.predict_events("nope", [real_frames[0]], [1])
    assert ei.value.code == "NOT_FOUND"
    with pytest.raises(ServerError) as ei:
        list(g.rollout("tiny", [real_frames[0]], [[1]] * 65))
    assert ei.value.code == "INVALID_ARGUMENT" and "candidates" in ei.value.message
    # the server is still healthy afterwards
    assert len(g.predict("tiny", [real_frames[0]], [2])) == 1


def test_queue_full_is_rejected_at_once(tmp_path, real_frames):
    srv = start_server(tmp_path, "--max-slots", "2", "--max-queue", "2")
    try:
        g = GrpcClient(srv.grpc)
        calls = [g.rollout_call("tiny", [real_frames[0]], [[2] * 64] * 2, frames="none") for _ in range(8)]
        codes = []
        for c in calls:
            try:
                for _ in c:
                    pass
                codes.append("OK")
            except Exception as e:  # noqa: BLE001
                codes.append(e.code().name)
        assert "RESOURCE_EXHAUSTED" in codes and "OK" in codes, codes
        rest = httpx.Client(base_url=srv.http)
        body = {"context": [frame_json(real_frames[0])], "candidates": [[2] * 64] * 2, "options": {"frames": "none"}}
        import concurrent.futures as cf

        with cf.ThreadPoolExecutor(8) as ex:
            statuses = list(ex.map(lambda _: rest.post("/v1/models/tiny/rollouts", json=body).status_code, range(8)))
        assert 429 in statuses and 200 in statuses, statuses
    finally:
        srv.stop()


def test_continuous_actions_validated(tmp_path, real_frames):
    """`base` uses continuous actions (dim 4, in [-1, 1]): wrong dimension or range is refused."""
    srv = start_server(tmp_path, "--preset", "base", "--max-slots", "2")
    try:
        g = GrpcClient(srv.grpc)
        for bad, part in (([[0.1, 0.2]], "4 numbers"), ([2], "4 numbers"), ([[0, 0, 0, 3.0]], "[-1, 1]")):
            with pytest.raises(ServerError) as ei:
                g.predict_events("base", [real_frames[0]], bad)
            assert ei.value.code == "INVALID_ARGUMENT" and part in ei.value.message
        out = g.predict("base", [real_frames[0]], [[0.1, -0.2, 0.3, 0.0]] * 2)
        assert out.shape == (2, 64, 64, 3)
    finally:
        srv.stop()
