"""The one data plane behind the REST, WebSocket and gRPC adapters: validate, build typed requests,
submit to the queue, gather or stream events. Adapters only translate wire formats.

Nothing reaches the queue unvalidated; every problem raises a domain error naming the field.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np

from ..errors import InvalidArgument, NotFound, from_code
from ..messages import ErrorCode, FrameMode, ModelInfo, Priority, RolloutEvent, RolloutRequest, SessionAction
from ..settings import ServerSettings
from .images import decode_frame

MAX_SEED = 2**63 - 1
MAX_TEMPERATURE = 10.0
CONTINUOUS_LIMIT = 1.0  # continuous actions are normalised to [-1, 1]


@dataclass
class WireFrame:
    encoding: str  # raw | png | jpeg
    data: bytes
    height: int = 0
    width: int = 0


@dataclass
class Options:
    frames: FrameMode = FrameMode.ALL
    seed: int = 0
    temperature: float = 0.0
    deadline_ms: int = 0
    priority: Priority = Priority.NORMAL
    return_tokens: bool = False
    frame_encoding: str = "png"


@dataclass
class RolloutInput:
    model: str
    context: list[WireFrame]
    candidates: list[list] = field(default_factory=list)  # K sequences of actions (int | list[float])
    context_actions: list | None = None
    options: Options = field(default_factory=Options)
    deadline: float | None = None  # absolute unix time from the transport (gRPC deadline)
    single: bool = False  # predict: one sequence, called `actions` on the wire


class DataPlane:
    def __init__(self, queue, server: ServerSettings):
        self.queue, self.server = queue, server

    # ---- models ---------------------------------------------------------------------------------
    def models(self) -> list[ModelInfo]:
        return self.queue.models()

    def model(self, name: str) -> ModelInfo:
        for m in self.queue.models():
            if m.name == name:
                return m
        known = ", ".join(m.name for m in self.queue.models()) or "none loaded"
        raise NotFound(f"model {name!r} not found (available: {known})", "model")

    def ready(self) -> bool:
        return self.queue.ready()

    # ---- validation -----------------------------------------------------------------------------
    def _action(self, m: ModelInfo, a, where: str) -> object:
        if m.continuous:
            if not isinstance(a, list | tuple | np.ndarray) or len(a) != m.action_dim:
                raise InvalidArgument(f"{where}: continuous action must be {m.action_dim} numbers, got {a!r}", where)
            try:
                v = np.asarray(a, np.float32)
            except (TypeError, ValueError) as e:
                raise InvalidArgument(f"{where}: action values must be numbers", where) from e
            if not np.all(np.isfinite(v)) or np.any(np.abs(v) > CONTINUOUS_LIMIT):
                raise InvalidArgument(f"{where}: continuous action values must be finite and in [-1, 1]", where)
            return v
        if isinstance(a, bool) or not isinstance(a, int | np.integer):
            raise InvalidArgument(f"{where}: discrete action must be an integer, got {a!r}", where)
        if not 0 <= int(a) < m.n_actions:
            raise InvalidArgument(f"{where}: action {a} out of range [0, {m.n_actions - 1}]", where)
        return int(a)

    def _actions(self, m: ModelInfo, seq: list, where: str) -> np.ndarray:
        vals = [self._action(m, a, f"{where}[{i}]") for i, a in enumerate(seq)]
        if m.continuous:
            return np.stack(vals).astype(np.float32) if vals else np.zeros((0, m.action_dim), np.float32)
        return np.asarray(vals, np.int64)

    def build(self, inp: RolloutInput, session: bool = False) -> RolloutRequest:
        m = self.model(inp.model)
        o = inp.options
        if not inp.context:
            raise InvalidArgument("context: at least one context frame is required", "context")
        if len(inp.context) > m.context_window:
            raise InvalidArgument(f"context: {len(inp.context)} frames, the model takes at most "
                                  f"{m.context_window}", "context")
        frames = np.stack([
            decode_frame(f.encoding, f.data, f.height, f.width, (m.height, m.width), self.server.max_image_pixels,
                         self.server.max_image_bytes, f"context[{i}]")
            for i, f in enumerate(inp.context)
        ])  # uint8 [C, H, W, 3]
        if session:
            actions = self._actions(m, [], "actions")[None]  # [1, 0]: actions arrive one by one
        else:
            if not inp.candidates:
                raise InvalidArgument("candidates: at least one action sequence is required", "candidates")
            if len(inp.candidates) > m.max_candidates:
                raise InvalidArgument(f"candidates: {len(inp.candidates)} sequences, at most "
                                      f"{m.max_candidates}", "candidates")
            lens = {len(c) if isinstance(c, list | tuple) else -1 for c in inp.candidates}
            if -1 in lens:
                if inp.single:
                    raise InvalidArgument("actions: must be a list of actions", "actions")
                raise InvalidArgument("candidates: each candidate must be a list of actions", "candidates")
            if len(lens) != 1:
                raise InvalidArgument("candidates: all action sequences must have the same length", "candidates")
            horizon = lens.pop()
            if not 1 <= horizon <= m.max_horizon:
                raise InvalidArgument(f"actions: horizon {horizon} must be in [1, {m.max_horizon}]", "actions")
            name = (lambda k: "actions") if inp.single else (lambda k: f"candidates[{k}]")
            actions = np.stack([self._actions(m, c, name(k)) for k, c in enumerate(inp.candidates)])
        ctx_actions = None
        if inp.context_actions:
            if len(inp.context_actions) != len(inp.context) - 1:
                raise InvalidArgument(f"context_actions: need {len(inp.context) - 1} (one between each pair of "
                                      f"context frames), got {len(inp.context_actions)}", "context_actions")
            ctx_actions = self._actions(m, inp.context_actions, "context_actions")
        if isinstance(o.seed, bool) or not isinstance(o.seed, int) or not 0 <= o.seed <= MAX_SEED:
            raise InvalidArgument(f"options.seed must be an integer in [0, 2^63-1], got {o.seed!r}", "options.seed")
        t = o.temperature
        if not isinstance(t, int | float) or not math.isfinite(t) or not 0 <= t <= MAX_TEMPERATURE:
            raise InvalidArgument(f"options.temperature must be in [0, {MAX_TEMPERATURE}], got {t!r}",
                                  "options.temperature")
        if not isinstance(o.deadline_ms, int) or o.deadline_ms < 0:
            raise InvalidArgument("options.deadline_ms must be a non-negative integer", "options.deadline_ms")
        if o.frame_encoding not in ("raw", "png", "jpeg"):
            raise InvalidArgument("options.frame_encoding must be raw, png or jpeg", "options.frame_encoding")
        deadline = inp.deadline
        if o.deadline_ms:
            d = time.time() + o.deadline_ms / 1000
            deadline = d if deadline is None else min(deadline, d)
        return RolloutRequest(
            id=uuid.uuid4().hex, model=m.name, context=frames, actions=actions, context_actions=ctx_actions,
            frames=FrameMode(o.frames), return_tokens=bool(o.return_tokens), seed=int(o.seed),
            temperature=float(t), deadline=deadline,
            priority=Priority.INTERACTIVE if session else Priority(o.priority), session=session,
        )

    # ---- calls ----------------------------------------------------------------------------------
    async def rollout(self, inp: RolloutInput) -> tuple[RolloutRequest, AsyncIterator[RolloutEvent]]:
        """Validate and enqueue (errors raise here, before any event); events end with a final one."""
        req = self.build(inp)
        return req, await self.queue.submit(req)

    async def predict(self, inp: RolloutInput) -> tuple[str, list[RolloutEvent]]:
        if len(inp.candidates) != 1:
            raise InvalidArgument("actions: predict takes exactly one action sequence", "actions")
        inp.single = True
        req, events = await self.rollout(inp)
        out = []
        async for ev in events:
            if ev.final:
                raise_for(ev)
            else:
                out.append(ev)
        return req.id, out

    async def open_session(self, inp: RolloutInput) -> tuple[RolloutRequest, AsyncIterator[RolloutEvent]]:
        req = self.build(inp, session=True)
        return req, await self.queue.submit(req)

    async def act(self, req: RolloutRequest, action) -> None:
        m = self.model(req.model)
        a = self._action(m, action, "action")
        await self.queue.act(SessionAction(req.id, np.asarray(a)))

    async def close_session(self, req: RolloutRequest) -> None:
        await self.queue.act(SessionAction(req.id, np.zeros(0), close=True))


def raise_for(ev: RolloutEvent) -> None:
    """A final event that carries an error becomes the matching domain error."""
    if ev.error != ErrorCode.OK:
        raise from_code(ev.error, ev.message)
