"""Process wiring: `serve` (front ends + engine in one process), `api` (front ends only, Redis) and
`worker` (engine only, Redis). Graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path

import uvicorn

from ..api.auth import Gate, GrpcGate, load_keys, require_admin_key
from ..api.conn import uvicorn_options
from ..api.dataplane import DataPlane
from ..api.grpc_server import set_serving, start_grpc
from ..api.http import create_app
from ..engine.build import build_engine
from ..settings import Settings

log = logging.getLogger("worldserve.server")


def repo_dirs(repo) -> list:
    """The model directories of a repository: its sub-folders that hold a config.json, by name."""
    dirs = sorted(d for d in repo.iterdir() if (d / "config.json").is_file())
    if not dirs:
        raise SystemExit(f"model repository {repo} holds no model directory (a folder with config.json)")
    return dirs


def admin_roots(settings: Settings) -> list[Path]:
    """The resolved directories the admin API may load from: server.admin_model_roots, else model.repo."""
    raw = settings.server.admin_model_roots or ([settings.model.repo] if settings.model.repo else [])
    roots = []
    for r in raw:
        try:
            p = Path(r).resolve(strict=True)
        except (OSError, RuntimeError):
            p = None
        if p is None or not p.is_dir():
            raise SystemExit(f"server.admin_model_roots (WORLDSERVE_SERVER__ADMIN_MODEL_ROOTS): {r} is not a "
                             "directory")
        roots.append(p)
    return roots


def check_startup(settings: Settings) -> None:
    """Refuse what must not serve, before any model is built: the admin API without an admin key or with a model
    root that is not a directory. Warn about the trust decisions the operator made."""
    srv, ms = settings.server, settings.model
    if srv.admin_api:
        require_admin_key(load_keys(settings.auth))
        if not admin_roots(settings):
            log.warning("server.admin_api is on but no model roots are set (server.admin_model_roots, model.repo): "
                        "the admin API can unload models but load none")
    if ms.trust_remote_code:
        log.warning("SECURITY: model.trust_remote_code is on: a model directory whose config.json names user code "
                    "(package.module:Class, an entry point) runs that code in this server%s",
                    " (admin keys can load such directories from the admin model roots)" if srv.admin_api else "")


def _weights_sha256(model_dir) -> str | None:
    from ..model.io import WEIGHTS, sha256_file

    w = Path(model_dir) / WEIGHTS
    return sha256_file(w) if w.is_file() else None


def build_local_queue(settings: Settings):
    from ..queue.local import LocalQueue

    def build(s: Settings, weights_sha256=None):  # -> (engine, info): in this process, or in one of its own
        # the loader resolves the model's backend x precision in place (runtime/choose.py: pin or default): on a
        # copy, so that every directory loaded later (repo, admin API) is chosen for itself
        s = s.model_copy(update={"model": s.model.model_copy()})
        if not s.engine.isolated:
            return build_engine(s, weights_sha256)
        from ..engine.host import ProcessHost  # the engine process builds it (engine/process.py)

        host = ProcessHost(s.model.preset or Path(s.model.dir).name, {
            "settings": {"model": s.model.model_dump(mode="json"), "engine": s.engine.model_dump(mode="json")},
            "weights_sha256": weights_sha256})
        return host.engine, host.spawn()

    def load(model_dir, weights_sha256=None):  # a model directory -> (engine, info): start-up and the admin API
        ms = type(settings.model).model_validate({**settings.model.model_dump(), "dir": model_dir, "repo": None,
                                                  "preset": None})
        return build(settings.model_copy(update={"model": ms}), weights_sha256)

    admin = settings.server.admin_api
    q = LocalQueue(loader=load, model_roots=admin_roots(settings) if admin else ())
    for d in repo_dirs(settings.model.repo) if settings.model.repo else [None]:
        engine, info = build(settings) if d is None else load(d)
        # what each name was first served with: the admin API re-loads a name only with these weights
        src = d if d is not None else (None if settings.model.preset else settings.model.dir)
        q.served_now(engine, info, _weights_sha256(src) if admin and src is not None else None)
    return q


async def run_worker(settings: Settings) -> None:
    """Redis worker: engine + model; a small HTTP server for /healthz, /readyz and /metrics."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from ..worker.worker import Worker

    engine, info = build_engine(settings)
    worker = Worker(engine, info, settings.queue)
    app = FastAPI(title="worldserve worker")
    app.get("/healthz")(lambda: {"status": "ok", "worker": worker.id} if worker.dead is None
                        else JSONResponse({"status": "dead", "reason": worker.dead}, status_code=503))
    app.get("/readyz")(lambda: {"status": "ready"} if worker.ready()
                       else JSONResponse({"status": "not ready"}, status_code=503))
    app.get("/metrics")(lambda: Response(generate_latest(), media_type=CONTENT_TYPE_LATEST))
    srv = settings.server
    http = quiet_server(uvicorn.Config(app, host=srv.host, port=srv.http_port, log_level="warning",
                                       **uvicorn_options(srv, tls=False)))  # the same header and connection limits
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    http_task = asyncio.create_task(http.serve())
    code = 0
    try:
        await worker.run(stop, srv.grace_s)
    except SystemExit as e:  # the engine died: the worker has handed its work on; exit non-zero, cleanly
        code = e.code if isinstance(e.code, int) else 1
    http.should_exit = True
    await http_task
    if code:
        raise SystemExit(code)


def quiet_server(config: uvicorn.Config) -> uvicorn.Server:
    """A uvicorn server that leaves SIGTERM/SIGINT to us (it would otherwise capture them and start its
    own shutdown, cancelling streams before our drain)."""
    http = uvicorn.Server(config)
    http.install_signal_handlers = lambda: None
    http.capture_signals = contextlib.nullcontext
    return http


LOOPBACK = ("127.0.0.1", "localhost", "::1")


async def serve_frontends(settings: Settings, queue) -> None:
    srv = settings.server
    gate = Gate(settings.auth, srv.max_sessions)
    if srv.admin_api:  # `api` too (Redis mode): admin routes for admin keys only, never for the whole port
        require_admin_key(gate.keys)
    if gate.open and srv.host not in LOOPBACK:
        log.warning("SECURITY: listening on %s without API keys: anyone who can reach this port can use every "
                    "slot and read /metrics; set WORLDSERVE_AUTH__API_KEYS or bind 127.0.0.1", srv.host)
    if not srv.tls and srv.host not in LOOPBACK:
        log.warning("listening on %s without TLS (server.tls_cert / server.tls_key unset): keys and frames travel "
                    "in clear text unless a TLS proxy sits in front", srv.host)
    await queue.start()
    dp = DataPlane(queue, srv)
    app = create_app(dp, srv, gate)
    grpc_server, gport, hs = await start_grpc(dp, srv, interceptors=[GrpcGate(gate)])
    config = uvicorn.Config(app, host=srv.host, port=srv.http_port, log_level=srv.log_level,
                            timeout_graceful_shutdown=int(srv.grace_s), **uvicorn_options(srv))
    http = quiet_server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await set_serving(hs, True)
    scheme = "https" if srv.tls else "http"
    log.warning("worldserve ready: %s://%s:%d grpc %s:%d%s models=%s keys=%d", scheme, srv.host, srv.http_port,
                srv.host, gport, " (tls)" if srv.tls else "", [m.name for m in queue.models()], len(gate.keys))
    http_task = asyncio.create_task(http.serve())
    watch = asyncio.create_task(dp.drainer.watch_slow_consumers(srv.slow_consumer_s))
    await stop.wait()
    watch.cancel()
    # drain: not ready first (readyz 503, gRPC health NOT_SERVING, new work UNAVAILABLE), sessions closed
    # (1012 / UNAVAILABLE), in-flight rollouts get the grace period, the rest end with UNAVAILABLE
    log.warning("draining: %d streams open, grace %.1fs", len(dp.drainer.active), srv.grace_s)
    dp.drainer.draining = True
    await set_serving(hs, False)
    finished, cut = await dp.drainer.drain(srv.grace_s)
    log.warning("drained: %d streams finished, %d ended with UNAVAILABLE", finished, cut)
    http.should_exit = True
    await grpc_server.stop(1.0)
    await http_task
    await queue.close()
