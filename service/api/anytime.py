"""Anytime rollouts (issue 20 item 5): at its deadline a rollout ends with the steps reached so far. No torch.

A planner at a fixed control rate sets options.anytime with deadline_ms = its tick budget: whatever the load, it gets
an answer at the tick, every candidate's steps up to where the deadline cut it, and per candidate how far it got and
whether it was cut (REST: the final NDJSON line; gRPC: the last message's `end`).

The answer comes at the deadline, not at the engine's next step boundary: the engine checks deadlines between steps,
and one step of 64 rows takes ~0.5 s on a loaded 2-core CPU, so a 250 ms tick answered by the engine came 0.8 s late
(p50, measured). So the front end keeps the deadline itself: a timer ends the stream at the deadline with what has
arrived and closes it (the request is cancelled, its slots freed, as for a client gone). Whichever comes first ends
it: the engine's DEADLINE_EXCEEDED after a step or the timer; both become an OK end here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
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
    stopped: set[int] = field(default_factory=set)  # candidates that ended at done (not cut)
    truncated: list[bool] = field(default_factory=list)  # filled at the end: cut by the deadline before the horizon

    @classmethod
    def of(cls, req: RolloutRequest) -> Reach:
        return cls(req.horizon, [0] * req.candidates)

    def see(self, ev: RolloutEvent) -> None:
        self.steps[ev.candidate] = max(self.steps[ev.candidate], ev.step + 1)
        if ev.ended:  # the engine ended this candidate's world (stop_on_done)
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


async def anytime(events: AsyncIterator[RolloutEvent], reach: Reach, req: RolloutRequest
                  ) -> AsyncIterator[RolloutEvent]:
    """`events` of `req` until its final event or its deadline (req.deadline, unix time), whichever comes first."""
    it = events.__aiter__()
    state = {"waiting": None, "expired": False}  # waiting: the task blocked on the next event, if any

    def expire() -> None:  # the deadline: wake the consumer if it is waiting for an event
        state["expired"] = True
        if state["waiting"] is not None:
            state["waiting"].cancel()

    left = (req.deadline - time.time()) if req.deadline is not None else None
    timer = asyncio.get_running_loop().call_later(max(0.0, left), expire) if left is not None else None
    try:
        while not state["expired"]:
            state["waiting"] = asyncio.current_task()
            try:
                ev = await it.__anext__()
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:
                if not state["expired"]:
                    raise  # the caller's cancellation
                asyncio.current_task().uncancel()  # our own timer
                break
            finally:
                state["waiting"] = None
            if ev.final:
                yield reach.end(ev)
                return
            reach.see(ev)
            yield ev
        yield reach.end(RolloutEvent.end(req.id, ErrorCode.DEADLINE_EXCEEDED, "deadline"))
    finally:  # at the deadline, or a consumer that stops early: closing the stream cancels the request
        if timer is not None:
            timer.cancel()
        aclose = getattr(it, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(RuntimeError):
                await aclose()
