"""`serve` with isolated engines (engine.isolated, issue 20 item 7), as an operator runs it: the real server as a
subprocess over a model repository (tiny + denoiser), each model's engine in its own process. SIGKILL one model's
engine process while a rollout runs: the rollout ends with a status at once, /healthz says so, the other model
keeps serving, and the process comes back by itself. The front end itself never imports torch; its /metrics shows
the engine processes' figures."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import ROOT, start_server
from worldserve.client.client import RestClient, ServerError

pytestmark = pytest.mark.e2e


def engine_children(pid: int) -> dict[str, int]:
    """The server's engine processes: model directory name -> pid (read from /proc)."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"worldserve.engine.process" in cmd:
            out[d.name] = int(d.name)
    return out


def test_a_killed_engine_process_ends_its_requests_and_comes_back(tmp_path, real_frames):
    repo = tmp_path / "models"
    repo.mkdir()
    for name in ("tiny", "denoiser"):
        (repo / name).symlink_to(ROOT / "models" / name)
    srv = start_server(tmp_path, "--model-repo", str(repo), "--max-slots", "16",
                       env={"WORLDSERVE_ENGINE__ISOLATED": "true"})
    try:
        children = engine_children(srv.proc.pid)
        assert len(children) == 2, children  # one engine process per model
        torch_maps = Path(f"/proc/{srv.proc.pid}/maps").read_text()
        assert "libtorch" not in torch_maps, "the front end loaded torch: its engines are not isolated"
        c = RestClient(srv.http)
        before = c.predict("tiny", real_frames[:2], [2, 1, 2], seed=3, temperature=1.0)
        # the engine processes' metrics reach the front end's /metrics (merged every ipc.METRICS_EVERY_S)
        frames = [0.0]
        deadline = time.time() + 10
        while frames[0] < 3 and time.time() < deadline:
            time.sleep(0.2)
            frames = [float(line.split()[-1]) for line in httpx.get(srv.http + "/metrics").text.splitlines()
                      if line.startswith('worldserve_frames_total{model="tiny"}')] or [0.0]
        assert frames[0] >= 3, "the tiny engine process's frames never reached /metrics"
        out: dict = {}
        started = threading.Event()
        # distinct random candidates (equal prefixes would be computed once and finish before the kill)
        cands = np.random.default_rng(0).integers(0, 3, (8, 60)).tolist()

        def long_rollout():
            try:
                out["events"] = []
                for ev in c.rollout("tiny", real_frames[:2], cands, frames="all"):
                    out["events"].append(ev)
                    started.set()
            except ServerError as e:
                out["error"] = e

        t = threading.Thread(target=long_rollout)
        t.start()
        assert started.wait(30), "the rollout never started"
        t0 = time.time()
        os.kill(max(children.values()), signal.SIGKILL)  # tiny's: the repository's models start in name order
        t.join(10)
        assert not t.is_alive(), "a request of a killed engine process must end at once"
        assert out["error"].code == "INTERNAL" and "engine process" in str(out["error"]), out.get("error")
        assert time.time() - t0 < 5
        assert httpx.get(srv.http + "/healthz").status_code == 503  # the process is down: the probe says so
        assert c.predict("denoiser", real_frames[:2], [2]).shape[0] == 1  # the other model keeps serving
        while httpx.get(srv.http + "/healthz").status_code != 200:  # back by itself
            assert time.time() - t0 < 90, "the engine process did not come back"
            time.sleep(0.2)
        assert len(engine_children(srv.proc.pid)) == 2
        after = c.predict("tiny", real_frames[:2], [2, 1, 2], seed=3, temperature=1.0)
        assert (after == before).all()  # the same weights, the same seeded frames
    finally:
        assert srv.stop() == 0
    assert engine_children(srv.proc.pid) == {}
