"""Which files of ours one REST rollout runs through, socket to model step and back (docs/architecture.md).

    python tools/request_path.py

Starts the real HTTP front end in this process (uvicorn on a free loopback port, embedded engine on the
bundled model), sends one warm-up rollout, then traces the files whose code runs (every thread) during one
more rollout (K=2, H=2, frames every step) and prints them in the order first entered.
"""

from __future__ import annotations

import asyncio
import base64
import io
import socket
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OURS = (str(ROOT / "service"), str(ROOT / "kernels"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def main() -> list[str]:
    import httpx
    import numpy as np
    import uvicorn
    from PIL import Image

    from worldserve.api.dataplane import DataPlane
    from worldserve.api.http import create_app
    from worldserve.cli.wiring import build_local_queue
    from worldserve.settings import Settings

    settings = Settings()
    q = build_local_queue(settings)
    await q.start()
    app = create_app(DataPlane(q, settings.server), settings.server)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)
    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(buf, "PNG")
    body = {"context": [{"encoding": "png", "data": base64.b64encode(buf.getvalue()).decode()}],
            "candidates": [[0, 1], [2, 2]]}
    seen: dict[str, None] = {}

    def tracer(frame, event, arg):
        f = frame.f_code.co_filename
        if f.startswith(OURS) and f not in seen:
            seen[f] = None
        return None

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
        (await c.post("/v1/models/tiny/rollouts", json=body)).raise_for_status()  # warm-up
        threading.setprofile(tracer)
        sys.setprofile(tracer)
        r = await c.post("/v1/models/tiny/rollouts", json=body)
        sys.setprofile(None)
        threading.setprofile(None)
        r.raise_for_status()
    server.should_exit = True
    await task
    await q.close()
    return [str(Path(f).relative_to(ROOT)) for f in seen]


def engine_thread_files() -> list[str]:
    """The engine thread was started before the profiler: trace its step functions on one in-process step."""
    import numpy as np

    from worldserve.engine.engine import Engine
    from worldserve.messages import RolloutRequest
    from worldserve.model.io import load_model_dir
    from worldserve.settings import DEFAULT_MODEL_DIR, EngineSettings

    eng = Engine(load_model_dir(DEFAULT_MODEL_DIR), EngineSettings(max_slots=4))
    req = RolloutRequest("r", "tiny", np.zeros((1, 64, 64, 3), np.uint8), np.zeros((2, 2), np.int64))
    seen: dict[str, None] = {}

    def tracer(frame, event, arg):
        f = frame.f_code.co_filename
        if f.startswith(OURS) and f not in seen:
            seen[f] = None

    eng.submit(req)
    sys.setprofile(tracer)
    while not any(e.final for e in eng.step()):
        pass
    sys.setprofile(None)
    return [str(Path(f).relative_to(ROOT)) for f in seen]


if __name__ == "__main__":
    front = asyncio.run(main())
    engine = engine_thread_files()
    files = list(dict.fromkeys(front + engine))
    print(f"{len(files)} files of ours on one REST rollout:")
    for f in files:
        print("  ", f, "(engine thread)" if f in engine and f not in front else "")
