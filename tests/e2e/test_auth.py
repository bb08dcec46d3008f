"""API keys and per-key limits on the real server (issue 12.3): 401 / UNAUTHENTICATED for strangers,
200 with a key, 429 / RESOURCE_EXHAUSTED with Retry-After over a key's limits; REST, WebSocket, gRPC."""

from __future__ import annotations

import base64
import io
import json
import time

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.conftest import start_server
from worldserve.api.gen import worldserve_pb2 as pb
from worldserve.api.gen import worldserve_pb2_grpc as pbg

pytestmark = pytest.mark.e2e
KEY = "k-alpha-0123456789"
LIMITED = [{"key": "k-slow-0123456789", "name": "slow", "rate": 1, "burst": 2},
           {"key": "k-one-0123456789", "name": "one", "max_concurrent": 1, "max_sessions": 1},
           {"key": "k-slots-0123456789", "name": "slots", "max_slots": 4}]


@pytest.fixture(scope="module")
def srv(tmp_path_factory, real_frames):
    tmp = tmp_path_factory.mktemp("auth")
    keys = tmp / "keys.txt"
    keys.write_text("# comment\n\nk-file-0123456789 filekey\n" + "\n".join(json.dumps(d) for d in LIMITED) + "\n")
    s = start_server(tmp, "--max-slots", "8", env={"WORLDSERVE_AUTH__API_KEYS": f"{KEY},k-beta-0123456789",
                                                  "WORLDSERVE_AUTH__API_KEYS_FILE": str(keys)})
    yield s
    s.stop()
    log = s.log.read_text()
    assert KEY not in log and "k-slow-0123456789" not in log  # keys never logged
    assert "Exception in ASGI application" not in log


def bearer(k: str) -> dict:
    return {"authorization": f"Bearer {k}"}


def body(real_frames) -> dict:
    buf = io.BytesIO()
    Image.fromarray(real_frames[0]).save(buf, format="PNG")
    return {"context": [{"encoding": "png", "data": base64.b64encode(buf.getvalue()).decode()}], "actions": [2]}


def test_rest(srv, real_frames):
    h = httpx.Client(base_url=srv.http, timeout=30)
    assert h.get("/healthz").status_code == 200 and h.get("/readyz").status_code == 200
    for path in ("/v1/models", "/metrics", "/docs", "/openapi.json", "/play"):
        r = h.get(path)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer"), (path, r.text)
        assert r.json()["error"]["code"] == "UNAUTHENTICATED"
    assert h.get("/v1/models", headers=bearer("wrong")).status_code == 401
    assert h.get("/v1/models", headers={"authorization": KEY}).status_code == 401  # no scheme
    assert "unknown" in h.get("/v1/models", headers=bearer("k-alpha")).json()["error"]["message"]
    r = h.post("/v1/models/tiny/predict", json=body(real_frames))
    assert r.status_code == 401
    for k in (KEY, "k-beta-0123456789", "k-file-0123456789"):
        assert h.get("/v1/models", headers=bearer(k)).status_code == 200
        assert h.get("/metrics", headers=bearer(k)).status_code == 200
    r = h.post("/v1/models/tiny/predict", json=body(real_frames), headers=bearer(KEY))
    assert r.status_code == 200 and len(r.json()["steps"]) == 1
    # rate 1/s, burst 2: the third call in a row is refused with Retry-After
    codes = [h.get("/v1/models", headers=bearer("k-slow-0123456789")) for _ in range(3)]
    assert [c.status_code for c in codes] == [200, 200, 429], [c.text for c in codes]
    assert int(codes[2].headers["retry-after"]) >= 1 and codes[2].json()["error"]["code"] == "RESOURCE_EXHAUSTED"
    # slots: a key with max_slots 4 may not run 5 candidates; 4 are fine, and they are given back
    roll = {"context": body(real_frames)["context"], "candidates": [[2, 2]] * 5, "options": {"frames": "none"}}
    slots = bearer("k-slots-0123456789")
    r = h.post("/v1/models/tiny/rollouts", json=roll, headers=slots)
    assert r.status_code == 429 and "slots" in r.json()["error"]["message"], r.text
    for _ in range(3):
        r = h.post("/v1/models/tiny/rollouts", json={**roll, "candidates": [[2, 2]] * 4}, headers=slots)
        assert r.status_code == 200 and r.text.count("\n") == 4 * 2 + 1, r.text[-300:]


def test_websocket(srv, real_frames):
    url = srv.http.replace("http", "ws", 1) + "/v1/models/tiny/session"
    for headers in ({}, bearer("wrong")):
        with pytest.raises(InvalidStatus) as ei:
            connect(url, additional_headers=headers)
        assert ei.value.response.status_code == 401
    open_msg = json.dumps({"type": "open", **{k: v for k, v in body(real_frames).items() if k != "actions"}})
    with connect(url, additional_headers=bearer(KEY)) as ws:
        ws.send(open_msg)
        assert json.loads(ws.recv(timeout=30))["type"] == "opened"
        ws.send(json.dumps({"type": "action", "action": 2}))
        assert json.loads(ws.recv(timeout=30))["type"] == "frame"
    # a browser sends its key as a subprotocol (it cannot set headers); the server selects worldserve.v1
    with pytest.raises(InvalidStatus) as ei:
        connect(url, subprotocols=["worldserve.v1", "bearer.wrong"])
    assert ei.value.response.status_code == 401
    with connect(url, subprotocols=["worldserve.v1", f"bearer.{KEY}"]) as ws:
        assert ws.subprotocol == "worldserve.v1"
        ws.send(open_msg)
        assert json.loads(ws.recv(timeout=30))["type"] == "opened"
    # key "one": one session at a time, and nothing else in flight while it is open
    with connect(url, additional_headers=bearer("k-one-0123456789")) as ws:
        ws.send(open_msg)
        assert json.loads(ws.recv(timeout=30))["type"] == "opened"
        with pytest.raises(InvalidStatus) as ei:
            connect(url, additional_headers=bearer("k-one-0123456789"))
        assert ei.value.response.status_code == 429
        r = httpx.post(srv.http + "/v1/models/tiny/predict", json=body(real_frames),
                       headers=bearer("k-one-0123456789"), timeout=30)
        assert r.status_code == 429 and "in flight" in r.json()["error"]["message"]
    # closed: the key's slot is free again
    r = httpx.post(srv.http + "/v1/models/tiny/predict", json=body(real_frames),
                   headers=bearer("k-one-0123456789"), timeout=30)
    assert r.status_code == 200, r.text


def test_grpc(srv, real_frames):
    ch = grpc.insecure_channel(srv.grpc)
    stub = pbg.WorldModelServiceStub(ch)
    hc = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert hc.status == health_pb2.HealthCheckResponse.SERVING  # health is public
    for md in ((), (("authorization", "Bearer wrong"),)):
        with pytest.raises(grpc.RpcError) as ei:
            stub.ListModels(pb.ListModelsRequest(), metadata=md, timeout=10)
        assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
    frame = pb.Frame(encoding=pb.Frame.RAW_RGB8, height=64, width=64, data=np.asarray(real_frames[0]).tobytes())
    req = pb.PredictRequest(model="tiny", context=[frame], actions=pb.ActionSequence(actions=[pb.Action(discrete=2)]))
    with pytest.raises(grpc.RpcError) as ei:
        stub.Predict(req, timeout=10)
    assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as ei:
        list(stub.Rollout(pb.RolloutRequest(model="tiny", context=[frame]), timeout=10))
    assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
    ok = (("authorization", f"Bearer {KEY}"),)
    assert [m.name for m in stub.ListModels(pb.ListModelsRequest(), metadata=ok, timeout=10).models] == ["tiny"]
    assert len(stub.Predict(req, metadata=ok, timeout=30).steps) == 1
    slow = (("authorization", "Bearer k-slow-0123456789"),)
    errs = []
    for _ in range(4):
        try:
            stub.ListModels(pb.ListModelsRequest(), metadata=slow, timeout=10)
        except grpc.RpcError as e:
            errs.append(e)
    assert errs and errs[0].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert int(dict(errs[0].trailing_metadata())["retry-after"]) >= 1
    # the key travels into the data plane (contextvar): its slot limit holds on gRPC too
    slots = (("authorization", "Bearer k-slots-0123456789"),)
    five = pb.RolloutRequest(model="tiny", context=[frame], candidates=[pb.ActionSequence(
        actions=[pb.Action(discrete=2)])] * 5, options=pb.RolloutOptions(frames=pb.FRAMES_NONE))
    with pytest.raises(grpc.RpcError) as ei:
        list(stub.Rollout(five, metadata=slots, timeout=10))
    assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "slots" in ei.value.details()
    four = pb.RolloutRequest(model="tiny", context=[frame], candidates=list(five.candidates)[:4], options=five.options)
    assert len(list(stub.Rollout(four, metadata=slots, timeout=30))) == 4
    # key "one": a second concurrent session is refused
    one = (("authorization", "Bearer k-one-0123456789"),)
    opened = pb.SessionMessage(open=pb.SessionOpen(model="tiny", context=[frame]))
    import queue as q

    feed: q.Queue = q.Queue()
    first = stub.Session(iter(feed.get, None), metadata=one, timeout=30)
    feed.put(opened)
    feed.put(pb.SessionMessage(action=pb.Action(discrete=2)))
    assert next(first).HasField("frame")
    with pytest.raises(grpc.RpcError) as ei:
        list(stub.Session(iter([opened]), metadata=one, timeout=10))
    assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    feed.put(None)
    list(first)


def test_vector_session_counts_its_sessions(srv, real_frames):
    # a VectorSession opens N sessions at once: each counts against the key's max_sessions (and takes a token), as
    # N Session calls would; they come back when the stream ends
    from worldserve.client.client import GrpcClient, Reset, ServerError

    one = GrpcClient(srv.grpc, api_key="k-one-0123456789")  # max_sessions 1
    try:
        with pytest.raises(ServerError) as ei, one.vector_session("tiny", 2) as v:
            v.exchange([Reset(real_frames[:1], seed=i) for i in range(2)])
        assert ei.value.code == "RESOURCE_EXHAUSTED" and "sessions" in str(ei.value), ei.value
        with one.vector_session("tiny", 1) as v:  # one env fits, and its place comes back when the stream ends
            assert len(v.exchange([Reset(real_frames[:1])])) == 1
            assert v.exchange([2])[0].frame is not None
        t0 = time.time()
        while True:
            try:
                with one.session("tiny", real_frames[:1]) as s:
                    assert s.step(2).frame is not None
                break
            except ServerError as e:
                assert e.code == "RESOURCE_EXHAUSTED" and time.time() - t0 < 5, e
                time.sleep(0.1)
    finally:
        one.close()
