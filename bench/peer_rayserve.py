"""Peer baseline: worldserve's WorldModel behind Ray Serve, written as a Ray Serve user would write it.

NOT part of the service. bench/peer_bench.py starts this as a subprocess and measures it next to worldserve and
LitServe. The same HTTP contract as bench/peer_litserve.py (POST /predict, JSON + base64 PNG, GET /health) and the
same model code (peer_litserve.WorldModelAPI's decode / batched predict / encode), so the two peers differ only in
the framework: Ray Serve's HTTP proxy, its router and `@serve.batch` dynamic batching in one replica.

    python -m bench.peer_rayserve --model-dir models/tiny --port 8200 [--max-batch-size 16 --batch-timeout 0.01]

Needs `pip install "ray[serve]"` (the `peers` extra; not installed by `make test`).
"""

import argparse
import signal
import threading

from fastapi import FastAPI, Request  # module level: the endpoints' annotations are resolved here


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", default=None)
    p.add_argument("--preset", default=None)
    p.add_argument("--port", type=int, default=8200)
    p.add_argument("--max-batch-size", type=int, default=16, help="requests per predict() (@serve.batch)")
    p.add_argument("--batch-timeout", type=float, default=0.01)
    a = p.parse_args(argv)

    import ray
    from ray import serve

    app = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=1024)
    @serve.ingress(app)
    class WorldModelDeployment:
        def __init__(self, model_dir, preset, max_batch: int, timeout: float):
            import torch

            from bench.peer_litserve import WorldModelAPI

            torch.set_num_threads(1)
            self.api = WorldModelAPI(model_dir=model_dir, preset=preset)
            self.api.setup("cpu")
            self.run_batch.set_max_batch_size(max_batch)
            self.run_batch.set_batch_wait_timeout_s(timeout)

        @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
        async def run_batch(self, reqs: list) -> list:
            return self.api.predict(list(reqs))

        @app.get("/health")
        async def health(self) -> dict:
            return {"ok": True}

        @app.post("/predict")
        async def predict(self, request: Request) -> dict:
            out = await self.run_batch(self.api.decode_request(await request.json()))
            return self.api.encode_response(out)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": a.port})
    serve.run(WorldModelDeployment.bind(a.model_dir, a.preset, a.max_batch_size, a.batch_timeout), route_prefix="/")
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
