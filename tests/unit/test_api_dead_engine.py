"""The api side of an engine failure (issue 12.1), in process: the real FastAPI app over a LocalQueue whose
engine runs a model that raises on every step. A request ends 500 INTERNAL (never a hang), then /healthz
turns 503 (a liveness probe restarts the process), /readyz 503, and new work is refused with 503."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io

import httpx
import numpy as np
from PIL import Image

from tests.faults import PoisonedModel
from worldserve.api.dataplane import DataPlane
from worldserve.api.http import create_app
from worldserve.engine.engine import Engine
from worldserve.messages import ModelInfo
from worldserve.model.config import PRESETS
from worldserve.model.world_model import build
from worldserve.queue.local import LocalQueue
from worldserve.settings import EngineSettings, ServerSettings

CFG = dataclasses.replace(PRESETS["tiny"], d_model=64, n_layers=2, n_heads=4)


def test_dead_engine_is_reported_by_healthz():
    model = build(CFG, seed=3)
    s = model.spec
    info = ModelInfo("tiny", s.height, s.width, 64, 64, 3, 0, ("l", "r", "f"), 8, 16, max_candidates=4)
    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(buf, format="PNG")
    body = {"context": [{"encoding": "png", "data": base64.b64encode(buf.getvalue()).decode()}], "actions": [2, 2]}

    async def main():
        q = LocalQueue(Engine(PoisonedModel(model, always=True), EngineSettings(max_slots=4)), info)
        await q.start()
        app = create_app(DataPlane(q, ServerSettings()), ServerSettings())
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            assert (await c.get("/healthz")).status_code == 200
            rs = [await asyncio.wait_for(c.post("/v1/models/tiny/predict", json=body), 20)
                  for _ in range(3)]  # three failing steps: the budget (3) is spent
            for r in rs:
                assert r.status_code == 500 and r.json()["error"]["code"] == "INTERNAL", r.text
            for _ in range(100):
                if (await c.get("/healthz")).status_code == 503:
                    break
                await asyncio.sleep(0.05)
            assert (await c.get("/healthz")).status_code == 503
            assert (await c.get("/readyz")).status_code == 503
            r = await asyncio.wait_for(c.post("/v1/models/tiny/predict", json=body), 10)
            assert r.status_code == 503 and r.json()["error"]["code"] == "UNAVAILABLE", r.text
        await q.close()

    asyncio.run(main())
