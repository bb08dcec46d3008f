"""Connection hygiene (issue 12.4) on the real server with small limits: connections that never finish
their headers are dropped (slowloris), gRPC caps concurrent RPCs, the server caps open sessions."""

from __future__ import annotations

import json
import socket
import time

import grpc
import httpx
import numpy as np
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.conftest import metric_value, start_server
from worldserve.client.client import GrpcClient

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    env = {"WORLDSERVE_SERVER__HTTP_HEADER_TIMEOUT_S": "1", "WORLDSERVE_SERVER__HTTP_BODY_TIMEOUT_S": "1",
           "WORLDSERVE_SERVER__GRPC_MAX_CONCURRENT_RPCS": "3",
           "WORLDSERVE_SERVER__MAX_SESSIONS": "2", "WORLDSERVE_SERVER__SLOW_CONSUMER_S": "1"}
    s = start_server(tmp_path_factory.mktemp("conn"), "--max-slots", "8", env=env)
    yield s
    s.stop()


def test_slowloris_connections_are_dropped(srv):
    host, port = srv.http.removeprefix("http://").split(":")
    socks = []
    for _ in range(50):
        s = socket.create_connection((host, int(port)))
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # headers never finished
        socks.append(s)
    assert httpx.get(srv.http + "/healthz", timeout=5).status_code == 200  # still serving meanwhile
    time.sleep(2.0)
    closed = 0
    for s in socks:
        s.settimeout(2)
        try:
            closed += s.recv(1) == b""
        except ConnectionResetError:
            closed += 1
        except TimeoutError:
            pass
        s.close()
    assert closed == 50, closed
    # a normal request on a kept-alive connection is unaffected
    with httpx.Client(base_url=srv.http) as c:
        assert c.get("/healthz").status_code == 200
        time.sleep(1.2)
        assert c.get("/readyz").status_code == 200


def test_trickling_body_gets_408(srv):
    host, port = srv.http.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)))
    s.sendall(b"POST /v1/models/tiny/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: 1000\r\n\r\n{\"context\": ")  # ... and the rest never comes
    s.settimeout(10)
    t0 = time.time()
    head = b""
    while chunk := s.recv(4096):  # the server answers, then closes
        head += chunk
    s.close()
    assert head.startswith(b"HTTP/1.1 408") and b"body not received" in head, head[:300]
    assert time.time() - t0 < 5


def test_grpc_max_concurrent_rpcs(srv, real_frames):
    g = GrpcClient(srv.grpc)
    calls = [g.rollout_call("tiny", [real_frames[0]], [[2] * 64], frames="none") for _ in range(6)]
    codes = []
    for c in calls:
        try:
            for _ in c:
                pass
            codes.append("OK")
        except grpc.RpcError as e:
            codes.append(e.code().name)
    assert "RESOURCE_EXHAUSTED" in codes and "OK" in codes, codes


def test_open_sessions_are_capped(srv, real_frames):
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(real_frames[0])).save(buf, format="PNG")
    open_msg = json.dumps({"type": "open", "context": [{"encoding": "png",
                                                        "data": base64.b64encode(buf.getvalue()).decode()}]})
    url = srv.http.replace("http", "ws", 1) + "/v1/models/tiny/session"
    with connect(url) as a, connect(url) as b:
        for ws in (a, b):
            ws.send(open_msg)
            assert json.loads(ws.recv(timeout=30))["type"] == "opened"
        with pytest.raises(InvalidStatus) as ei:
            connect(url)
        assert ei.value.response.status_code == 429 and "retry-after" in ei.value.response.headers
        with GrpcClient(srv.grpc).session("tiny", [real_frames[0]]) as s, pytest.raises(Exception) as ge:
            s.step(2)
        assert "RESOURCE_EXHAUSTED" in str(ge.value)
    with connect(url) as c:  # closed sessions free their places
        c.send(open_msg)
        assert json.loads(c.recv(timeout=30))["type"] == "opened"


def _metric(srv, name: str) -> float:
    return metric_value(srv.http, name)


def test_slow_consumer_is_cut_off_and_its_slots_freed(srv, real_frames):
    """Two clients ask for 8 x 64 raw frames (~8 MB of NDJSON each) and never read: once the socket
    buffers are full the server waits on them; after slow_consumer_s their requests are cancelled."""
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(real_frames[0])).save(buf, format="PNG")
    body = json.dumps({"context": [{"encoding": "png", "data": base64.b64encode(buf.getvalue()).decode()}],
                       "candidates": [[2] * 64] * 8, "options": {"frame_encoding": "raw"}}).encode()
    host, port = srv.http.removeprefix("http://").split(":")
    socks = []
    for _ in range(2):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect((host, int(port)))
        s.sendall(b"POST /v1/models/tiny/rollouts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        socks.append(s)  # ... and never read
    t0, last, still_since = time.time(), -1.0, time.time()
    while True:  # until no slot, nothing queued and no frame produced for a whole second (both requests cut)
        busy = _metric(srv, "worldserve_active_slots") > 0 or _metric(srv, "worldserve_queue_depth") > 0
        frames = _metric(srv, "worldserve_frames_total")
        if busy or frames != last:
            last, still_since = frames, time.time()
        elif time.time() - still_since >= 1.0:
            break
        assert time.time() - t0 < 20, "slots of unread streams not freed"
        time.sleep(0.2)
    time.sleep(1.0)
    assert _metric(srv, "worldserve_frames_total") == last  # production stopped: nothing is written for them
    for s in socks:  # reading now: each stream ends with a final line that says why it was cut
        s.settimeout(5)
        data = b""
        while not data.endswith(b"\r\n0\r\n\r\n"):
            chunk = s.recv(1 << 20)
            assert chunk, data[-300:]
            data += chunk
        s.close()
        tail = data[data.rindex(b'{"final"'):]
        assert b"RESOURCE_EXHAUSTED" in tail and b"did not read" in tail, tail[:300]
    assert httpx.get(srv.http + "/readyz").status_code == 200
