"""Fuzzing (issue 12.7): schemathesis against the real server's /openapi.json (positive and negative
cases for every operation, with an API key configured) and hypothesis-generated protobuf messages
against gRPC. Zero server errors (5xx / INTERNAL / UNKNOWN), and the server still serves afterwards."""

from __future__ import annotations

import time

import grpc
import httpx
import numpy as np
import pytest

schemathesis = pytest.importorskip("schemathesis", reason="dev extra: schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402

from tests.conftest import start_server  # noqa: E402
from worldserve.api.gen import worldserve_pb2 as pb  # noqa: E402
from worldserve.api.gen import worldserve_pb2_grpc as pbg  # noqa: E402

pytestmark = pytest.mark.e2e
KEY = "fuzz-key-0123456789"
AUTH = {"authorization": f"Bearer {KEY}"}
FAST = dict(deadline=None, derandomize=True, database=None, phases=[Phase.generate],
            suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("fuzz"), "--max-slots", "8",
                     env={"WORLDSERVE_AUTH__API_KEYS": KEY, "WORLDSERVE_AUTH__PUBLIC_DOCS": "true"})
    yield s
    s.stop()
    assert "Exception in ASGI application" not in s.log.read_text()


def test_openapi_schemathesis(srv):
    schema = schemathesis.openapi.from_url(srv.http + "/openapi.json")
    t0, cases, statuses = time.time(), 0, {}
    for result in schema.get_all_operations():
        op = result.ok()
        named = "{name}" in op.path
        plans = [(mode, {"name": "tiny"} if named else None, 50 if op.method.upper() == "POST" else 8)
                 for mode in schemathesis.GenerationMode]
        if named:
            plans.append((schemathesis.GenerationMode.POSITIVE, None, 10))  # any model name
        for mode, path_params, n in plans:

            @settings(max_examples=n, **FAST)
            @given(case=op.as_strategy(generation_mode=mode, path_parameters=path_params))
            def run(case):
                nonlocal cases
                resp = case.call(base_url=srv.http, headers=AUTH, timeout=20)
                cases += 1
                statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
                assert resp.status_code < 500, (case.method, case.path, case.body, resp.status_code, resp.text[:300])

            try:
                run()
            except Unsatisfiable:  # negative cases of an operation without parameters: there are none
                assert mode == schemathesis.GenerationMode.NEGATIVE
    print("schemathesis", cases, "cases", round(time.time() - t0, 1), "s", statuses)
    assert cases >= 200 and time.time() - t0 < 60, (cases, time.time() - t0)
    assert any(400 <= s < 500 for s in statuses) and 200 in statuses, statuses
    assert httpx.get(srv.http + "/readyz").status_code == 200


# -------------------------------------------------------------------------------------------- gRPC
def _frames():
    raw = st.builds(lambda h, w, d: pb.Frame(encoding=pb.Frame.RAW_RGB8, height=h, width=w, data=d),
                    st.sampled_from([0, 1, 64, 65, 2**32 - 1]), st.sampled_from([0, 64, 2**32 - 1]),
                    st.one_of(st.binary(max_size=64), st.just(b"\0" * 64 * 64 * 3)))
    other = st.builds(lambda e, d: pb.Frame(encoding=e, data=d), st.integers(0, 7), st.binary(max_size=256))
    return st.lists(st.one_of(raw, other), max_size=10)


def _action():
    floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
    return st.one_of(st.builds(lambda v: pb.Action(discrete=v), st.integers(0, 2**32 - 1)),
                     st.builds(lambda v: pb.Action(continuous=pb.ContinuousAction(values=v)),
                               st.lists(floats, max_size=6)),
                     st.just(pb.Action()))


def _seq(max_size=70):
    return st.builds(lambda a: pb.ActionSequence(actions=a), st.lists(_action(), max_size=max_size))


def _options():
    return st.builds(lambda f, s, t, d, p, e: pb.RolloutOptions(frames=f, seed=s, temperature=t, deadline_ms=d,
                                                                priority=p, frame_encoding=e),
                     st.integers(0, 5), st.integers(0, 2**64 - 1), st.floats(width=32), st.integers(0, 2**32 - 1),
                     st.integers(0, 5), st.integers(0, 5))


def test_grpc_protobuf_fuzz(srv, real_frames):
    ch = grpc.insecure_channel(srv.grpc)
    stub = pbg.WorldModelServiceStub(ch)
    md = (("authorization", f"Bearer {KEY}"),)
    good = pb.Frame(encoding=pb.Frame.RAW_RGB8, height=64, width=64, data=np.asarray(real_frames[0]).tobytes())
    ctx = st.one_of(_frames(), st.just([good]))
    seen: dict[str, int] = {}

    def call(fn):
        try:
            fn()
            code = "OK"
        except grpc.RpcError as e:
            code = e.code().name
        seen[code] = seen.get(code, 0) + 1
        assert code not in ("INTERNAL", "UNKNOWN", "DEADLINE_EXCEEDED"), code

    @settings(max_examples=120, **FAST)
    @given(model=st.sampled_from(["tiny"] * 4 + ["", "nope"]), context=ctx, actions=_seq(), ctx_actions=_seq(8),
           options=_options(), cands=st.lists(_seq(6), max_size=4))
    def run(model, context, actions, ctx_actions, options, cands):
        req = pb.PredictRequest(model=model, context=context, actions=actions, context_actions=ctx_actions,
                                options=options)
        call(lambda: stub.Predict(req, metadata=md, timeout=20))
        roll = pb.RolloutRequest(model=model, context=context, candidates=cands, context_actions=ctx_actions,
                                 options=options)
        call(lambda: list(stub.Rollout(roll, metadata=md, timeout=20)))
        open_msg = pb.SessionMessage(open=pb.SessionOpen(model=model, context=context, options=options))
        msgs = [open_msg] + [pb.SessionMessage(action=a) for a in actions.actions[:3]]
        call(lambda: list(stub.Session(iter(msgs), metadata=md, timeout=20)))

    @settings(max_examples=80, **FAST)
    @given(data=st.binary(max_size=512))
    def raw(data):  # arbitrary bytes as a request: never INTERNAL
        call(lambda: ch.unary_unary("/worldserve.v1.WorldModelService/Predict")(data, metadata=md, timeout=20))

    run()
    raw()
    print("grpc fuzz", seen)
    assert "INVALID_ARGUMENT" in seen and "OK" in seen, seen
    assert len(stub.ListModels(pb.ListModelsRequest(), metadata=md, timeout=10).models) == 1


# ---------------------------------------------------------------------------------------------- WebSocket
def _json_values():
    leaf = st.one_of(st.none(), st.booleans(), st.integers(-(10**30), 10**30), st.floats(allow_nan=False),
                     st.text(max_size=12), st.sampled_from(["open", "action", "close"]))
    return st.recursive(leaf, lambda c: st.one_of(st.lists(c, max_size=4),
                                                  st.dictionaries(st.sampled_from(
                                                      ["type", "action", "context", "options", "x"]), c,
                                                      max_size=4)), max_leaves=12)


def test_websocket_fuzz(srv, real_frames):
    """Generated frames on the session endpoint (after a valid open or instead of it): every answer is a
    frame, an error message or a close with 1000/1003/1008/1013, never 1011 or a dropped connection."""
    import base64
    import io
    import json

    from PIL import Image
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    buf = io.BytesIO()
    Image.fromarray(real_frames[0]).save(buf, format="PNG")
    good_open = json.dumps({"type": "open", "context": [{"encoding": "png",
                                                         "data": base64.b64encode(buf.getvalue()).decode()}]})
    url = srv.http.replace("http", "ws", 1) + "/v1/models/tiny/session"
    frames = st.one_of(_json_values().map(json.dumps), st.binary(max_size=64), st.text(max_size=40),
                       st.builds(lambda a: json.dumps({"type": "action", "action": a}), _json_values()))
    closes: dict[int, int] = {}

    @settings(max_examples=60, **FAST)
    @given(opened=st.booleans(), msgs=st.lists(frames, min_size=1, max_size=3))
    def run(opened, msgs):
        with connect(url, additional_headers=AUTH, open_timeout=10) as ws:
            if opened:
                ws.send(good_open)
                assert json.loads(ws.recv(timeout=30))["type"] == "opened"
            try:
                for m in msgs:
                    ws.send(m)
                    while True:
                        reply = json.loads(ws.recv(timeout=0.3))
                        assert reply["type"] in ("frame", "error"), reply
                        if reply["type"] == "error":
                            assert reply["code"] in ("INVALID_ARGUMENT", "NOT_FOUND"), reply
            except TimeoutError:
                return
            except ConnectionClosed as e:
                code = e.rcvd.code if e.rcvd else None
                closes[code] = closes.get(code, 0) + 1
                assert code in (1000, 1003, 1008), code

    run()
    assert closes, closes
