"""Typed messages between front ends and workers, declared once (no torch here).

In-process they travel as objects; through Redis as `pack`/`unpack` bytes: a JSON header plus raw
array buffers (no pickle, so a message from the queue can never run code).
"""

from __future__ import annotations

import dataclasses
import json
import struct
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from .model.spec import ModelSpec
from .wire import FrameMode, Priority

__all__ = ["Cancel", "ErrorCode", "FrameMode", "ModelInfo", "Priority", "RolloutEvent", "RolloutRequest",
           "SessionAction", "check_request", "pack", "unpack"]

class ErrorCode(IntEnum):
    OK = 0
    INVALID_ARGUMENT = 1
    NOT_FOUND = 2
    RESOURCE_EXHAUSTED = 3
    DEADLINE_EXCEEDED = 4
    CANCELLED = 5
    UNAVAILABLE = 6
    INTERNAL = 7


@dataclass(frozen=True)
class ModelInfo(ModelSpec):
    """A served model: its spec (model/spec.py) and how this server serves it."""

    max_candidates: int = 64
    backend: str = "eager"
    precision: str = "fp32"

    def to_json(self) -> str:  # how workers announce their models in Redis
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> ModelInfo:
        d = json.loads(raw)
        return cls(**{**d, "action_names": tuple(d["action_names"])})


@dataclass
class RolloutRequest:
    id: str
    model: str
    context: np.ndarray  # uint8 [C, H, W, 3]
    actions: np.ndarray  # discrete int64 [K, T] | continuous float32 [K, T, A]
    context_actions: np.ndarray | None = None  # like actions, one sequence of C-1 (or None: unknown)
    frames: FrameMode = FrameMode.ALL
    return_tokens: bool = False
    seed: int = 0
    temperature: float = 0.0
    deadline: float | None = None  # unix time (seconds)
    priority: Priority = Priority.NORMAL
    session: bool = False  # interactive: actions arrive one at a time through `SessionAction`
    attempt: int = 0  # redelivery count (Redis mode)
    stop_on_done: bool = False  # a candidate stops stepping once the model says done (the world is absorbing)
    tenant: str = ""  # the calling key's name ("" in open mode): the engine shares its slots fairly between keys
    weight: float = 1.0  # that key's share weight (KeyLimits.weight)
    # sampled randomness keyed by (seed, the candidate's actions so far) instead of (seed + candidate): candidates with
    # equal prefixes draw the same noise and share their rows (engine/prefix.py); greedy token rollouts share anyway
    common_random_numbers: bool = False

    @property
    def candidates(self) -> int:
        return int(self.actions.shape[0])

    @property
    def horizon(self) -> int:
        return int(self.actions.shape[1])


@dataclass
class SessionAction:
    request_id: str
    action: np.ndarray  # discrete int64 [] | continuous float32 [A]
    close: bool = False


@dataclass
class RolloutEvent:
    request_id: str
    candidate: int
    step: int  # 0-based index of the predicted frame
    reward: float
    done: float  # probability the episode ended at this step
    frame: np.ndarray | None = None  # uint8 [H, W, 3]
    tokens: np.ndarray | None = None  # int64 [N]
    # how sure the model was of this frame, in [0, 1]: for token models the mean probability of the frame's chosen
    # tokens (under the distribution each was sampled from); None where the model gives none
    confidence: float | None = None
    # stop_on_done: this candidate's world ended at this step (no more events for it). Greedy rollouts end where
    # done > 0.5; sampled ones (and every rollout of a latent model) with probability done (a draw from the
    # candidate's seeded stream)
    ended: bool = False
    final: bool = False  # last event of the request (may carry an error)
    error: ErrorCode = ErrorCode.OK
    message: str = ""

    @classmethod
    def end(cls, request_id: str, error: ErrorCode = ErrorCode.OK, message: str = "") -> RolloutEvent:
        return cls(request_id, -1, -1, 0.0, 0.0, final=True, error=error, message=message)


@dataclass
class Cancel:
    request_id: str


MESSAGE_TYPES = {c.__name__: c for c in (RolloutRequest, RolloutEvent, SessionAction, Cancel)}
_ENUMS = {"frames": FrameMode, "priority": Priority, "error": ErrorCode}


def pack(msg) -> bytes:
    """Message -> bytes: u32 header length, JSON header, then the raw buffers of its arrays."""
    header: dict = {"type": type(msg).__name__, "fields": {}, "arrays": {}}
    blobs: list[bytes] = []
    offset = 0
    for f in dataclasses.fields(msg):
        v = getattr(msg, f.name)
        if isinstance(v, np.ndarray):
            b = np.ascontiguousarray(v).tobytes()
            header["arrays"][f.name] = [str(v.dtype), list(v.shape), offset, len(b)]
            blobs.append(b)
            offset += len(b)
        else:
            header["fields"][f.name] = int(v) if isinstance(v, IntEnum) else v
    h = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<I", len(h)) + h + b"".join(blobs)


def unpack(data: bytes):
    (n,) = struct.unpack_from("<I", data)
    header = json.loads(data[4 : 4 + n])
    cls = MESSAGE_TYPES[header["type"]]
    body = memoryview(data)[4 + n :]
    known = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in header["fields"].items() if k in known}  # a newer sender's extra fields: ignored
    for name, (dtype, shape, off, size) in header["arrays"].items():
        if name not in known:
            continue
        kw[name] = np.frombuffer(body[off : off + size], dtype=np.dtype(dtype)).reshape(shape).copy()
    for name, enum in _ENUMS.items():
        if name in kw:
            kw[name] = enum(kw[name])
    return cls(**kw)


def check_request(req, info: ModelInfo) -> str | None:
    """Why a request taken off a queue cannot run on this model (None: it can). Structure only, cheap:
    the front end validated the content; this guards the engine against a corrupt or foreign entry."""
    if not isinstance(req, RolloutRequest):
        return f"expected a RolloutRequest, got {type(req).__name__}"
    if not isinstance(req.id, str) or not req.id:
        return "request id missing"
    if req.model != info.name:
        return f"request for model {req.model!r} reached a worker of {info.name!r}"
    if not isinstance(req.tenant, str) or isinstance(req.weight, bool) or not isinstance(req.weight, int | float) \
            or not 0 < req.weight < float("inf"):
        return "tenant must be a string and weight a positive finite number"
    c = req.context
    frame = (info.height, info.width, 3)
    if not isinstance(c, np.ndarray) or c.dtype != np.uint8 or c.ndim != 4 or c.shape[1:] != frame:
        return f"context must be uint8 [C, {info.height}, {info.width}, 3]"
    if not 1 <= c.shape[0] <= info.context_window:
        return f"context: {c.shape[0]} frames, must be 1..{info.context_window}"
    a, cont = req.actions, info.continuous
    if not isinstance(a, np.ndarray) or a.ndim != (3 if cont else 2) or (cont and a.shape[2] != info.action_dim):
        return "actions must be " + (f"float [K, T, {info.action_dim}]" if cont else "int [K, T]")
    if not 1 <= a.shape[0] <= info.max_candidates or a.shape[1] > info.max_horizon:
        return (f"actions: shape {list(a.shape)} outside 1..{info.max_candidates} candidates, "
                f"0..{info.max_horizon} steps")
    ca = req.context_actions
    if ca is not None and (not isinstance(ca, np.ndarray) or ca.ndim != (2 if cont else 1)
                           or (cont and ca.shape[1] != info.action_dim)):
        return "context_actions must be " + (f"float [C-1, {info.action_dim}]" if cont else "int [C-1]")
    if ca is not None and ca.shape[0] != c.shape[0] - 1:
        return f"context_actions: {ca.shape[0]} for {c.shape[0]} context frames, must be {c.shape[0] - 1}"
    for x in (a, ca):
        if x is None or x.size == 0:
            continue
        if cont and (not np.issubdtype(x.dtype, np.floating) or not np.isfinite(x).all()):
            return "continuous actions must be finite floats"
        if not cont and (not np.issubdtype(x.dtype, np.integer) or x.min() < 0 or x.max() >= info.n_actions):
            return f"discrete actions must be integers in [0, {info.n_actions})"
    return None
