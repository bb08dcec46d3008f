"""An engine in its own process (the shape of vLLM's engine-core process): `serve` with `engine.isolated` runs each
model here, so a model that crashes its process (a kernel fault, an OOM kill) takes down only itself; the front end
(engine/host.ProcessHost) ends that model's requests at once and starts it again.

    python -m worldserve.engine.process FD      # FD: this end of a socketpair made by the front end

1. CONFIG arrives: build the engine as `serve` would (engine/build.py), answer READY with the model's info, or
   FAILED with the error that stopped it (the front end raises it as an in-process build would: a refused
   directory is the operator's 4xx, not "the process ended").
2. The engine runs in a thread; each step's events go back as one EVENTS frame; this process's metrics go back as a
   METRICS frame every ipc.METRICS_EVERY_S (the front end's /metrics merges them).
3. This (main) thread reads MSG frames: requests are submitted (a refusal is answered as the request's final
   event: there is no synchronous reply over the socket), session actions and cancels handed over.
4. STOP or the front end gone (EOF): stop the engine and exit 0; an engine that failed exits EXIT_ENGINE_DEAD.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading

from ..errors import ServiceError
from ..messages import Cancel, ErrorCode, RolloutEvent, RolloutRequest, SessionAction, unpack
from . import ipc

log = logging.getLogger("worldserve.engine")
EXIT_ENGINE_DEAD = 70
EXIT_BUILD_FAILED = 78  # the engine could not be built (a refused directory, a bad configuration): said in FAILED


def serve(sock: socket.socket) -> int:
    from ..settings import EngineSettings, ModelSettings, Settings
    from .build import build_engine

    kind, payload = ipc.recv(sock)
    if kind != ipc.CONFIG:
        raise RuntimeError(f"expected CONFIG first, got frame kind {kind}")
    cfg = json.loads(payload)
    s = cfg["settings"]
    settings = Settings(model=ModelSettings.model_validate(s["model"]),
                        engine=EngineSettings.model_validate(s["engine"]))
    try:
        engine, info = build_engine(settings, cfg.get("weights_sha256"))
    except Exception as e:
        ipc.send(sock, ipc.FAILED, ipc.encode_failure(e))  # the front end raises it (and logs it) as its own
        if not isinstance(e, ServiceError | ValueError | TypeError | OSError):
            raise  # unexpected: the traceback is the report
        return EXIT_BUILD_FAILED
    lock = threading.Lock()  # the engine thread and this thread both send

    def emit(events: list[RolloutEvent]) -> None:
        payload = ipc.encode_events(events, engine.fatal is not None)
        with lock:
            ipc.send(sock, ipc.EVENTS, payload)

    with lock:
        ipc.send(sock, ipc.READY, info.to_json().encode())
    runner = threading.Thread(target=engine.run, args=(emit,), name=f"engine-{info.name}", daemon=True)
    runner.start()
    stopped = threading.Event()
    threading.Thread(target=_metrics_every, args=(sock, lock, stopped), name="metrics", daemon=True).start()
    try:
        while runner.is_alive():
            kind, payload = ipc.recv(sock)
            if kind == ipc.STOP:
                break
            if kind == ipc.METRICS_NOW:  # a scrape: what the engine has done up to now (every step already emitted)
                _send_metrics(sock, lock, ipc.METRICS_FRESH)
                continue
            if kind == ipc.ACTS:  # the actions of one front-end loop pass (a vector env's N): one engine step
                engine.act_many(ipc.decode_msgs(payload))
                continue
            if kind != ipc.MSG:
                continue
            msg = unpack(payload)
            if isinstance(msg, RolloutRequest):
                try:
                    engine.submit(msg)
                except Exception as e:  # noqa: BLE001 - answered as the request's end, never lost
                    code = e.code if isinstance(e, ServiceError) else ErrorCode.INTERNAL
                    emit([RolloutEvent.end(msg.id, code, str(e))])
            elif isinstance(msg, SessionAction):
                engine.act(msg)
            elif isinstance(msg, Cancel):
                engine.cancel(msg.request_id)
    except (ipc.Closed, OSError):
        log.warning("engine process %s: the front end went away; stopping", info.name)
    stopped.set()
    engine.stop()
    runner.join(30)
    return EXIT_ENGINE_DEAD if engine.fatal is not None else 0


def _send_metrics(sock: socket.socket, lock: threading.Lock, kind: int) -> None:
    from prometheus_client import generate_latest

    text = generate_latest()  # outside the lock: the engine thread's events do not wait for it
    with lock:
        ipc.send(sock, kind, text)


def _metrics_every(sock: socket.socket, lock: threading.Lock, stopped: threading.Event) -> None:
    while not stopped.wait(ipc.METRICS_EVERY_S):
        try:
            _send_metrics(sock, lock, ipc.METRICS)
        except OSError:
            return


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s[engine] %(message)s")
    sock = socket.socket(fileno=int(argv[0]))
    code = serve(sock)
    sock.close()
    sys.stdout.flush()
    os._exit(code)  # no interpreter teardown of torch's threads


if __name__ == "__main__":
    main()
