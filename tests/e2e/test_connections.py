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

from tests.conftest import start_server
from worldserve.client import GrpcClient

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    env = {"WORLDSERVE_SERVER__HTTP_HEADER_TIMEOUT_S": "1", "WORLDSERVE_SERVER__GRPC_MAX_CONCURRENT_RPCS": "3",
           "WORLDSERVE_SERVER__MAX_SESSIONS": "2"}
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
