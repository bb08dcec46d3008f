"""The one place that maps domain errors to HTTP, gRPC and WebSocket status codes."""

from __future__ import annotations

import json
import math

import grpc
from starlette.types import Send

from ..errors import ServiceError
from ..messages import ErrorCode


class Unauthenticated(ServiceError):
    """No or an unknown API key (front-end only: never travels through the queue)."""

    code = "UNAUTHENTICATED"  # type: ignore[assignment]


class PermissionDenied(ServiceError):
    """A known key asked for more than it may (e.g. a priority above its cap)."""

    code = "PERMISSION_DENIED"  # type: ignore[assignment]


class Conflict(ServiceError):
    """The request conflicts with what is served (e.g. loading a model under a name already taken): 409."""

    code = "ALREADY_EXISTS"  # type: ignore[assignment]


class RateLimited(ServiceError):
    """Over a per-key limit: 429 / RESOURCE_EXHAUSTED with Retry-After."""

    code = ErrorCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after: float = 1.0, field: str | None = None):
        super().__init__(message, field)
        self.retry_after = retry_after


HTTP_STATUS = {
    ErrorCode.INVALID_ARGUMENT: 400,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.RESOURCE_EXHAUSTED: 429,
    ErrorCode.DEADLINE_EXCEEDED: 504,
    ErrorCode.CANCELLED: 499,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.INTERNAL: 500,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "ALREADY_EXISTS": 409,
}

GRPC_STATUS = {
    ErrorCode.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorCode.CANCELLED: grpc.StatusCode.CANCELLED,
    ErrorCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.INTERNAL: grpc.StatusCode.INTERNAL,
    "UNAUTHENTICATED": grpc.StatusCode.UNAUTHENTICATED,
    "PERMISSION_DENIED": grpc.StatusCode.PERMISSION_DENIED,
    "ALREADY_EXISTS": grpc.StatusCode.ALREADY_EXISTS,
}

# WebSocket close codes (RFC 6455 + IANA registry): 1008 policy violation, 1011 server error,
# 1012 service restart, 1013 try again later.
WS_CLOSE = {
    ErrorCode.INVALID_ARGUMENT: 1008,
    ErrorCode.NOT_FOUND: 1008,
    ErrorCode.RESOURCE_EXHAUSTED: 1013,
    ErrorCode.DEADLINE_EXCEEDED: 1000,
    ErrorCode.CANCELLED: 1000,
    ErrorCode.UNAVAILABLE: 1012,
    ErrorCode.INTERNAL: 1011,
    "UNAUTHENTICATED": 1008,
    "PERMISSION_DENIED": 1008,
    "ALREADY_EXISTS": 1008,
}
WS_UNSUPPORTED_DATA = 1003  # a binary frame


def code_name(code) -> str:
    return code if isinstance(code, str) else code.name


def http_status(code) -> int:
    return HTTP_STATUS.get(code, 500)


def grpc_status(code) -> grpc.StatusCode:
    return GRPC_STATUS.get(code, grpc.StatusCode.INTERNAL)


def ws_close_code(code) -> int:
    return WS_CLOSE.get(code, 1011)


def retry_after(e: ServiceError) -> float | None:
    return getattr(e, "retry_after", None)


def retry_after_header(e: Exception) -> str | None:
    """The Retry-After value (HTTP header and gRPC metadata alike): whole seconds, at least 1; None if none."""
    ra = getattr(e, "retry_after", None)
    return None if ra is None else str(max(1, math.ceil(ra)))


def grpc_trailers(e: Exception) -> tuple:
    ra = retry_after_header(e)
    return (("retry-after", ra),) if ra is not None else ()


def error_body(code, message: str, field: str | None = None) -> dict:
    """The one REST / WebSocket-handshake error body."""
    return {"error": {"code": code_name(code), "message": message, "field": field}}


def error_json(e: ServiceError) -> bytes:
    return json.dumps(error_body(e.code, e.message, e.field)).encode()


def _json_error(status: int, code: str, message: str, field: str | None) -> tuple[dict, dict]:
    body = json.dumps(error_body(code, message, field)).encode()
    start = {"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         (b"connection", b"close")]}
    return start, {"type": "http.response.body", "body": body}


async def send_json_error(send: Send, status: int, code: str, message: str, field: str | None = None,
                          headers: list[tuple[bytes, bytes]] | None = None) -> None:
    start, body = _json_error(status, code, message, field)
    start["headers"] += headers or []
    await send(start)
    await send(body)
