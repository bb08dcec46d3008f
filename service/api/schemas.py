"""JSON wire schemas (REST + WebSocket) and their translation to the data plane's types. No torch here.

Unknown fields are refused (422 naming the field), so a typo in an option never passes silently.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import InvalidArgument
from ..messages import ErrorCode, RolloutEvent
from ..wire import FRAME_MODES, PRIORITIES, EncodingName, FrameModeName, PriorityName, name_of
from .anytime import Reach
from .dataplane import MAX_DEADLINE_MS, Options, WireFrame
from .images import encode_frame

STRICT = ConfigDict(extra="forbid")
DEFAULT = Options()  # the option defaults are the data plane's (one place for REST, WS and gRPC)


class FrameIn(BaseModel):
    model_config = STRICT
    encoding: EncodingName = "png"
    data: str = Field(description="base64 of the PNG/JPEG file or of raw RGB8 bytes")
    height: int = Field(0, ge=0, le=1 << 20, description="required for raw")
    width: int = Field(0, ge=0, le=1 << 20, description="required for raw")


class OptionsIn(BaseModel):
    model_config = STRICT
    frames: FrameModeName = name_of(DEFAULT.frames)
    seed: int = Field(DEFAULT.seed, description="in [0, 2^63-1]")
    temperature: float = Field(DEFAULT.temperature, description="in [0, 10]; 0 = greedy")
    deadline_ms: int = Field(DEFAULT.deadline_ms, ge=0, le=MAX_DEADLINE_MS, description="0 = none")
    priority: PriorityName = name_of(DEFAULT.priority)
    return_tokens: bool = DEFAULT.return_tokens
    frame_encoding: EncodingName = DEFAULT.frame_encoding
    stop_on_done: bool = Field(DEFAULT.stop_on_done, description="stop stepping a candidate once the model says done "
                               "(the world is absorbing after done); the final line names each stop")
    anytime: bool = Field(DEFAULT.anytime, description="with deadline_ms: at the deadline the rollout ends OK with the "
                          "steps reached so far; the final line gives `steps_reached` and `truncated` per candidate "
                          "(predict: `truncated`) instead of a DEADLINE_EXCEEDED error")
    common_random_numbers: bool = Field(DEFAULT.common_random_numbers, description="sampled rollouts: key the "
                                        "randomness by (seed, the candidate's actions so far) instead of (seed, "
                                        "candidate): candidates with equal action prefixes draw the same noise (less "
                                        "noisy comparisons for a planner) and are computed once (greedy ones always)")


class LoadModelIn(BaseModel):
    model_config = STRICT
    dir: str = Field(max_length=4096, description="a model directory on the server (config.json, model.safetensors, "
                     "MODEL_CARD.md) inside one of its admin model roots (server.admin_model_roots, else model.repo)")
    weights_sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$", description="the sha256 (hex) of the directory's "
                                "model.safetensors as you pinned it; the server hashes the file itself and refuses "
                                "other weights before anything is built (the card inside the directory is not "
                                "trusted)")


class PredictIn(BaseModel):
    model_config = STRICT
    context: list[FrameIn]
    actions: list[Any] = Field(description="one action per step: int (discrete) or a flat list of floats")
    context_actions: list[Any] | None = None
    options: OptionsIn = OptionsIn()


class RolloutIn(BaseModel):
    model_config = STRICT
    context: list[FrameIn]
    candidates: list[list[Any]]
    context_actions: list[Any] | None = None
    options: OptionsIn = OptionsIn()


class SessionOpenIn(BaseModel):
    model_config = STRICT
    type: Literal["open"] = "open"
    context: list[FrameIn]
    context_actions: list[Any] | None = None
    options: OptionsIn = OptionsIn()


def frames_in(frames: list[FrameIn]) -> list[WireFrame]:
    out = []
    for i, f in enumerate(frames):
        try:
            data = base64.b64decode(f.data, validate=True)
        except (binascii.Error, ValueError) as e:
            raise InvalidArgument(f"context[{i}].data is not valid base64", f"context[{i}].data") from e
        out.append(WireFrame(f.encoding, data, f.height, f.width))
    return out


def options_in(o: OptionsIn) -> Options:
    return Options(FRAME_MODES[o.frames], o.seed, o.temperature, o.deadline_ms, PRIORITIES[o.priority],
                   o.return_tokens, o.frame_encoding, o.stop_on_done, o.anytime, o.common_random_numbers)


def describe(errors: list[dict], skip: int = 0) -> tuple[str, str]:
    """pydantic errors -> (field, message) naming the first problem."""
    if not errors:
        return "body", "invalid request"
    e = errors[0]
    where = ".".join(str(x) for x in e["loc"][skip:]) or "body"
    return where, f"{where}: {e['msg']}"


def validation_error(ve: ValidationError) -> InvalidArgument:
    where, msg = describe(ve.errors())
    return InvalidArgument(msg, where)


_DATA = "\x00"  # stands for a frame's base64 in event_bytes (json.dumps writes it as "\u0000")
_DATA_JSON = json.dumps(_DATA)


def event_bytes(ev: RolloutEvent, encoding: str, reach: Reach | None = None, head: dict | None = None) -> bytes:
    """event_json as compact JSON bytes (`head`'s keys first), the frame's base64 spliced in as bytes: base64 needs no
    JSON escaping, and running a 64x64 raw frame's 16 KB through json.dumps was ~60 of the ~80 us an event cost."""
    d = event_json(ev, encoding, reach, data=False)
    text = json.dumps(d if head is None else {**head, **d}, separators=(",", ":"))
    if ev.final or ev.frame is None:
        return text.encode()
    before, after = text.split(_DATA_JSON, 1)  # the sentinel is the only such string: other values are numbers
    return b"".join((before.encode(), b'"', base64.b64encode(encode_frame(ev.frame, encoding)), b'"',
                     after.encode()))


def event_json(ev: RolloutEvent, encoding: str, reach: Reach | None = None, data: bool = True) -> dict:
    """An event as the JSON the REST and WebSocket adapters send (data=False: the frame's data is a placeholder that
    event_bytes fills)."""
    if ev.final:
        if ev.error == ErrorCode.OK:  # an OK end may still say something (stop_on_done: which candidates stopped)
            d = {"final": True, "error": None, **({"message": ev.message} if ev.message else {})}
            if reach is not None:  # anytime: how far each candidate got, and whether the deadline cut it
                d.update(steps_reached=reach.steps, truncated=reach.truncated)
            return d
        return {"final": True, "error": {"code": ev.error.name, "message": ev.message}}
    d: dict = {"candidate": ev.candidate, "step": ev.step, "reward": ev.reward, "done": ev.done}
    if ev.frame is not None:
        h, w = ev.frame.shape[:2]
        d["frame"] = {"encoding": encoding, "height": h, "width": w,
                      "data": base64.b64encode(encode_frame(ev.frame, encoding)).decode() if data else _DATA}
    if ev.tokens is not None:
        d["tokens"] = ev.tokens.tolist()
    if ev.confidence is not None:  # absent when the model gives none
        d["confidence"] = ev.confidence
    if ev.ended:  # stop_on_done: this candidate's world ended here (absent otherwise)
        d["ended"] = True
    return d


_TO_SQUARE = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_SLICE = 1 << 20


class JsonDepth:
    """Running nesting depth of JSON text fed in pieces (a streamed body, a WebSocket message): `[` / `{` +1,
    `]` / `}` -1, the running maximum over every piece. Brackets inside strings count too (frame data is
    base64, which has none), so this may over-count, never under-count: json.loads never nests deeper than
    `max`. C-speed: counts first, and only a piece that could go over the limit is scanned (numpy, 1 MiB slices)."""

    def __init__(self, limit: int):
        self.limit, self.depth, self.max = limit, 0, 0

    def feed(self, data: bytes | str) -> bool:
        """True once the nesting has gone over `limit`."""
        if isinstance(data, str):
            opens, closes = data.count("[") + data.count("{"), data.count("]") + data.count("}")
        else:
            opens, closes = data.count(b"[") + data.count(b"{"), data.count(b"]") + data.count(b"}")
        if self.depth + opens <= self.limit:  # cannot go over within this piece
            self.max = max(self.max, self.depth + (opens > 0))
            self.depth += opens - closes
            return False
        raw = data.encode("utf-8", "ignore") if isinstance(data, str) else data
        seq = raw.translate(_TO_SQUARE, _NOT_BRACKET)  # only the brackets, all as [ and ]
        for i in range(0, len(seq), _SLICE):
            run = np.cumsum(np.where(np.frombuffer(seq, np.uint8, min(_SLICE, len(seq) - i), i) == 91, 1, -1))
            run += self.depth
            self.max = max(self.max, int(run.max()))
            self.depth = int(run[-1])
            if self.max > self.limit:
                return True
        return False

    @property
    def message(self) -> str:
        return f"JSON nested deeper than {self.limit} levels (server.max_json_depth)"
