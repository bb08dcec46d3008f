"""Every kind of bad input gets a clear 4xx / gRPC status naming the field, never a 500 or a hang."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import metric_value, start_server
from worldserve.client.client import GrpcClient, RestClient, ServerError

pytestmark = pytest.mark.e2e


def b64png(arr: np.ndarray, mode: str | None = None) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG") if mode else Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def frame_json(arr):
    return {"encoding": "png", "data": b64png(arr)}


@pytest.fixture(scope="module")
def rest(server):
    return httpx.Client(base_url=server.http, timeout=30, headers=server.headers)


def metric(server, name: str) -> float:
    """Summed over the processes that run engines (the server itself, or the workers)."""
    return metric_value(server.metrics_urls, name)


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


def test_rest_oversized_numbers_and_unknown_fields(rest, server, real_frames):
    """Issue 12 probes: a 400-digit deadline_ms or action is a 4xx naming the field, never an OverflowError 500."""
    ok = frame_json(real_frames[0])
    p = "/v1/models/tiny/predict"
    huge = int("9" * 400)
    post(rest, p, {"context": [ok], "actions": [2], "options": {"deadline_ms": huge}}, 422, "options.deadline_ms")
    post(rest, p, {"context": [ok], "actions": [2], "options": {"deadline_ms": 86_400_001}}, 422, "deadline_ms")
    post(rest, p, {"context": [ok], "actions": [huge]}, 400, "actions[0]")
    post(rest, p, {"context": [ok], "actions": [2], "options": {"seed": huge}}, 400, "seed")
    post(rest, p, {"context": [ok], "actions": [2], "options": {"temperature": huge}}, 422, "temperature")
    post(rest, p, {"context": [ok, ok], "actions": [2], "context_actions": [huge]}, 400, "context_actions[0]")
    post(rest, p, {"context": [ok], "actions": [2], "bogus": 1}, 422, "bogus")
    post(rest, p, {"context": [ok], "actions": [2], "options": {"sead": 1}}, 422, "options.sead")
    post(rest, p, {"context": [{**ok, "height": huge}], "actions": [2]}, 422, "context.0.height")
    # over Python's int -> str digit limit: refused while parsing, still a 4xx with our error body
    r = rest.post(p, content=b'{"context": [], "actions": [' + b"7" * 5000 + b"]}",
                  headers={"content-type": "application/json"})
    assert r.status_code in (400, 422) and "error" in r.json(), r.text
    # discrete actions given as lists (the shape of another model) are refused
    post(rest, p, {"context": [ok], "actions": [[2]]}, 400, "actions[0]")
    post(rest, p, {"context": [ok], "actions": [[]]}, 400, "actions[0]")
    assert len(server.rest().predict("tiny", [real_frames[0]], [2])) == 1


def _encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def test_image_format_is_what_the_field_says(rest, real_frames):
    """png must be PNG and jpeg must be JPEG (QOI/DDS/BMP labelled png were decoded, mutated ones gave 500)."""
    p = "/v1/models/tiny/predict"
    f = real_frames[0]

    def frame(data: bytes, enc: str = "png") -> dict:
        return {"context": [{"encoding": enc, "data": base64.b64encode(data).decode()}], "actions": [2]}

    for fmt in ("QOI", "DDS", "BMP", "JPEG", "GIF", "TIFF"):
        post(rest, p, frame(_encode(f, fmt)), 400, "context[0]")
    post(rest, p, frame(_encode(f, "PNG"), "jpeg"), 400, "context[0]")
    assert rest.post(p, json=frame(_encode(f, "JPEG"), "jpeg")).status_code == 200
    # mutated files: every decode error is a 400, never a 500
    rng = np.random.default_rng(12)
    for fmt, enc in (("PNG", "png"), ("JPEG", "jpeg"), ("QOI", "png")):
        good = bytearray(_encode(f, fmt))
        for _ in range(12):
            bad = bytearray(good)
            for i in rng.integers(8, len(bad), 6):
                bad[i] = int(rng.integers(0, 256))
            if rng.random() < 0.3:
                bad = bad[: int(rng.integers(8, len(bad)))]
            r = rest.post(p, json=frame(bytes(bad), enc))
            assert r.status_code in (200, 400), (fmt, r.status_code, r.text[:300])


def test_body_limits_while_reading(rest, server):
    """A chunked body (no Content-Length) over max_body_bytes is cut off with 413 while it is read; so is a
    body of too many JSON arrays (json.loads of 16 MB of `[]` would cost ~450 MB)."""
    p = "/v1/models/tiny/rollouts"

    def chunks():
        yield b'{"context": [], "candidates": [], "pad": "'
        for _ in range(40):
            yield b"x" * (1 << 20)
        yield b'"}'

    t0 = time.time()
    r = rest.post(p, content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"], r.text[:300]
    assert time.time() - t0 < 10
    body = b'{"context": [], "candidates": [' + b"[]," * 100_000 + b"[]]}"
    r = rest.post(p, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "arrays" in r.json()["error"]["message"], r.text[:300]
    assert httpx.get(server.http + "/healthz").status_code == 200


def test_predict_cancelled_when_client_disconnects(server, real_frames):
    """10 predicts (H=64) cut off after 0.3 s stop producing frames (they all ran to the end before)."""
    before = metric(server, "worldserve_frames_total")
    body = {"context": [frame_json(real_frames[0])], "actions": [2] * 64, "options": {"frames": "none"}}

    def cut(_):
        try:
            httpx.post(server.http + "/v1/models/tiny/predict", json=body, timeout=0.3, headers=server.headers)
        except httpx.TimeoutException:
            pass

    with cf.ThreadPoolExecutor(10) as ex:
        list(ex.map(cut, range(10)))
    time.sleep(1.5)
    settled = metric(server, "worldserve_frames_total")
    time.sleep(1.5)
    assert metric(server, "worldserve_frames_total") == settled, "cancelled predicts still running"
    assert settled - before < 640 * 0.8, (before, settled)


def test_grpc_bad_inputs(server, real_frames):
    g = server.grpc_client()
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
    """`base` uses continuous actions (dim 4, in [-1, 1]): only a flat list of 4 finite numbers is an action.
    Issue 12: `[[[0.1],[0.2],[0.3],[0.4]]]` passed the length check and killed the engine thread."""
    srv = start_server(tmp_path, "--preset", "base", "--max-slots", "2")
    try:
        g = GrpcClient(srv.grpc)
        for bad, part in (([[0.1, 0.2]], "4 numbers"), ([2], "4 numbers"), ([[0, 0, 0, 3.0]], "[-1, 1]")):
            with pytest.raises(ServerError) as ei:
                g.predict_events("base", [real_frames[0]], bad)
            assert ei.value.code == "INVALID_ARGUMENT" and part in ei.value.message
        rest = httpx.Client(base_url=srv.http, timeout=30)
        ok = frame_json(real_frames[0])
        p = "/v1/models/base/predict"
        nested = [[[0.1], [0.2], [0.3], [0.4]]]
        for bad in (nested, [[[], [], [], []]], [[0.1]], [[]], [[0.1, 0.2, 0.3, int("9" * 400)]],
                    [[0.1, 0.2, 0.3, True]], [[0.1, 0.2, 0.3, "0.4"]], [[0.1, 0.2, 0.3, None]]):
            post(rest, p, {"context": [ok], "actions": bad}, 400, "actions[0]")
            post(rest, p, {"context": [ok, ok], "actions": [[0, 0, 0, 0]], "context_actions": bad}, 400,
                 "context_actions[0]")
        post(rest, "/v1/models/base/rollouts", {"context": [ok], "candidates": [nested[0:1] * 2]}, 400,
             "candidates[0][0]")
        with pytest.raises(ServerError) as ei:  # gRPC context_actions of the wrong dimension
            g.predict_events("base", [real_frames[0]] * 2, [[0, 0, 0, 0]], context_actions=[[0.1]])
        assert ei.value.code == "INVALID_ARGUMENT" and "context_actions[0]" in ei.value.message
        with RestClient(srv.http).session("base", [real_frames[0]]) as s:  # WS session actions
            for bad in nested + [[], [0.1], int("9" * 400)]:
                with pytest.raises(ServerError) as ei:
                    s.step(bad)
                assert ei.value.code == "INVALID_ARGUMENT" and "action" in ei.value.message
            assert s.step([0.1, 0.2, 0.3, 0.4]).frame.shape == (64, 64, 3)
        with g.session("base", [real_frames[0]]) as s:  # gRPC session: a bad action ends the stream
            with pytest.raises(ServerError) as ei:
                s.step([0.1])
            assert ei.value.code == "INVALID_ARGUMENT" and "action" in ei.value.message
        # the engine is alive and serving
        out = g.predict("base", [real_frames[0]], [[0.1, -0.2, 0.3, 0.0]] * 2)
        assert out.shape == (2, 64, 64, 3)
        assert httpx.get(srv.http + "/healthz").status_code == 200
        assert httpx.get(srv.http + "/readyz").status_code == 200
    finally:
        srv.stop()
