"""Engine frame time vs the bare model step, same process, same batch (used by bench/load.py --engine-batch).

For a batch of B rows the engine runs one full step (schedule, model.step, sampling, decode where asked,
events); the bare loop runs `model.step` alone on its own cache of B slots (plus `decode` when the engine
decodes too). The two are timed alternately, step by step, so drift of a shared machine hits both alike.
efficiency = bare / engine (1.0: the engine adds nothing; issue 11 goal >= 0.9 at B = 16).
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from worldserve.engine.engine import Engine
from worldserve.messages import FrameMode, RolloutRequest
from worldserve.model.dynamics import advance
from worldserve.settings import EngineSettings


def from_commit(rev: str, path: str, name: str):
    """`name` as defined in an older commit's service/`path` (for a before/after figure in one run): git show
    REV:service/PATH, its relative imports resolved against today's package (worldserve.model.X for model/...)."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    src = subprocess.run(["git", "show", f"{rev}:service/{path}"], capture_output=True, text=True, cwd=root,
                         check=True).stdout
    package = "worldserve." + ".".join(Path(path).parent.parts)
    src = src.replace("from .", f"from {package}.")
    ns: dict = {"__name__": f"{package}@{rev}"}
    exec(compile(src, f"{rev}:service/{path}", "exec"), ns)  # noqa: S102 - our own file, older commit
    return ns[name]


def legacy_sampler(rev: str):
    """The sampler of an older commit: model/sampling.py's `sample` at REV."""
    return from_commit(rev, "model/sampling.py", "sample")


@torch.no_grad()
def engine_vs_step(model, ctx: np.ndarray, batch: int, steps: int, frames: str = "none", temperature: float = 0.0,
                   sampler=None) -> dict:
    """ctx: uint8 [C, H, W, 3] context of every row. Returns median ms of engine step and bare step."""
    cfg = model.cfg
    emitted = []
    eng = Engine(model, EngineSettings(max_slots=batch, max_queue=4 * batch),
                 **({"sampler": sampler} if sampler is not None else {}))
    rng = np.random.default_rng(0)
    h = steps + 2
    for i in range(batch):
        if cfg.continuous:
            acts = rng.uniform(-1, 1, (1, h, cfg.action_dim)).astype(np.float32)
        else:
            acts = rng.integers(0, cfg.n_actions, (1, h))
        eng.submit(RolloutRequest(f"r{i}", cfg.name, ctx, acts, frames=FrameMode[frames.upper()], seed=i,
                                  temperature=temperature))
    # bare: the same context prefilled into its own cache, model.step (+ decode) only
    cache = model.allocate_cache(batch)
    slots = torch.arange(batch)
    tokens = model.encode(torch.from_numpy(ctx)).unsqueeze(0).expand(batch, -1, -1)
    a0, known = model.unknown_actions(batch, ctx.shape[0] - 1)
    model.prefill(cache, slots, tokens, a0, known)
    emitted.extend(eng.step())  # admission (encode + prefill) and the first step: not measured
    eng_t, bare_t = [], []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        emitted.extend(eng.step())
        t1 = time.perf_counter()
        a = torch.rand(batch, cfg.action_dim) * 2 - 1 if cfg.continuous else torch.randint(0, cfg.n_actions, (batch,))
        t2 = time.perf_counter()
        logits, _, _ = model.step(cache, slots, a)
        if frames != "none":
            model.decode(cache.last_tokens[slots])
        t3 = time.perf_counter()
        advance(cache, slots, logits.argmax(-1))  # keeps the bare cache filling like the engine's (not timed)
        if i > 0:  # the first bare step warms its own path
            eng_t.append(t1 - t0)
            bare_t.append(t3 - t2)
    assert sum(1 for e in emitted if not e.final) == batch * (steps + 2), "engine did not step every row"
    e, b = statistics.median(eng_t), statistics.median(bare_t)
    return {"batch": batch, "frames": frames, "temperature": temperature, "engine_ms": 1e3 * e, "bare_ms": 1e3 * b,
            "efficiency": b / e, "overhead_ms": 1e3 * (e - b), "steps": steps}

