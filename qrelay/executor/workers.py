"""The control plane's side of the worker processes (see `_workerproc` for theirs).

`WorkerPool` starts the zygote, learns the backends from it, and runs each
primitive job in a worker process of its own: the job's bytes go down a
socket, progress and the encoded result come back, and the executor's event
loop only moves bytes. A job that is cancelled or outlives its backend's
maximum run time has its worker killed (by the zygote, its parent) and the
next job gets a freshly forked one; a worker that dies on its own (SIGKILL,
segfault, out of memory) fails only its job, with a message saying how it
ended. If the zygote itself dies it is started again.

This module never imports qiskit: the executor's process stays small and
its start-up and heartbeats never wait on it.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import contextlib
import itertools
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import structlog
from anyio.abc import SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from qrelay._proto.v1 import backends_pb2, types_pb2
from qrelay.errors import Aborted, DeadlineExceeded, Internal, error_for_code
from qrelay.executor import _workerproc as proc
from qrelay.executor._frames import ChannelClosed, FrameTooLarge, encode_frame, read_frame

log = structlog.get_logger(__name__)

__all__ = ["Progress", "WorkerPool", "WorkerPoolConfig", "default_worker_memory_bytes"]

# progress(stage, done, total) as a worker reports it.
Progress = Callable[[str, int, int], None]
# Jobs of remote devices (which only wait on their provider) one worker holds at once.
SHARED_JOBS_PER_WORKER = 64
# How long to wait for a dead worker's exit status before reporting without it.
_EXIT_STATUS_WAIT_S = 2.0


def default_worker_memory_bytes(workers: int) -> int:
    """Three quarters of the machine's memory shared by the workers, at least 4 GiB each."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0
    return max(int(total * 0.75) // max(workers, 1), 4 << 30)


@dataclass(frozen=True)
class WorkerPoolConfig:
    """What the workers load and the limits they run under (no secrets: it travels in env)."""

    backends: list[str]
    size: int
    backend_providers: list[str] = field(default_factory=list)
    optimization_level: int = 1
    transpile_cache_size: int = 256
    memory_limit_bytes: int = 0
    max_message_bytes: int = 256 << 20
    start_timeout_s: float = 120.0
    nice: int = 2
    executor_id: str = ""


@dataclass(eq=False)
class _Worker:
    worker_id: str
    pid: int
    stream: SocketStream
    zygote: _Zygote
    # False: one simulator job at a time, killed to cancel. True: many jobs of
    # remote devices, cancelled with CANCEL frames.
    shared: bool = False
    # request number -> where its frames go; closed when the worker's channel is.
    pending: dict[int, MemoryObjectSendStream[tuple[int, bytes]]] = field(default_factory=dict)
    send_lock: anyio.Lock = field(default_factory=anyio.Lock)
    closed: bool = False

    async def send(self, kind: int, request: int, body: bytes = b"") -> None:
        async with self.send_lock:
            await self.stream.send(encode_frame(kind, proc.REQUEST.pack(request) + body))


@dataclass(eq=False)
class _ZygoteProcess:
    """A started zygote: loop-independent, so a later pool may reuse it (see _WARM)."""

    popen: subprocess.Popen[bytes]
    control: socket.socket
    key: str
    pid: int = 0
    infos: list[backends_pb2.BackendInfo] = field(default_factory=list)
    shared: list[str] = field(default_factory=list)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self) -> None:
        """Hang up (it kills its workers and exits); SIGKILL if it lingers. Blocking."""
        with contextlib.suppress(OSError):
            self.control.close()
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


@dataclass(eq=False)
class _Zygote:
    """One pool's use of a zygote process: fork answers and exit reports."""

    process: _ZygoteProcess
    forks: dict[str, asyncio.Future[int]] = field(default_factory=dict)
    exits: dict[int, int] = field(default_factory=dict)
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    forked: set[int] = field(default_factory=set)
    closed: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def control(self) -> socket.socket:
        return self.process.control

    def send(self, **message: Any) -> None:
        self.control.send(json.dumps(message).encode())

    def notify_exit(self) -> None:
        """Wake everyone waiting for an exit report (each waits on the current event)."""
        woken, self.exited = self.exited, asyncio.Event()
        woken.set()


class _WarmZygotes:
    """Zygotes kept loaded for the life of this process, by what they loaded.

    An executor that stops hands its zygote back here and the next one with
    the same backends and settings starts in milliseconds instead of seconds
    (tests and embedded use start many). Zygotes are started from one
    long-lived thread, since PR_SET_PDEATHSIG fires when the *thread* that
    started the child ends; they die with this process.
    """

    KEEP = 4

    def __init__(self) -> None:
        self._idle: list[_ZygoteProcess] = []
        self._lock = threading.Lock()
        self.spawner = ThreadPoolExecutor(1, thread_name_prefix="qrelay-zygote-spawner")
        atexit.register(self.close)

    def take(self, key: str) -> _ZygoteProcess | None:
        with self._lock:
            for process in list(self._idle):
                if process.key == key:
                    self._idle.remove(process)
                    if process.alive():
                        return process
        return None

    def give(self, process: _ZygoteProcess) -> _ZygoteProcess | None:
        """Keep `process` warm; returns the one to stop instead (it, or the oldest)."""
        with self._lock:
            self._idle.append(process)
            return self._idle.pop(0) if len(self._idle) > self.KEEP else None

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for process in idle:
            process.stop()


_WARM = _WarmZygotes()


class WorkerPool:
    """Up to `size` jobs at once, each in its own worker process; async context manager."""

    def __init__(self, config: WorkerPoolConfig) -> None:
        self.config = config
        self._log = log.bind(executor_id=config.executor_id)
        self._capacity = anyio.Semaphore(config.size)
        self._idle: deque[_Worker] = deque()
        self._shared: list[_Worker] = []
        self._shared_lock = anyio.Lock()
        self._shared_backends: frozenset[str] = frozenset()
        self._requests = itertools.count(1)
        self._zygote: _Zygote | None = None
        self._zygote_lock = anyio.Lock()
        self._tg: anyio.abc.TaskGroup | None = None
        self.infos: list[backends_pb2.BackendInfo] = []
        self.workers_started = 0
        self.workers_lost = 0

    async def __aenter__(self) -> WorkerPool:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        try:
            zygote = await self._ensure_zygote()
            self.infos = list(zygote.process.infos)
            self._shared_backends = frozenset(zygote.process.shared)
            # Fork every worker now: a failure shows at start, not on the first job.
            for _ in range(self.config.size):
                self._idle.append(await self._fork(zygote))
        except BaseException:
            await self.__aexit__(*sys.exc_info())
            raise
        self._log.info(
            "workers.started",
            workers=self.config.size,
            zygote_pid=zygote.pid,
            memory_limit_mib=self.config.memory_limit_bytes >> 20,
        )
        return self

    async def __aexit__(self, *exc: Any) -> bool | None:
        with anyio.CancelScope(shield=True):
            for worker in [*self._idle, *self._shared]:
                await worker.stream.aclose()
            self._idle.clear()
            self._shared.clear()
            if self._zygote is not None:
                await self._release_zygote(self._zygote)
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        return await self._tg.__aexit__(*exc)

    # -- running jobs ------------------------------------------------------------

    @property
    def zygote_pid(self) -> int:
        """Pid of the process the workers are forked from (0 before it started)."""
        return self._zygote.pid if self._zygote is not None else 0

    async def run(
        self,
        spec: types_pb2.JobSpec,
        *,
        max_run_time_s: float,
        progress: Progress | None = None,
        on_worker: Callable[[int], None] | None = None,
    ) -> types_pb2.JobResult | types_pb2.JobError:
        """Run one Sampler/Estimator spec in a worker; its JobResult or JobError.

        Raises DeadlineExceeded past `max_run_time_s`, Aborted when the worker
        died under the job. A simulator's worker is killed on either and on
        cancellation; a shared (remote-device) worker is told to cancel the job.
        """
        if spec.backend in self._shared_backends:
            worker = await self._shared_worker()
            return await self._run_on(worker, spec, max_run_time_s, progress, on_worker)
        async with self._capacity:
            worker = await self._idle_worker()
            return await self._run_on(worker, spec, max_run_time_s, progress, on_worker)

    async def _idle_worker(self) -> _Worker:
        while self._idle:
            worker = self._idle.pop()
            if not worker.closed:
                return worker
            await self._discard(worker)  # died while idle
        return await self._fork(await self._ensure_zygote())

    async def _shared_worker(self) -> _Worker:
        async with self._shared_lock:  # jobs arriving together share the first fork
            self._shared = [w for w in self._shared if not w.closed]
            live = [w for w in self._shared if len(w.pending) < SHARED_JOBS_PER_WORKER]
            if live:
                return min(live, key=lambda w: len(w.pending))
            worker = await self._fork(await self._ensure_zygote(), shared=True)
            self._shared.append(worker)
            return worker

    async def _run_on(
        self,
        worker: _Worker,
        spec: types_pb2.JobSpec,
        max_run_time_s: float,
        progress: Progress | None,
        on_worker: Callable[[int], None] | None,
    ) -> types_pb2.JobResult | types_pb2.JobError:
        if on_worker is not None:
            on_worker(worker.pid)
        request = next(self._requests)
        sender, receiver = anyio.create_memory_object_stream[tuple[int, bytes]](math.inf)
        worker.pending[request] = sender
        answered = False
        try:
            with anyio.move_on_after(max_run_time_s):
                outcome = await self._exchange(worker, request, spec, receiver, progress)
                answered = True
                return outcome
            raise DeadlineExceeded(
                f"the job ran longer than the maximum run time of {max_run_time_s:g} s "
                f"for backend {spec.backend!r} (executor setting max_run_time_s) and "
                "was stopped"
            )
        finally:
            worker.pending.pop(request, None)
            sender.close()
            receiver.close()
            with anyio.CancelScope(shield=True):
                if worker.shared:
                    if not answered and not worker.closed:
                        with contextlib.suppress(anyio.BrokenResourceError, OSError):
                            await worker.send(proc.CANCEL, request)
                elif answered and not worker.closed:
                    self._idle.append(worker)
                else:
                    await self._discard(worker)

    async def _exchange(
        self,
        worker: _Worker,
        request: int,
        spec: types_pb2.JobSpec,
        frames: MemoryObjectReceiveStream[tuple[int, bytes]],
        progress: Progress | None,
    ) -> types_pb2.JobResult | types_pb2.JobError:
        try:
            await worker.send(proc.RUN, request, spec.SerializeToString())
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            raise Aborted(await self._death_notice(worker)) from None
        async for kind, payload in frames:
            if kind == proc.PROGRESS:
                if progress is not None:
                    report = json.loads(payload)
                    progress(str(report["stage"]), int(report["done"]), int(report["total"]))
            elif kind == proc.RESULT:
                return types_pb2.JobResult.FromString(payload)
            elif kind == proc.ERROR:
                return types_pb2.JobError.FromString(payload)
        raise Aborted(await self._death_notice(worker))

    async def _read(self, worker: _Worker) -> None:
        """Hand each frame from a worker to its request; close them all when it goes."""
        buffered = BufferedByteReceiveStream(worker.stream)
        try:
            while True:
                kind, payload = await read_frame(buffered, self.config.max_message_bytes)
                (request,) = proc.REQUEST.unpack_from(payload)
                target = worker.pending.get(request)
                if target is not None:
                    with contextlib.suppress(anyio.BrokenResourceError):
                        target.send_nowait((kind, payload[proc.REQUEST.size :]))
                # Buffered frames are read without yielding: let the heartbeats in.
                await anyio.lowlevel.checkpoint()
        except (ChannelClosed, FrameTooLarge, anyio.BrokenResourceError, OSError) as exc:
            if isinstance(exc, FrameTooLarge):
                self._log.error("worker.frame_too_large", worker_pid=worker.pid, reason=str(exc))
        except anyio.ClosedResourceError:
            pass  # we closed it: discarded or shutting down
        finally:
            worker.closed = True
            for target in worker.pending.values():
                target.close()
            if not worker.zygote.closed:
                with contextlib.suppress(OSError):
                    worker.zygote.send(op="kill", pid=worker.pid)

    async def _death_notice(self, worker: _Worker) -> str:
        """Why a worker's channel closed under a job, in words for the job's error."""
        self.workers_lost += 1
        zygote = worker.zygote
        with anyio.move_on_after(_EXIT_STATUS_WAIT_S):
            while worker.pid not in zygote.exits and not zygote.closed:
                await zygote.exited.wait()
        status = zygote.exits.get(worker.pid)
        if status is None:
            how = "its channel closed"
        elif status < 0:
            try:
                how = f"killed by {signal.Signals(-status).name}"
            except ValueError:
                how = f"killed by signal {-status}"
        else:
            how = f"exit status {status}"
        hint = ""
        if status == -signal.SIGKILL and self.config.memory_limit_bytes:
            hint = (
                "; a kill can mean the machine ran out of memory (the executor allows "
                f"{self.config.memory_limit_bytes >> 20} MiB per job)"
            )
        elif status == -signal.SIGSEGV:
            hint = "; the simulator crashed on this job"
        self._log.warning("worker.died", worker_pid=worker.pid, how=how)
        return (
            f"the worker process running this job died ({how}){hint}; the executor "
            "replaced it and goes on serving"
        )

    async def _discard(self, worker: _Worker) -> None:
        """Kill a worker (cancel, run-time limit, broken channel) and forget it."""
        zygote = worker.zygote
        if not zygote.closed:
            with contextlib.suppress(OSError):
                zygote.send(op="kill", pid=worker.pid)
        await worker.stream.aclose()
        self._log.info("worker.killed", worker_pid=worker.pid)

    # -- processes ---------------------------------------------------------------

    async def _ensure_zygote(self) -> _Zygote:
        async with self._zygote_lock:
            if self._zygote is not None and self._zygote.closed:
                await self._stop_zygote(self._zygote)  # died: reap it, start anew
            if self._zygote is None:
                process = _WARM.take(self._zygote_key())
                if process is None:
                    process = await self._start_zygote()
                self._zygote = _Zygote(process)
                assert self._tg is not None
                self._tg.start_soon(self._follow_zygote, self._zygote, name="worker zygote")
            return self._zygote

    def _zygote_key(self) -> str:
        """What a zygote loaded and how its workers run: equal keys are interchangeable."""
        return json.dumps(self._zygote_config(), sort_keys=True)

    def _zygote_config(self) -> dict[str, Any]:
        return {
            "parent_pid": os.getpid(),
            "backends": self.config.backends,
            "backend_providers": self.config.backend_providers,
            "optimization_level": self.config.optimization_level,
            "transpile_cache_size": self.config.transpile_cache_size,
            "memory_limit_bytes": self.config.memory_limit_bytes,
            "max_message_bytes": self.config.max_message_bytes,
            "nice": self.config.nice,
            "log_level": logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower(),
        }

    async def _start_zygote(self) -> _ZygoteProcess:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        config = {**self._zygote_config(), "control_fd": child_end.fileno()}
        env = dict(os.environ, **{proc.CONFIG_ENV: json.dumps(config)})
        # Secrets of the executor stay here: workers never talk to the broker.
        for name in list(env):
            if name.endswith("TOKEN") or name.endswith("TOKEN_FILE"):
                del env[name]
        command = [sys.executable, "-m", "qrelay.executor._workerproc"]

        def spawn() -> subprocess.Popen[bytes]:
            return subprocess.Popen(command, env=env, pass_fds=(child_end.fileno(),))

        try:
            popen = await asyncio.get_running_loop().run_in_executor(_WARM.spawner, spawn)
        except BaseException:
            parent_end.close()
            raise
        finally:
            child_end.close()
        parent_end.setblocking(False)
        process = _ZygoteProcess(popen, parent_end, self._zygote_key())
        try:
            with anyio.fail_after(self.config.start_timeout_s):
                message = await self._receive(process.control)
        except BaseException as exc:
            await anyio.to_thread.run_sync(process.stop)
            if isinstance(exc, TimeoutError):
                raise Internal(
                    f"worker processes did not start within {self.config.start_timeout_s:g} s"
                ) from None
            raise
        if message is None or message.get("op") != "ready":
            await anyio.to_thread.run_sync(process.stop)
            if message is None:
                raise Internal("worker processes failed to start: the zygote exited")
            raise error_for_code(int(message.get("code", 13)), str(message.get("message")))
        process.pid = int(message["pid"])
        process.shared = [str(name) for name in message.get("shared", [])]
        process.infos = [
            backends_pb2.BackendInfo.FromString(base64.b64decode(b)) for b in message["backends"]
        ]
        return process

    async def _receive(self, control: socket.socket) -> dict[str, Any] | None:
        loop = asyncio.get_running_loop()
        data = await loop.sock_recv(control, proc.CONTROL_PACKET)
        return json.loads(data) if data else None

    async def _follow_zygote(self, zygote: _Zygote) -> None:
        """Read fork answers and exit reports until the zygote goes away."""
        hung_up = False  # the zygote went away (not: this task was cancelled)
        try:
            while True:
                try:
                    message = await self._receive(zygote.control)
                except OSError:
                    message = None
                if message is None:
                    hung_up = True
                    break
                op = message.get("op")
                if op == "forked":
                    future = zygote.forks.pop(str(message["worker"]), None)
                    if future is not None and not future.done():
                        future.set_result(int(message["pid"]))
                elif op == "exited":
                    zygote.forked.discard(int(message["pid"]))
                    zygote.exits[int(message["pid"])] = int(message["status"])
                    if len(zygote.exits) > 1024:  # the oldest are long reported
                        zygote.exits.pop(next(iter(zygote.exits)))
                    zygote.notify_exit()
        finally:
            # Cancelled (the pool is closing): the zygote lives on, maybe warm
            # for the next pool. Hung up: it is gone for this pool too.
            zygote.closed = zygote.closed or hung_up
            zygote.notify_exit()
            for future in zygote.forks.values():
                if not future.done():
                    future.set_exception(Internal("the worker zygote exited"))
            if hung_up and not self._closing(zygote):
                self._log.warning("workers.zygote_exited", zygote_pid=zygote.pid)
                self._idle = deque(w for w in self._idle if w.zygote is not zygote)

    def _closing(self, zygote: _Zygote) -> bool:
        return self._zygote is not zygote

    async def _fork(self, zygote: _Zygote, shared: bool = False) -> _Worker:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        worker_id = uuid.uuid4().hex[:12]
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        zygote.forks[worker_id] = future
        try:
            socket.send_fds(
                zygote.control,
                [json.dumps({"op": "fork", "worker": worker_id, "shared": shared}).encode()],
                [child_end.fileno()],
            )
            with anyio.fail_after(self.config.start_timeout_s):
                pid = await future
        except BaseException:
            zygote.forks.pop(worker_id, None)
            parent_end.close()
            raise
        finally:
            child_end.close()
        stream = await SocketStream.from_socket(parent_end)
        zygote.forked.add(pid)
        self.workers_started += 1
        worker = _Worker(worker_id, pid, stream, zygote, shared=shared)
        assert self._tg is not None
        self._tg.start_soon(self._read, worker, name=f"worker {pid}")
        return worker

    async def _release_zygote(self, zygote: _Zygote) -> None:
        """Kill this pool's workers; keep a healthy zygote warm for the next pool."""
        self._zygote = None
        if zygote.closed or not zygote.process.alive():
            await anyio.to_thread.run_sync(zygote.process.stop)
            return
        for pid in zygote.forked:
            with contextlib.suppress(OSError):
                zygote.send(op="kill", pid=pid)
        surplus = _WARM.give(zygote.process)
        if surplus is not None:
            await anyio.to_thread.run_sync(surplus.stop)

    async def _stop_zygote(self, zygote: _Zygote) -> None:
        """Stop a zygote for good (it died, or this pool is done with it)."""
        if self._zygote is zygote:
            self._zygote = None
        await anyio.to_thread.run_sync(zygote.process.stop)
