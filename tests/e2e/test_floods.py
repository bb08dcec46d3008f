"""Cheap denial of service before authentication (issue 18), each attack scaled to a few seconds against the real
server with small limits: header floods (bytes, lines, connections still in their headers), silent sessions that
never send `open` (WebSocket and gRPC), gRPC streams that are never read, deeply nested JSON (WebSocket, REST).

Before the fixes: one connection trickling tiny headers grew `serve` by ~2 GB in 10 s; 4 silent sessions held every
place for good; 32 unread gRPC streams on one connection kept another client's predict waiting ~9 s; 100k `[`
over a WebSocket raised RecursionError (close 1011 and a traceback)."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from PIL import Image
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from tests.conftest import E2E_AUTH, E2E_KEY, metric_value, start_server
from worldserve.api.gen import worldserve_pb2 as pb
from worldserve.api.gen import worldserve_pb2_grpc as pbg
from worldserve.client.client import GrpcClient, ServerError

pytestmark = pytest.mark.e2e

PENDING_CAP = 16  # max_unauthenticated_connections
SESSIONS = 4  # max_sessions
OPEN_S = 1.0  # session_open_timeout_s
STREAMS = 4  # grpc_max_streams_per_connection
SLOW_S = 1.0  # slow_consumer_s
RSS_BOUND_MB = 50  # growth of the server process under a 3 s header flood


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    env = {**E2E_AUTH, "WORLDSERVE_SERVER__HTTP_HEADER_TIMEOUT_S": "4",
           "WORLDSERVE_SERVER__MAX_UNAUTHENTICATED_CONNECTIONS": str(PENDING_CAP),
           "WORLDSERVE_SERVER__MAX_SESSIONS": str(SESSIONS),
           "WORLDSERVE_SERVER__SESSION_OPEN_TIMEOUT_S": str(OPEN_S),
           "WORLDSERVE_SERVER__GRPC_MAX_STREAMS_PER_CONNECTION": str(STREAMS),
           "WORLDSERVE_SERVER__SLOW_CONSUMER_S": str(SLOW_S)}
    s = start_server(tmp_path_factory.mktemp("floods"), "--max-slots", "8", env=env)
    s.key = E2E_KEY
    yield s
    s.stop()


def _addr(srv) -> tuple[str, int]:
    host, port = srv.http.removeprefix("http://").split(":")
    return host, int(port)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise KeyError("VmRSS")


def _exchange(srv, raw: bytes) -> bytes:
    """Send `raw` on a fresh connection; everything the server answers until it closes."""
    with socket.create_connection(_addr(srv)) as s:
        s.settimeout(5)
        s.sendall(raw)
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
                if b"\r\n\r\n" in got and b"connection: close" not in got.lower():
                    break  # a kept-alive answer: done once its head is in
        except ConnectionResetError:
            pass
        return got


def _log_tail(srv, start: int) -> str:
    return srv.log.read_text()[start:]


@pytest.fixture(scope="module")
def open_msg(real_frames) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(real_frames[0])).save(buf, format="PNG")
    return json.dumps({"type": "open", "context": [{"encoding": "png",
                                                    "data": base64.b64encode(buf.getvalue()).decode()}]})


def _ws_url(srv) -> str:
    return srv.http.replace("http", "ws", 1) + "/v1/models/tiny/session"


# ------------------------------------------------------------------------------------------- headers
def test_header_flood_is_cut_and_memory_stays_flat(srv):
    """One connection, no key, tiny headers as fast as it can for 3 s: the server answers 431 and closes after
    http_max_headers lines, so the flood ends at once and the process does not grow (was +1.9 GB in 10 s)."""
    pid = srv.proc.pid
    before = _rss_mb(pid)
    s = socket.create_connection(_addr(srv))
    s.settimeout(2)
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    chunk = b"a: b\r\n" * 10000  # 60 KB of 6-byte headers
    t0, sent, cut = time.monotonic(), 0, None
    while time.monotonic() - t0 < 3.0:
        try:
            s.sendall(chunk)
            sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            cut = time.monotonic() - t0
            break
        except TimeoutError:
            continue
    s.close()
    grown = _rss_mb(pid) - before
    assert cut is not None and cut < 1.5, f"flood not cut: {sent / 1e6:.0f} MB of headers sent in 3 s"
    assert grown < RSS_BOUND_MB, f"server grew {grown:.0f} MB under the header flood"
    assert httpx.get(srv.http + "/healthz", timeout=5).status_code == 200


@pytest.mark.parametrize("headers, limit", [
    (b"X-Big: " + b"a" * 20000 + b"\r\n", b"server.http_max_header_bytes"),
    (b"".join(b"x-%d: y\r\n" % i for i in range(150)), b"server.http_max_headers"),
], ids=["bytes", "lines"])
def test_too_large_headers_get_431(srv, headers, limit):
    got = _exchange(srv, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    assert got.startswith(b"HTTP/1.1 431") and limit in got, got[:300]


def test_headers_under_the_limits_are_served(srv):
    headers = b"".join(b"x-%d: %s\r\n" % (i, b"v" * 100) for i in range(90))  # 90 lines, ~10 KB
    got = _exchange(srv, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    assert got.startswith(b"HTTP/1.1 200"), got[:300]


def test_connections_in_their_headers_are_capped(srv):
    """max_unauthenticated_connections connections that never finish their headers: a new connection is closed
    at once, unanswered, while an established (kept-alive) connection is still served."""
    with httpx.Client(base_url=srv.http, headers=srv.headers, timeout=5) as c:
        assert c.get("/v1/models").status_code == 200  # its headers are done: not pending any more
        held = []
        for _ in range(PENDING_CAP):
            s = socket.create_connection(_addr(srv))
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # never finished
            held.append(s)
        time.sleep(0.3)
        try:
            with socket.create_connection(_addr(srv)) as extra:
                extra.settimeout(3)
                extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                got = extra.recv(100)
        except (ConnectionResetError, BrokenPipeError):
            got = b""
        assert got == b"", got
        assert c.get("/v1/models").status_code == 200
        for s in held:
            s.close()
    time.sleep(0.3)
    assert httpx.get(srv.http + "/healthz", timeout=5).status_code == 200  # places back


# ------------------------------------------------------------------------------------------- sessions
def test_silent_websockets_end_at_the_open_deadline(srv, open_msg):
    url, hdr = _ws_url(srv), srv.headers
    silent = [connect(url, additional_headers=hdr) for _ in range(SESSIONS)]  # every session place, no `open`
    try:
        with pytest.raises(InvalidStatus) as ei:
            connect(url, additional_headers=hdr)
        assert ei.value.response.status_code == 429  # locked out meanwhile
        t0 = time.monotonic()
        for ws in silent:
            err = json.loads(ws.recv(timeout=OPEN_S + 4))
            assert err["type"] == "error" and "open" in err["message"] and "deadline" in err["message"], err
            with pytest.raises(ConnectionClosed) as cc:
                ws.recv(timeout=5)
            assert cc.value.rcvd is not None and cc.value.rcvd.code == 1008
        assert time.monotonic() - t0 < OPEN_S + 2
    finally:
        for ws in silent:
            ws.close()
    time.sleep(0.2)
    with connect(url, additional_headers=hdr) as ws:  # the places came back
        ws.send(open_msg)
        assert json.loads(ws.recv(timeout=30))["type"] == "opened"


def test_silent_grpc_sessions_end_at_the_open_deadline(srv, real_frames):
    stop = threading.Event()

    def silent():
        stop.wait()
        return
        yield

    with srv.channel(options=[("grpc.use_local_subchannel_pool", 1)]) as ch:  # a connection of their own
        stub = pbg.WorldModelServiceStub(ch)
        calls = [stub.Session(silent(), timeout=OPEN_S + 6) for _ in range(SESSIONS)]
        try:
            time.sleep(0.3)
            g = GrpcClient(srv.grpc, api_key=srv.key)
            with g.session("tiny", [real_frames[0]]) as s, pytest.raises(ServerError) as ge:
                s.step(2)
            assert ge.value.code == "RESOURCE_EXHAUSTED"  # every place held
            t0 = time.monotonic()
            for c in calls:
                with pytest.raises(grpc.RpcError) as ei:
                    next(c)
                assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, ei.value
                assert "open" in ei.value.details() and "deadline" in ei.value.details()
            assert time.monotonic() - t0 < OPEN_S + 2
            time.sleep(0.2)
            with g.session("tiny", [real_frames[0]]) as s:  # the places came back
                assert s.step(2).frame is not None
            g.close()
        finally:
            stop.set()
            for c in calls:
                c.cancel()


# ------------------------------------------------------------------------------------------- gRPC streams
def test_unread_grpc_streams_do_not_starve_others(srv, real_frames):
    """32 rollouts on one connection that never reads (no BDP probing and a 1 KiB lookahead, so HTTP/2 flow control
    stops the server's writes): at most grpc_max_streams_per_connection of them reach the server, each is cut after
    slow_consumer_s (slots freed), and another client's predict answers within 2 s all along (was ~9 s)."""
    frame = np.asarray(real_frames[0], np.uint8)
    req = pb.RolloutRequest(
        model="tiny", context=[pb.Frame(encoding=pb.Frame.RAW_RGB8, height=64, width=64,
                                        data=frame.tobytes())],
        candidates=[pb.ActionSequence(actions=[pb.Action(discrete=2)] * 64)],
        options=pb.RolloutOptions(frame_encoding=pb.Frame.RAW_RGB8))
    att = srv.channel(options=[("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024),
                               ("grpc.use_local_subchannel_pool", 1)])
    calls = [pbg.WorldModelServiceStub(att).Rollout(req, timeout=60) for _ in range(32)]
    victim = GrpcClient(srv.grpc, api_key=srv.key)
    try:
        time.sleep(0.5)
        worst, end = 0.0, time.monotonic() + 3 * SLOW_S + 1
        while time.monotonic() < end:  # several slow-consumer periods
            t = time.monotonic()
            victim.predict("tiny", [real_frames[0]], [2], timeout=10)
            worst = max(worst, time.monotonic() - t)
        assert worst < 2.0, f"a predict waited {worst:.1f} s behind unread streams"
        t0 = time.monotonic()  # the slow-consumer cut covers gRPC: no slot is held for the unread streams
        while metric_value(srv.http, "worldserve_active_slots") > 0:
            assert time.monotonic() - t0 < SLOW_S + 3, "slots of unread gRPC streams not freed"
            time.sleep(0.1)
        # reading at last: a stream that reached the server says why it was cut (the others never started)
        ends: list = []

        def read(c):
            try:
                for _ in c:
                    pass
                ends.append(("OK", ""))
            except grpc.RpcError as e:
                ends.append((e.code(), e.details() or ""))

        readers = [threading.Thread(target=read, args=(c,), daemon=True) for c in calls]
        for r in readers:
            r.start()
        t0 = time.monotonic()
        while not any(c == grpc.StatusCode.RESOURCE_EXHAUSTED and "did not read" in d for c, d in list(ends)):
            assert time.monotonic() - t0 < 10, ends
            time.sleep(0.05)
    finally:
        for c in calls:
            c.cancel()
        att.close()
        victim.close()


# ------------------------------------------------------------------------------------------- nested JSON
def test_nested_json_over_websocket_closes_1008(srv):
    start = len(srv.log.read_text())
    with connect(_ws_url(srv), additional_headers=srv.headers, max_size=2**24) as ws:
        ws.send("[" * 100_000)
        err = json.loads(ws.recv(timeout=10))
        assert err["type"] == "error" and "server.max_json_depth" in err["message"], err
        with pytest.raises(ConnectionClosed) as cc:
            ws.recv(timeout=5)
        assert cc.value.rcvd is not None and cc.value.rcvd.code == 1008
    time.sleep(0.2)
    tail = _log_tail(srv, start)
    assert "Traceback" not in tail and "RecursionError" not in tail, tail[-2000:]


@pytest.mark.parametrize("depth", [40, 5000])
def test_nested_json_rest_body_gets_400(srv, depth):
    start = len(srv.log.read_text())
    body = b'{"context": ' + b"[" * depth + b"]" * depth + b', "actions": [2]}'
    r = httpx.post(srv.http + "/v1/models/tiny/predict", content=body, timeout=10,
                   headers={**srv.headers, "content-type": "application/json"})
    assert r.status_code == 400, r.text[:300]
    err = r.json()["error"]
    assert "32" in err["message"] and "server.max_json_depth" in err["message"], err
    assert "Traceback" not in _log_tail(srv, start)
