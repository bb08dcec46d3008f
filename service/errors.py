"""Domain errors. One place (api/errors.py) maps them to HTTP and gRPC status codes."""

from __future__ import annotations

from .messages import ErrorCode


class ServiceError(Exception):
    code = ErrorCode.INTERNAL

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidArgument(ServiceError):
    code = ErrorCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = ErrorCode.NOT_FOUND


class QueueFull(ServiceError):
    code = ErrorCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(ServiceError):
    code = ErrorCode.DEADLINE_EXCEEDED


class Cancelled(ServiceError):
    code = ErrorCode.CANCELLED


class Unavailable(ServiceError):
    code = ErrorCode.UNAVAILABLE


BY_CODE = {c.code: c for c in (InvalidArgument, NotFound, QueueFull, DeadlineExceeded, Cancelled, Unavailable)}


def from_code(code: ErrorCode, message: str) -> ServiceError:
    return BY_CODE.get(code, ServiceError)(message)
