"""Redis mode edges: start-up before Redis, wrong passwords, secrets in every URL form, deadlines that travel
as durations (clock skew), sessions beyond the request timeout, duplicate request ids."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import FAST_FAILOVER, MODEL_DIR, RedisServer, free_port, start_process, start_redis, wait_ready
from tests.integration.inproc import GROUP, KEY, MODEL, WorkerThread, collect, request, settings
from worldserve.client.client import GrpcClient, ServerError
from worldserve.messages import ErrorCode, RolloutRequest, SessionAction, pack, unpack
from worldserve.queue import redis_common as rc

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def model():
    from worldserve.model.io import load_model_dir

    return load_model_dir(MODEL_DIR)


@pytest.fixture
def redis_server(tmp_path):
    r = start_redis(tmp_path)
    yield r
    r.stop()


class Proc:
    """`worldserve api|worker` as a subprocess (not waited on: these tests start them where Redis fails)."""

    def __init__(self, tmp: Path, cmd: str, url: str):
        self.http, self.grpc = free_port(), free_port()
        self.log = tmp / f"{cmd}-{self.http}.log"
        extra = ["--model-dir", str(MODEL_DIR), "--max-slots", "8"] if cmd == "worker" else []
        self.proc = start_process([cmd, "--queue", url, "--http-port", str(self.http), "--grpc-port",
                                   str(self.grpc), *extra], self.log, FAST_FAILOVER)
        self.url = f"http://127.0.0.1:{self.http}"

    def readyz(self, timeout: float = 90) -> int:
        """/readyz status once the HTTP server answers."""
        t0 = time.time()
        while time.time() - t0 < timeout:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                return httpx.get(self.url + "/readyz", timeout=1).status_code
            except httpx.HTTPError:
                time.sleep(0.2)
        raise TimeoutError(self.log.read_text()[-3000:])

    def wait_log(self, text: str, timeout: float = 30) -> None:
        t0 = time.time()
        while text not in self.log.read_text():
            assert time.time() - t0 < timeout, f"{text!r} not logged:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def rollout_error(grpc_port: int, frames) -> ServerError:
    with pytest.raises(ServerError) as e:
        list(GrpcClient(f"127.0.0.1:{grpc_port}").rollout(MODEL, frames[:1], [[2, 2]], frames="none"))
    return e.value


def test_worker_and_api_started_before_redis_say_why_then_join(tmp_path, real_frames):
    rs = RedisServer(free_port(), tmp_path)  # not started yet
    worker, api = Proc(tmp_path, "worker", rs.url), Proc(tmp_path, "api", rs.url)
    try:
        assert worker.readyz() == 503 and api.readyz() == 503
        worker.wait_log("redis unreachable")
        api.wait_log("redis unreachable")
        err = rollout_error(api.grpc, real_frames)
        assert err.code == "UNAVAILABLE" and "redis unreachable" in err.message, err  # never NOT_FOUND
        rs.start()
        wait_ready(worker.url, worker.proc, worker.log, timeout=30)
        worker.wait_log("joined group")
        wait_ready(api.url, api.proc, api.log, timeout=30)
        got = list(GrpcClient(f"127.0.0.1:{api.grpc}").rollout(MODEL, real_frames[:1], [[2, 2]], frames="none"))
        assert len(got) == 2
    finally:
        worker.stop()
        api.stop()
        rs.stop()


def test_wrong_password_is_named_and_secrets_never_logged_in_any_url_form(tmp_path, real_frames):
    secret, wrong = "s3cr3t/pa@ss:w0rd", "wr0ng/guess@x"
    port, sock = free_port(), tmp_path / "r.sock"
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--unixsocket", str(sock), "--unixsocketperm", "700", "--requirepass", secret],
                            stdout=subprocess.DEVNULL)
    procs = []
    try:
        time.sleep(0.5)
        bad_worker = Proc(tmp_path, "worker", f"redis://:{wrong}@127.0.0.1:{port}/0")
        bad_api = Proc(tmp_path, "api", f"unix://{sock}?db=0&password={wrong}")
        worker = Proc(tmp_path, "worker", f"redis://:{secret}@127.0.0.1:{port}/0")  # '/', '@', ':' un-encoded
        api = Proc(tmp_path, "api", f"unix://{sock}?db=0&password={secret}")
        user_api = Proc(tmp_path, "api", f"redis://default:{secret}@127.0.0.1:{port}/0")
        procs = [bad_worker, bad_api, worker, api, user_api]
        bad_worker.wait_log("authentication failed", 90)
        assert bad_worker.readyz() == 503
        bad_api.wait_log("authentication failed")
        err = rollout_error(bad_api.grpc, real_frames)
        assert err.code == "UNAVAILABLE" and "authentication failed" in err.message, err
        rest = httpx.get(bad_api.url + "/v1/models", timeout=5)
        assert rest.status_code == 503 and rest.json()["error"]["code"] == "UNAVAILABLE", rest.text
        for good in (worker, api, user_api):
            wait_ready(good.url, good.proc, good.log, timeout=90)
        for a in (api, user_api):
            got = list(GrpcClient(f"127.0.0.1:{a.grpc}").rollout(MODEL, real_frames[:1], [[2, 1]], frames="none"))
            assert len(got) == 2
    finally:
        for p in procs:
            p.stop()
        proc.terminate()
        proc.wait(10)
    from urllib.parse import quote

    for p in procs:
        text = p.log.read_text()
        for s in (secret, wrong, quote(secret, safe=""), quote(wrong, safe="")):
            assert s not in text, f"{s!r} in {p.log.name}"
    assert "password=***" in bad_api.log.read_text() and ":***@" in worker.log.read_text()


def test_redaction_and_credentials_of_every_url_form():
    cases = {
        "redis://:pw1/x@h:6379/0": ("redis://h:6379/0", None, "pw1/x"),
        "redis://user:p%40w2@h/0": ("redis://h/0", "user", "p@w2"),
        "rediss://u:p@w3:x@h:1": ("rediss://h:1", "u", "p@w3:x"),
        "unix://:pw4@/tmp/r.sock?db=1": ("unix:///tmp/r.sock?db=1", None, "pw4"),
        "unix:///tmp/r.sock?db=0&password=pw5/@": ("unix:///tmp/r.sock?db=0&password=pw5/@", None, None),
        "redis://h:1/0": ("redis://h:1/0", None, None),
    }
    for url, want in cases.items():
        assert rc.split_credentials(url) == want
        red = rc.redacted(url)
        for s in ("pw1", "p%40w2", "p@w2", "p@w3", "pw4", "pw5"):
            assert s not in red, red
        assert red == url or "***" in red


def test_deadline_travels_as_a_duration_judged_on_the_receiving_clock(model, redis_server, real_frames):
    """A front end whose clock is 5 s behind packs an absolute deadline that is already past on the worker's
    clock; the entry's duration says 20 s are left, so it is served. Duration 0 is expired wherever it lands."""
    w = WorkerThread(model, redis_server)
    try:
        w.wait_ready()
        r = redis_server.client()
        skewed = request(real_frames[:1], 40, k=1, h=4)
        skewed.deadline = time.time() - 5.0
        expired = request(real_frames[:1], 41, k=1, h=4)
        expired.deadline = time.time() + 3600
        r.xadd(KEY, {"m": pack(skewed), "id": skewed.id, "d": rc.encode_remaining(time.time() - 5 + 25)})
        r.xadd(KEY, {"m": pack(expired), "id": expired.id, "d": rc.encode_remaining(time.time(), time.time())})
        t0 = time.time()
        while not all(any(unpack(f[b"m"]).final for _, f in r.xrange(rc.results_key(q.id))) for q in (skewed, expired)):
            assert time.time() - t0 < 20
            time.sleep(0.05)
        ev = [unpack(f[b"m"]) for _, f in r.xrange(rc.results_key(skewed.id))]
        assert ev[-1].error == ErrorCode.OK and len(ev) == 4 + 1
        ev = [unpack(f[b"m"]) for _, f in r.xrange(rc.results_key(expired.id))]
        assert ev[-1].error == ErrorCode.DEADLINE_EXCEEDED
    finally:
        w.shutdown()


def test_reanchor_takes_queue_time_on_redis_clock_whatever_the_host_clock():
    # an entry added at Redis time 1000.0 with 10 s left, read 2 s later (Redis time 1002.0)
    eid = b"1000000-0"
    for host_offset in (-300.0, -5.0, 0.0, 7.5, 3600.0):  # this host's clock minus Redis's
        now = 1002.0 + host_offset
        deadline = rc.reanchor(10.0, eid, now, redis_offset_s=-host_offset)
        assert deadline == pytest.approx(now + 8.0)
    assert rc.reanchor(None, eid, 5.0, 0.0) is None
    assert rc.reanchor(10.0, eid, 5.0, None) == 15.0  # offset unknown yet: no queue time taken off
    assert rc.reanchor(1.0, eid, 1010.0, 0.0) == pytest.approx(1010.0)  # queued longer than it had: expired now
    assert rc.decode_remaining(rc.encode_remaining(None)) is None
    assert rc.decode_remaining(rc.encode_remaining(100.0, now=90.0)) == pytest.approx(10.0)


def test_session_outlives_the_request_timeout(model, redis_server, real_frames):
    from worldserve.queue.redis_queue import RedisQueue

    w = WorkerThread(model, redis_server)

    async def main():
        fe = RedisQueue(settings(redis_server), request_timeout_s=1.0)
        await fe.start()
        try:
            s = RolloutRequest("sess-1", MODEL, real_frames[:1], np.zeros((1, 0), np.int64), session=True, seed=3)
            events = await fe.submit(s)
            got = []
            for a in (2, 2, 1, 2):
                await fe.act(SessionAction(s.id, np.asarray(a)))
                got.append(await asyncio.wait_for(events.__anext__(), 20))
                await asyncio.sleep(0.6)  # 2.4 s in all, past the 1 s request timeout
            await fe.act(SessionAction(s.id, np.zeros(0), close=True))
            end = await asyncio.wait_for(events.__anext__(), 20)
            return got, end
        finally:
            await fe.close()

    try:
        w.wait_ready()
        got, end = asyncio.run(main())
        assert [e.step for e in got] == [0, 1, 2, 3] and not any(e.final for e in got)
        assert end.final and end.error == ErrorCode.OK, end
    finally:
        w.shutdown()


def test_duplicate_request_id_runs_once_and_leaks_no_slots(model, redis_server, real_frames):
    w = WorkerThread(model, redis_server)
    try:
        w.wait_ready()
        r = redis_server.client()
        dup = request(real_frames[:1], 50, k=3, h=30)
        fields = {"m": pack(dup), "id": dup.id, "d": b"60"}
        r.xadd(KEY, fields)
        t0 = time.time()
        while not r.exists(rc.results_key(dup.id)):  # running: the same request arrives again (re-added)
            assert time.time() - t0 < 10
            time.sleep(0.01)
        r.xadd(KEY, fields)
        while not any(unpack(f[b"m"]).final for _, f in r.xrange(rc.results_key(dup.id))):
            assert time.time() - t0 < 30
            time.sleep(0.05)
        time.sleep(0.5)
        ev = [unpack(f[b"m"]) for _, f in r.xrange(rc.results_key(dup.id))]
        assert [e.final for e in ev].count(True) == 1 and len(ev) == 3 * 30 + 1  # one run
        assert r.xpending(KEY, GROUP)["pending"] == 0 and r.xlen(KEY) == 0
        assert w.engine.free_slots() == 8 and w.engine.room() == 8
        (ok,) = collect(redis_server, [request(real_frames[:1], 51, k=8, h=2)])  # every slot usable
        assert ok[-1].error == ErrorCode.OK
    finally:
        w.shutdown()
