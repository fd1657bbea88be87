"""The one server interceptor that authenticates every call, from metadata alone.

gRPC hands a server interceptor the method name and the call's metadata
before any request message has been read. `AuthInterceptor` decides there:
a refused call gets a handler that answers UNAUTHENTICATED (or
PERMISSION_DENIED) without ever reading the request, so an unauthenticated
40 MiB message is never buffered, let alone parsed (HTTP/2 flow control
stops the sender at the stream window). An accepted call runs its real
handler with the caller's `Principal` in a context variable, which
servicers read with `caller()`; they never look at metadata themselves.

Health checks: load balancers and kubelet probes send no token. A health
Check without a valid token (on a broker that has tokens) is answered from
the interceptor with the server's overall status, again without reading the
request (whose service name it therefore ignores: every qrelay service
shares the server's status anyway); Watch needs a token. With a valid token,
or on an open dev broker, health is the standard service. Reflection needs a
valid token of any role once the broker has tokens.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextvars import ContextVar
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health_pb2

from qrelay.broker.audit import audit
from qrelay.broker.identity import Identity, Principal, Service
from qrelay.errors import QRelayError, Unauthenticated
from qrelay.rpc import capped, status_code

_principal: ContextVar[Principal | None] = ContextVar("qrelay_principal", default=None)


def caller() -> Principal:
    """The authenticated caller of the call being served (set by AuthInterceptor)."""
    principal = _principal.get()
    if principal is None:  # a servicer reached without the interceptor: a wiring bug
        raise Unauthenticated("call was not authenticated")
    return principal


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of the first `authorization: Bearer ...` entry, if any."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        raise Unauthenticated("authorization metadata must be 'Bearer <token>'")
    return None


def _refusal(error: QRelayError) -> grpc.RpcMethodHandler:
    """A handler that answers `error` and never reads a request message.

    A client-streaming handler whatever the method's real shape: the wire does
    not tell them apart, and only this shape lets gRPC leave the body unread
    (a unary handler's request is received in full before it is called).
    """
    code, message = status_code(error.code), capped(error.message)

    async def refuse(requests: AsyncIterator[Any], context: Any) -> None:
        await context.abort(code, message)

    return grpc.stream_unary_rpc_method_handler(refuse)


def _probe_answer(serving: Callable[[], bool]) -> grpc.RpcMethodHandler:
    """A health Check handler answering the server's overall status, request unread."""

    async def check(requests: AsyncIterator[Any], context: Any) -> health_pb2.HealthCheckResponse:
        status = health_pb2.HealthCheckResponse.SERVING
        if not serving():
            status = health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)

    return grpc.stream_unary_rpc_method_handler(
        check, response_serializer=health_pb2.HealthCheckResponse.SerializeToString
    )


def _enter(principal: Principal) -> None:
    """Make `principal` the caller of the call being served, in its own context
    (each call runs in a task of its own): servicers read it with `caller()`,
    and every log line of the call, audit lines included, names its user."""
    _principal.set(principal)
    if principal.user:
        structlog.contextvars.bind_contextvars(user=principal.user)


def _as(principal: Principal, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """`handler` with `principal` set as the caller while its behaviour runs."""
    deserializer, serializer = handler.request_deserializer, handler.response_serializer
    if handler.unary_unary is not None:
        unary_unary = handler.unary_unary

        async def unary(request: Any, context: Any) -> Any:
            _enter(principal)
            return await unary_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(unary, deserializer, serializer)
    if handler.unary_stream is not None:
        unary_stream = handler.unary_stream

        async def server_stream(request: Any, context: Any) -> AsyncIterator[Any]:
            _enter(principal)
            async for item in unary_stream(request, context):
                yield item

        return grpc.unary_stream_rpc_method_handler(server_stream, deserializer, serializer)
    if handler.stream_unary is not None:
        stream_unary = handler.stream_unary

        async def client_stream(requests: AsyncIterator[Any], context: Any) -> Any:
            _enter(principal)
            return await stream_unary(requests, context)

        return grpc.stream_unary_rpc_method_handler(client_stream, deserializer, serializer)
    stream_stream = handler.stream_stream

    async def bidi(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        _enter(principal)
        async for item in stream_stream(requests, context):
            yield item

    return grpc.stream_stream_rpc_method_handler(bidi, deserializer, serializer)


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Authenticate and authorize every call before its request is read (see module)."""

    def __init__(self, identity: Identity, serving: Callable[[], bool]) -> None:
        self.identity = identity
        # Whether the server is serving, for token-less health checks.
        self.serving = serving

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = str(handler_call_details.method)
        service = Service.of(method)
        if service is Service.HEALTH:
            return await self._health(continuation, handler_call_details, method)
        try:
            token = bearer_token(handler_call_details.invocation_metadata)
        except Unauthenticated as exc:
            audit("auth.failed", method=method, reason=exc.message)
            return _refusal(exc)
        try:
            principal = await self.identity.authenticate(token, service, method)
        except QRelayError as exc:  # refused, already audited; or the store is unavailable
            return _refusal(exc)
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return _as(principal, handler)

    async def _health(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
        method: str,
    ) -> grpc.RpcMethodHandler:
        """Probes are not audited: they come every few seconds, by design without a token."""
        try:
            token = bearer_token(handler_call_details.invocation_metadata)
            admitted = await self.identity.admits(token, Service.HEALTH)
        except QRelayError:
            admitted = False
        if admitted:
            return await continuation(handler_call_details)
        if method.endswith("/Check"):
            return _probe_answer(self.serving)
        return _refusal(Unauthenticated(f"{method} needs a bearer token; Check does not"))
