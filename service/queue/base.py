"""The queue between front ends and the engine: in-process (local) or Redis Streams. No torch here."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from ..messages import ModelInfo, RolloutEvent, RolloutRequest, SessionAction


class Queue(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def models(self) -> list[ModelInfo]: ...

    def ready(self) -> bool: ...

    def alive(self) -> bool:
        """False when this process cannot go on (its engine died): /healthz answers 503 so it is restarted."""
        ...

    async def submit(self, req: RolloutRequest) -> AsyncIterator[RolloutEvent]:
        """Enqueue (raises QueueFull at once when over capacity); returns the request's event stream.

        The iterator ends after the final event; closing it early cancels the request.
        """
        ...

    async def act(self, action: SessionAction) -> None: ...
