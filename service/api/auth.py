"""API keys and per-key limits for REST, WebSocket (ASGI middleware) and gRPC (server interceptor).

Keys come from settings (`auth.api_keys`, `auth.api_keys_file`); none configured = open mode. A key is
sent as `Authorization: Bearer <key>` (HTTP, WebSocket handshake) or `authorization` metadata (gRPC) and
compared in constant time. Strangers get /healthz, /readyz and the gRPC health service; /metrics and the
docs (/docs, /openapi.json, /play, gRPC reflection) follow `auth.public_metrics` / `auth.public_docs`.

Per key: a token bucket (requests/s), requests in flight, open sessions, and the highest priority it may
use (requests above it run at the cap: `PRINCIPAL` carries the key into the data plane). Over a limit:
429 / RESOURCE_EXHAUSTED with Retry-After. A cap on open sessions applies in every mode.

Scopes: a key is ordinary (predict, rollouts, sessions, listing) unless it carries the `admin` scope
(`auth.admin_keys`, or `"scopes": ["admin"]` on a keys-file JSON line). Every path under /v1/admin/ is refused
with 403 / PERMISSION_DENIED to any other caller (HttpGate, before the route runs; api/admin.py checks again),
and without keys (open mode) nobody is an admin: `serve` with `server.admin_api` refuses to start without an
admin key (require_admin_key).
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from contextvars import ContextVar
from dataclasses import dataclass, field

import grpc

from ..settings import AuthSettings, KeyLimits
from ..wire import PRIORITIES, Priority
from .errors import (
    PermissionDenied,
    RateLimited,
    Unauthenticated,
    code_name,
    error_json,
    grpc_status,
    grpc_trailers,
    http_status,
    retry_after_header,
    send_json_error,
)

log = logging.getLogger("worldserve.api.auth")


class TokenBucket:
    def __init__(self, rate: float, burst: float):
        self.rate, self.burst = rate, max(1.0, burst or rate)
        self.tokens, self.t = self.burst, time.monotonic()

    def take(self) -> float:
        """0 when a token was taken, else the seconds until one is there."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


ADMIN = "admin"  # loads and unloads models (api/admin.py); ordinary keys have no scope
SCOPES = (ADMIN,)
ADMIN_PREFIX = "/v1/admin"


@dataclass
class Principal:
    name: str  # never the key itself (logs)
    limits: KeyLimits
    scopes: frozenset[str] = frozenset()
    bucket: TokenBucket = field(init=False)
    in_flight: int = 0
    sessions: int = 0
    slots: int = 0

    def __post_init__(self):
        self.bucket = TokenBucket(self.limits.rate, self.limits.burst)

    @property
    def max_priority(self) -> Priority:
        return PRIORITIES[self.limits.max_priority]

    @property
    def admin(self) -> bool:
        return ADMIN in self.scopes


def require_admin(who: Principal | None) -> Principal:
    """The caller if it holds the `admin` scope; PermissionDenied for every other key and in open mode."""
    if who is None or not who.admin:
        raise PermissionDenied("this route needs a key with the `admin` scope (auth.admin_keys, or \"scopes\": "
                               "[\"admin\"] in the keys file); this key has no admin scope" if who is not None else
                               "this route needs a key with the `admin` scope; no key was given", "authorization")
    return who


PRINCIPAL: ContextVar[Principal | None] = ContextVar("worldserve_principal", default=None)


def current_principal() -> Principal | None:
    """The key of the call being served (set by HttpGate / GrpcGate); adapters hand it to the data plane."""
    return PRINCIPAL.get()


GATE: ContextVar[Gate | None] = ContextVar("worldserve_gate", default=None)  # set by GrpcGate for its calls


def hold_sessions(n: int):
    """A call that opens `n` sessions at once (gRPC VectorSession): each counts against the server's and the key's
    max_sessions and takes one rate token, as n Session calls would (RateLimited if any does not fit: none is
    held then). -> a release function (idempotent)."""
    gate, who = GATE.get(), PRINCIPAL.get()
    held = 0
    try:
        while gate is not None and held < n:
            gate.enter(who, session=True, concurrent=False)
            held += 1
    except RateLimited:
        for _ in range(held):
            gate.leave(who, session=True, concurrent=False)
        raise
    done = []

    def release() -> None:
        if not done and gate is not None:
            done.append(True)
            for _ in range(held):
                gate.leave(who, session=True, concurrent=False)
    return release


def take_token() -> None:
    """One more unit of work inside a long call (a reset in a VectorSession): one token of the key's rate."""
    who = PRINCIPAL.get()
    if who is not None:
        wait = who.bucket.take()
        if wait > 0:
            raise RateLimited(f"over this key's rate of {who.limits.rate:g} requests/s", wait)


def capped_priority(p: Priority, who: Principal | None) -> Priority:
    """The priority a request runs at: never above its key's cap (INTERACTIVE=0 is the highest)."""
    return p if who is None else Priority(max(int(p), int(who.max_priority)))


def take_slots(n: int, who: Principal | None):
    """Count `n` engine slots against the key `who` (RateLimited over its max_slots); -> a release
    function (idempotent) or None when nothing is counted."""
    if who is None or not who.limits.max_slots:
        return None
    if who.slots + n > who.limits.max_slots:
        raise RateLimited(f"this request needs {n} slots and this key holds {who.slots}; its limit is "
                          f"{who.limits.max_slots}", 1.0, "candidates")
    who.slots += n
    done = []

    def release() -> None:
        if not done:
            done.append(True)
            who.slots -= n

    return release


def _scopes(raw, where: str) -> frozenset[str]:
    if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
        raise SystemExit(f"{where}: \"scopes\" must be a list of strings, e.g. [\"admin\"]")
    unknown = sorted(set(raw) - set(SCOPES))
    if unknown:
        raise SystemExit(f"{where}: unknown scope(s) {unknown}; known: {list(SCOPES)}")
    return frozenset(raw)


def load_keys(auth: AuthSettings) -> list[tuple[bytes, Principal]]:
    """(key bytes, principal) for every configured key.

    `auth.api_keys` are ordinary keys (names key0, key1, ...), `auth.admin_keys` carry the `admin` scope (admin0,
    ...). Keys-file lines: `key [name]` (an ordinary key) or a JSON object
    {"key": ..., "name": ..., "scopes": ["admin"], "rate": ..., "burst": ..., "max_concurrent": ...,
    "max_sessions": ..., "max_priority": ...} (`scopes`: optional, default none: an ordinary key; "admin" lets the
    key load and unload models through /v1/admin/); blank lines and # comments are skipped. A key configured twice
    is an error (one key, one principal: its scopes and limits must not depend on which entry matched)."""
    out: list[tuple[bytes, Principal]] = []
    for i, k in enumerate(auth.api_keys):
        if k.get_secret_value():
            out.append((k.get_secret_value().encode(), Principal(f"key{i}", auth.limits)))
    for i, k in enumerate(auth.admin_keys):
        if k.get_secret_value():
            out.append((k.get_secret_value().encode(), Principal(f"admin{i}", auth.limits, frozenset({ADMIN}))))
    if auth.api_keys_file is not None:
        if not auth.api_keys_file.is_file():
            raise SystemExit(f"auth.api_keys_file {auth.api_keys_file} does not exist (create the keys Secret)")
        for n, line in enumerate(auth.api_keys_file.read_text().splitlines()):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("{"):
                d = json.loads(line)
                key, name = str(d.pop("key")), str(d.pop("name", f"file{n}"))
                scopes = _scopes(d.pop("scopes", []), f"auth.api_keys_file line {n + 1} ({name})")
                limits = KeyLimits(**{**auth.limits.model_dump(), **d})
            else:
                key, _, name = line.partition(" ")
                name, limits, scopes = name.strip() or f"file{n}", auth.limits, frozenset()
            out.append((key.encode(), Principal(name, limits, scopes)))
    seen: dict[bytes, str] = {}
    for key, who in out:
        if key in seen:
            raise SystemExit(f"the same API key is configured twice ({seen[key]} and {who.name}): one key, one "
                             "principal (give an admin key only in auth.admin_keys or with \"scopes\": [\"admin\"])")
        seen[key] = who.name
    return out


def require_admin_key(keys: list[tuple[bytes, Principal]]) -> None:
    """`server.admin_api` needs at least one key with the admin scope (SystemExit naming the settings)."""
    if not any(who.admin for _, who in keys):
        raise SystemExit("server.admin_api (WORLDSERVE_SERVER__ADMIN_API) is on but no key has the `admin` scope: "
                         "set WORLDSERVE_AUTH__ADMIN_KEYS (or a keys-file line with \"scopes\": [\"admin\"]), or "
                         "turn the admin API off. Without one, every caller of the port could load and unload models")


class Gate:
    """Who may call, and how much: shared by the HTTP middleware and the gRPC interceptor."""

    def __init__(self, auth: AuthSettings, max_sessions: int):
        self.keys = load_keys(auth)
        if auth.required and not self.keys:
            raise SystemExit("auth.required is set but no API key is configured (auth.api_keys / auth.api_keys_file)")
        self.auth, self.max_sessions, self.sessions = auth, max_sessions, 0

    @property
    def open(self) -> bool:
        return not self.keys

    def identify(self, authorization: str | None) -> Principal | None:
        """Constant-time lookup of `Bearer <key>` (every key is compared, whatever matches)."""
        if self.open:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        found = None
        for key, who in self.keys:
            if hmac.compare_digest(key, given) and given:
                found = who
        if found is None:
            raise Unauthenticated("an API key is required: send `Authorization: Bearer <key>`"
                                  if not given else "unknown API key", "authorization")
        return found

    def enter(self, who: Principal | None, session: bool, concurrent: bool = True) -> None:
        """Counts one call in (raises RateLimited); every successful enter needs one `leave`."""
        if session and self.sessions >= self.max_sessions:
            raise RateLimited(f"{self.sessions} sessions are open, the server's limit is {self.max_sessions}", 5.0)
        if who is not None:
            lim = who.limits
            if session and lim.max_sessions and who.sessions >= lim.max_sessions:
                raise RateLimited(f"this key has {who.sessions} open sessions, its limit is {lim.max_sessions}", 5.0)
            if concurrent and lim.max_concurrent and who.in_flight >= lim.max_concurrent:
                raise RateLimited(f"this key has {who.in_flight} requests in flight, its limit is "
                                  f"{lim.max_concurrent}", 1.0)
            wait = who.bucket.take()  # last: a refused call costs no token
            if wait > 0:
                raise RateLimited(f"over this key's rate of {lim.rate:g} requests/s", wait)
            who.in_flight += concurrent
            who.sessions += session
        self.sessions += session

    def leave(self, who: Principal | None, session: bool, concurrent: bool = True) -> None:
        self.sessions -= session
        if who is not None:
            who.in_flight -= concurrent
            who.sessions -= session


# ------------------------------------------------------------------------------------------------ gRPC
def _bearer(metadata) -> str | None:
    for k, v in metadata or ():
        if k == "authorization":
            return v if isinstance(v, str) else v.decode("latin-1")
    return None


class GrpcGate(grpc.aio.ServerInterceptor):
    """Keys and limits for gRPC: health is public, reflection follows `public_docs`."""

    def __init__(self, gate: Gate):
        self.gate = gate

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        method = details.method or ""
        if handler is None or method.startswith("/grpc.health.v1.Health/"):
            return handler
        reflection = method.startswith("/grpc.reflection.")
        if reflection and (self.gate.auth.public_docs or self.gate.open):
            return handler
        gate, session = self.gate, method.endswith("/Session")  # a VectorSession holds its N sessions itself
        concurrent = method.endswith(("/Predict", "/Rollout", "/Session", "/VectorSession"))
        token = _bearer(details.invocation_metadata)

        async def admit(context) -> Principal | None:
            try:
                who = gate.identify(token)
                gate.enter(who, session, concurrent)
                return who
            except (Unauthenticated, RateLimited) as e:
                await context.abort(grpc_status(e.code), e.message, trailing_metadata=grpc_trailers(e))

        if handler.unary_unary:
            inner_uu = handler.unary_unary

            async def unary_unary(request, context):
                who = await admit(context)
                reset = PRINCIPAL.set(who)
                try:
                    return await inner_uu(request, context)
                finally:
                    PRINCIPAL.reset(reset)
                    gate.leave(who, session, concurrent)
            return handler._replace(unary_unary=unary_unary)

        inner = handler.unary_stream or handler.stream_stream
        if inner is None:  # stream-unary: none in this service
            return handler

        async def streaming(request, context):
            who = await admit(context)
            PRINCIPAL.set(who)  # the RPC's own task: no reset needed
            GATE.set(gate)
            try:
                async for item in inner(request, context):
                    yield item
            finally:
                gate.leave(who, session, concurrent)
        if handler.unary_stream:
            return handler._replace(unary_stream=streaming)
        return handler._replace(stream_stream=streaming)


# ------------------------------------------------------------------------------------------------ HTTP
ALWAYS_PUBLIC = ("/healthz", "/readyz")
DOCS = ("/docs", "/redoc", "/openapi.json", "/play", "/static/")
COUNTED = ("/v1/",)
WS_BEARER = "bearer."  # WebSocket subprotocol carrying the key; the server selects WS_PROTOCOL
WS_PROTOCOL = "worldserve.v1"  # API calls: a token each; POSTs and sessions also count as in flight


class HttpGate:
    """Pure ASGI middleware (streams pass through untouched; the in-flight count lasts to their end)."""

    def __init__(self, app, gate: Gate):
        self.app, self.gate = app, gate

    def _public(self, path: str) -> bool:
        a = self.gate.auth
        return (path in ALWAYS_PUBLIC or (path == "/metrics" and a.public_metrics)
                or (a.public_docs and path.startswith(DOCS)))

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or self._public(scope["path"]):
            return await self.app(scope, receive, send)
        ws = scope["type"] == "websocket"
        counted = scope["path"].startswith(COUNTED)
        concurrent = ws or scope.get("method") == "POST"
        auth = None
        for k, v in scope.get("headers", ()):
            if k == b"authorization":
                auth = v.decode("latin-1")
        if auth is None and ws:  # browsers cannot set headers on a WebSocket: `bearer.<key>` subprotocol
            for proto in scope.get("subprotocols", ()):
                if proto.startswith(WS_BEARER):
                    auth = "Bearer " + proto[len(WS_BEARER):]
        try:
            who = self.gate.identify(auth)
            if _admin_path(scope["path"]):  # every admin route, known or not, before its body is read
                require_admin(who)
            if counted:
                self.gate.enter(who, session=ws, concurrent=concurrent)
        except (Unauthenticated, PermissionDenied, RateLimited) as e:
            return await _refuse(scope, receive, send, e)
        reset = PRINCIPAL.set(who)
        try:
            await self.app(scope, receive, send)
        finally:
            PRINCIPAL.reset(reset)
            if counted:
                self.gate.leave(who, session=ws, concurrent=concurrent)


def _admin_path(path: str) -> bool:
    return path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/")


async def _refuse(scope, receive, send, e) -> None:
    status = http_status(e.code)
    headers = [(b"www-authenticate", b'Bearer realm="worldserve"')] if status == 401 else []
    ra = retry_after_header(e)
    if ra is not None:
        headers.append((b"retry-after", ra.encode()))
    if scope["type"] == "http":
        return await send_json_error(send, status, code_name(e.code), e.message, e.field, headers)
    # WebSocket handshake: an HTTP answer where the server supports it, else a close before accept (403)
    await receive()  # websocket.connect
    if "websocket.http.response" in scope.get("extensions", {}):
        body = error_json(e)
        await send({"type": "websocket.http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), *headers]})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008, "reason": e.message[:120]})
