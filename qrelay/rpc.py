"""The one place where qrelay errors meet gRPC status codes.

Servicer methods are wrapped with `@grpc_errors`: a `QRelayError` becomes
`context.abort(code, message)`; anything else is logged with a correlation id
and answered INTERNAL without a stack trace. The client side uses
`error_from_rpc` to get the same exception classes back.
"""

from __future__ import annotations

import functools
import inspect
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar, cast

import grpc
import structlog

from qrelay.errors import QRelayError, error_for_code

log = structlog.get_logger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def status_code(code: int) -> grpc.StatusCode:
    """grpc.StatusCode for a google.rpc.Code number."""
    for sc in grpc.StatusCode:
        if sc.value[0] == code:
            return sc
    return grpc.StatusCode.UNKNOWN


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> None:
    if isinstance(exc, QRelayError):
        await context.abort(status_code(exc.code), exc.message)
    incident = uuid.uuid4().hex[:12]
    log.error("rpc.failed", incident=incident, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error (incident {incident})")


def grpc_errors(fn: F) -> F:
    """Map exceptions raised by a unary or server-streaming servicer method to statuses."""
    if inspect.isasyncgenfunction(fn):

        @functools.wraps(fn)
        async def stream_wrapper(self: Any, request: Any, context: Any) -> AsyncIterator[Any]:
            try:
                async for item in fn(self, request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - mapped to a status
                await _abort(context, exc)

        return cast(F, stream_wrapper)

    @functools.wraps(fn)
    async def unary_wrapper(self: Any, request: Any, context: Any) -> Any:
        try:
            return await cast(Callable[..., Awaitable[Any]], fn)(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status
            await _abort(context, exc)

    return cast(F, unary_wrapper)


def error_from_rpc(exc: grpc.RpcError) -> QRelayError:
    """The qrelay exception a failed call stands for."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return error_for_code(code.value[0], details or code.name)
