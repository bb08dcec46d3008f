"""Rollout engine: step-level continuous batching over static per-slot model state (a KV cache, a frame history).

One `step()` = schedule -> execute -> update:
  1. take in new requests, session actions and cancels
  2. retire cancelled / expired requests (their slots free up this step)
  3. admit waiting requests into free slots, fairly between API keys (scheduler.py: weighted fair order, chunks of
     candidates, preemption at the step boundary, session headroom): encode + prefill batched, fork the candidates
     (candidates with equal action prefixes step as one row, forked where they diverge: engine/prefix.py)
  4. execute (engine/execute.py): the rows' inputs in ONE host->device copy (engine/inputs.py), one dynamics step
     for every slot that has an action (bucketed batch) or one within-frame pass (engine/frames.py), sample, the
     frames' confidence, decode where asked, then ONE device->host copy of everything the step produced: no other
     host read in between (on CUDA one wait a step; engine/syncs.py counts them)
  5. update: the step's events, handed over in one batch; stops at done; free finished requests
The engine knows no transport: requests in, each step's `list[RolloutEvent]` out (`step()` returns it;
`run(emit)` hands it to `emit`; engine/host.py runs that loop in a thread for the queue and the worker).
Thread-safe entry points: `submit`, `act`, `cancel`.

Failures: an exception while admitting or stepping ends the requests it touched with INTERNAL and the engine
goes on (their slots are freed; a later prefill overwrites whatever the failed step left in them). After
`max_consecutive_failures` failing steps in a row, or an error outside the model, the engine is fatal: every
active and waiting request ends with INTERNAL, `fatal` holds the exception and `run()` returns.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import fields

import numpy as np

from .. import metrics
from ..errors import InvalidArgument, QueueFull, Unavailable
from ..messages import ErrorCode, ModelInfo, RolloutEvent, RolloutRequest, SessionAction
from ..model.protocol import ModelSpec, WorldModelProtocol, check_model
from ..runtime.batch import Sampler
from ..settings import EngineSettings
from . import prefix
from .context_cache import ContextCache
from .execute import Executor, StepOutputs
from .prefill import prefill
from .scheduler import Chunk, Job, Row, Scheduler

log = logging.getLogger("worldserve.engine")


class Engine:
    def __init__(self, model: WorldModelProtocol, cfg: EngineSettings, sampler: Sampler | None = None):
        check_model(model)
        self.model, self.cfg = model, cfg
        self.spec = model.spec
        self.sampler = sampler or Sampler()
        self.pad_slot = cfg.max_slots  # never allocated: padding rows of a bucket write here
        if hasattr(model, "max_step_rows"):  # a backend that builds per batch size (TensorRT): steps carry <= this
            model.max_step_rows = cfg.max_slots
        # opaque to the engine: max_slots for requests, the padding slot, then the context cache's (never stepped)
        self.state = model.allocate_state(cfg.max_slots + 1 + cfg.context_cache_slots)
        cached = range(cfg.max_slots + 1, cfg.max_slots + 1 + cfg.context_cache_slots)
        self.contexts = ContextCache(list(cached), self.spec.name)  # 3b: prefilled contexts across requests
        self.exec = Executor(model, self.state, cfg, self.sampler, self.pad_slot)  # 4: the device's work
        self.frames = self.exec.frames  # within-frame decoding's per-slot state (None: one step makes a frame)
        self.free: list[int] = list(range(cfg.max_slots))
        self.jobs: dict[str, Job] = {}  # every request taken in and not yet ended: waiting, running or both
        self.running: list[Chunk] = []  # admitted candidates, in admission order
        self.sched = Scheduler(cfg.max_slots)
        self._seq = itertools.count()
        self._inbox: deque = deque()
        self._out: list[RolloutEvent] = []  # this step's events, handed over together at its end
        self._busy = False  # the last step did work (or work is waiting)
        self._failures = 0  # failing steps in a row
        self.fatal: BaseException | None = None
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.device = model.device
        self.share_prefixes = cfg.share_prefixes  # engine/prefix.py: equal action prefixes of a chunk run as one row
        self.rows_stepped = 0  # model rows computed (within-frame decoding: one per pass), for tests and bench/

    # ---- thread-safe entry points -----------------------------------------------------------
    def info(self, backend: str = "eager", precision: str = "fp32") -> ModelInfo:
        spec = {f.name: getattr(self.spec, f.name) for f in fields(ModelSpec)}
        return ModelInfo(**spec, max_candidates=min(self.cfg.max_candidates, self.cfg.max_slots), backend=backend,
                         precision=precision)

    def submit(self, req: RolloutRequest) -> None:
        with self._lock:
            if self.fatal is not None:
                raise Unavailable(f"engine failed ({type(self.fatal).__name__}: {self.fatal}); not taking work")
            if req.id in self.jobs or any(k == "submit" and obj.id == req.id for k, obj, _ in self._inbox):
                raise InvalidArgument(f"request id {req.id!r} is already in this engine", "id")
            if self.queued() + len(self._inbox) >= self.cfg.max_queue:
                metrics.REQUESTS.labels(self.spec.name, "rejected").inc()
                raise QueueFull(f"queue full ({self.cfg.max_queue} requests waiting); retry later")
            self._inbox.append(("submit", req, time.monotonic()))
        self._wake.set()

    def act(self, a: SessionAction) -> None:
        self.act_many([a])

    def act_many(self, actions: list[SessionAction]) -> None:
        """Actions handed over together are taken in the same step (the inbox is only touched under the lock)."""
        with self._lock:
            self._inbox.extend(("act", a, 0.0) for a in actions)
        self._wake.set()

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._inbox.append(("cancel", request_id, 0.0))
        self._wake.set()

    def free_slots(self) -> int:
        return len(self.free)

    def queued(self) -> int:
        """Requests none of whose candidates has started yet."""
        return sum(not j.started for j in list(self.jobs.values()))

    def room(self) -> int:
        """Slots left once every request not yet admitted has its slots (a Redis worker reads while > 0)."""
        with self._lock:
            inbox = [obj for k, obj, _ in self._inbox if k == "submit"]
        return len(self.free) - sum(j.need() for j in list(self.jobs.values())) - sum(r.candidates for r in inbox)

    def alive(self) -> bool:
        return self.fatal is None

    def run(self, emit: Callable[[list[RolloutEvent]], None]) -> None:
        """Step until stop(), handing each step's events to `emit`; a fatal error ends every request first."""
        try:
            while not self._stop.is_set():
                events = self.step()
                if events:
                    emit(events)
                if not self._busy:
                    self._wake.wait(0.01)
                    self._wake.clear()
        except BaseException as e:  # noqa: BLE001 - whatever it is, every request gets its status
            self._die(e)
            try:
                emit(self._take())
            except Exception:  # the consumer of events failed too: nothing more can be told
                log.exception("could not hand over the final events")

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    # ---- the step ------------------------------------------------------------------------------
    def step(self) -> list[RolloutEvent]:
        """One iteration, schedule -> execute -> update; returns its events (on an exception they stay for `_die`)."""
        t0 = time.perf_counter()
        self._drain_inbox()  # 1. requests, session actions, cancels in
        self._retire(time.time())  # 2. cancelled / expired requests out: their slots free for this very step
        self._admit()  # 3. waiting requests into free slots: encode + prefill batched, fork the candidates
        rows = self._schedule()  # the step's rows: one per slot with work
        if rows:
            self._guarded(rows)  # 4. execute (engine/execute.py) + 5. update (events, stops, counters, finished)
            metrics.STEP_SECONDS.labels(self.spec.name).observe(time.perf_counter() - t0)
        metrics.QUEUE_DEPTH.labels(self.spec.name).set(self.queued())
        metrics.ACTIVE_SLOTS.labels(self.spec.name).set(self.cfg.max_slots - len(self.free))
        self._busy = bool(rows) or bool(self._inbox)
        return self._take()

    def _take(self) -> list[RolloutEvent]:
        out, self._out = self._out, []
        return out

    def _drain_inbox(self) -> None:
        with self._lock:  # taken whole under the lock: submit's duplicate scan never sees it change
            items, self._inbox = self._inbox, deque()
        for kind, obj, t in items:
            if kind == "submit":
                self.jobs[obj.id] = Job(obj, next(self._seq), t, last_seen=t)
            elif kind == "act":
                j = self.jobs.get(obj.request_id)
                if j is None:
                    continue
                j.last_seen = time.monotonic()  # before admission the actions wait in the job
                if obj.close:
                    j.closing = True
                else:
                    j.actions.append(obj.action)
            elif kind == "cancel" and obj in self.jobs:
                self._finish(self.jobs[obj], ErrorCode.CANCELLED, "cancelled by the client")

    def _retire(self, now: float) -> None:
        mono, idle = time.monotonic(), self.cfg.session_idle_s
        for j in list(self.jobs.values()):
            r = j.req
            if r.deadline is not None and now > r.deadline:
                self._finish(j, ErrorCode.DEADLINE_EXCEEDED, "deadline exceeded while queued" if not j.started else
                             f"deadline exceeded after {j.progress()} of {r.horizon if not r.session else '∞'} steps")
            elif r.session and j.closing and not j.actions:
                self._finish(j, ErrorCode.OK, "")
            elif r.session and j.chunks and mono - j.last_seen > idle:
                self._finish(j, ErrorCode.DEADLINE_EXCEEDED, "session idle timeout")
            elif r.session and not j.chunks and mono - j.submitted > idle:  # its player has long given up
                self._finish(j, ErrorCode.DEADLINE_EXCEEDED, "session idle timeout while waiting for a slot")

    def _admit(self) -> None:
        if not any(j.pending for j in self.jobs.values()):
            return
        plan = self.sched.plan(self.jobs.values(), len(self.free))
        for c, n in plan.preempt.items():
            self._preempt(c, n)
        admitted: list[Chunk] = []
        for j, n in plan.grant:
            for k0, k1, skip in j.take(n):  # from its pending ranges in order (a preempted one replays)
                c = Chunk(j, k0, [self.free.pop() for _ in range(k1 - k0)], skip)
                prefix.start(c, self.share_prefixes, self.exec.latent_out)
                j.chunks.append(c)
                admitted.append(c)
        if not admitted:
            return
        try:
            self._prefill(admitted)
        except Exception as e:  # encode / prefill failed: these requests end, the engine goes on
            self._failed(list({id(c.job): c.job for c in admitted}.values()), e, "admission")
            return
        self.running.extend(admitted)

    def _preempt(self, c: Chunk, n: int) -> None:
        """Give back c's last n live candidates: they wait again and replay the steps they already sent."""
        victims = [i for i, s in enumerate(c.slots) if s >= 0][-n:]
        prefix.give_back(c, victims)  # a group's owner among them hands its slot (the state) to a member first
        for i in victims:
            self.free.append(c.slots[i])
            c.slots[i] = -1
            c.job.requeue(c.k0 + i, max(c.skip, c.step))
        if not c.live():
            self._drop_chunk(c)
        log.debug("preempted %d candidates of %s at step %d", n, c.req.id, c.step)

    def _drop_chunk(self, c: Chunk) -> None:
        self.free.extend(s for s in c.slots if s >= 0)
        c.slots = []
        c.job.chunks = [x for x in c.job.chunks if x is not c]
        self.running = [x for x in self.running if x is not c]

    def _prefill(self, admitted: list[Chunk]) -> None:
        prefill(self.model, self.state, admitted, self.device, self.exec.chunk, self.contexts)  # 3b (engine/prefill.py)

    def _schedule(self) -> list[Row]:
        rows = []
        for c in self.running:
            if c.share is not None:  # equal action prefixes: one row a group, forked where they diverge
                rows.extend(prefix.rows(c, self.model, self.state))
            elif c.passes_done:  # a frame in progress: its next pass, no new action
                rows.extend(Row(c, c.k0 + i, s, None, fresh=False) for i, s in enumerate(c.slots) if s >= 0)
            elif c.req.session:
                if c.job.actions:
                    rows.append(Row(c, 0, c.slots[0], c.job.actions.popleft()))
            else:  # the chunk's actions at this step in one slice: int per row | float32 [A] per row
                acts = c.req.actions[c.k0 : c.k0 + len(c.slots), c.step]
                acts = acts.tolist() if acts.ndim == 1 else list(acts)
                rows.extend([Row(c, c.k0 + i, s, acts[i]) for i, s in enumerate(c.slots) if s >= 0])
        self.rows_stepped += len(rows)
        return rows

    def _guarded(self, rows: list[Row]) -> None:
        """Execute; on failure isolate the request(s) at fault when the cache was not yet advanced."""
        self.exec.advanced = False
        try:
            self._run(rows)
            self._failures = 0
            return
        except Exception as e:
            owners = list({id(r.chunk.job): r.chunk.job for r in rows}.values())
            if self.exec.advanced or len(owners) == 1:
                self._failed(owners, e, "step")
                return
            log.warning("engine step of %d requests failed (%s: %s); retrying each alone", len(owners),
                        type(e).__name__, e)
        served, last = False, None
        for a in owners:  # one request per step: the others are served, the one at fault ends
            mine = [r for r in rows if r.chunk.job is a]
            self.exec.advanced = False
            try:
                self._run(mine)
                served = True
            except Exception as e:
                self._failed([a], e, "step", count=False)
                last = e
        if served:  # the budget counts failing steps, not failing requests of one retried step
            self._failures = 0
        elif last is not None:
            self._count_failure(last)

    def _failed(self, jobs: list[Job], e: Exception, where: str, count: bool = True) -> None:
        log.error("engine %s failed for %s: %s: %s", where, [j.req.id for j in jobs], type(e).__name__, e,
                  exc_info=e)
        for j in jobs:  # every slot of theirs back, admitted this step or not
            self._finish(j, ErrorCode.INTERNAL, f"engine {where} failed: {type(e).__name__}: {e}")
        if count:
            self._count_failure(e)

    def _count_failure(self, e: Exception) -> None:
        self._failures += 1
        if self._failures >= self.cfg.max_consecutive_failures:
            raise EngineFailed(f"{self._failures} engine steps failed in a row; last: {type(e).__name__}: {e}") from e

    def _run(self, rows: list[Row]) -> None:
        out = self.exec.run(rows)  # 4. None: no frame completed this iteration (within-frame decoding)
        if out is not None:
            self._update(out)  # 5

    def _update(self, out: StepOutputs) -> None:
        """5. The step's events (handed over together at its end), stops at done, step counters, finished requests."""
        rows, host, ends, frame_of = out.rows, out.host, out.ends, out.frame_of
        reward, done = host.reward.tolist(), host.done.tolist()  # Python floats, once
        conf = [None] * len(rows) if host.confidence is None else host.confidence.tolist()
        now = time.monotonic()
        first, shared = len(self._out), False
        for i, r in enumerate(rows):
            c = r.chunk
            if c.step < c.skip:  # replayed after a preemption: this step was sent already
                continue
            j = c.job
            req = j.req
            if not j.first_event:
                j.first_event = True
                metrics.TTFF.labels(self.spec.name).observe(now - j.submitted)
            frame = host.frames[frame_of[i]] if i in frame_of else None
            tok = req.return_tokens and host.tokens is not None
            for k in (r.candidate,) if r.members is None else (r.candidate, *[c.k0 + m for m in r.members]):
                self._out.append(RolloutEvent(req.id, k, c.step, reward[i], done[i], frame=frame, confidence=conf[i],
                                              tokens=host.tokens[i].astype(np.int64) if tok else None,
                                              ended=i in ends))
            shared = shared or r.members is not None
        if shared:  # a shared row's events go out in candidate order, like unshared rows'
            pos = {e.request_id: n for n, e in reversed(list(enumerate(self._out[first:])))}
            self._out[first:] = sorted(self._out[first:], key=lambda e: (pos[e.request_id], e.candidate))
        metrics.FRAMES.labels(self.spec.name).inc(len(self._out) - first)
        for i in ends:  # a candidate whose world ended (a shared row: its whole group): no more steps, slots freed now
            r = rows[i]
            c, o = r.chunk, r.candidate - r.chunk.k0
            for m in (o, *(r.members or ())):
                c.job.stopped[c.k0 + m] = c.step
                self.free.append(c.slots[m])
                c.slots[m] = -1
            prefix.drop(c, o)
        for c in {id(r.chunk): r.chunk for r in rows}.values():
            j = c.job
            c.step += 1
            j.last_seen = now  # a session is idle only when no action is being processed
            if not j.req.session and (c.step >= j.req.horizon or not c.live()):
                self._drop_chunk(c)
                if not j.chunks and not j.pending:
                    said = ", ".join(f"candidate {k} at step {s}" for k, s in sorted(j.stopped.items()))
                    self._finish(j, ErrorCode.OK, f"stopped at done: {said}" if said else "")

    def _end(self, request_id: str, code: ErrorCode, message: str) -> None:
        metrics.REQUESTS.labels(self.spec.name, code.name.lower()).inc()
        self._out.append(RolloutEvent.end(request_id, code, message))

    def _finish(self, j: Job, code: ErrorCode, message: str) -> None:
        if self.jobs.pop(j.req.id, None) is None:
            return  # ended already
        for c in list(j.chunks):
            self._drop_chunk(c)
        j.pending = []
        self._end(j.req.id, code, message)

    def _die(self, e: BaseException) -> None:
        """Fatal: end every request this engine holds or was given, then stop taking work."""
        with self._lock:
            self.fatal = e
            log.critical("engine failed and stops: %s: %s", type(e).__name__, e, exc_info=e)
            msg = f"engine failed: {type(e).__name__}: {e}"
            for j in list(self.jobs.values()):
                self._finish(j, ErrorCode.INTERNAL, msg)
            for kind, obj, _ in self._inbox:
                if kind == "submit":
                    self._end(obj.id, ErrorCode.INTERNAL, msg)
            self._inbox.clear()


class EngineFailed(RuntimeError):
    """Too many failing steps in a row: the engine cannot go on."""


def complete(engine: Engine, requests: list[RolloutRequest]) -> list[RolloutEvent]:
    """Offline use (warm-up, benchmarks, tools): submit, step this engine in the calling thread until every request
    has its final event; returns the events in order."""
    events: list[RolloutEvent] = []
    for r in requests:
        engine.submit(r)
    todo = {r.id for r in requests}
    while todo:
        evs = engine.step()
        events.extend(evs)
        todo -= {e.request_id for e in evs if e.final}
    return events
