"""Build a served model's engine in this process (imports torch): the embedded `serve`, a Redis worker and an
isolated engine process (engine/process.py) all build it here."""

from __future__ import annotations

import logging

log = logging.getLogger("worldserve.engine")


def build_engine(settings, weights_sha256: str | None = None):
    """settings: worldserve.settings.Settings (model + engine sections) -> (Engine, ModelInfo).
    `weights_sha256`: an operator's pin of the weights (checked on the bytes loaded)."""
    from ..runtime.batch import Sampler
    from ..runtime.host_malloc import tune_malloc
    from ..runtime.loader import prepare
    from .engine import Engine

    if settings.engine.tune_malloc:  # before the model's first allocation: process-wide
        log.info(tune_malloc())
    model = prepare(settings.model, weights_sha256)
    engine = Engine(model, settings.engine, sampler=Sampler(settings.model.triton_kernels))
    if settings.model.warmup:
        warmup(engine)
    return engine, engine.info(settings.model.backend, settings.model.precision)


def warmup(engine) -> None:
    """Run every bucket size once so the first real request does not pay for it."""
    import numpy as np

    from ..messages import RolloutRequest
    from ..runtime.batch import buckets
    from .engine import complete

    s = engine.spec
    ctx = np.zeros((1, s.height, s.width, 3), np.uint8)
    for b in buckets(engine.cfg.max_slots):  # one bucket at a time: each batch shape runs once
        acts = (np.zeros((b, 2, s.action_dim), np.float32) if s.action_dim else np.zeros((b, 2), np.int64))
        complete(engine, [RolloutRequest(id=f"warmup-{b}", model=s.name, context=ctx, actions=acts)])
