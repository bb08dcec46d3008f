"""Anytime rollouts (issue 20 item 5): at its deadline a rollout ends with the steps reached so far. No torch.

A planner at a fixed control rate sets options.anytime with deadline_ms = its tick budget: whatever the load, it gets
an answer at the tick, every candidate's steps up to where the deadline cut it, and per candidate how far it got and
whether it was cut (REST: the final NDJSON line; gRPC: the last message's `end`). Nothing changes in the engine: it
ends a rollout at its deadline after the steps it finished (all delivered), and this turns that DEADLINE_EXCEEDED end
into an OK one.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ..messages import ErrorCode, RolloutEvent, RolloutRequest


@dataclass
class Reach:
    """How far each candidate of an anytime rollout got. The engine ends a rollout at its deadline with
    DEADLINE_EXCEEDED after the steps it finished (their events already delivered); an anytime rollout turns that end
    into an OK one and says per candidate how many steps it reached and whether the deadline cut it."""

    horizon: int
    steps: list[int]  # per candidate: steps delivered
    stop_on_done: bool = False
    stopped: set[int] = field(default_factory=set)  # candidates that ended at done (not cut)
    truncated: list[bool] = field(default_factory=list)  # filled at the end: cut by the deadline before the horizon

    @classmethod
    def of(cls, req: RolloutRequest) -> Reach:
        return cls(req.horizon, [0] * req.candidates, req.stop_on_done)

    def see(self, ev: RolloutEvent) -> None:
        self.steps[ev.candidate] = max(self.steps[ev.candidate], ev.step + 1)
        if self.stop_on_done and ev.done > 0.5:  # the engine's stop rule
            self.stopped.add(ev.candidate)

    def end(self, ev: RolloutEvent) -> RolloutEvent:
        """The final event as the client gets it: a deadline becomes an OK end that names the cut candidates."""
        self.truncated = [s < self.horizon and k not in self.stopped for k, s in enumerate(self.steps)]
        if ev.error != ErrorCode.DEADLINE_EXCEEDED:
            return ev
        cut = sum(self.truncated)
        return RolloutEvent.end(ev.request_id, ErrorCode.OK, f"anytime: the deadline came after {min(self.steps)}.."
                                f"{max(self.steps)} of {self.horizon} steps; {cut} of {len(self.steps)} candidates "
                                "truncated")


async def anytime(events: AsyncIterator[RolloutEvent], reach: Reach) -> AsyncIterator[RolloutEvent]:
    try:
        async for ev in events:
            if ev.final:
                yield reach.end(ev)
                return
            reach.see(ev)
            yield ev
    finally:  # a consumer that stops early closes the stream: the request is cancelled, its slots freed
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(RuntimeError):
                await aclose()
