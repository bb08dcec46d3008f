"""The engine's bookkeeping per request: a Job (one request from submit to its final event: the candidates still
waiting for slots, its running chunks), a Chunk (a contiguous range of its candidates admitted together: their slots
and their step) and one Row of a step (one slot's work). Plain data; the engine (engine.py) owns every transition and
the scheduler (scheduler.py) decides who gets slots.

A request's K candidates need not run together: they are admitted in chunks as slots free up (a K=64 request never
waits for 64 free slots, nor blocks the smaller requests behind it), and a running chunk may give candidates back
(preemption, scheduler.py). A candidate given back runs again from step 0 later; its steps below `skip` were already
sent and are replayed silently. The counter-based sampler makes the replay exact: a candidate's frames depend only
on (seed + k, step), never on when or next to whom it ran.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..messages import RolloutRequest


@dataclass(eq=False)
class Job:
    req: RolloutRequest
    seq: int  # arrival order
    submitted: float  # monotonic
    pending: list[list[int]] = field(default_factory=list)  # [k0, k1, skip]: candidates waiting for slots
    chunks: list[Chunk] = field(default_factory=list)  # running
    started: bool = False  # a chunk was admitted once (no longer counts as queued)
    first_event: bool = False
    stopped: dict[int, int] = field(default_factory=dict)  # stop_on_done: candidate -> the step it ended at
    actions: deque = field(default_factory=deque)  # sessions: actions not yet stepped (also before admission)
    last_seen: float = 0.0
    closing: bool = False

    def __post_init__(self):
        if not self.pending:
            self.pending = [[0, self.req.candidates, 0]]

    @property
    def tenant(self) -> str:
        return self.req.tenant

    def need(self) -> int:
        """Candidates waiting for a slot."""
        return sum(k1 - k0 for k0, k1, _ in self.pending)

    def held(self) -> int:
        return sum(c.live() for c in self.chunks)

    def take(self, n: int) -> list[tuple[int, int, int]]:
        """The next n waiting candidates as (k0, k1, skip) ranges, in order; they start now."""
        out = []
        while n > 0 and self.pending:
            k0, k1, skip = self.pending[0]
            k = min(n, k1 - k0)
            out.append((k0, k0 + k, skip))
            n -= k
            if k == k1 - k0:
                self.pending.pop(0)
            else:
                self.pending[0][0] = k0 + k
        self.started = True
        return out

    def requeue(self, k: int, skip: int) -> None:
        """Candidate k was given back at step `skip`: it waits again (neighbours that replay alike merge)."""
        merged: list[list[int]] = []
        for r in sorted([*self.pending, [k, k + 1, skip]]):
            if merged and merged[-1][1] == r[0] and merged[-1][2] == r[2]:
                merged[-1][1] = r[1]
            else:
                merged.append(r)
        self.pending = merged

    def progress(self) -> int:
        return max((max(c.step, c.skip) for c in self.chunks), default=0)


@dataclass(eq=False)
class Chunk:
    job: Job
    k0: int  # its first candidate: slot i runs candidate k0 + i
    slots: list[int]  # -1: that candidate stopped at done or was given back
    skip: int = 0  # steps below this were sent before a preemption: replayed without events
    step: int = 0

    @property
    def req(self) -> RolloutRequest:
        return self.job.req

    def live(self) -> int:
        return sum(s >= 0 for s in self.slots)


@dataclass
class Row:
    """One slot's work in this step."""

    chunk: Chunk
    candidate: int
    slot: int
    action: object  # discrete int | continuous float32 [A]
