"""Serving subcommands: serve (embedded), api and worker (Redis mode)."""

from __future__ import annotations

import argparse
import asyncio
import logging


def _settings(a):
    from .settings import Settings

    s = Settings()
    m, e, srv, q = s.model, s.engine, s.server, s.queue
    for name, target, attr in [
        ("model_dir", m, "dir"), ("preset", m, "preset"), ("device", m, "device"), ("backend", m, "backend"),
        ("precision", m, "precision"), ("max_slots", e, "max_slots"), ("max_queue", e, "max_queue"),
        ("host", srv, "host"), ("http_port", srv, "http_port"), ("grpc_port", srv, "grpc_port"),
        ("queue", q, "url"),
    ]:
        v = getattr(a, name, None)
        if v is not None:
            setattr(target, attr, type(getattr(target, attr))(v) if getattr(target, attr) is not None else v)
    if getattr(a, "triton", False):
        m.triton_kernels = True
    return s


def _common(p: argparse.ArgumentParser, model: bool = True) -> None:
    p.add_argument("--host")
    p.add_argument("--http-port", type=int)
    p.add_argument("--grpc-port", type=int)
    p.add_argument("--queue", help="local | redis://[user:pass@]host:port/db | rediss://…")
    if model:
        p.add_argument("--model-dir")
        p.add_argument("--preset", help="serve random weights of a preset (tiny/base/large)")
        p.add_argument("--device")
        p.add_argument("--backend", choices=["eager", "compile", "onnxruntime", "tensorrt"])
        p.add_argument("--precision", choices=["fp32", "fp16", "bf16", "int8", "fp8"])
        p.add_argument("--max-slots", type=int)
        p.add_argument("--max-queue", type=int)
        p.add_argument("--triton", action="store_true", help="use the Triton kernels where they exist")


def cmd_serve(a) -> None:
    from .server import build_local_queue, serve_frontends

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    s = _settings(a)
    if s.queue.url != "local":
        raise SystemExit("`serve` runs the in-process queue; use `worldserve api` + `worldserve worker` for Redis")
    asyncio.run(serve_frontends(s, build_local_queue(s)))


def cmd_api(a) -> None:
    from .queue.redis_queue import RedisQueue
    from .server import serve_frontends

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    s = _settings(a)
    if not s.queue.url.startswith(("redis://", "rediss://", "unix://")):
        raise SystemExit("`api` needs --queue redis://… (or WORLDSERVE_QUEUE__URL)")
    asyncio.run(serve_frontends(s, RedisQueue(s.queue)))


def cmd_worker(a) -> None:
    from .server import run_worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    s = _settings(a)
    if not s.queue.url.startswith(("redis://", "rediss://", "unix://")):
        raise SystemExit("`worker` needs --queue redis://… (or WORLDSERVE_QUEUE__URL)")
    if a.name:
        s.queue.worker_name = a.name
    asyncio.run(run_worker(s))


def add_commands(sub) -> None:
    p = sub.add_parser("api", help="front ends only (HTTP + gRPC), no model: requests go through Redis")
    _common(p, model=False)
    p.set_defaults(fn=cmd_api)
    p = sub.add_parser("worker", help="engine + model, takes work from Redis; /healthz /readyz /metrics on --http-port")
    _common(p)
    p.add_argument("--name", help="consumer name (default: host-pid-random)")
    p.set_defaults(fn=cmd_worker)

    p = sub.add_parser("serve", help="HTTP + gRPC front ends and the engine in one process")
    _common(p)
    p.set_defaults(fn=cmd_serve)

