"""Shared fixtures: real MiniGrid frames, free ports, the real server as a subprocess."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "models" / "tiny"


def metric_value(urls, name: str, having: str = "", headers: dict | None = None) -> float:
    """A Prometheus metric summed over every label set (e.g. every model) and every process in `urls` (str or list);
    `having`: only the series whose line contains it (e.g. 'result="hit"'); `headers`: a key where /metrics takes
    one. KeyError when no process exports it."""
    total, seen = 0.0, False
    for url in [urls] if isinstance(urls, str) else urls:
        for line in httpx.get(url + "/metrics", headers=headers).text.splitlines():
            if (line.startswith(name + " ") or line.startswith(name + "{")) and having in line:
                total += float(line.rsplit(" ", 1)[1])
                seen = True
    if not seen:
        raise KeyError(name)
    return total


def wait_models(http: str, key: str, names, timeout: float = 30) -> None:
    """Until the front end lists every model in `names` (in Redis mode workers announce their models)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        got = {m["name"] for m in httpx.get(http + "/v1/models", headers={"authorization": f"Bearer {key}"},
                                            timeout=5).json().get("models", [])}
        if set(names) <= got:
            return
        time.sleep(0.1)
    raise TimeoutError(f"models {sorted(names)} not all listed after {timeout}s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


E2E_KEY = "e2e-key-0123456789abcdef"  # the e2e suite runs with API keys configured (WORLDSERVE_AUTH__API_KEYS)


class Clients:
    """Clients of a serving surface (`http`, `grpc`) that send its API key (`key`)."""

    @property
    def headers(self) -> dict:
        from worldserve.client.client import auth_headers

        return auth_headers(self.key)

    def rest(self, **kw):
        from worldserve.client.client import RestClient

        return RestClient(self.http, api_key=self.key, **kw)

    def grpc_client(self, **kw):
        from worldserve.client.client import GrpcClient

        return GrpcClient(self.grpc, api_key=self.key, **kw)

    def channel(self, options=()):
        from worldserve.client.client import channel

        return channel(self.grpc, self.key, options=options)


@dataclass
class Server(Clients):
    proc: subprocess.Popen
    http: str
    grpc: str
    log: Path
    metrics_urls: list | None = None
    key: str | None = None  # the API key its clients must send

    def stop(self, sig=signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_process(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    e = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "worldserve.cli.main", *args], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, env=e, cwd=ROOT)


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"server not ready after {timeout}s:\n{log.read_text()[-3000:]}")


def start_server(tmp: Path, *extra: str, cmd: str = "serve", env: dict | None = None) -> Server:
    hp, gp = free_port(), free_port()
    log = tmp / f"{cmd}-{hp}.log"
    proc = start_process([cmd, "--http-port", str(hp), "--grpc-port", str(gp), *extra], log, env)
    srv = Server(proc, f"http://127.0.0.1:{hp}", f"127.0.0.1:{gp}", log)
    try:
        wait_ready(srv.http, proc, log)
    except Exception:
        srv.stop()
        raise
    return srv


@pytest.fixture(scope="session")
def real_frames() -> np.ndarray:
    """Real observations of the environment: uint8 [16, 64, 64, 3] from a held-out-style episode."""
    from worldserve.lab.data.minigrid_env import Simulator

    sim = Simulator(seed=4242)
    frames = [sim.frame()]
    for a in [2, 2, 0, 2, 1, 2, 2, 0, 2, 2, 1, 2, 2, 0, 2]:
        frames.append(sim.step(a)[0])
    return np.stack(frames)


# the suite's key; its limits are generous so that the e2e tests measure the service, not the per-key limits
E2E_AUTH = {"WORLDSERVE_AUTH__API_KEYS": E2E_KEY, "WORLDSERVE_AUTH__PUBLIC_METRICS": "true",
            "WORLDSERVE_AUTH__PUBLIC_DOCS": "true"}


E2E_MODELS = ("tiny", "denoiser")  # the e2e surface serves both shipped architectures side by side


@pytest.fixture(scope="session", params=["local", "redis"])
def server(request, tmp_path_factory):
    """The e2e surface, twice: `serve` of a model repository (in-process queue: tiny + denoiser) and api + one
    worker per model through a real Redis."""
    tmp = tmp_path_factory.mktemp(request.param)
    if request.param == "local":
        repo = tmp / "models"
        repo.mkdir()
        for name in E2E_MODELS:
            (repo / name).symlink_to(ROOT / "models" / name)
        # e.g. WORLDSERVE_TEST_SERVE_ARGS="--backend onnxruntime --precision int8" runs the suite on that backend
        extra = os.environ.get("WORLDSERVE_TEST_SERVE_ARGS", "").split()
        srv = start_server(tmp, "--model-repo", str(repo), "--max-slots", "64", "--max-queue", "128", *extra,
                           env=E2E_AUTH)
        srv.metrics_urls = [srv.http]
    else:
        redis = request.getfixturevalue("redis_server")
        srv = start_stack(tmp, redis, 1, ("--max-slots", "64", "--max-queue", "128"), api_env=E2E_AUTH)
        srv.add_worker(tmp, "--model-dir", str(ROOT / "models" / "denoiser"), "--max-slots", "64", "--max-queue", "128")
        wait_models(srv.http, E2E_AUTH["WORLDSERVE_AUTH__API_KEYS"], E2E_MODELS)
    srv.key = E2E_KEY
    yield srv
    srv.stop()


# ---------------------------------------------------------------------------------------------- Redis
@dataclass
class RedisServer:
    port: int
    dir: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        t0 = time.time()
        while time.time() - t0 < 10:
            try:
                if redis.Redis(port=self.port).ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def client(self):
        import redis

        return redis.Redis(port=self.port)


def start_redis(tmp: Path) -> RedisServer:
    import shutil

    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (make test installs it with apt)")
    r = RedisServer(free_port(), tmp)
    r.start()
    return r


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    r = start_redis(tmp_path_factory.mktemp("redis"))
    yield r
    r.stop()


FAST_FAILOVER = {"WORLDSERVE_QUEUE__CLAIM_IDLE_MS": "1500", "WORLDSERVE_QUEUE__HEARTBEAT_S": "0.3",
                 "WORLDSERVE_QUEUE__BLOCK_MS": "500"}


@dataclass
class Stack(Clients):
    """Front end (api) + workers joined by a real redis-server: the same HTTP/gRPC surface as `serve`."""

    api: Server
    workers: list[Server]
    redis: RedisServer
    key: str | None = None

    @property
    def http(self) -> str:
        return self.api.http

    @property
    def grpc(self) -> str:
        return self.api.grpc

    @property
    def metrics_urls(self) -> list[str]:
        return [w.http for w in self.workers if w.proc.poll() is None]

    def add_worker(self, tmp: Path, *extra: str, env: dict | None = None) -> Server:
        w = start_server(tmp, "--queue", self.redis.url, "--model-dir", str(MODEL_DIR), *extra, cmd="worker",
                         env={**FAST_FAILOVER, **(env or {})})
        self.workers.append(w)
        return w

    def stop(self) -> None:
        self.api.stop()
        for w in self.workers:
            w.stop()


def start_stack(tmp: Path, redis: RedisServer, n_workers: int = 1, worker_args=(), api_env=None,
                worker_env=None) -> Stack:
    st = Stack(None, [], redis)  # type: ignore[arg-type]
    for _ in range(n_workers):
        st.add_worker(tmp, *worker_args, env=worker_env)
    st.api = start_server(tmp, "--queue", redis.url, cmd="api", env={**FAST_FAILOVER, **(api_env or {})})
    return st
