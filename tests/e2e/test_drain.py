"""Drain on SIGTERM (issue 12.6): readiness and gRPC health flip first, sessions get a close frame at
once, in-flight rollouts get the grace period, the rest end with UNAVAILABLE (a final NDJSON line, a
gRPC status), and the process exits."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import json
import signal
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.conftest import start_server
from worldserve.client.client import GrpcClient

pytestmark = pytest.mark.e2e


def test_sigterm_drains(tmp_path, real_frames):
    srv = start_server(tmp_path, "--max-slots", "2", env={"WORLDSERVE_SERVER__GRACE_S": "1.5"})
    try:
        buf = io.BytesIO()
        Image.fromarray(real_frames[0]).save(buf, format="PNG")
        ctx = [{"encoding": "png", "data": base64.b64encode(buf.getvalue()).decode()}]
        body = {"context": ctx, "candidates": [[2] * 64] * 2, "options": {"frames": "none"}}

        def rest_rollout(_):
            lines = []
            with httpx.stream("POST", srv.http + "/v1/models/tiny/rollouts", json=body, timeout=30) as r:
                assert r.status_code == 200
                lines = [json.loads(x) for x in r.iter_lines() if x]
            assert lines and lines[-1].get("final"), lines[-3:]  # never a stream cut without its last line
            err = lines[-1]["error"]
            return "OK" if err is None else err["code"]

        def grpc_rollout(_):
            try:
                list(GrpcClient(srv.grpc).rollout_call("tiny", [real_frames[0]], [[2] * 64] * 2, frames="none"))
                return "OK"
            except grpc.RpcError as e:
                return e.code().name

        ws = connect(srv.http.replace("http", "ws", 1) + "/v1/models/tiny/session")
        ws.send(json.dumps({"type": "open", "context": ctx}))
        assert json.loads(ws.recv(timeout=30))["type"] == "opened"
        with cf.ThreadPoolExecutor(16) as ex:
            rest = [ex.submit(rest_rollout, i) for i in range(8)]
            grpcs = [ex.submit(grpc_rollout, i) for i in range(6)]
            time.sleep(0.5)
            t0 = time.time()
            srv.proc.send_signal(signal.SIGTERM)
            health = health_pb2_grpc.HealthStub(grpc.insecure_channel(srv.grpc))
            while httpx.get(srv.http + "/readyz", timeout=2).status_code != 503:
                assert time.time() - t0 < 1.0, "readyz did not flip"
                time.sleep(0.02)
            st = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
            assert st == health_pb2.HealthCheckResponse.NOT_SERVING
            r = httpx.post(srv.http + "/v1/models/tiny/rollouts", json=body, timeout=5)  # no new work
            assert r.status_code == 503 and r.json()["error"]["code"] == "UNAVAILABLE"
            msg = json.loads(ws.recv(timeout=5))  # the session is closed at once, with a reason
            assert msg["type"] == "error" and msg["code"] == "UNAVAILABLE", msg
            with pytest.raises(ConnectionClosed) as ei:
                ws.recv(timeout=5)
            assert ei.value.rcvd.code == 1012
            outcomes = [f.result(timeout=30) for f in rest + grpcs]
        assert srv.proc.wait(15) == 0
        assert time.time() - t0 < 1.5 + 6
        assert "OK" in outcomes and "UNAVAILABLE" in outcomes, outcomes
        assert set(outcomes) <= {"OK", "UNAVAILABLE"}, outcomes
        log = srv.log.read_text()
        assert "drained:" in log and "Exception in ASGI application" not in log and "Traceback" not in log
    finally:
        srv.stop()
