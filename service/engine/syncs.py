"""What an engine step waits for on CUDA: synchronisations counted per step (bench/gpu_check reports them).

    syncs_per_step(engine, steps=20) -> SyncCount   steps the engine `steps` times (work must be running: admit first,
                                                    admission is not a step's steady state) and counts
    count_syncs()                                   the same around any code: `with count_syncs() as c: ...; c.total`

Counted: every synchronising call torch reports under `torch.cuda.set_sync_debug_mode("warn")` (a blocking or
pageable copy, .item(), .cpu(), .tolist(), nonzero, a stream synchronize: `flagged`) plus the step's one wait for
its packed device -> host copy (an event wait, runtime/batch.to_host: `waits`). The goal is 1 per step: that copy,
nothing flagged (`strict=True` runs the steps under set_sync_debug_mode("error"), so the first flagged call raises
with its stack). On the CPU there is nothing to count: every figure is 0.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch

from ..runtime import batch


@dataclass
class SyncCount:
    steps: int = 0
    flagged: int = 0  # synchronising calls torch warned about
    waits: int = 0  # event waits of the step's one device -> host copy
    cuda: bool = False

    @property
    def total(self) -> int:
        return self.flagged + self.waits

    @property
    def per_step(self) -> float:
        return self.total / self.steps if self.steps else 0.0


@contextlib.contextmanager
def count_syncs(strict: bool = False):
    """Count the CUDA synchronisations of the code inside (see the module doc); strict: raise on a flagged one."""
    c = SyncCount(cuda=torch.cuda.is_available())
    if not c.cuda:
        yield c
        return
    prev, before = torch.cuda.get_sync_debug_mode(), batch.SYNCS[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("error" if strict else "warn")
        try:
            yield c
        finally:
            torch.cuda.set_sync_debug_mode(prev)
            c.flagged = sum("synchroniz" in str(w.message) for w in caught)
            c.waits = batch.SYNCS[0] - before


def syncs_per_step(engine, steps: int = 20, strict: bool = False) -> SyncCount:
    """Step `engine` `steps` times and count its synchronisations (engine: worldserve.engine.engine.Engine with work
    admitted and running). -> SyncCount (.per_step, .flagged, .waits)."""
    with count_syncs(strict) as c:
        for _ in range(steps):
            engine.step()
    c.steps = steps
    return c
