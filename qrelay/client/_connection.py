"""One gRPC channel to a broker: stubs, credentials, retries and error mapping.

Every call the SDK makes goes through `Connection.unary` or `Connection.watch`,
so the bearer token, the per-call deadline, the UNAVAILABLE retry policy and
the grpc-status → `qrelay.errors` translation live in exactly one place.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import grpc

from qrelay._proto.v1 import (
    backends_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    programs_pb2_grpc,
    sessions_pb2_grpc,
    types_pb2,
)
from qrelay.client._log import get_logger
from qrelay.client.accounts import resolve_account
from qrelay.errors import InvalidArgument, QRelayError, Unavailable
from qrelay.rpc import error_from_rpc
from qrelay.tls import (
    ClientTLS,
    HandshakeFailed,
    client_tls,
    explain_failure,
    secure_channel,
    split_scheme,
)

log = get_logger(__name__)

Resp = TypeVar("Resp")

_MAX_MESSAGE_BYTES = 128 * 1024 * 1024

#: Channel options: large messages (results of big sweeps), fast reconnects
#: after a dropped connection (the defaults back off for up to two minutes),
#: and keepalive at the server's default minimum interval so that a silently
#: vanished broker is noticed on a long Watch without provoking GOAWAY.
_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 300_000),
    ("grpc.keepalive_timeout_ms", 20_000),
]


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter for calls that failed with UNAVAILABLE.

    Only transport-level unavailability is retried: every other status is an
    answer. Submit is safe to retry because each run carries one idempotency
    key for all its attempts.
    """

    max_attempts: int = 6
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    multiplier: float = 2.0

    def backoff(self, attempt: int) -> float:
        """Sleep before retry number `attempt` (1-based): uniform in [0, capped exponential]."""
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
        return random.uniform(0.0, ceiling)


#: Watch stream failures after which the SDK reconnects and resumes.
_RESUMABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED}
)


def retryable(error: QRelayError) -> bool:
    """True for UNAVAILABLE, except a TLS failure: a certificate is not trusted on a retry."""
    return isinstance(error, Unavailable) and not isinstance(error, HandshakeFailed)


def is_resumable(exc: grpc.RpcError) -> bool:
    """True for stream failures caused by the connection rather than by the request."""
    code = exc.code() if hasattr(exc, "code") else None
    return code in _RESUMABLE


class Connection:
    """A grpc.aio channel plus the stubs of every qrelay service.

    Must be created on the event loop that will use it (grpc.aio channels
    belong to one loop).
    """

    def __init__(
        self,
        address: str,
        token: str | None,
        *,
        timeout: float,
        retry: RetryPolicy,
        tls: ClientTLS | None = None,
    ) -> None:
        target, _ = split_scheme(address)
        if not target or ":" not in target:
            raise InvalidArgument(f"broker address must be 'host:port', got {address!r}")
        self.address = target
        self.tls = tls
        self.timeout = timeout
        self.retry = retry
        self.metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self.channel = secure_channel(target, tls, _CHANNEL_OPTIONS)
        self.jobs = jobs_pb2_grpc.JobServiceStub(self.channel)
        self.backends = backends_pb2_grpc.BackendServiceStub(self.channel)
        self.programs = programs_pb2_grpc.ProgramServiceStub(self.channel)
        self.sessions = sessions_pb2_grpc.SessionServiceStub(self.channel)
        self._closed = False

    @classmethod
    def to(
        cls,
        address: str | None,
        token: str | None,
        *,
        name: str | None = None,
        timeout: float,
        retry: RetryPolicy | None = None,
        tls: bool | None = None,
        tls_ca: str | os.PathLike[str] | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        tls_server_name: str | None = None,
    ) -> Connection:
        """A connection to `address` (else the account `name`, QRELAY_BROKER or the saved
        default) with its token and TLS from the arguments, the address's scheme or the
        QRELAY_TLS* environment: what the SDK and the CLI both dial."""
        account = resolve_account(address, token, name)
        target, transport = client_tls(
            account.broker,
            tls=tls,
            ca=tls_ca,
            cert=tls_cert,
            key=tls_key,
            server_name=tls_server_name,
            env=os.environ,
        )
        return cls(
            target, account.token, timeout=timeout, retry=retry or RetryPolicy(), tls=transport
        )

    async def unary(
        self,
        method: Callable[..., Awaitable[Resp]],
        request: Any,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - a gRPC deadline, not a wait
    ) -> Resp:
        """Call a unary method, retrying UNAVAILABLE; failures raise `qrelay.errors`."""
        budget = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + budget
        attempt = 0
        while True:
            attempt += 1
            remaining = deadline - time.monotonic()
            try:
                return await method(request, metadata=self.metadata, timeout=max(remaining, 0.001))
            except grpc.aio.AioRpcError as exc:
                error = self.error(exc)
                if not retryable(error):
                    raise error from None
                pause = self.retry.backoff(attempt)
                if attempt >= self.retry.max_attempts or time.monotonic() + pause >= deadline:
                    raise Unavailable(
                        f"broker at {self.address} unavailable after {attempt} attempts "
                        f"({budget:g} s budget): {error.message}"
                    ) from None
                log.debug(
                    "rpc.retried", address=self.address, attempt=attempt, pause_s=round(pause, 3)
                )
                await anyio.sleep(pause)

    def error(self, exc: grpc.RpcError) -> QRelayError:
        """The qrelay error of a failed call; a TLS handshake failure says what went wrong."""
        error = error_from_rpc(exc)
        if isinstance(error, Unavailable):
            explained = explain_failure(error.message, self.tls, self.address)
            if explained is not None:
                return HandshakeFailed(explained)
        return error

    def watch(self, job_id: str, after_seq: int) -> grpc.aio.UnaryStreamCall[Any, Any]:
        """Open a Watch stream (no deadline: a job may run for hours; keepalive guards it)."""
        request = jobs_pb2.WatchRequest(job_id=job_id, after_seq=after_seq)
        call: grpc.aio.UnaryStreamCall[jobs_pb2.WatchRequest, types_pb2.JobEvent] = self.jobs.Watch(
            request, metadata=self.metadata
        )
        return call

    def run(self, request: jobs_pb2.SubmitRequest) -> grpc.aio.UnaryStreamCall[Any, Any]:
        """Open a Run stream (submit + follow; no deadline, like `watch`)."""
        call: grpc.aio.UnaryStreamCall[jobs_pb2.SubmitRequest, types_pb2.JobEvent] = self.jobs.Run(
            request, metadata=self.metadata
        )
        return call

    async def close(self) -> None:
        """Close the channel, cancelling calls still in flight. Idempotent."""
        if self._closed:
            return
        self._closed = True
        await self.channel.close(grace=None)
