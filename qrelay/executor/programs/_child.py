"""The code that runs inside a sandbox process.

Started by `_jail` (in the sandbox's namespaces, still root there when
isolated): imports qiskit and the program runtime ahead of need, says READY
on the channel (fd), then waits for exactly one JOB. For the job it mounts the
job's program and environment and becomes the job's uid (`enter_job`, from `_jail`,
when isolated), installs the seccomp filter (`_seccomp`), enters the work
directory, applies the resource limits, puts the program and its
requirements on sys.path, imports the entry point, calls it with a
`ProgramContext`, reports DONE or FAILED and exits. It never runs twice.
"""

from __future__ import annotations

import base64
import importlib
import json
import math
import os
import resource
import socket
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any

from qrelay.executor.programs import _ipc

_MiB = 1 << 20


def _warm_imports() -> None:
    """Import what every program needs, so a job's first instruction runs at once."""
    import numpy  # noqa: F401
    import qiskit
    import qiskit.circuit.library
    import qiskit.primitives
    import qiskit.qpy
    import qiskit.quantum_info
    import qiskit.transpiler  # noqa: F401

    import qrelay._program_primitives
    import qrelay.program
    import qrelay.values  # noqa: F401


class SocketHost:
    """`ProgramHost` over the sandbox channel; thread-safe for programs with threads."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._lock = threading.Lock()

    def send(self, kind: int, payload: bytes) -> None:
        with self._lock:
            _ipc.send_frame(self._sock, kind, payload)

    def run_primitive(self, spec: Any) -> Any:
        from qrelay._proto.v1 import types_pb2
        from qrelay.errors import Internal, error_for_code

        with self._lock:
            _ipc.send_frame(self._sock, _ipc.PRIMITIVE, spec.SerializeToString())
            kind, payload = _ipc.recv_frame(self._sock)
        if kind == _ipc.PRIMITIVE_RESULT:
            return types_pb2.JobResult.FromString(payload)
        if kind == _ipc.PRIMITIVE_ERROR:
            err = types_pb2.JobError.FromString(payload)
            raise error_for_code(err.code, err.message)
        raise Internal(f"unexpected frame {kind!r} from the executor")

    def publish(self, value_json: str) -> None:
        from qrelay._proto.v1 import types_pb2

        self.send(_ipc.INTERIM, types_pb2.Interim(value_json=value_json).SerializeToString())

    def log(self, level: int, text: str) -> None:
        from qrelay._proto.v1 import types_pb2

        line = types_pb2.LogLine(level=level, text=text, stream="log")  # type: ignore[arg-type]
        self.send(_ipc.LOG, line.SerializeToString())

    def fail(self, code: int, message: str, type_: str = "", tb: list[str] | None = None) -> None:
        from qrelay._proto.v1 import types_pb2

        err = types_pb2.JobError(code=code, message=message, type=type_, traceback=tb or [])
        self.send(_ipc.FAILED, err.SerializeToString())


def _vm_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _apply_limits(limits: dict[str, Any]) -> None:
    """Resource limits counted from now: imports already done are not the program's."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = math.ceil(usage.ru_utime + usage.ru_stime + float(limits["cpu_seconds"]))
    # Soft limit: SIGXCPU (the parent reports "CPU time limit"); hard: SIGKILL.
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 2))
    resource.setrlimit(resource.RLIMIT_AS, (_vm_bytes() + int(limits["memory_mb"]) * _MiB,) * 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (int(limits["max_open_files"]),) * 2)
    if limits["max_processes"] is not None:  # else the job's cgroup counts them
        resource.setrlimit(resource.RLIMIT_NPROC, (int(limits["max_processes"]),) * 2)
    # Python ignores SIGXFSZ: a write past the limit fails with EFBIG (OSError).
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(limits["file_size_mb"]) * _MiB,) * 2)


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )


def _user_traceback(exc: BaseException, program_dir: str) -> list[str]:
    """The traceback frames that are the user's own files, paths relative to the program."""
    prefix = program_dir.rstrip("/") + "/"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.startswith(prefix)]
    for f in frames:
        f.filename = f.filename[len(prefix) :]
    return [line.rstrip("\n") for line in traceback.format_list(frames)]


def _report_user_error(host: SocketHost, exc: BaseException, job: dict[str, Any]) -> None:
    from qrelay.errors import QRelayError

    if isinstance(exc, MemoryError):
        code, message = 8, f"memory limit of {job['limits']['memory_mb']} MB exceeded"
        if str(exc):
            message += f" ({exc})"
    else:
        code = exc.code if isinstance(exc, QRelayError) else 2
        message = str(exc) or _type_name(exc)
    host.fail(code, message, _type_name(exc), _user_traceback(exc, job["program_dir"]))


def _run_job(host: SocketHost, job: dict[str, Any]) -> None:
    from qrelay._proto.v1 import backends_pb2, types_pb2
    from qrelay.errors import InvalidArgument
    from qrelay.program import ProgramBackend, ProgramContext
    from qrelay.values import decode_value, encode_value

    os.chdir(job["work_dir"])
    os.environ["HOME"] = os.environ["TMPDIR"] = job["work_dir"]
    sys.path[:0] = [job["program_dir"], *job["sys_path"]]
    importlib.invalidate_caches()
    _apply_limits(job["limits"])

    try:
        inputs = decode_value(job["inputs_json"] or "{}")
    except InvalidArgument as exc:
        host.fail(3, f"inputs: {exc}")
        return
    if not isinstance(inputs, dict) or not all(isinstance(k, str) for k in inputs):
        host.fail(3, "inputs must be a JSON object with string keys")
        return

    entry = job["entry_point"]
    module_name, _, func_name = entry.partition(":")
    top = sys.modules.get(module_name.split(".")[0])
    if top is not None and not str(getattr(top, "__file__", "")).startswith(job["program_dir"]):
        host.fail(
            3,
            f"entry point {entry!r}: the name {module_name.split('.')[0]!r} is taken by a module "
            "the sandbox has already imported; rename the program's module",
        )
        return
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            host.fail(3, f"entry point {entry!r}: module {module_name!r} not found in the program")
        else:
            _report_user_error(host, exc, job)
        return
    except BaseException as exc:  # noqa: BLE001 - user code may raise anything; it is reported
        _report_user_error(host, exc, job)
        return
    func = getattr(module, func_name, None)
    if not callable(func):
        host.fail(3, f"entry point {entry!r}: module {module_name!r} has no function {func_name!r}")
        return

    info = backends_pb2.BackendInfo.FromString(base64.b64decode(job["backend_info"]))
    ctx = ProgramContext(
        job_id=job["job_id"], backend=ProgramBackend.from_info(info), inputs=inputs, _host=host
    )
    try:
        value = func(ctx, **inputs)
    except BaseException as exc:  # noqa: BLE001 - user code may raise anything; it is reported
        _report_user_error(host, exc, job)
        return
    try:
        encoded = encode_value(value)
    except InvalidArgument as exc:
        host.fail(3, f"cannot encode the program's return value: {exc}", "InvalidArgument")
        return
    host.send(_ipc.DONE, types_pb2.JobResult(program_json=encoded).SerializeToString())


def main(argv: list[str], enter_job: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Serve one job; `enter_job` (from `_jail`) mounts its program and drops to its uid."""
    sock = socket.socket(fileno=int(argv[1]))
    _warm_imports()
    host = SocketHost(sock)
    host.send(_ipc.READY, json.dumps({"pid": os.getpid()}).encode())
    try:
        kind, payload = _ipc.recv_frame(sock)
    except _ipc.ChannelClosed:
        os._exit(0)  # discarded while warm
    if kind != _ipc.JOB:
        os._exit(70)
    job = json.loads(payload)
    if "mounts" in job:
        if enter_job is None:
            os._exit(72)  # an isolated job reached a sandbox started without _jail
        enter_job(job)
    if job.get("seccomp"):
        # Last step before user code: the jail is set up, privileges are gone.
        from qrelay.executor.programs import _seccomp

        try:
            _seccomp.install()
        except OSError as exc:
            host.fail(13, f"the sandbox could not install its seccomp filter: {exc}")
            os._exit(0)
    try:
        _run_job(host, job)
    except _ipc.ChannelClosed:
        os._exit(71)
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                continue
    # _exit: do not wait for threads the program left behind.
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv)
