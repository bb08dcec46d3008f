"""The engine's bookkeeping per request: waiting (a heap entry), active (its slots and progress), and one row of
a step (one slot's work). Plain data; the engine (engine.py) owns every transition."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..messages import RolloutRequest


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
    stopped: dict[int, int] = field(default_factory=dict)  # stop_on_done: candidate -> the step it ended at


@dataclass(order=True)
class Waiting:
    priority: int
    seq: int
    req: RolloutRequest = field(compare=False)
    submitted: float = field(compare=False)  # monotonic


@dataclass
class Row:
    """One slot's work in this step."""

    active: Active
    candidate: int
    slot: int
    action: object  # discrete int | continuous float32 [A]
