"""One error type with a status code, mapped once to the wire and once to client exceptions.

Codes follow TF Serving's HTTP mapping of gRPC status codes, so that people who know TF Serving
read them the same way. ``wire_error`` is the one mapping from an exception to the code and message
a reply carries (broker and worker both answer through it, via ``protocol.exception_reply``);
``error_from_code`` is the one mapping back, in the client.
"""
from __future__ import annotations

from typing import Any, Iterable

OK = 200
INVALID_ARGUMENT = 400
PERMISSION_DENIED = 403
NOT_FOUND = 404
RESOURCE_EXHAUSTED = 429
INTERNAL = 500
UNAVAILABLE = 503
DEADLINE_EXCEEDED = 504

CODE_NAMES: dict[int, str] = {
    OK: "OK",
    INVALID_ARGUMENT: "INVALID_ARGUMENT",
    PERMISSION_DENIED: "PERMISSION_DENIED",
    NOT_FOUND: "NOT_FOUND",
    RESOURCE_EXHAUSTED: "RESOURCE_EXHAUSTED",
    INTERNAL: "INTERNAL",
    UNAVAILABLE: "UNAVAILABLE",
    DEADLINE_EXCEEDED: "DEADLINE_EXCEEDED",
}


class ConfigError(ValueError):
    """A setting, config file or model the server refuses before it serves (``sgserve start`` exits
    2, process.EXIT_CONFIG_ERROR), or a config reload it keeps the running config over. The message
    says what to change. Never a wire reply: requests get ServeErrors."""


class ServeError(Exception):
    """An error that crosses process boundaries as ``code + message``."""

    code: int = INTERNAL

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message

    @property
    def retryable(self) -> bool:
        """True for "overloaded or briefly unavailable, retry later"; False for real errors."""
        return self.code in (RESOURCE_EXHAUSTED, UNAVAILABLE)

    def __str__(self) -> str:
        return f"{self.code} {CODE_NAMES.get(self.code, '?')}: {self.message}"


class InvalidArgument(ServeError):
    code = INVALID_ARGUMENT


class PermissionDenied(ServeError):
    """An admin command from a client the server does not trust with it (sgserve/auth.py)."""

    code = PERMISSION_DENIED


class NotFound(ServeError):
    code = NOT_FOUND


class ResourceExhausted(ServeError):
    code = RESOURCE_EXHAUSTED


class Internal(ServeError):
    code = INTERNAL


class Unavailable(ServeError):
    code = UNAVAILABLE


class DeadlineExceeded(ServeError):
    code = DEADLINE_EXCEEDED


_BY_CODE: dict[int, type[ServeError]] = {
    cls.code: cls
    for cls in (InvalidArgument, PermissionDenied, NotFound, ResourceExhausted, Internal, Unavailable, DeadlineExceeded)
}


def wire_error(exc: BaseException, context: str = "") -> tuple[int, str]:
    """(code, message) that answers a request which raised ``exc``.

    A ServeError carries its own; anything else is a bug on our side: 500, naming the exception so
    that the client's report leads to it. ``context`` says where ("internal error in the broker: ").
    """
    if isinstance(exc, ServeError):
        return exc.code, exc.message
    return INTERNAL, f"{context}{type(exc).__name__}: {exc}"


def as_serve_error(exc: BaseException, context: str = "") -> ServeError:
    """``exc`` as the ServeError a request is answered with (see wire_error)."""
    if isinstance(exc, ServeError):
        return exc
    return Internal(wire_error(exc, context)[1])


def error_from_code(code: int, message: str) -> ServeError:
    """The typed exception for a status code received on the wire."""
    cls = _BY_CODE.get(code)
    if cls is None:
        return ServeError(message, code)
    return cls(message)


def names(items: Iterable[Any]) -> str:
    """What exists, for an error message: sorted, comma-separated, "(none)" when empty."""
    return ", ".join(sorted(str(k) for k in items)) or "(none)"
