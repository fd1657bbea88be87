"""Running a broker: store, scheduler, reapers and the gRPC server, with graceful shutdown.

`Broker` builds every part itself and hands each what it needs: the
programs' hooks go to `Jobs` and the scheduler as constructor arguments, and
a store that replicas share (`store.replicas()`) adds the replica fan-out.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from qrelay._proto.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    backends_pb2,
    backends_pb2_grpc,
    executor_pb2,
    executor_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    programs_pb2,
    programs_pb2_grpc,
    sessions_pb2,
    sessions_pb2_grpc,
)
from qrelay.broker import validation
from qrelay.broker.admin import AdminServicer
from qrelay.broker.auth import AuthInterceptor
from qrelay.broker.events import EventHub
from qrelay.broker.fanout import ReplicaFanout
from qrelay.broker.identity import Identity, load_server_key
from qrelay.broker.jobs import Backends, Jobs
from qrelay.broker.leases import LeaseReaper
from qrelay.broker.metrics import BrokerMetrics
from qrelay.broker.programs import Programs
from qrelay.broker.scheduler import RemoteExecutors, Scheduler
from qrelay.broker.service import (
    BackendServicer,
    ExecutorServicer,
    JobServicer,
    ProgramServicer,
    SessionServicer,
    max_message_bytes,
)
from qrelay.broker.sessions import Sessions
from qrelay.broker.settings import BrokerSettings
from qrelay.broker.store import open_store
from qrelay.broker.streams import RunStreams
from qrelay.errors import FailedPrecondition
from qrelay.rpc import DecodeGuard
from qrelay.tls import server_credentials

log = structlog.get_logger(__name__)

SERVICE_NAMES = (
    jobs_pb2.DESCRIPTOR.services_by_name["JobService"].full_name,
    backends_pb2.DESCRIPTOR.services_by_name["BackendService"].full_name,
    executor_pb2.DESCRIPTOR.services_by_name["ExecutorService"].full_name,
    programs_pb2.DESCRIPTOR.services_by_name["ProgramService"].full_name,
    sessions_pb2.DESCRIPTOR.services_by_name["SessionService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
)
METRICS_REFRESH_S = 2.0
# How long start() waits for the replica fan-out to listen before serving anyway.
FANOUT_CONNECT_S = 10.0


class Broker:
    """A running broker; built and torn down by `running_broker`."""

    def __init__(self, settings: BrokerSettings) -> None:
        self.settings = settings
        self.broker_id = f"b-{uuid.uuid4().hex[:12]}"
        self.store = open_store(settings, origin=self.broker_id)
        self.hub = EventHub()
        self.metrics = BrokerMetrics()
        self.programs = Programs(self.store, settings)
        # Replicas sharing the store hear each other through the fan-out, which
        # keeps the scheduler's view of the executors connected to the others.
        replicas = self.store.replicas()
        remote = None if replicas is None else RemoteExecutors()
        self.scheduler = Scheduler(
            self.store,
            self.hub,
            settings,
            self.metrics,
            program_resolver=self.programs.bundle,
            remote=remote,
        )
        self.reaper = LeaseReaper(self.store, self.hub, self.scheduler, settings)
        # Who may call what (AuthInterceptor); with SQLite and no key configured,
        # load_server_key makes identity.key beside the database.
        self.identity = Identity(
            self.store,
            load_server_key(settings),
            default_tenant=settings.default_tenant,
            static_tokens=settings.tokens,
            executor_token=settings.executor_token,
        )
        self.jobs = Jobs(
            self.store, self.hub, self.scheduler, settings, program_check=self.programs.check_job
        )
        self.backends = Backends(self.store, self.scheduler)
        self.sessions = Sessions(self.store, self.scheduler, self.jobs, settings)
        self.fanout = (
            None
            if replicas is None or remote is None
            else ReplicaFanout(
                replicas,
                remote,
                self.hub,
                self.scheduler,
                self.broker_id,
                settings.replica_sync_interval_s,
            )
        )
        self.health = health.aio.HealthServicer()
        self.address = ""
        # Where executors connect: `address`, or the mutual-TLS executor port.
        self.executor_address = ""
        self._server: grpc.aio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = False
        # What a health Check without a token is told (AuthInterceptor).
        self.serving = False

    async def start(self) -> None:
        await self.store.open()
        if self.identity.key is None:
            log.warning(
                "identity.no_key",
                hint="set QRELAY_IDENTITY_KEY_FILE (the same on every replica) to use "
                "tokens from the store; file tokens still work",
            )
        renewed = await self.store.renew_running_leases(self.settings.lease_ttl_s)
        await self.scheduler.load()
        if self.fanout is not None:
            self._spawn(self.fanout.run())
            try:
                async with asyncio.timeout(FANOUT_CONNECT_S):
                    await self.fanout.connected.wait()
            except TimeoutError:
                log.warning("fanout.not_listening", waited_s=FANOUT_CONNECT_S)
        limit = max_message_bytes(self.settings)
        server = grpc.aio.server(
            # Authentication first: a refused call's request is never read.
            interceptors=[
                AuthInterceptor(self.identity, lambda: self.serving),
                DecodeGuard(check=validation.nul_problem),
            ],
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 5000),
                # A second broker on a busy port must fail, not share it at random.
                ("grpc.so_reuseport", 0),
            ],
        )
        streams = RunStreams(self.jobs, self.settings.max_stream_jobs)
        jobs_pb2_grpc.add_JobServiceServicer_to_server(JobServicer(self.jobs, streams), server)
        backends_pb2_grpc.add_BackendServiceServicer_to_server(
            BackendServicer(self.backends), server
        )
        executor_pb2_grpc.add_ExecutorServiceServicer_to_server(
            ExecutorServicer(self.scheduler, self.settings, self.broker_id), server
        )
        programs_pb2_grpc.add_ProgramServiceServicer_to_server(
            ProgramServicer(self.programs), server
        )
        sessions_pb2_grpc.add_SessionServiceServicer_to_server(
            SessionServicer(self.sessions), server
        )
        admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(self.identity), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        self.address = _bind(server, self.settings.listen, self._credentials(executors=False))
        self.executor_address = self.address
        if self.settings.executor_listen is not None:
            self.executor_address = _bind(
                server, self.settings.executor_listen, self._credentials(executors=True)
            )
        await server.start()
        self._server = server
        self._spawn(self.scheduler.run())
        self._spawn(self.reaper.run())
        self._spawn(self.sessions.run())
        if self.settings.metrics_port:
            endpoint = self.metrics.serve(
                self.settings.metrics_bind_host,
                self.settings.metrics_port,
                self.settings.metrics_token,
            )
            log.info(
                "metrics.listening", url=endpoint.url, token=self.settings.metrics_token is not None
            )
            self._spawn(self._refresh_metrics())
        for name in (*SERVICE_NAMES, ""):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.serving = True
        self.scheduler.wake()
        log.info(
            "broker.started",
            address=self.address,
            executor_address=self.executor_address,
            tls=self.settings.tls,
            mtls=self.settings.tls_client_ca is not None,
            broker_id=self.broker_id,
            db=self.store.describe(),
            leases_renewed=renewed,
        )

    def _credentials(self, *, executors: bool) -> grpc.ServerCredentials | None:
        """TLS credentials of a port (None: plaintext); see qrelay.tls for the mTLS design.

        With a client CA, the executor port always requires a client
        certificate; the main port requires one only when there is no
        executor port (then everyone, clients too, presents one).
        """
        s = self.settings
        if s.tls_cert is None or s.tls_key is None:
            return None
        require = s.tls_client_ca is not None and (executors or s.executor_listen is None)
        return server_credentials(
            s.tls_cert, s.tls_key, s.tls_client_ca, require_client_cert=require
        )

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        task.add_done_callback(self._task_done)
        self._tasks.append(task)

    @staticmethod
    def _task_done(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("broker.task_failed", task=task.get_name(), exc_info=task.exception())

    async def _refresh_metrics(self) -> None:
        while True:
            await self.metrics.refresh(self.store)
            await asyncio.sleep(METRICS_REFRESH_S)

    async def shutdown(self) -> None:
        """NOT_SERVING, end long streams, drain calls (grace), stop tasks, close the store."""
        if self._stopped:
            return
        self._stopped = True
        self.serving = False
        await self.health.enter_graceful_shutdown()
        # Long-lived streams never end on their own: ask them to, so that the
        # grace period is spent on unary calls in flight.
        await self.scheduler.close_all()
        self.hub.close()
        if self._server is not None:
            await self._server.stop(self.settings.shutdown_grace_s)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        await self.scheduler.drain()
        self.metrics.stop()
        if self.fanout is not None:
            await self.fanout.withdraw()
        await self.store.close()
        log.info("broker.stopped", broker_id=self.broker_id)


def _bind(server: grpc.aio.Server, listen: str, credentials: grpc.ServerCredentials | None) -> str:
    """Add a port for `listen` (TLS with `credentials`); the address to dial it by."""
    try:
        if credentials is None:
            port = server.add_insecure_port(listen)
        else:
            port = server.add_secure_port(listen, credentials)
    except RuntimeError as exc:  # grpc says only "Failed to bind to address ..."
        raise FailedPrecondition(
            f"cannot listen on {listen}: address in use (another broker or "
            f"`qrelay dev` is running there?) or not available: {exc}"
        ) from None
    host = listen.rsplit(":", 1)[0]
    if host in ("", "0.0.0.0", "[::]", "::"):
        host = "127.0.0.1"
    return f"{host}:{port}"


@asynccontextmanager
async def running_broker(settings: BrokerSettings) -> AsyncIterator[Broker]:
    """A started broker, shut down gracefully on exit."""
    broker = Broker(settings)
    try:
        await broker.start()
        yield broker
    finally:
        await broker.shutdown()
