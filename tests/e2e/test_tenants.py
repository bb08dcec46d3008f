"""Tenants on the real server (issue 18.7-18.9): one key flooding the engine with K=64 rollouts does not hold another
key's predict; a request over the cost cap is refused with the cost and the limit; a key over its cost in flight gets
429 + Retry-After until its request ends; a flood of pathological PNGs is refused cheaply while /healthz answers."""

from __future__ import annotations

import base64
import io
import json
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import metric_value, start_server

pytestmark = pytest.mark.e2e
KEYS = [{"key": "k-tenant-a-0123456789", "name": "a"},
        {"key": "k-tenant-b-0123456789", "name": "b"},
        {"key": "k-tenant-c-0123456789", "name": "capped", "max_request_cost": 512, "max_cost_in_flight": 600}]
A, B, CAPPED = ({"authorization": f"Bearer {k['key']}"} for k in KEYS)
SERVER_COST = 4096  # server.max_request_cost here (the default 65536 is above the tiny model's 64 x 64 x 2)
PREDICT_WITHIN_S = 5.0  # key a's predict under key b's flood (~0.5 s measured; 56-64 s before the fix)
HEALTHZ_WITHIN_S = 1.0


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tenants")
    keys = tmp / "keys.txt"
    keys.write_text("\n".join(json.dumps(k) for k in KEYS) + "\n")
    s = start_server(tmp, env={"WORLDSERVE_AUTH__API_KEYS_FILE": str(keys),
                               "WORLDSERVE_SERVER__MAX_REQUEST_COST": str(SERVER_COST)})
    yield s
    s.stop()
    assert "Exception in ASGI application" not in s.log.read_text()


def png(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return buf.getvalue()


def chunky_png(frame: np.ndarray, n_chunks: int = 200_000) -> bytes:
    """A valid PNG of the frame with n empty private ancillary chunks before its pixels (12 bytes each: 2.4 MB):
    PIL parses each in Python."""
    data = png(frame)
    at = data.index(b"IDAT") - 4
    empty = struct.pack(">I", 0) + b"zzZz" + struct.pack(">I", zlib.crc32(b"zzZz"))
    return data[:at] + empty * n_chunks + data[at:]


def frame_json(data: bytes) -> dict:
    return {"encoding": "png", "data": base64.b64encode(data).decode()}


def test_a_flooding_key_does_not_hold_another_keys_predict(srv, real_frames):
    ctx = [frame_json(png(real_frames[0]))]
    flood = {"context": ctx, "candidates": [[2] * 32] * 64, "options": {"frames": "none"}}
    stop = threading.Event()
    done = []

    def flooder():
        with httpx.Client(base_url=srv.http, headers=B, timeout=120) as h:
            while not stop.is_set():
                with h.stream("POST", "/v1/models/tiny/rollouts", json=flood) as r:
                    assert r.status_code == 200, r.read()
                    for _ in r.iter_lines():
                        if stop.is_set():
                            break  # closing the stream cancels the rollout
                done.append(1)

    with ThreadPoolExecutor(4) as ex:
        flooders = [ex.submit(flooder) for _ in range(4)]  # one K=64 rollout running, three waiting
        try:
            time.sleep(2.0)
            lat = []
            with httpx.Client(base_url=srv.http, headers=A, timeout=120) as h:
                for _ in range(5):
                    t0 = time.perf_counter()
                    r = h.post("/v1/models/tiny/predict", json={"context": ctx, "actions": [2]})
                    lat.append(time.perf_counter() - t0)
                    assert r.status_code == 200 and len(r.json()["steps"]) == 1, r.text
                    time.sleep(0.2)
            print(f"key a's predict under key b's flood: {[round(x * 1000) for x in lat]} ms")
            assert max(lat) < PREDICT_WITHIN_S, lat
        finally:
            stop.set()
            for f in flooders:
                f.result(timeout=120)


def test_cost_caps(srv, real_frames):
    ctx = [frame_json(png(real_frames[0]))]
    h = httpx.Client(base_url=srv.http, timeout=60)
    # over the server's cap: 64 candidates x 64 steps x 2 (a frame every step) = 8192 > 4096
    r = h.post("/v1/models/tiny/rollouts", headers=A, json={"context": ctx, "candidates": [[2] * 64] * 64})
    assert r.status_code == 400, r.text
    msg = r.json()["error"]["message"]
    assert "8192 candidate-steps" in msg and "4096" in msg and "server" in msg, msg
    # the same work without frames every step costs 4096: allowed (and cheap to cancel: only the headers are read)
    with h.stream("POST", "/v1/models/tiny/rollouts", headers=A,
                  json={"context": ctx, "candidates": [[2] * 64] * 64, "options": {"frames": "none"}}) as r:
        assert r.status_code == 200
    # over the key's own cap: 8 x 40 x 2 = 640 > 512
    r = h.post("/v1/models/tiny/rollouts", headers=CAPPED, json={"context": ctx, "candidates": [[2] * 40] * 8})
    assert r.status_code == 400 and "640 candidate-steps" in r.text and "512" in r.text, r.text
    # in flight: 8 x 40 = 320 runs; a second one (320 + 320 > 600) is 429 with Retry-After until the first ends
    body = {"context": ctx, "candidates": [[2] * 40] * 8, "options": {"frames": "none"}}
    with h.stream("POST", "/v1/models/tiny/rollouts", headers=CAPPED, json=body) as first:
        assert first.status_code == 200
        r = h.post("/v1/models/tiny/rollouts", headers=CAPPED, json=body)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1, r.text
        assert "max_cost_in_flight" in r.json()["error"]["message"] and "320" in r.text
        lines = [json.loads(x) for x in first.iter_lines() if x]
        assert lines[-1]["final"] and lines[-1]["error"] is None
    deadline = time.time() + 5
    while (r := h.post("/v1/models/tiny/rollouts", headers=CAPPED, json=body)).status_code == 429:
        assert time.time() < deadline, "the cost in flight was not given back"
        time.sleep(0.05)
    assert r.status_code == 200, r.text


def test_pathological_pngs_are_refused_without_stalling_the_server(srv, real_frames):
    bomb = {"context": [frame_json(chunky_png(real_frames[0]))], "actions": [2]}
    assert 1_000_000 < len(bomb["context"][0]["data"]) < 4_000_000
    stop = threading.Event()
    statuses, messages = [], []

    def client():
        with httpx.Client(base_url=srv.http, headers=A, timeout=60) as h:
            while not stop.is_set():
                r = h.post("/v1/models/tiny/predict", json=bomb)
                statuses.append(r.status_code)
                messages.append(r.json()["error"]["message"] if r.status_code != 200 else "")

    health = []
    with ThreadPoolExecutor(8) as ex:
        clients = [ex.submit(client) for _ in range(8)]
        try:
            with httpx.Client(base_url=srv.http, timeout=30) as h:
                t_end = time.time() + 6
                while time.time() < t_end:
                    t0 = time.perf_counter()
                    assert h.get("/healthz").status_code == 200
                    health.append(time.perf_counter() - t0)
                    time.sleep(0.1)
        finally:
            stop.set()
            for c in clients:
                c.result(timeout=120)
    print(f"/healthz under 8 clients posting a {len(bomb['context'][0]['data']) >> 10} KB chunk-bomb PNG: "
          f"max {max(health) * 1000:.0f} ms, {len(statuses)} PNGs refused")
    assert max(health) < HEALTHZ_WITHIN_S, health
    assert statuses and set(statuses) == {400}, set(statuses)
    assert all("context[0]" in m and "chunks" in m for m in messages), messages[:2]
    # an ordinary PNG still decodes
    r = httpx.post(srv.http + "/v1/models/tiny/predict", headers=A, timeout=30,
                   json={"context": [frame_json(png(real_frames[0]))], "actions": [2]})
    assert r.status_code == 200


def _context_cache(http: str) -> dict[str, float]:
    return {r: metric_value(http, "worldserve_context_cache_total", f'result="{r}"', headers=A)  # /metrics takes a key
            for r in ("hit", "miss")}


def _context_cache_after(http: str, want: dict[str, float], timeout: float = 15.0) -> dict[str, float]:
    # the engine process's counters reach the front end's /metrics every ipc.METRICS_EVERY_S
    t_end = time.monotonic() + timeout
    while (got := _context_cache(http)) != want and time.monotonic() < t_end:
        time.sleep(0.2)
    return got


def test_a_context_is_prefilled_once_per_key_and_never_for_another_key(srv, real_frames):
    """engine/context_cache.py on the real server: key a's repeated context hits, key b's same context misses (the
    tenant is in the key), and the answers are the same ones."""
    ctx = [frame_json(png(f)) for f in real_frames[5:8]]  # no other test of this module sends this context
    body = {"context": ctx, "actions": [2, 0, 2, 2]}
    with httpx.Client(base_url=srv.http, timeout=60) as h:
        before = _context_cache(srv.http)
        got = []
        for i, key in enumerate((A, A, B)):
            r = h.post("/v1/models/tiny/predict", headers=key, json=body)
            assert r.status_code == 200, r.text
            got.append(r.json()["steps"])
            want = {"hit": before["hit"] + (i >= 1), "miss": before["miss"] + 1 + (i >= 2)}
            assert _context_cache_after(srv.http, want) == want, (i, before)
    assert got[0] == got[1] == got[2]
