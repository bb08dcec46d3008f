"""Admission policy of the engine (issue 18.7): which waiting requests get free slots, how many candidates each, and
whose running candidates give theirs back. Pure bookkeeping (Job, Chunk, Row below): no torch.

Tenants are API keys (`RolloutRequest.tenant`, "" in open mode), each with a weight (KeyLimits.weight). Every engine
step, before the model step:

1. Fair order. A key's share is max_slots x its weight / the weights of the keys holding or waiting for slots. The
   next waiting request is the first by (its key holds >= its share, priority, slots its key holds / weight,
   arrival): a key within its share always goes before a key over it, whatever the priorities (a key allowed
   `interactive` cannot crowd others out with it); otherwise INTERACTIVE before NORMAL before BULK, then the key
   that holds least for its weight (weighted fair queueing on slots held), then first come.
2. No head-of-line blocking. A request takes as many of its candidates as there are free slots (a chunk) and the
   rest later, so a K=64 request neither waits for 64 free slots nor blocks the K=1 requests of other keys behind it,
   and it cannot starve: it is in line for every slot that frees up.
3. Preemption at the step boundary. A request that finds no free slot may take running candidates back:
   - a key under its share, from keys over theirs (never pushing them below their share, never taking itself above
     its own): a key that came late gets its share within one step instead of a whole horizon later;
   - an INTERACTIVE request, from BULK rollouts of its own key, or of any key when its key is under its share
     (NORMAL work is never preempted for priority: interactive requests go first in line for the next free slot).
   Victims are the running chunks with the fewest steps done (least work lost), newest request first. A candidate
   given back restarts from step 0 later and replays the steps it already sent without sending them again (exact:
   the sampler is counter-based), so preemption costs at most the victims' steps since admission, never a frame.
   Sessions are never preempted (their actions cannot be replayed): they are limited instead (4.).
4. Session headroom. Sessions hold a slot while idle, so together they may hold at most max_slots - headroom slots
   (headroom = max_slots // 16: 4 of 64; none below 16 slots, small dev engines keep every slot for sessions).
   Rollouts and predicts always have those slots, so a queue of sessions never holds a predict: sessions past the
   cap wait (or time out after session_idle_s), predicts go past them.
With one key (open mode) this is the former order, priority then arrival, plus chunks, session headroom and
interactive-over-bulk preemption.

Bookkeeping per request: a Job (one request from submit to its final event: the candidates still
waiting for slots, its running chunks), a Chunk (a contiguous range of its candidates admitted together: their slots
and their step) and one Row of a step (one slot's work). Plain data; the engine (engine.py) owns every transition and
the policy above decides who gets slots.

A request's K candidates need not run together: they are admitted in chunks as slots free up (a K=64 request never
waits for 64 free slots, nor blocks the smaller requests behind it), and a running chunk may give candidates back
(preemption, 3. above). A candidate given back runs again from step 0 later; its steps below `skip` were already
sent and are replayed silently. The counter-based sampler makes the replay exact: a candidate's frames depend only
on (seed + k, step), never on when or next to whom it ran.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..messages import RolloutRequest
from ..wire import Priority


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
    crn: object = None  # common random numbers: int64 [K, T] stream keys (engine/prefix.crn_keys), made once
    context_key: bytes | None = None  # engine/context_cache.context_key of its request, made once
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
    passes_done: int = 0  # within-frame decoding (engine/frames.py): passes of the frame in progress; 0 = none
    # prefix sharing (engine/prefix.py): owner index -> its group's indices (owner included), candidates whose
    # actions so far are equal and whose one row is the owner's slot; None: every candidate is its own row
    share: dict[int, list[int]] | None = None

    @property
    def req(self) -> RolloutRequest:
        return self.job.req

    def live(self) -> int:
        return sum(s >= 0 for s in self.slots)


@dataclass(slots=True)
class Row:
    """One slot's work in this step."""

    chunk: Chunk
    candidate: int
    slot: int
    action: object  # discrete int | continuous float32 [A]; None: a frame in progress takes its next pass
    fresh: bool = True  # starts a frame (its action goes to the model) rather than continuing one
    members: list[int] | None = None  # prefix sharing: the other chunk indices whose outputs this row also is


def headroom(max_slots: int) -> int:
    """Slots sessions never take: max_slots / 16 (4 of 64; none below 16 slots, where every slot may be a session)."""
    return max_slots // 16


@dataclass
class Plan:
    preempt: dict[Chunk, int] = field(default_factory=dict)  # chunk -> how many of its live candidates give back
    grant: list[tuple[Job, int]] = field(default_factory=list)  # job -> how many more of its candidates start


class Scheduler:
    def __init__(self, max_slots: int):
        self.max_slots = max_slots
        self.session_cap = max_slots - headroom(max_slots)
        self._idle: tuple | None = None  # the state of the last plan that did nothing

    def plan(self, jobs: Iterable[Job], free: int) -> Plan:
        jobs = list(jobs)
        state = (free, len(jobs), max((j.seq for j in jobs), default=-1))
        if state == self._idle:  # no slot freed, no request came or went since: nothing to do again (cheap steps)
            return Plan()
        plan = self._plan(jobs, free)
        self._idle = None if plan.grant or plan.preempt else state
        return plan

    def _plan(self, jobs: list[Job], free: int) -> Plan:
        held: dict[str, int] = {}
        weight: dict[str, float] = {}
        queues: dict[str, list[Job]] = {}
        running: list[Chunk] = []
        sessions = 0
        for j in jobs:
            t = j.tenant
            weight[t] = max(weight.get(t, 0.0), float(j.req.weight) if j.req.weight > 0 else 1.0)
            held[t] = held.get(t, 0) + j.held()
            if j.req.session:
                sessions += bool(j.chunks)
            else:
                running.extend(c for c in j.chunks if c.live())
            if j.pending:
                queues.setdefault(t, []).append(j)
        plan = Plan()
        if not queues:
            return plan
        for q in queues.values():  # each key's own queue in order, its next request last (pop())
            q.sort(key=lambda j: (int(j.req.priority), j.seq), reverse=True)
        active = [t for t in weight if held[t] or t in queues]
        total = sum(weight[t] for t in active)
        share = {t: self.max_slots * weight[t] / total for t in active}
        granted: dict[int, int] = {}
        running.sort(key=lambda c: (c.step, -c.job.seq))  # least work lost first, newest request first
        while True:
            best = None
            for t, q in queues.items():
                while q and (granted.get(id(q[-1]), 0) >= self._need(q[-1])
                             or q[-1].req.session and sessions >= self.session_cap):
                    q.pop()  # served, or a session past the headroom: rollouts and predicts go past it
                if q:
                    k = (held[t] >= share[t], int(q[-1].req.priority), held[t] / weight[t], q[-1].seq)
                    if best is None or k < best[0]:
                        best = (k, t, q[-1])
            if best is None:
                return plan
            _, t, j = best
            n = self._need(j) - granted.get(id(j), 0)
            if free == 0:
                free += self._preempt(j, n, running, held, share, plan)
                if free == 0:  # nothing it may take: the next in line may (another key, a higher priority)
                    queues[t].pop()
                    continue
            g = min(n, free)
            if held[t] < share[t]:  # up to its share: what is left goes round again (to it if nobody else wants it)
                g = min(g, max(1, round(share[t] - held[t])))
            plan.grant.append((j, g))
            granted[id(j)] = granted.get(id(j), 0) + g
            free -= g
            held[t] += g
            sessions += bool(j.req.session)

    @staticmethod
    def _need(j: Job) -> int:
        return 1 if j.req.session else j.need()

    def _preempt(self, j: Job, n: int, running: list[Chunk], held: dict[str, int], share: dict[str, float],
                 plan: Plan) -> int:
        """Take up to n running candidates back for job j under the rules of 3.; -> how many."""
        t = j.tenant
        under = held[t] + 1 <= share[t]
        room = math.floor(share[t] - held[t]) if under else 0  # what the fair rule may still give t
        interactive = j.req.priority == Priority.INTERACTIVE
        got = 0
        for c in running:
            if got >= n:
                break
            v = c.job.tenant
            left = c.live() - plan.preempt.get(c, 0)
            if c.job is j or left <= 0:
                continue
            fair = min(room, math.floor(held[v] - share[v])) if under and v != t else 0
            prio = n if interactive and c.req.priority == Priority.BULK and (v == t or under) else 0
            k = min(n - got, left, max(fair, prio))
            if k <= 0:
                continue
            plan.preempt[c] = plan.preempt.get(c, 0) + k
            held[v] -= k
            got += k
            if not prio:
                room -= k
        return got
