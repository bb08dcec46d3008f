"""Container tooling for the tests: the engine (docker if a daemon answers, else podman), image builds from
the repository's Dockerfiles, and containers and networks that are always removed.

Environment knobs (all optional):
    WORLDSERVE_CONTAINER_ENGINE   docker | podman (default: docker if `docker info` works, else podman)
    WORLDSERVE_BASE_IMAGE         BASE_IMAGE for the builds (default: localhost/pybase:3.11 where that image
                                  exists, the stand-in /work/shared/tools/container-setup makes on machines
                                  without a registry; else the Dockerfile's python:3.11-slim-bookworm)
    WORLDSERVE_REDIS_IMAGE        a Redis image to use instead of building deploy/redis/Dockerfile
    PIP_FIND_LINKS / pip config   a folder holding the CPU torch wheel: mounted into a podman build
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LOCAL_BASE = "localhost/pybase:3.11"
TORCH_WHEEL = "torch-2.13.0+cpu-cp311-*.whl"


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "container: builds the images and runs them with docker or podman")


def detect_engine() -> str | None:
    forced = os.environ.get("WORLDSERVE_CONTAINER_ENGINE")
    if forced:
        return forced
    if shutil.which("docker"):
        try:
            if subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0:
                return "docker"
        except subprocess.TimeoutExpired:
            pass
    if shutil.which("podman"):
        return "podman"
    return None


def _wheel_dirs() -> list[Path]:
    dirs = os.environ.get("PIP_FIND_LINKS", "").split()
    try:
        out = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.find-links"],
                             capture_output=True, text=True, timeout=60).stdout
        dirs += out.split()
    except subprocess.TimeoutExpired:
        pass
    return [Path(d) for d in dirs if Path(d).is_dir()]


@dataclass
class Engine:
    cmd: str
    logs_dir: Path
    build_seconds: dict[str, float] = field(default_factory=dict)

    def run_cmd(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        p = subprocess.run([self.cmd, *args], capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise RuntimeError(f"{self.cmd} {' '.join(args)} -> {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
        return p

    def image_exists(self, ref: str) -> bool:
        return self.run_cmd("image", "inspect", ref, check=False).returncode == 0

    def base_image(self) -> str | None:
        if os.environ.get("WORLDSERVE_BASE_IMAGE"):
            return os.environ["WORLDSERVE_BASE_IMAGE"]
        return LOCAL_BASE if self.image_exists(LOCAL_BASE) else None

    def build(self, tag: str, context: Path, target: str | None = None, torch: bool = False,
              dockerfile: Path | None = None, timeout: float = 900) -> None:
        """Build with the flags this engine needs here; the log goes to logs_dir, its tail into the error."""
        args = ["build", "-t", tag]
        if dockerfile:
            args += ["-f", str(dockerfile)]
        if target:
            args += ["--target", target]
        base = self.base_image()
        if base:
            args += ["--build-arg", f"BASE_IMAGE={base}"]
        if self.cmd == "podman":
            # docker format keeps HEALTHCHECK; host network + the host's CA bundle reach the package index
            # the way this machine does (container-setup prints the same flags)
            args += ["--format", "docker", "--network", "host"]
            if Path("/etc/ssl/certs").is_dir():
                args += ["-v", "/etc/ssl/certs:/etc/ssl/certs:ro"]
            if torch:
                for d in _wheel_dirs():
                    if list(d.glob(TORCH_WHEEL)):  # a local CPU torch wheel: no torch index needed
                        args += ["-v", f"{d}:{d}:ro", "--build-arg", f"PIP_FIND_LINKS={d}",
                                 "--build-arg", "TORCH_INDEX_URL="]
                        break
        log = self.logs_dir / f"build-{tag.replace('/', '_').replace(':', '_')}.log"
        t0 = time.time()
        with open(log, "w") as f:
            p = subprocess.run([self.cmd, *args, str(context)], stdout=f, stderr=subprocess.STDOUT,
                               timeout=timeout, env=dict(os.environ, DOCKER_BUILDKIT="1"))
        self.build_seconds[tag] = time.time() - t0
        if p.returncode != 0:
            raise RuntimeError(f"building {tag} failed ({p.returncode}), log {log}:\n{log.read_text()[-4000:]}")

    def port(self, container: str, port: int) -> int:
        out = self.run_cmd("port", container, f"{port}/tcp").stdout.strip().splitlines()
        return int(out[0].rsplit(":", 1)[1])

    def inspect(self, ref: str, kind: str = "container") -> dict:
        return json.loads(self.run_cmd(kind, "inspect", ref).stdout)[0]

    def logs(self, container: str) -> str:
        p = self.run_cmd("logs", container, check=False)
        lines = (p.stdout + p.stderr).splitlines()
        return "\n".join(ln for ln in lines if "systemd" not in ln)  # podman without systemd: timer noise

    def running(self, container: str) -> bool:
        return bool(self.inspect(container)["State"]["Running"])

    def deployment(self) -> Deployment:
        return Deployment(self)

    def healthcheck(self, container: str) -> bool:
        """Run the image's HEALTHCHECK once now (podman), or read the health state docker keeps."""
        if self.cmd == "podman":
            return self.run_cmd("healthcheck", "run", container, check=False, timeout=60).returncode == 0
        return self.inspect(container)["State"].get("Health", {}).get("Status") == "healthy"


@dataclass
class Deployment:
    """Containers and a network made for one test module; remove() takes them all away."""

    engine: Engine
    prefix: str = field(default_factory=lambda: f"wstest-{uuid.uuid4().hex[:8]}")
    containers: list[str] = field(default_factory=list)
    network: str | None = None

    def create_network(self) -> str:
        self.network = self.prefix
        self.engine.run_cmd("network", "create", self.network)
        return self.network

    def run(self, name: str, image: str, *args: str, env: dict[str, str] | None = None,
            alias: str | None = None, ports: tuple[int, ...] = (), opts: tuple[str, ...] = ()) -> str:
        cname = f"{self.prefix}-{name}"
        cmd = ["run", "-d", "--name", cname, "--label", "worldserve.test=1"]
        if self.network:
            cmd += ["--network", self.network]
            if alias:
                cmd += ["--network-alias", alias]
        for k, v in (env or {}).items():
            cmd += ["-e", f"{k}={v}"]
        for p in ports:
            cmd += ["-p", f"127.0.0.1::{p}"]
        self.containers.append(cname)
        self.engine.run_cmd(*cmd, *opts, image, *args)
        return cname

    def dump_logs(self) -> str:
        return "\n".join(f"----- {c}\n{self.engine.logs(c)[-3000:]}" for c in self.containers)

    def remove(self) -> None:
        for c in reversed(self.containers):
            self.engine.run_cmd("rm", "-f", "-t", "2", c, check=False, timeout=60)
        if self.network:
            self.engine.run_cmd("network", "rm", self.network, check=False)


@pytest.fixture(scope="session")
def engine(tmp_path_factory) -> Engine:
    cmd = detect_engine()
    if cmd is None:
        msg = "no container engine: install docker, or podman via /work/shared/tools/container-setup"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return Engine(cmd, tmp_path_factory.mktemp("container-logs"))
