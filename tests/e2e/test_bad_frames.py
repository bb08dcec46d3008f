"""Malformed WebSocket frames and gRPC messages (issue 12): an error + a proper close / status, never an
"Exception in ASGI application", an UNKNOWN status, a hang, or a request that is expensive before it is
refused. Runs against the real server in both modes (the `server` fixture)."""

from __future__ import annotations

import base64
import io
import json
import time

import grpc
import httpx
import numpy as np
import pytest
from PIL import Image
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from worldserve.api.gen import worldserve_pb2 as pb
from worldserve.api.gen import worldserve_pb2_grpc as pbg

pytestmark = pytest.mark.e2e
SVC = "/worldserve.v1.WorldModelService/"


def _png(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _ws_url(server) -> str:
    return server.http.replace("http", "ws", 1) + "/v1/models/tiny/session"


def _open(real_frames, **options) -> str:
    return json.dumps({"type": "open", "context": [{"encoding": "png", "data": _png(real_frames[0])}],
                       "options": options})


def _expect_close(ws, code: int) -> dict:
    """The server's error message, then its close frame with `code`."""
    msg = json.loads(ws.recv(timeout=10))
    assert msg["type"] == "error", msg
    with pytest.raises(ConnectionClosed) as ei:
        ws.recv(timeout=10)
    assert ei.value.rcvd is not None and ei.value.rcvd.code == code, ei.value
    return msg


def _varint(v: int) -> bytes:
    out = bytearray()
    while True:
        out.append((v & 0x7F) | (0x80 if v > 0x7F else 0))
        v >>= 7
        if not v:
            return bytes(out)


def _log(server):
    return getattr(server, "api", server).log


def test_ws_malformed_frames_get_an_error_and_a_close_frame(server, real_frames):
    url = _ws_url(server)
    probes = [(b"\x00\x01binary", 1003, "binary"), ("[1, 2]", 1008, "object"), ('"open"', 1008, "object"),
              ("{not json", 1008, "JSON"), ("7" * 5000, 1008, "JSON"),
              (json.dumps({"type": "action", "action": 1}), 1008, "open"),
              (_open(real_frames, deadline_ms=int("9" * 400)), 1008, "deadline_ms"),
              (_open(real_frames, bogus=1), 1008, "bogus"),
              (json.dumps({"type": "open", "context": "x"}), 1008, "context")]
    for frame, code, part in probes:
        with connect(url, additional_headers=server.headers) as ws:
            ws.send(frame)
            msg = _expect_close(ws, code)
            assert part in msg["message"] + str(msg.get("field")), (frame[:40], msg)
    with connect(url.replace("/tiny/", "/nope/"), additional_headers=server.headers) as ws:
        ws.send(_open(real_frames))
        assert _expect_close(ws, 1008)["code"] == "NOT_FOUND"
    # inside an open session: a bad action is an error and the session goes on; a malformed frame ends it
    with connect(url, additional_headers=server.headers) as ws:
        ws.send(_open(real_frames))
        assert json.loads(ws.recv(timeout=30))["type"] == "opened"
        for bad in ({"type": "action", "action": "x"}, {"type": "action", "action": [[0.1]]},
                    {"type": "action", "action": int("9" * 400)}, {"type": "dance"}):
            ws.send(json.dumps(bad))
            msg = json.loads(ws.recv(timeout=10))
            assert msg["type"] == "error" and msg["code"] == "INVALID_ARGUMENT", msg
        ws.send(json.dumps({"type": "action", "action": 2}))
        assert json.loads(ws.recv(timeout=30))["type"] == "frame"
        ws.send(b"\xff")
        _expect_close(ws, 1003)
    assert "Exception in ASGI application" not in _log(server).read_text()


def test_grpc_counts_checked_before_parsing(server):
    """16 MB of empty context frames / candidates / actions: refused in milliseconds (it took 45 s and
    5.9 GB); over max_body_bytes: refused by gRPC itself."""
    ch = server.channel(options=[("grpc.max_send_message_length", 64 << 20)])
    predict = ch.unary_unary(SVC + "Predict", request_serializer=None, response_deserializer=None)
    rollout = ch.unary_stream(SVC + "Rollout", request_serializer=None, response_deserializer=None)
    n = (16 << 20) // 2 - 64
    one_seq = b"\x0a\x00" * (n - 8)
    seq_len = _varint(len(one_seq))
    model = b"\x0a\x04tiny"
    for call, body, part in ((predict, model + b"\x12\x00" * n, "context"),
                             (lambda b, **kw: list(rollout(b, **kw)), model + b"\x1a\x00" * n, "candidates"),
                             (predict, model + b"\x1a" + seq_len + one_seq, "actions"),
                             (predict, model + b"\x12\x05\x0a\x01", "valid")):  # truncated
        t0 = time.time()
        with pytest.raises(grpc.RpcError) as ei:
            call(body, timeout=30)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, ei.value
        assert part in ei.value.details() and time.time() - t0 < 5, (part, ei.value.details(), time.time() - t0)
    with pytest.raises(grpc.RpcError) as ei:
        predict(model + b"\x22\x80\x80\x80\x09" + b"\0" * (18 << 20), timeout=30)
    assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # many context frames, within the byte budget: refused on the count, before any image is decoded
    g = server.grpc_client()
    with pytest.raises(Exception) as ei2:
        g.predict_events("tiny", [np.zeros((64, 64, 3), np.uint8)] * 200, [1])
    assert "context" in str(ei2.value)
    assert httpx.get(server.http + "/healthz").status_code == 200


def test_grpc_session_protocol_errors(server, real_frames):
    stub = pbg.WorldModelServiceStub(server.channel())
    frame = pb.Frame(encoding=pb.Frame.RAW_RGB8, height=64, width=64, data=real_frames[0].tobytes())
    opened = pb.SessionMessage(open=pb.SessionOpen(model="tiny", context=[frame]))
    act = pb.SessionMessage(action=pb.Action(discrete=2))
    cases = [([], "open"), ([act], "open"), ([opened, opened], "second"),
             ([opened, pb.SessionMessage(action=pb.Action(discrete=9))], "action"),
             ([opened, pb.SessionMessage()], "`open` or `action`"),
             ([pb.SessionMessage(open=pb.SessionOpen(model="tiny", context=[frame],
                                                     options=pb.RolloutOptions(temperature=float("inf"))))],
              "temperature")]
    for msgs, part in cases:
        with pytest.raises(grpc.RpcError) as ei:
            list(stub.Session(iter(msgs), timeout=30))
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and part in ei.value.details(), (part, ei.value)
    # a good session still works
    got = list(stub.Session(iter([opened, act, act]), timeout=30))
    assert len(got) == 2 and all(e.HasField("frame") for e in got)
