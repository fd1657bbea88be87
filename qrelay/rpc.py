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
from google.protobuf.message import DecodeError

from qrelay.errors import InvalidArgument, QRelayError, error_for_code, exception_leaves

log = structlog.get_logger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def status_code(code: int) -> grpc.StatusCode:
    """grpc.StatusCode for a google.rpc.Code number."""
    for sc in grpc.StatusCode:
        if sc.value[0] == code:
            return sc
    return grpc.StatusCode.UNKNOWN


#: Longest status message sent: gRPC carries it in a trailer, and trailers beyond
#: the peer's metadata limit (16 KiB by default) turn the status into a transport
#: error; a client-chosen value (an id, a name) echoed in full must not do that.
MAX_STATUS_MESSAGE = 2000


def capped(text: str, limit: int = MAX_STATUS_MESSAGE) -> str:
    """`text` cut to `limit` characters, saying how much was cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def _qrelay_error(exc: BaseException) -> QRelayError | None:
    """The qrelay error an exception (or a task group's exceptions) stands for."""
    for leaf in exception_leaves(exc):
        if isinstance(leaf, QRelayError):
            return leaf
    return None


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> None:
    error = _qrelay_error(exc)
    if error is not None:
        await context.abort(status_code(error.code), capped(error.message))
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


# ----------------------------------------------------------------- undecodable requests


class _Undecodable:
    """What a request that is not valid protobuf deserializes to: the reason."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _decode_reason(exc: Exception) -> str:
    text = str(exc)
    # "Error parsing message with type 'qrelay.v1.X': Wire format was corrupt"
    _, sep, tail = text.partition("': ")
    return tail if sep and tail else text


class _Refused:
    """What a decoded request that `DecodeGuard(check=...)` refused deserializes to."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


#: A request check: why a decoded request is refused (INVALID_ARGUMENT), or None.
RequestCheck = Callable[[Any], "str | None"]


def _guarded(
    deserializer: Callable[[bytes], Any] | None, check: RequestCheck | None = None
) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(raw: bytes) -> Any:
        try:
            request = deserializer(raw)
        except (DecodeError, RecursionError, UnicodeDecodeError) as exc:
            return _Undecodable(_decode_reason(exc))
        # A request without a single zero byte holds no NUL character: most small
        # requests (ids, names) skip the walk over their fields.
        if check is not None and b"\x00" in raw:
            try:
                problem = check(request)
            except RecursionError:
                problem = "the request is nested too deeply to be checked"
            if problem is not None:
                return _Refused(capped(problem, 500))
        return request

    return deserialize


def _invalid(method: str, request: _Undecodable | _Refused) -> InvalidArgument:
    if isinstance(request, _Refused):
        return InvalidArgument(request.message)
    return InvalidArgument(
        capped(f"the request is not a valid {method} message: {request.reason}", 500)
    )


_BAD = (_Undecodable, _Refused)


async def _checked(requests: AsyncIterator[Any], method: str) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, _BAD):
            raise _invalid(method, request)  # the servicer's @grpc_errors answers it
        yield request


async def _outcome(result: Any) -> Any:
    """A behaviour's return value, whether it was a coroutine or a plain function."""
    return await result if inspect.isawaitable(result) else result


async def _items(result: Any) -> AsyncIterator[Any]:
    """A streaming behaviour's responses: an async generator, a generator, or none
    (a coroutine that wrote them with context.write)."""
    if inspect.isasyncgen(result):
        async for item in result:
            yield item
    elif inspect.isawaitable(result):
        await result
    elif result is not None:
        for item in result:
            yield item


class DecodeGuard(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Answer INVALID_ARGUMENT, not UNKNOWN "Unexpected DecodeError", to a request that
    is not valid protobuf (garbage bytes, bad UTF-8 in a string, nesting deeper than
    the decoder allows). gRPC decodes requests before any servicer code runs, so the
    deserializers are wrapped: a bad unary request is refused before the servicer is
    called; a bad message on a request stream raises InvalidArgument where the
    servicer reads it.

    `check` (the broker's NUL check) also refuses decoded requests of unary
    methods with INVALID_ARGUMENT and its message, before the servicer runs.
    Messages on request streams are the servicer's to check, since a stream
    may answer one bad item without ending (RunStream)."""

    def __init__(self, check: RequestCheck | None = None) -> None:
        self.check = check

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = str(handler_call_details.method).rsplit("/", 1)[-1]
        streamed = handler.stream_unary is not None or handler.stream_stream is not None
        deserializer = _guarded(handler.request_deserializer, None if streamed else self.check)
        serializer = handler.response_serializer
        if handler.unary_unary is not None:
            unary_unary = handler.unary_unary

            async def unary(request: Any, context: Any) -> Any:
                if isinstance(request, _BAD):
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT, _invalid(method, request).message
                    )
                return await _outcome(unary_unary(request, context))

            return grpc.unary_unary_rpc_method_handler(unary, deserializer, serializer)
        if handler.unary_stream is not None:
            unary_stream = handler.unary_stream

            async def server_stream(request: Any, context: Any) -> AsyncIterator[Any]:
                if isinstance(request, _BAD):
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT, _invalid(method, request).message
                    )
                async for item in _items(unary_stream(request, context)):
                    yield item

            return grpc.unary_stream_rpc_method_handler(server_stream, deserializer, serializer)
        if handler.stream_unary is not None:
            stream_unary = handler.stream_unary

            async def client_stream(requests: AsyncIterator[Any], context: Any) -> Any:
                return await _outcome(stream_unary(_checked(requests, method), context))

            return grpc.stream_unary_rpc_method_handler(client_stream, deserializer, serializer)
        stream_stream = handler.stream_stream

        async def bidi(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
            async for item in _items(stream_stream(_checked(requests, method), context)):
                yield item

        return grpc.stream_stream_rpc_method_handler(bidi, deserializer, serializer)
