"""The one session pump behind the WebSocket and gRPC adapters (no torch here).

A session is a stream of actions in and a stream of events out, run concurrently: a feeder hands each
incoming action to the data plane while the events of the engine go back to the client. Both transports get
the same semantics from here:
- the client's input ending, or a `CLOSE` item, closes the session: the engine ends it with a final event;
- a rejected action (InvalidArgument from the data plane) goes to `rejected` when the transport can report
  it and go on (WebSocket: an error message), else it ends the session with that error (gRPC);
- any other error of the feeder (a malformed message, the queue unavailable, ...) ends the session at once
  with that error — never a silent OK end, never a hang until the idle timeout;
- a final event that carries an error raises it as a domain error (errors.py maps it to a status once);
- when the consumer stops (client gone, cancelled), the feeder is stopped and the session closed, so its
  slot comes back in the same engine step;
- backpressure: at most `max_pending` actions are handed over and not yet answered by a frame; past that the
  feeder stops reading the client (TCP / HTTP-2 flow control pushes back), so nothing a client can push piles
  up in the front end, the Redis session stream or the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from ..errors import InvalidArgument
from ..messages import RolloutEvent, RolloutRequest
from .dataplane import DataPlane, raise_for

CLOSE = object()  # an inbox item: the client closed the session on purpose


async def session_events(dp: DataPlane, req: RolloutRequest, events: AsyncIterator[RolloutEvent],
                         inbox: AsyncIterator, rejected: Callable[[InvalidArgument], Awaitable] | None = None,
                         max_pending: int | None = None) -> AsyncIterator[RolloutEvent]:
    """Feed `inbox` (actions, or CLOSE) to the session `req`; yield its non-final events; raise its error."""
    failed: asyncio.Future = asyncio.get_running_loop().create_future()
    limit = max_pending or dp.server.max_pending_actions
    pending = [0]  # actions handed over and not yet answered by a frame
    answered = asyncio.Event()

    async def feed() -> None:
        try:
            async for item in inbox:
                if item is CLOSE:
                    break
                while pending[0] >= limit:  # backpressure: wait for a frame before reading on
                    answered.clear()
                    await answered.wait()
                pending[0] += 1
                try:
                    await dp.act(req, item)
                except InvalidArgument as e:
                    pending[0] -= 1  # a refused action is never answered
                    if rejected is None:
                        raise
                    await rejected(e)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - every feeder error ends the session with its status
            if not failed.done():
                failed.set_exception(e)
        finally:
            with contextlib.suppress(Exception):
                await dp.close_session(req)

    feeder = asyncio.create_task(feed())
    stream = events.__aiter__()
    try:
        while True:
            nxt = asyncio.ensure_future(stream.__anext__())
            await asyncio.wait({nxt, failed}, return_when=asyncio.FIRST_COMPLETED)
            if failed.done():  # the feeder failed: its error ends the stream, whatever the engine sent
                nxt.cancel()
                await asyncio.gather(nxt, return_exceptions=True)
                failed.result()
            try:
                ev = nxt.result()
            except StopAsyncIteration:
                return
            if ev.final:
                raise_for(ev)
                return
            pending[0] = max(0, pending[0] - 1)  # one frame answers one action
            answered.set()
            yield ev
    finally:
        feeder.cancel()
        await asyncio.gather(feeder, return_exceptions=True)
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()  # cancels the request if it is still running: its slot comes back
