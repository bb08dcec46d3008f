"""RL users' env-steps/s: N sessions stepped one by one (N RemoteWorldEnvs, one blocking round trip each) vs the
vectorized env (RemoteVectorEnv: one VectorSession message carries the N actions, one engine step computes them), in
one run, and the engine's own ceiling: the same model in this process (no server, 1 torch thread) stepping 1 and N
rows with a frame every step (a rollout of K = 1 and K = N, temperature 1). The vectorized env cannot beat the
engine at N rows, and one by one is bounded by the engine at 1 row: on a CPU where a step of N rows costs about N
times a step of one, that bounds the ratio, whatever the wire does.

    .venv/bin/python -m bench.vector_env [--envs 16] [--steps 64] [--target HOST:PORT]

Without --target a `worldserve serve` on the bundled tiny model is started on free loopback ports (1 torch thread,
--max-slots 64). Goal (issue 20): vectorized >= 5x at N = 16. Written to bench/reports/vector_env.md and printed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from worldserve.client.gym import RemoteVectorEnv, RemoteWorldEnv

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "bench" / "reports" / "vector_env.md"


def serve() -> tuple[subprocess.Popen, str]:
    import socket

    import httpx

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    proc = subprocess.Popen([sys.executable, "-m", "worldserve.cli", "serve", "--http-port", str(ports[0]),
                             "--grpc-port", str(ports[1]), "--max-slots", "64"], cwd=ROOT,
                            env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    t0 = time.time()
    while time.time() - t0 < 180:
        try:
            if httpx.get(f"http://127.0.0.1:{ports[0]}/readyz", timeout=1).status_code == 200:
                return proc, f"127.0.0.1:{ports[1]}"
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not start")


def one_by_one(target: str, n: int, steps: int) -> float:
    envs = [RemoteWorldEnv(target, "tiny", max_steps=10**6) for _ in range(n)]
    for i, e in enumerate(envs):
        e.reset(seed=i)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for _ in range(steps):
        for e in envs:
            e.step(int(rng.integers(0, 3)))
    dt = time.perf_counter() - t0
    for e in envs:
        e.close()
    return n * steps / dt


def vectorized(target: str, n: int, steps: int) -> float:
    envs = RemoteVectorEnv(target, "tiny", num_envs=n, max_steps=10**6)
    envs.reset(seed=0)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for _ in range(steps):
        envs.step(rng.integers(0, 3, n))
    dt = time.perf_counter() - t0
    envs.close()
    return n * steps / dt


def engine_alone(n: int, steps: int) -> float:
    """Frames/s of the engine itself (no server): a K = n rollout of `steps` steps, a frame every step."""
    import torch

    from worldserve.client.gym import minigrid_context
    from worldserve.engine.engine import Engine, complete
    from worldserve.messages import RolloutRequest
    from worldserve.runtime.host_malloc import tune_malloc
    from worldserve.runtime.loader import prepare
    from worldserve.settings import EngineSettings, ModelSettings

    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    tune_malloc()  # as the served engine's process does (EngineSettings.tune_malloc)
    # what `serve` serves: the model directory's pin (eager bf16 on this CPU) or the device default
    eng = Engine(prepare(ModelSettings(dir=ROOT / "models" / "tiny")), EngineSettings(max_slots=64))
    ctx, _ = minigrid_context()(0)
    acts = np.random.default_rng(0).integers(0, 3, (n, steps))
    complete(eng, [RolloutRequest("warm", "tiny", ctx, acts[:, :2], seed=1, temperature=1.0)])
    t0 = time.perf_counter()
    complete(eng, [RolloutRequest("r", "tiny", ctx, acts, seed=1, temperature=1.0)])
    return n * steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--envs", type=int, default=16)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--target")
    a = ap.parse_args()
    proc, target = (None, a.target) if a.target else serve()
    try:
        vectorized(target, a.envs, 4)  # warm
        slow = one_by_one(target, a.envs, a.steps)
        fast = vectorized(target, a.envs, a.steps)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(20)
    one, many = engine_alone(1, a.steps), engine_alone(a.envs, a.steps)  # after the server is gone: no contention
    text = (f"# Vectorized env vs N envs stepped one by one\n\n`python -m bench.vector_env --envs {a.envs} --steps "
            f"{a.steps}` (tiny, serve --max-slots 64, 1 torch thread; one run on a shared CPU)\n\n"
            f"| N | one by one (env-steps/s) | RemoteVectorEnv (env-steps/s) | ratio |\n|---|---|---|---|\n"
            f"| {a.envs} | {slow:.0f} | {fast:.0f} | {fast / slow:.1f}x |\n\n"
            f"The engine alone (same model, this process, no server), frames every step: {one:.0f} frames/s at 1 row, "
            f"{many:.0f} at {a.envs} rows ({many / one:.1f}x). One by one reaches {slow / one:.2f} of the 1-row "
            "engine, "
            f"the vectorized env {fast / many:.2f} of the {a.envs}-row engine: the round trips are gone, what is left "
            f"is the model's own cost per row (on this CPU a step of {a.envs} rows costs "
            f"{a.envs * one / many:.1f}x a step of one).\n")
    REPORT.parent.mkdir(exist_ok=True)
    REPORT.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
