"""Redis Streams layout shared by front ends and workers, connection set-up and self-healing helpers.

Keys (model = model name, rid = request id):
    worldserve:requests:{model}      stream of packed RolloutRequest; consumer group workers:{model}
    worldserve:results:{rid}         stream of packed RolloutEvent for one request (expires)
    worldserve:session:{rid}         stream of packed SessionAction for one interactive session (expires)
    worldserve:deadletter:{model}    requests that failed on max_deliveries workers
    worldserve:cancelled:{rid}       flag (TTL): the client cancelled
    worldserve:models                hash model -> ModelInfo JSON (written by workers)
    worldserve:workers:{model}       sorted set worker id -> last heartbeat (unix seconds)
    worldserve:wake:{consumer}       stream used to wake a blocked XREAD when the key set changes
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from urllib.parse import urlparse

import redis.asyncio as aioredis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from ..settings import QueueSettings

log = logging.getLogger("worldserve.redis")
CANCEL_CHANNEL = "worldserve:cancel"
MODELS = "worldserve:models"
TRANSIENT = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)


def requests_key(model: str) -> str:
    return f"worldserve:requests:{model}"


def group_name(model: str) -> str:
    return f"workers:{model}"


def results_key(rid: str) -> str:
    return f"worldserve:results:{rid}"


def session_key(rid: str) -> str:
    return f"worldserve:session:{rid}"


def deadletter_key(model: str) -> str:
    return f"worldserve:deadletter:{model}"


def cancelled_key(rid: str) -> str:
    return f"worldserve:cancelled:{rid}"


def workers_key(model: str) -> str:
    return f"worldserve:workers:{model}"


def wake_key(consumer: str) -> str:
    return f"worldserve:wake:{consumer}"


def redacted(url: str) -> str:
    """The URL with any password removed, for logs."""
    u = urlparse(url)
    if u.password:
        netloc = f"{u.username or ''}:***@{u.hostname}" + (f":{u.port}" if u.port else "")
        return u._replace(netloc=netloc).geturl()
    return url


def connect(q: QueueSettings) -> aioredis.Redis:
    """A client with retries and socket timeouts longer than any BLOCK we use."""
    kw: dict = dict(
        socket_timeout=q.block_ms / 1000 + 5, socket_connect_timeout=5, health_check_interval=10,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), 3), retry_on_error=[RedisConnectionError],
        decode_responses=False,
    )
    if q.password is not None:
        kw["password"] = q.password.get_secret_value()
    if q.username:
        kw["username"] = q.username
    if q.url.startswith("rediss://"):
        kw["ssl_cert_reqs"] = ssl.CERT_REQUIRED
        if q.tls_ca:
            kw["ssl_ca_certs"] = str(q.tls_ca)
    return aioredis.from_url(q.url, **kw)


async def ensure_group(r: aioredis.Redis, model: str) -> None:
    """Create the stream and its consumer group if missing (self-heals NOGROUP after a Redis restart)."""
    try:
        await r.xgroup_create(requests_key(model), group_name(model), id="0", mkstream=True)
    except ResponseError as e:
        if "BUSYGROUP" not in str(e):
            raise


def is_nogroup(e: Exception) -> bool:
    return isinstance(e, ResponseError) and "NOGROUP" in str(e)


class Backoff:
    """Exponential backoff for reconnect loops (never a hot error loop)."""

    def __init__(self, base: float = 0.05, cap: float = 2.0):
        self.base, self.cap, self.n = base, cap, 0

    async def sleep(self) -> None:
        await asyncio.sleep(min(self.cap, self.base * (2**self.n)))
        self.n += 1

    def reset(self) -> None:
        self.n = 0
