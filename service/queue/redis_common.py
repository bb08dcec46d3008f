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
    worldserve:alive:{consumer}      a worker's heartbeat key (PX ttl, judged by Redis's clock): when it is
                                     gone, survivors claim that worker's pending entries at once

A request entry carries m (packed RolloutRequest), id (its request id, readable even when m is not) and
d (seconds left until its deadline when it was added, "" = none): deadlines travel as durations and are
re-anchored on the receiving worker's clock (`reanchor`), so clock skew between hosts never matters.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
from urllib.parse import unquote

import redis.asyncio as aioredis
from redis.backoff import ExponentialBackoff
from redis.exceptions import AuthenticationError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from ..settings import QueueSettings

log = logging.getLogger("worldserve.redis")
CANCEL_CHANNEL = "worldserve:cancel"
MODELS = "worldserve:models"
TRANSIENT = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)
ERRORS = (RedisError, *TRANSIENT)  # every failure of a Redis command (OOM, READONLY, ... too): UNAVAILABLE


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


def alive_key(consumer: str) -> str:
    return f"worldserve:alive:{consumer}"


_QUERY_SECRET = re.compile(r"(?i)([?&;](?:password|pass|pwd|auth|token)=)[^&;#]*")


def split_credentials(url: str) -> tuple[str, str | None, str | None]:
    """url -> (url without user info, username, password), percent-decoded.

    Robust to reserved characters left un-encoded in the password ('/', '@', '?', '#', ':'): the user
    info is everything between "scheme://" and the LAST '@' (a Redis URL has no '@' after the host)."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest or (scheme == "unix" and rest.startswith("/")):  # unix:///path?password=
        return url, None, None
    if scheme == "unix":  # unix://[user]:[password]@/path/to/socket
        info, _, host = rest.partition("@/")
        host = "/" + host
    else:
        info, _, host = rest.rpartition("@")
    user, colon, pw = info.partition(":")
    return f"{scheme}://{host}", unquote(user) or None, unquote(pw) if colon else None


def redacted(url: str) -> str:
    """The URL with every secret masked, for logs: user info (redis://:pw@, redis://user:pw@, a password
    with un-encoded reserved characters) and password-like query parameters (unix://...?password=)."""
    bare, user, pw = split_credentials(url)
    if user is not None or pw is not None:
        scheme, _, host = bare.partition("://")
        bare = f"{scheme}://{user or ''}:***@{host}" if pw is not None else f"{scheme}://{user}@{host}"
    return _QUERY_SECRET.sub(r"\1***", bare)


def connect(q: QueueSettings) -> aioredis.Redis:
    """A client with retries and socket timeouts longer than any BLOCK we use.

    Credentials are taken out of the URL here (QueueSettings.password / username win), so a password
    with reserved characters never reaches redis-py's URL parser."""
    url, user, pw = split_credentials(q.url)
    kw: dict = dict(
        socket_timeout=q.block_ms / 1000 + 5, socket_connect_timeout=5, health_check_interval=10,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), 3), retry_on_error=[RedisConnectionError],
        decode_responses=False,
    )
    if q.password is not None:
        pw = q.password.get_secret_value()
    if q.username:
        user = q.username
    if pw is not None:
        kw["password"] = pw
    if user:
        kw["username"] = user
    if url.startswith("rediss://"):
        kw["ssl_cert_reqs"] = ssl.CERT_REQUIRED
        if q.tls_ca:
            kw["ssl_ca_certs"] = str(q.tls_ca)
    return aioredis.from_url(url, **kw)


def describe(e: BaseException, url: str | None = None) -> str:
    """A reason for a Redis failure, auth errors named as such, never a secret. With `url`, for logs (the
    redacted address); without, for clients (no internal address)."""
    at = f" at {redacted(url)}" if url else ""
    text = redact_text(str(e), url) if url else ""
    if is_auth_error(e):
        return f"redis authentication failed{at} (wrong password or user?)"
    if isinstance(e, TRANSIENT):
        return f"redis unreachable{at} ({type(e).__name__}{': ' + text if text else ''})"
    return f"redis error ({type(e).__name__}{': ' + text if text else ''})"


_AUTH_TEXT = ("noauth", "wrongpass", "invalid username-password", "authentication required", "invalid password",
              "auth <password> called without")


def is_auth_error(e: BaseException) -> bool:
    """Wrong or missing credentials (redis-py raises these as AuthenticationError or, on some transports,
    as a plain ConnectionError / ResponseError carrying the server's text)."""
    return isinstance(e, AuthenticationError) or any(t in str(e).lower() for t in _AUTH_TEXT)


def redact_text(text: str, url: str) -> str:
    """`text` with the URL's password (raw and percent-encoded forms) masked."""
    _, _, pw = split_credentials(url)
    m = re.search(r"(?i)[?&;]password=([^&;#]*)", url)
    for secret in {pw, m and m.group(1), m and unquote(m.group(1))} - {None, ""}:
        text = text.replace(secret, "***")
    return text


def reanchor(remaining_s: float | None, entry_id: bytes, now: float, redis_offset_s: float | None) -> float | None:
    """Deadline on this host's clock for an entry added with `remaining_s` left (None: no deadline).

    The time the entry spent in the stream is measured on Redis's clock (its id is Redis's time in ms when
    it was added; `redis_offset_s` = Redis clock - this host's clock, from the heartbeat) and taken off."""
    if remaining_s is None:
        return None
    queued = 0.0
    if redis_offset_s is not None:
        added = int(entry_id.split(b"-", 1)[0]) / 1000
        queued = min(max(0.0, now + redis_offset_s - added), max(0.0, remaining_s))
    return now + remaining_s - queued


def encode_remaining(deadline: float | None, now: float | None = None) -> bytes:
    """The d field of a request entry: seconds left (this host's clock), b"" for none."""
    if deadline is None:
        return b""
    return repr(max(0.0, deadline - (time.time() if now is None else now))).encode()


def decode_remaining(raw: bytes | None) -> float | None:
    return float(raw) if raw else None


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
