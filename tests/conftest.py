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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    http: str
    grpc: str
    log: Path

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
    return subprocess.Popen([sys.executable, "-m", "worldserve.cli", *args], stdout=open(log, "w"),
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
    from worldserve.data.minigrid_env import Simulator

    sim = Simulator(seed=4242)
    frames = [sim.frame()]
    for a in [2, 2, 0, 2, 1, 2, 2, 0, 2, 2, 1, 2, 2, 0, 2]:
        frames.append(sim.step(a)[0])
    return np.stack(frames)


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Server:
    srv = start_server(tmp_path_factory.mktemp("serve"), "--model-dir", str(MODEL_DIR), "--max-slots", "64",
                       "--max-queue", "128")
    yield srv
    srv.stop()
