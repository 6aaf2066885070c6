"""API errors shared by the controller, the clients and the CLI.

Each error carries a Kubernetes-style ``reason`` and an HTTP-like ``code`` so that the
CLI can print ``Error from server (NotFound): ...`` the way ``oc`` does, and a gRPC
status code so that the error crosses the wire unchanged (see ``vmferry.client``).
"""

from __future__ import annotations

import grpc


class ApiError(Exception):
    """Base class: ``reason`` (e.g. ``NotFound``), ``code`` (HTTP-like) and a message."""

    reason = "InternalError"
    code = 500
    grpc_code = grpc.StatusCode.INTERNAL
    # The server said so (``vmferry.client`` sets it on what the API answered): the CLI
    # prints ``Error from server (Reason): ...`` only for those, ``error: ...`` otherwise.
    from_server = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class BadRequest(ApiError):
    reason, code, grpc_code = "BadRequest", 400, grpc.StatusCode.INVALID_ARGUMENT


class Invalid(ApiError):
    """A manifest or patch failed validation; the message names the field path."""

    reason, code, grpc_code = "Invalid", 422, grpc.StatusCode.INVALID_ARGUMENT


class RequestEntityTooLarge(ApiError):
    """The request body is larger than the API receives (``limits.MAX_REQUEST_BYTES``)."""

    reason, code, grpc_code = "RequestEntityTooLarge", 413, grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthorized(ApiError):
    reason, code, grpc_code = "Unauthorized", 401, grpc.StatusCode.UNAUTHENTICATED


class Forbidden(ApiError):
    reason, code, grpc_code = "Forbidden", 403, grpc.StatusCode.PERMISSION_DENIED


class NotFound(ApiError):
    reason, code, grpc_code = "NotFound", 404, grpc.StatusCode.NOT_FOUND


class AlreadyExists(ApiError):
    reason, code, grpc_code = "AlreadyExists", 409, grpc.StatusCode.ALREADY_EXISTS


class Conflict(ApiError):
    """Optimistic-concurrency failure: the object's resourceVersion moved on."""

    reason, code, grpc_code = "Conflict", 409, grpc.StatusCode.ABORTED


class Gone(ApiError):
    """A watch asked for a resourceVersion older than the retained history: relist."""

    reason, code, grpc_code = "Expired", 410, grpc.StatusCode.OUT_OF_RANGE


class Unavailable(ApiError):
    reason, code, grpc_code = "ServiceUnavailable", 503, grpc.StatusCode.UNAVAILABLE


ERRORS_BY_REASON: dict[str, type[ApiError]] = {
    cls.reason: cls
    for cls in (
        ApiError,
        BadRequest,
        Invalid,
        RequestEntityTooLarge,
        Unauthorized,
        Forbidden,
        NotFound,
        AlreadyExists,
        Conflict,
        Gone,
        Unavailable,
    )
}


def error_from_reason(reason: str, message: str) -> ApiError:
    """Rebuild an ApiError from the reason/message pair that crossed the wire."""
    return ERRORS_BY_REASON.get(reason, ApiError)(message)
