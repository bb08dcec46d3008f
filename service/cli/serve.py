"""Serving subcommands: serve (embedded), api and worker (Redis mode)."""

from __future__ import annotations

import argparse
import asyncio
import logging

CLI_FIELDS = [  # flag -> (settings section, field)
    ("model_dir", "model", "dir"), ("model_repo", "model", "repo"), ("preset", "model", "preset"),
    ("device", "model", "device"), ("backend", "model", "backend"), ("precision", "model", "precision"),
    ("max_slots", "engine", "max_slots"), ("max_queue", "engine", "max_queue"), ("host", "server", "host"),
    ("http_port", "server", "http_port"), ("grpc_port", "server", "grpc_port"), ("queue", "queue", "url"),
]


def _settings(a):
    """Settings from the environment, then the flags given on the command line, validated like the rest."""
    from ..settings import Settings

    s = Settings()
    over: dict[str, dict] = {}
    for flag, section, attr in CLI_FIELDS:
        v = getattr(a, flag, None)
        if v is not None:
            over.setdefault(section, {})[attr] = v
    if {"backend", "precision"} & set(over.get("model", {})):
        over["model"]["auto"] = False  # named on the command line: the serving.json pin is not read
    if getattr(a, "triton", False):
        over.setdefault("model", {})["triton_kernels"] = True
    if getattr(a, "name", None):
        over.setdefault("queue", {})["worker_name"] = a.name
    for section, values in over.items():  # validated: a bad flag is an error naming it, not a crash later
        sub = getattr(s, section)  # only what was set (env, flags): a default that follows another field
        # (model.precision follows model.device) is derived again from the new values
        setattr(s, section, type(sub).model_validate({**sub.model_dump(exclude_unset=True), **values}))
    return s


def _common(p: argparse.ArgumentParser, model: bool = True) -> None:
    p.add_argument("--host")
    p.add_argument("--http-port", type=int)
    p.add_argument("--grpc-port", type=int)
    p.add_argument("--queue", help="local | redis://[user:pass@]host:port/db | rediss://…")
    if model:
        p.add_argument("--model-dir")
        p.add_argument("--model-repo", help="serve every model directory in this folder (e.g. models)")
        p.add_argument("--preset", help="serve random weights of a preset (tiny/base/large)")
        p.add_argument("--device")
        p.add_argument("--backend", choices=["eager", "compile", "onnxruntime", "tensorrt"])
        p.add_argument("--precision", choices=["fp32", "fp16", "bf16", "int8", "fp8"])
        p.add_argument("--max-slots", type=int)
        p.add_argument("--max-queue", type=int)
        p.add_argument("--triton", action="store_true", help="use the Triton kernels where they exist")


def cmd_serve(a) -> None:
    from .wiring import build_local_queue, check_startup, serve_frontends

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    s = _settings(a)
    if s.queue.url != "local":
        raise SystemExit("`serve` runs the in-process queue; use `worldserve api` + `worldserve worker` for Redis")
    check_startup(s)  # before any model is built: admin API without an admin key, bad model roots
    asyncio.run(serve_frontends(s, build_local_queue(s)))


def cmd_api(a) -> None:
    from ..queue.redis_queue import RedisQueue
    from .wiring import serve_frontends

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    s = _settings(a)
    if not s.queue.url.startswith(("redis://", "rediss://", "unix://")):
        raise SystemExit("`api` needs --queue redis://… (or WORLDSERVE_QUEUE__URL)")
    asyncio.run(serve_frontends(s, RedisQueue(s.queue)))


def cmd_worker(a) -> None:
    from .wiring import run_worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    s = _settings(a)
    if not s.queue.url.startswith(("redis://", "rediss://", "unix://")):
        raise SystemExit("`worker` needs --queue redis://… (or WORLDSERVE_QUEUE__URL)")
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

