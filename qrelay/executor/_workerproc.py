"""The processes where quantum work runs: a warm zygote and the workers it forks.

The executor's control plane (gRPC, heartbeats, scheduling) never runs a
circuit: Aer holds the interpreter lock for seconds and a hostile QPY can
allocate gigabytes, and neither may delay a heartbeat. So:

    executor (asyncio, gRPC)
      └─ zygote   `python -m qrelay.executor._workerproc`, started by fork+exec;
         │        imports qiskit and loads the backends (pass managers warm) once
         └─ worker one per slot, os.fork()ed by the zygote on request: ready at
                  once, holds its backends and transpile cache across jobs, runs
                  one job at a time; killed and re-forked on cancel or crash.

Forking is safe here because the zygote is single-threaded Python that never
started gRPC and never simulated (no OpenMP pool yet); gRPC lives only in the
executor, which starts the zygote by fork+exec. A worker is forked in
milliseconds, so replacing a killed one costs nothing a job would notice.

Channels:
- executor <-> zygote: a SOCK_SEQPACKET pair, one JSON object per packet.
  `fork` carries the worker's end of a fresh socketpair (SCM_RIGHTS);
  the zygote answers `forked`, reports `exited` with the status when it reaps
  a worker, and performs `kill` (it is the parent, so a pid it kills is never
  a recycled one).
- executor <-> worker: a stream socketpair with `_frames` frames, each
  naming its request: RUN (a JobSpec) answered by PROGRESS frames and then
  one RESULT or ERROR; CANCEL for a job on a shared (remote-device) worker.

Every worker dies with its zygote and the zygote with the executor
(PR_SET_PDEATHSIG), so no simulation outlives the process that wanted it.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import os
import resource
import select
import signal
import socket
import struct
import sys
import threading
import time
import traceback
import uuid
from typing import Any

# zygote -> executor ops: ready, failed, forked, exited; executor -> zygote: fork, kill.
CONFIG_ENV = "QRELAY_WORKER_CONFIG"
CONTROL_PACKET = 1 << 20
# Worker channel frames: each payload starts with the request's 8-byte number.
REQUEST = struct.Struct(">Q")
RUN = ord("J")  # executor -> worker: types_pb2.JobSpec
CANCEL = ord("C")  # executor -> worker: (nothing more)
PROGRESS = ord("p")  # worker -> executor: JSON {"stage", "done", "total"}
RESULT = ord("R")  # worker -> executor: types_pb2.JobResult
ERROR = ord("E")  # worker -> executor: types_pb2.JobError

_PR_SET_PDEATHSIG = 1
PROGRESS_INTERVAL_S = 0.5


def die_with_parent(expected_parent: int) -> None:
    """Ask the kernel for SIGKILL when the parent dies; exit now if it already has."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != expected_parent:
        os._exit(0)


def _send(control: socket.socket, **message: Any) -> None:
    control.send(json.dumps(message).encode())


def _load(config: dict[str, Any]) -> tuple[dict[str, Any], list[str], list[str]]:
    """Pipelines by backend name (one shared transpile cache), their BackendInfos,
    and the names of the backends whose jobs may share a worker (remote devices)."""
    from qrelay.executor.backends import load_backend, load_providers
    from qrelay.executor.pipeline import PrimitivePipeline
    from qrelay.executor.transpile import TranspileCache, pass_manager

    load_providers(config.get("backend_providers", []))
    cache = TranspileCache(int(config["transpile_cache_size"]))
    pipelines: dict[str, Any] = {}
    infos: list[str] = []
    shared: list[str] = []
    for name in config["backends"]:
        backend = load_backend(name)
        pass_manager(backend)  # warm: the first job does not pay for it
        pipelines[name] = PrimitivePipeline(
            backend,
            cache,
            int(config["optimization_level"]),
            memory_limit_bytes=int(config["memory_limit_bytes"]),
        )
        infos.append(base64.b64encode(backend.info().SerializeToString()).decode())
        if not backend.local:
            shared.append(name)
    return pipelines, infos, shared


def zygote_main() -> None:
    """Load once, announce the backends, then fork workers until the executor hangs up."""
    config = json.loads(os.environ.pop(CONFIG_ENV))
    die_with_parent(int(config["parent_pid"]))
    # Ctrl-C in a terminal reaches the whole process group; stopping the
    # zygote and its workers is the executor's call (it hangs up the channel).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Below the control plane: on a busy machine the executor's heartbeats and
    # stream win the CPU over a simulation (inherited by every worker).
    os.nice(int(config.get("nice", 0)))
    control = socket.socket(fileno=int(config["control_fd"]))
    from qrelay.logging import configure_logging

    configure_logging(config.get("log_level", "info"))
    try:
        pipelines, infos, shared = _load(config)
    except Exception as exc:  # noqa: BLE001 - reported to the executor, which fails to start
        from qrelay.errors import Internal, QRelayError

        if isinstance(exc, QRelayError):
            _send(control, op="failed", code=exc.code, message=exc.message)
        else:
            _send(control, op="failed", code=Internal.code, message=f"{type(exc).__name__}: {exc}")
        sys.exit(1)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    _send(control, op="ready", pid=os.getpid(), backends=infos, shared=shared)
    children: set[int] = set()
    try:
        while True:
            readable, _, _ = select.select([control.fileno(), wake_r], [], [])
            if wake_r in readable:
                os.read(wake_r, 4096)
            _reap(control, children)
            if control.fileno() not in readable:
                continue
            try:
                data, fds, _, _ = socket.recv_fds(control, CONTROL_PACKET, 1)
            except ConnectionResetError:
                data, fds = b"", []  # the executor went away mid-message: the same as closing
            if not data:
                return  # the executor closed the control channel: stop everything
            message = json.loads(data)
            if message.get("op") == "kill":
                pid = int(message["pid"])
                if pid in children:
                    os.kill(pid, signal.SIGKILL)
                continue
            if message.get("op") != "fork" or not fds:
                for fd in fds:
                    os.close(fd)
                continue
            zygote_pid = os.getpid()
            pid = os.fork()
            if pid == 0:
                code = 70  # EX_SOFTWARE: the worker loop itself failed
                try:
                    os.close(wake_r)
                    os.close(wake_w)
                    control.close()
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    holds_many = bool(message.get("shared"))
                    code = _worker_main(fds[0], pipelines, config, zygote_pid, holds_many)
                except BaseException:
                    traceback.print_exc()
                    raise
                finally:
                    os._exit(code)  # never back into the zygote's loop
            os.close(fds[0])
            children.add(pid)
            _send(control, op="forked", worker=message["worker"], pid=pid)
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        control.close()


def _reap(control: socket.socket, children: set[int]) -> None:
    """Collect finished workers and tell the executor how each ended."""
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)
        code = os.waitstatus_to_exitcode(status)
        try:
            _send(control, op="exited", pid=pid, status=code)
        except OSError:
            return


def _worker_main(
    fd: int, pipelines: dict[str, Any], config: dict[str, Any], zygote_pid: int, shared: bool
) -> int:
    """One worker: run the jobs the channel sends until it closes.

    A simulator's worker gets one job at a time and runs it right here (it is
    killed to cancel). A `shared` worker runs each job on a thread of its own,
    so it can hold many jobs of a remote device that only wait on their
    provider; CANCEL sets the job's event, seen between pubs.
    """
    import structlog

    from qrelay._proto.v1 import types_pb2
    from qrelay.executor._frames import ChannelClosed, recv_frame

    die_with_parent(zygote_pid)
    limit = int(config["memory_limit_bytes"])
    if limit > 0:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        # What a simulation may still allocate under the limit.
        for pipeline in pipelines.values():
            pipeline.limit_memory(limit - _address_space())
    channel = _Channel(socket.socket(fileno=fd))
    wlog = structlog.get_logger("qrelay.executor.worker").bind(worker_pid=os.getpid())
    max_frame = int(config["max_message_bytes"])
    cancels: dict[int, threading.Event] = {}

    def job(request: int, spec: Any, cancelled: threading.Event) -> None:
        try:
            kind, body = _run_one(
                pipelines, spec, cancelled, _Progress(channel, request), limit, wlog
            )
            channel.send(kind, request, body)
        except OSError:
            pass  # the executor hung up; nobody wants this result
        finally:
            cancels.pop(request, None)

    while True:
        try:
            kind, payload = recv_frame(channel.sock, max_frame)
        except ChannelClosed:
            return 0
        (request,) = REQUEST.unpack_from(payload)
        if kind == CANCEL:
            event = cancels.get(request)
            if event is not None:
                event.set()
            continue
        if kind != RUN:
            wlog.warning("worker.frame_ignored", kind=kind)
            continue
        spec = types_pb2.JobSpec.FromString(payload[REQUEST.size :])
        cancels[request] = threading.Event()
        if not shared:
            job(request, spec, cancels[request])
            continue
        threading.Thread(
            target=job, args=(request, spec, cancels[request]), name=f"job-{request}", daemon=True
        ).start()


class _Channel:
    """The worker's end: frames from several job threads, one at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._lock = threading.Lock()

    def send(self, kind: int, request: int, body: bytes) -> None:
        from qrelay.executor._frames import send_frame

        with self._lock:
            send_frame(self.sock, kind, REQUEST.pack(request) + body)


class _Progress:
    """Progress frames for one job: a stage's first report, then at most one per
    PROGRESS_INTERVAL_S; a one-pub job sends one frame ("run 0/1"), and the
    last report of a job is its result. Sent as the pipeline reports, before a
    long simulation call starts: Aer holds the interpreter lock while it runs,
    so no thread here could report during it. The executor relays a job's
    latest report only once the job has run a second (tiny jobs: never).
    """

    def __init__(self, channel: _Channel, request: int) -> None:
        self._channel = channel
        self._request = request
        self._stage = ""
        self._sent_at = 0.0

    def __call__(self, stage: str, done: int, total: int) -> None:
        if done == total or (stage == "transpile" and total == 1):
            return  # the result says "all done"; one pub transpiles in no time
        now = time.monotonic()
        if stage == self._stage and now - self._sent_at < PROGRESS_INTERVAL_S:
            return
        self._stage, self._sent_at = stage, now
        body = json.dumps({"stage": stage, "done": done, "total": total}).encode()
        self._channel.send(PROGRESS, self._request, body)


def _run_one(
    pipelines: dict[str, Any],
    spec: Any,
    cancelled: threading.Event,
    progress: Any,
    limit: int,
    wlog: Any,
) -> tuple[int, bytes]:
    """Run a JobSpec; every failure becomes a JobError (a traceback stays in this log)."""
    from qrelay._proto.v1 import types_pb2
    from qrelay.errors import Internal, InvalidArgument, QRelayError, ResourceExhausted

    def error(code: int, message: str) -> tuple[int, bytes]:
        return ERROR, types_pb2.JobError(code=code, message=message).SerializeToString()

    pipeline = pipelines.get(spec.backend)
    if pipeline is None:
        return error(InvalidArgument.code, f"backend {spec.backend!r} is not loaded in this worker")
    try:
        result = pipeline.run(spec, cancelled, progress)
        return RESULT, result.SerializeToString()
    except QRelayError as exc:
        return error(exc.code, exc.message)
    except MemoryError:
        return error(
            ResourceExhausted.code,
            f"the job ran out of memory in its worker (limit {_mib(limit)})",
        )
    except Exception as exc:  # noqa: BLE001 - see below
        text = str(exc)
        if "Insufficient memory" in text:
            # Aer's own check against max_memory_mb (density matrices, noise).
            return error(
                ResourceExhausted.code,
                "the simulation needs more memory than this executor allows per job "
                f"(limit {_mib(limit)}): {text.strip().splitlines()[-1][:300]}",
            )
        incident = uuid.uuid4().hex[:12]
        wlog.error("job.crashed", incident=incident, exc_info=exc)
        return error(Internal.code, f"internal error on the executor (incident {incident})")


def _address_space() -> int:
    """This process's current virtual size in bytes (VmSize)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB" if n > 0 else "unlimited"


if __name__ == "__main__":
    zygote_main()
