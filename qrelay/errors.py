"""qrelay's exception hierarchy, one class per gRPC status code.

Logic raises these and never imports grpc; `qrelay.rpc` turns them into a
status at the servicer edge, and the client SDK turns a status back into the
same class, so `except qrelay.errors.NotFound` works on both sides of the wire.
Codes are google.rpc.Code numbers (equal to grpc.StatusCode values).
"""

from __future__ import annotations

from typing import ClassVar


class QRelayError(Exception):
    """Base class; `code` is the google.rpc.Code the error travels as."""

    code: ClassVar[int] = 2  # UNKNOWN
    code_name: ClassVar[str] = "UNKNOWN"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class Cancelled(QRelayError):
    code, code_name = 1, "CANCELLED"


class InvalidArgument(QRelayError, ValueError):
    """Bad input. Also a `ValueError`, which is what Qiskit's primitives raise for it,
    so `except ValueError` written for Qiskit keeps working with qrelay."""

    code, code_name = 3, "INVALID_ARGUMENT"


class InvalidType(InvalidArgument, TypeError):
    """Bad input of the wrong type (non-integer shots): Qiskit raises `TypeError` there.

    It travels as INVALID_ARGUMENT like any bad input; the SDK raises it before sending.
    """


def invalid_argument(exc: BaseException, prefix: str = "") -> InvalidArgument:
    """The qrelay error for a ValueError/TypeError Qiskit raised, its message kept."""
    cls = InvalidType if isinstance(exc, TypeError) else InvalidArgument
    return cls(f"{prefix}{exc}")


class DeadlineExceeded(QRelayError):
    code, code_name = 4, "DEADLINE_EXCEEDED"


class NotFound(QRelayError):
    code, code_name = 5, "NOT_FOUND"


class AlreadyExists(QRelayError):
    code, code_name = 6, "ALREADY_EXISTS"


class PermissionDenied(QRelayError):
    code, code_name = 7, "PERMISSION_DENIED"


class ResourceExhausted(QRelayError):
    code, code_name = 8, "RESOURCE_EXHAUSTED"


class QuotaExceeded(ResourceExhausted):
    """A tenant's quota refused the request; names the quota, its limit and the use."""

    def __init__(self, message: str, *, tenant: str, quota: str, limit: float, used: float) -> None:
        super().__init__(message)
        self.tenant = tenant
        self.quota = quota
        self.limit = limit
        self.used = used


class FailedPrecondition(QRelayError):
    code, code_name = 9, "FAILED_PRECONDITION"


class Aborted(QRelayError):
    code, code_name = 10, "ABORTED"


class Unimplemented(QRelayError):
    code, code_name = 12, "UNIMPLEMENTED"


class Internal(QRelayError):
    code, code_name = 13, "INTERNAL"


class Unavailable(QRelayError):
    code, code_name = 14, "UNAVAILABLE"


class Unauthenticated(QRelayError):
    code, code_name = 16, "UNAUTHENTICATED"


_BY_CODE: dict[int, type[QRelayError]] = {
    cls.code: cls
    for cls in (
        Cancelled,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        Internal,
        Unavailable,
        Unauthenticated,
    )
}


def error_for_code(code: int, message: str) -> QRelayError:
    """The exception for a google.rpc.Code number (QRelayError for UNKNOWN and others)."""
    return _BY_CODE.get(code, QRelayError)(message)


def exception_leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, or [exc] itself.

    Task groups wrap what their tasks raised; callers that answer with one
    status or one log line look at the leaves.
    """
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in exception_leaves(sub)]
    return [exc]
