"""Rollout engine: step-level continuous batching over a static per-slot KV cache.

One `step()` = schedule -> execute -> update:
  1. take in new requests, session actions and cancels
  2. retire cancelled / expired requests (their slots free up this step)
  3. admit waiting requests into free slots: encode + prefill batched, fork K candidates
  4. one dynamics step for every slot that has an action (bucketed batch), sample, decode where asked
  5. emit events, free finished requests
The engine knows no transport: requests in, `emit(RolloutEvent)` out. Thread-safe entry points:
`submit`, `act`, `cancel`; the loop runs in one thread (`run`).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import metrics
from ..errors import QueueFull
from ..messages import ErrorCode, FrameMode, ModelInfo, RolloutEvent, RolloutRequest, SessionAction
from ..model.dynamics import advance
from ..model.world_model import WorldModel
from .batch import bucket, pad_to, run_fixed_chunks
from .sampler import Sampler

log = logging.getLogger("worldserve.engine")


@dataclass(frozen=True)
class EngineConfig:
    max_slots: int = 64
    max_queue: int = 256  # waiting requests; beyond this, submit raises QueueFull
    max_candidates: int = 64
    session_idle_s: float = 300.0


@dataclass
class Active:
    req: RolloutRequest
    slots: list[int]
    step: int = 0
    submitted: float = 0.0
    first_event: bool = False
    actions: deque = field(default_factory=deque)  # sessions: actions not yet stepped
    last_seen: float = 0.0
    closing: bool = False


class Engine:
    def __init__(self, model: WorldModel, cfg: EngineConfig, emit: Callable[[RolloutEvent], None],
                 sampler: Sampler | None = None):
        self.model, self.cfg, self.emit = model, cfg, emit
        self.spec = model.spec
        self.sampler = sampler or Sampler()
        self.pad_slot = cfg.max_slots  # never allocated: padding rows of a bucket write here
        self.cache = model.allocate_cache(cfg.max_slots + 1)
        self.free: list[int] = list(range(cfg.max_slots))
        self.active: dict[str, Active] = {}
        self.waiting: list[tuple[int, int, RolloutRequest, float]] = []  # heap (priority, seq, req, t)
        self._seq = itertools.count()
        self._inbox: deque = deque()
        self._early: dict[str, list[SessionAction]] = {}  # actions that arrived before their session's admission
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.device = next(model.parameters()).device

    # ---- thread-safe entry points -----------------------------------------------------------
    def info(self, backend: str = "eager", precision: str = "fp32") -> ModelInfo:
        s = self.spec
        return ModelInfo(s.name, s.height, s.width, s.tokens_per_frame, s.vocab_size, s.n_actions, s.action_dim,
                         list(s.action_names), s.context_window, s.max_horizon,
                         min(self.cfg.max_candidates, self.cfg.max_slots), backend, precision)

    def submit(self, req: RolloutRequest) -> None:
        with self._lock:
            if len(self.waiting) + len(self._inbox) >= self.cfg.max_queue:
                metrics.REQUESTS.labels("rejected").inc()
                raise QueueFull(f"queue full ({self.cfg.max_queue} requests waiting); retry later")
            self._inbox.append(("submit", req, time.monotonic()))
        self._wake.set()

    def act(self, a: SessionAction) -> None:
        self._inbox.append(("act", a, 0.0))
        self._wake.set()

    def cancel(self, request_id: str) -> None:
        self._inbox.append(("cancel", request_id, 0.0))
        self._wake.set()

    def free_slots(self) -> int:
        return len(self.free)

    def room(self) -> int:
        """Slots left once every request not yet admitted has its slots (a Redis worker reads while > 0)."""
        pending = [w[2] for w in list(self.waiting)] + [obj for k, obj, _ in list(self._inbox) if k == "submit"]
        return len(self.free) - sum(r.candidates for r in pending)

    def run(self) -> None:
        while not self._stop.is_set():
            if not self.step():
                self._wake.wait(0.01)
                self._wake.clear()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    # ---- the step ------------------------------------------------------------------------------
    def step(self) -> bool:
        t0 = time.perf_counter()
        self._drain_inbox()  # 1
        self._retire(time.time())  # 2
        self._admit()  # 3
        rows = self._schedule()
        if rows:
            self._execute(rows)  # 4 + 5
            metrics.STEP_SECONDS.observe(time.perf_counter() - t0)
        metrics.QUEUE_DEPTH.set(len(self.waiting))
        metrics.ACTIVE_SLOTS.set(self.cfg.max_slots - len(self.free))
        return bool(rows) or bool(self._inbox)

    def _drain_inbox(self) -> None:
        while self._inbox:
            kind, obj, t = self._inbox.popleft()
            if kind == "submit":
                heapq.heappush(self.waiting, (int(obj.priority), next(self._seq), obj, t))
            elif kind == "act":
                a = self.active.get(obj.request_id)
                if a is None:  # session not admitted yet: keep its actions for admission
                    if any(w[2].id == obj.request_id for w in self.waiting):
                        self._early.setdefault(obj.request_id, []).append(obj)
                    continue
                a.last_seen = time.monotonic()
                if obj.close:
                    a.closing = True
                else:
                    a.actions.append(obj.action)
            elif kind == "cancel":
                if obj in self.active:
                    self._finish(self.active[obj], ErrorCode.CANCELLED, "cancelled by the client")
                elif any(w[2].id == obj for w in self.waiting):
                    self.waiting = [w for w in self.waiting if w[2].id != obj]
                    heapq.heapify(self.waiting)
                    self.emit(RolloutEvent.end(obj, ErrorCode.CANCELLED, "cancelled by the client"))

    def _retire(self, now: float) -> None:
        mono = time.monotonic()
        for a in list(self.active.values()):
            r = a.req
            if r.deadline is not None and now > r.deadline:
                self._finish(a, ErrorCode.DEADLINE_EXCEEDED,
                             f"deadline exceeded after {a.step} of {r.horizon if not r.session else '∞'} steps")
            elif r.session and (a.closing and not a.actions or mono - a.last_seen > self.cfg.session_idle_s):
                self._finish(a, ErrorCode.OK if a.closing else ErrorCode.DEADLINE_EXCEEDED,
                             "" if a.closing else "session idle timeout")
        expired = [w for w in self.waiting if w[2].deadline is not None and now > w[2].deadline]
        for w in expired:
            self.emit(RolloutEvent.end(w[2].id, ErrorCode.DEADLINE_EXCEEDED, "deadline exceeded while queued"))
            metrics.REQUESTS.labels("deadline").inc()
        if expired:
            self.waiting = [w for w in self.waiting if w not in expired]
            heapq.heapify(self.waiting)

    def _admit(self) -> None:
        admitted: list[Active] = []
        while self.waiting and len(self.free) >= self.waiting[0][2].candidates:
            _, _, req, t = heapq.heappop(self.waiting)
            slots = [self.free.pop() for _ in range(req.candidates)]
            a = Active(req, slots, submitted=t, last_seen=time.monotonic())
            for early in self._early.pop(req.id, []):
                if early.close:
                    a.closing = True
                else:
                    a.actions.append(early.action)
            admitted.append(a)
        if not admitted:
            return
        # encode every context frame of every admitted request in one batch
        ctx = torch.from_numpy(np.concatenate([a.req.context for a in admitted])).to(self.device)
        tokens = run_fixed_chunks(self.model.encode, ctx)  # int64 [sum(C), N], batch-invariant
        groups: dict[int, list[tuple[Active, torch.Tensor]]] = {}
        off = 0
        for a in admitted:
            c = a.req.context.shape[0]
            groups.setdefault(c, []).append((a, tokens[off : off + c]))
            off += c
        for c, members in groups.items():  # prefill batched per context length
            first = torch.tensor([a.slots[0] for a, _ in members], device=self.device)
            acts, known = self._context_actions([a.req for a, _ in members], c - 1)
            self.model.prefill(self.cache, first, torch.stack([t for _, t in members]), acts, known)
            for a, _ in members:  # fork: prefill once, copy into the other K-1 slots
                if len(a.slots) > 1:
                    self.cache.fork(a.slots[0], torch.tensor(a.slots[1:], device=self.device))
                self.active[a.req.id] = a

    def _context_actions(self, reqs: list[RolloutRequest], n: int):
        acts, known = self.model.unknown_actions(len(reqs), n, self.device)
        for i, r in enumerate(reqs):
            if r.context_actions is not None and n > 0:
                acts[i] = torch.as_tensor(r.context_actions[:n], device=self.device).to(acts.dtype)
                if known is not None:
                    known[i] = True
        return acts, known

    def _schedule(self) -> list[tuple[Active, int, int, object]]:
        """Rows of this step: (request, candidate, slot, action)."""
        rows = []
        for a in self.active.values():
            if a.req.session:
                if a.actions:
                    rows.append((a, 0, a.slots[0], a.actions.popleft()))
            else:
                for k, s in enumerate(a.slots):
                    rows.append((a, k, s, a.req.actions[k, a.step]))
        return rows

    def _execute(self, rows) -> None:
        b = len(rows)
        nb = bucket(b, self.cfg.max_slots)
        metrics.BATCH_SIZE.observe(b)
        slots = pad_to(torch.tensor([r[2] for r in rows]), nb, self.pad_slot).to(self.device)
        if self.spec.action_dim:
            acts = torch.zeros(nb, self.spec.action_dim)
            acts[:b] = torch.from_numpy(np.stack([np.asarray(r[3], np.float32) for r in rows]))
        else:
            acts = torch.zeros(nb, dtype=torch.int64)
            acts[:b] = torch.tensor([int(r[3]) for r in rows])
        logits, reward, done = self.model.step(self.cache, slots, acts.to(self.device))
        # sample with per-row keys: candidate k of a request seeded s draws from stream s + k, so a fork
        # equals K separate requests seeded s .. s+K-1, alone or in any batch
        seed = torch.tensor([(r[0].req.seed + r[1]) % (1 << 63) for r in rows], dtype=torch.int64)
        cand = torch.zeros(b, dtype=torch.int64)
        stepi = torch.tensor([r[0].step for r in rows], dtype=torch.int64)
        temp = torch.tensor([r[0].req.temperature for r in rows], dtype=torch.float32)
        nxt = self.sampler(logits[:b], temp.to(self.device), seed.to(self.device), cand.to(self.device),
                           stepi.to(self.device))
        advance(self.cache, slots[:b], nxt)
        want = [i for i, r in enumerate(rows) if self._wants_frame(r[0])]
        frames = run_fixed_chunks(self.model.decode, nxt[want]).cpu().numpy() if want else None
        frame_of = {i: j for j, i in enumerate(want)}
        reward, done, nxt_cpu = reward[:b].float().cpu().numpy(), done[:b].float().cpu().numpy(), nxt.cpu().numpy()
        now = time.monotonic()
        for i, (a, k, _, _) in enumerate(rows):
            if not a.first_event:
                a.first_event = True
                metrics.TTFF.observe(now - a.submitted)
            self.emit(RolloutEvent(
                a.req.id, k, a.step, float(reward[i]), float(done[i]),
                frame=frames[frame_of[i]] if i in frame_of else None,
                tokens=nxt_cpu[i] if a.req.return_tokens else None,
            ))
        metrics.FRAMES.inc(b)
        for a in {id(r[0]): r[0] for r in rows}.values():  # 5. update
            a.step += 1
            a.last_seen = time.monotonic()  # a session is idle only when no action is being processed
            if not a.req.session and a.step >= a.req.horizon:
                self._finish(a, ErrorCode.OK, "")

    def _wants_frame(self, a: Active) -> bool:
        m = a.req.frames
        return m == FrameMode.ALL or (m == FrameMode.LAST and (a.req.session or a.step == a.req.horizon - 1))

    def _finish(self, a: Active, code: ErrorCode, message: str) -> None:
        self.active.pop(a.req.id, None)
        self.free.extend(a.slots)
        a.slots = []
        metrics.REQUESTS.labels(code.name.lower()).inc()
        self.emit(RolloutEvent.end(a.req.id, code, message))
