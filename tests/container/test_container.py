"""The cpu image, built from the Dockerfile and run the way deploy/compose.yaml runs it: Redis, a worker and
the api as three containers on their own network, hardened (read-only root, no capabilities, no new
privileges). Requests go from this host through the published ports with the project's client and real
MiniGrid frames; the answers must be the frames the model gives in process, the same for the same seed.

The services' command, environment and hardening are read from deploy/compose.yaml (with its ${VAR}
interpolation), so this test fails when the compose file stops being runnable. Named volumes become tmpfs
mounts here and host ports are picked at random. Takes 3-5 minutes on a clean 2-core machine (the image
build is most of it) and well under a minute with the build cache warm.
"""

from __future__ import annotations

import io
import os
import re
import secrets
import subprocess
import tarfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from tests.conftest import metric_value
from worldserve.client.client import GrpcClient, RestClient

pytestmark = [pytest.mark.container, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "localhost/worldserve:test-cpu"
REDIS_IMAGE = "localhost/worldserve-redis:test"
MODEL = "tiny"
COMPOSE = ROOT / "deploy" / "compose.yaml"
_VAR = re.compile(r"\$\$|\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def interpolate(value, env: dict[str, str]):
    """Compose's variable interpolation: ${V}, ${V:-default}, ${V-default}, ${V:?error}, ${V?error}, $$."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1), m.group(2), m.group(3)
        v = env.get(name)
        unset = v is None or (v == "" and op and op.startswith(":"))
        if op and op.endswith("?") and unset:
            raise KeyError(f"compose needs {name}: {arg}")
        if op and op.endswith("-") and unset:
            return arg
        return v or ""

    return _VAR.sub(sub, value)


def compose_services(env: dict[str, str]) -> dict[str, dict]:
    return interpolate(yaml.safe_load(COMPOSE.read_text())["services"], env)


def run_options(svc: dict) -> tuple[str, ...]:
    """docker/podman run flags for a compose service's hardening, tmpfs and init settings."""
    opts: list[str] = []
    if svc.get("read_only"):
        opts.append("--read-only")
    for c in svc.get("cap_drop", []):
        opts += ["--cap-drop", c]
    for s in svc.get("security_opt", []):
        opts += ["--security-opt", s]
    for t in svc.get("tmpfs", []):
        opts += ["--tmpfs", t]
    for v in svc.get("volumes", []):  # named volumes: a tmpfs here, nothing to clean up
        opts += ["--tmpfs", f"{v.split(':')[1]}:mode=1777"]
    if svc.get("init"):
        opts.append("--init")
    return tuple(opts)


@dataclass
class Stack:
    engine: object  # conftest.Engine
    dep: object  # conftest.Deployment
    api: str
    worker: str
    redis: str
    http: str
    grpc: str
    worker_http: str


@pytest.fixture(scope="module")
def image(engine) -> str:
    engine.build(IMAGE, ROOT, target="cpu", torch=True)
    return IMAGE


@pytest.fixture(scope="module")
def redis_image(engine) -> str:
    if os.environ.get("WORLDSERVE_REDIS_IMAGE"):
        return os.environ["WORLDSERVE_REDIS_IMAGE"]
    engine.build(REDIS_IMAGE, ROOT / "deploy" / "redis")
    return REDIS_IMAGE


@pytest.fixture(scope="module")
def stack(engine, image: str, redis_image: str) -> Stack:
    env = {"REDIS_PASSWORD": secrets.token_hex(16), "WORKER_THREADS": "1", "WORKER_MAX_SLOTS": "16"}
    svc = compose_services(env)
    dep = engine.deployment()
    try:
        dep.create_network()
        r = svc["redis"]
        redis = dep.run("redis", redis_image, *r["command"], env=r["environment"], alias="redis")
        w = svc["worker"]
        worker = dep.run("worker", image, *w["command"], env=w["environment"], ports=(8001,), opts=run_options(w))
        a = svc["api"]
        api = dep.run("api", image, *a["command"], env=a["environment"], ports=(8000, 50051),
                      opts=run_options(a))
        s = Stack(engine, dep, api, worker, redis, f"http://127.0.0.1:{engine.port(api, 8000)}",
                  f"127.0.0.1:{engine.port(api, 50051)}", f"http://127.0.0.1:{engine.port(worker, 8001)}")
        wait_ready(s, timeout=240)
        yield s
    finally:
        dep.remove()


def wait_ready(s: Stack, timeout: float) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        for c in (s.redis, s.worker, s.api):
            if not s.engine.running(c):
                raise RuntimeError(f"{c} exited:\n{s.dep.dump_logs()}")
        try:
            if httpx.get(s.http + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"api not ready after {timeout}s:\n{s.dep.dump_logs()}")


def inprocess_frames(context: np.ndarray, actions: list[int], seed: int, temperature: float) -> np.ndarray:
    """What the engine gives for the same request in this process, from the repository's model files."""
    from worldserve.engine.engine import Engine as ModelEngine
    from worldserve.engine.engine import complete
    from worldserve.messages import RolloutRequest
    from worldserve.model.io import load_model_dir
    from worldserve.settings import EngineSettings

    eng = ModelEngine(load_model_dir(ROOT / "models" / MODEL), EngineSettings(max_slots=16))
    events = complete(eng, [RolloutRequest("r", MODEL, np.asarray(context), np.asarray([actions], np.int64),
                                           seed=seed, temperature=temperature)])
    return np.stack([e.frame for e in sorted((e for e in events if not e.final), key=lambda e: e.step)])


# ---------------------------------------------------------------------------------------------- the image
def test_image_is_hardened_and_complete(engine, image: str) -> None:
    info = engine.inspect(image, kind="image")
    cfg = info["Config"]
    assert cfg["User"] == "10001:10001"
    assert cfg["Entrypoint"] == ["worldserve"] and cfg["Cmd"] == ["serve"]  # exec form: SIGTERM reaches it
    health = cfg.get("Healthcheck") or info["Healthcheck"]  # docker keeps it in Config, podman beside it
    assert health["Test"][0] == "CMD" and "/readyz" in " ".join(health["Test"])
    assert {"8000/tcp", "8001/tcp", "50051/tcp"} <= set(cfg["ExposedPorts"])
    env = dict(e.split("=", 1) for e in cfg["Env"])
    assert env["WORLDSERVE_MODEL__DIR"] == "/app/models/tiny" and env["WORLDSERVE_SERVER__HOST"] == "0.0.0.0"
    script = (
        "set -e; for c in gcc cc g++ c++ clang make; do ! command -v $c; done; "
        "python -c 'import importlib.util as u; assert u.find_spec(\"grpc_tools\") is None'; "
        "python -c 'import worldserve.api.gen.worldserve_pb2 as m; print(m.__file__)'; "
        "python -c 'import torch; assert torch.version.cuda is None; print(torch.__version__)'; "
        "python -c 'from worldserve.model.io import load_model_dir; print(load_model_dir(\"/app/models/tiny\").spec)'; "
        "touch /app/artifacts/x; ! touch /app/x 2>/dev/null; id -u"
    )
    out = engine.run_cmd("run", "--rm", "--entrypoint", "sh", image, "-c", script, timeout=120).stdout
    assert "/opt/venv/lib/python3" in out and "site-packages/worldserve/api/gen/worldserve_pb2.py" in out
    assert "2.13.0" in out and out.strip().splitlines()[-1] == "10001"


def test_build_context_holds_only_what_the_image_needs(engine, tmp_path: Path) -> None:
    """What .dockerignore lets through, as the engine itself sends it: COPY the context into an image."""
    (tmp_path / "Dockerfile").write_text("FROM scratch\nCOPY . /ctx/\n")
    tag, name = "localhost/worldserve-context:test", f"wstest-ctx-{secrets.token_hex(4)}"
    engine.build(tag, ROOT, dockerfile=tmp_path / "Dockerfile", timeout=300)
    try:
        engine.run_cmd("create", "--name", name, tag, "none")
        tar = subprocess.run([engine.cmd, "export", name], capture_output=True, timeout=120, check=True).stdout
    finally:
        engine.run_cmd("rm", "-f", name, check=False)
        engine.run_cmd("rmi", "-f", tag, check=False)
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        files = {m.name.removeprefix("./").removeprefix("ctx/"): m.size for m in t.getmembers() if m.isfile()}
    for need in ("pyproject.toml", "service/cli/main.py", "proto/worldserve/v1/worldserve.proto", "tools/gen_proto.py",
                 "models/tiny/model.safetensors", "models/tiny/config.json", "kernels/__init__.py"):
        assert need in files, need
    tops = {f.split("/")[0] for f in files}
    assert tops <= {"pyproject.toml", "README.md", "service", "kernels", "proto", "tools", "models"}, tops
    assert not [f for f in files if "__pycache__" in f or re.search(r"_pb2(_grpc)?\.pyi?$", f)]
    assert sum(files.values()) < 50 * 2**20


# ---------------------------------------------------------------------------------------------- the stack
def test_rest_predict_and_grpc_rollout_through_redis(stack: Stack, real_frames: np.ndarray) -> None:
    ctx, actions = real_frames[:3], [2, 1, 2, 2, 0, 2]
    rest, g = RestClient(stack.http), GrpcClient(stack.grpc)
    first = rest.predict(MODEL, ctx, actions, seed=7, temperature=1.0)
    assert first.shape == (6, 64, 64, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(rest.predict(MODEL, ctx, actions, seed=7, temperature=1.0), first)
    np.testing.assert_array_equal(g.predict(MODEL, ctx, actions, seed=7, temperature=1.0), first)
    # the image serves the repository's model with the repository's code: same frames as in process
    np.testing.assert_array_equal(first, inprocess_frames(ctx, actions, seed=7, temperature=1.0))

    k, h = 4, 5
    cands = np.random.default_rng(0).integers(0, 3, (k, h)).tolist()

    def rollout() -> dict[tuple[int, int], np.ndarray]:
        return {(e.candidate, e.step): e.frame for e in g.rollout(MODEL, real_frames[:2], cands, seed=3,
                                                                    temperature=1.0)}

    a, b = rollout(), rollout()
    assert sorted(a) == [(c, s) for c in range(k) for s in range(h)]
    assert all(f.shape == (64, 64, 3) and f.dtype == np.uint8 for f in a.values())
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert any(not np.array_equal(a[(0, s)], a[(c, s)]) for c in range(1, k) for s in range(h))


def test_health_and_metrics_of_both_processes(stack: Stack) -> None:
    assert httpx.get(stack.http + "/healthz").json()["status"] == "ok"
    ready = httpx.get(stack.http + "/readyz")
    assert ready.status_code == 200 and MODEL in ready.json()["models"]
    assert "worldserve_" in httpx.get(stack.http + "/metrics").text
    assert httpx.get(stack.worker_http + "/readyz").status_code == 200
    assert metric_value(stack.worker_http, "worldserve_frames_total") > 0  # summed over the model label
    for c in (stack.redis, stack.worker, stack.api):  # the images' HEALTHCHECKs
        assert stack.engine.healthcheck(c), f"{c} unhealthy:\n{stack.engine.logs(c)[-2000:]}"

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(stack.grpc) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_sigterm_drains_then_exits_zero(stack: Stack, real_frames: np.ndarray) -> None:
    """`stop` sends SIGTERM to the entrypoint: the worker finishes the rollout it holds, both exit 0."""
    k, h = 16, 64
    got, errors = [], []

    def client() -> None:
        try:
            for ev in GrpcClient(stack.grpc).rollout(MODEL, real_frames[:2], [[2, 2, 0, 1] * (h // 4)] * k):
                got.append(ev)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=client)
    t.start()
    t0 = time.time()
    while not got and not errors and time.time() - t0 < 30:
        time.sleep(0.005)
    at_stop = len(got)
    stack.engine.run_cmd("stop", "-t", "60", stack.worker, timeout=90)
    t.join(60)
    assert not errors, errors
    assert 0 < at_stop < k * h, "the rollout was in flight when the worker got SIGTERM"
    assert len(got) == k * h, "the worker finished the rollout it held before exiting"
    stack.engine.run_cmd("stop", "-t", "30", stack.api, timeout=60)
    for c in (stack.worker, stack.api):
        code = stack.engine.inspect(c)["State"]["ExitCode"]
        assert code == 0, f"{c} exited {code}:\n{stack.engine.logs(c)[-3000:]}"

