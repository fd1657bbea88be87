"""ProgramRunner: what the executor agent calls to run one program job in a sandbox.

It checks the inputs against the program's JSON Schema, unpacks the program,
makes sure its requirements are installed, takes a warm sandbox, hands it the
job and then serves the sandbox channel: primitive requests go to the
executor's own pipeline (`run_primitive`), interim results and log lines go
to `emit`. Whatever happens — result, failure, limit, cancellation — the
sandbox's process group (and with it its PID namespace) is killed and its
work directory removed.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import jsonschema
import structlog
from anyio.abc import ByteReceiveStream
from google.protobuf.message import DecodeError

from qrelay._proto.v1 import backends_pb2, executor_pb2, types_pb2
from qrelay.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    QRelayError,
    ResourceExhausted,
)
from qrelay.executor.programs import _ipc, _jail
from qrelay.executor.programs.bundles import BundleCache
from qrelay.executor.programs.environments import EnvironmentCache
from qrelay.executor.programs.sandbox import Isolation, Sandbox, SandboxUser, WarmPool
from qrelay.executor.programs.settings import SandboxSettings

log = structlog.get_logger(__name__)

Emit = Callable[[types_pb2.Interim | types_pb2.LogLine], Awaitable[None]]
RunPrimitive = Callable[[types_pb2.JobSpec], Awaitable[types_pb2.JobResult]]

_ENTRY_POINT = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_MAX_LINE = 64 << 10
# google.rpc codes used in JobError, from the error classes
_UNKNOWN, _INVALID, _DEADLINE, _EXHAUSTED, _INTERNAL = (
    QRelayError.code,
    InvalidArgument.code,
    DeadlineExceeded.code,
    ResourceExhausted.code,
    Internal.code,
)


class ProgramFailed(Exception):
    """A program job ended without a result; `job_error` says why, for the client."""

    def __init__(self, job_error: types_pb2.JobError) -> None:
        super().__init__(job_error.message)
        self.job_error = job_error

    @property
    def code(self) -> int:
        return self.job_error.code

    @classmethod
    def of(cls, code: int, message: str, type_: str = "") -> ProgramFailed:
        return cls(types_pb2.JobError(code=code, message=message, type=type_))


class _LogBudget:
    """Forwards log lines until `limit` bytes, then one truncation note and silence."""

    def __init__(self, emit: Emit, limit: int) -> None:
        self._emit = emit
        self._limit = limit
        self.used = 0
        self.truncated = False

    async def line(self, line: types_pb2.LogLine) -> None:
        if self.truncated:
            return
        size = len(line.text.encode("utf-8"))
        if self.used + size > self._limit:
            self.truncated = True
            note = f"log output truncated after {self.used} bytes (limit {self._limit} bytes)"
            await self._emit(
                types_pb2.LogLine(level=types_pb2.LogLine.LEVEL_WARNING, text=note, stream="log")
            )
            return
        self.used += size
        await self._emit(line)


class ProgramRunner:
    """Runs program jobs in sandboxes; one instance per executor."""

    def __init__(self, settings: SandboxSettings, run_primitive: RunPrimitive) -> None:
        self.settings = settings
        self._run_primitive = run_primitive
        root = settings.cache_dir
        self.bundles = BundleCache(root / "programs")
        self.environments = EnvironmentCache(root / "envs", settings.python, settings.pip_timeout_s)
        self._isolation: Isolation | None = None
        self._pool: WarmPool | None = None

    @property
    def isolation(self) -> Isolation:
        if self._isolation is None:
            raise FailedPrecondition("ProgramRunner.start() has not been called")
        return self._isolation

    @property
    def pool(self) -> WarmPool:
        if self._pool is None:
            raise FailedPrecondition("ProgramRunner.start() has not been called")
        return self._pool

    async def start(self) -> None:
        """Find out the isolation this host allows, create the cache layout, warm the pool.

        The pool holds processes, not tasks: nothing runs in the background.
        Raises `FailedPrecondition` when sandboxes cannot work on this host, or
        cannot isolate tenants and `allow_weak_sandbox` is not set; the
        missing protections are logged either way.
        """
        await anyio.to_thread.run_sync(self._make_dirs)
        isolation = await Isolation.probe(self.settings)
        missing = isolation.missing()
        if missing and not self.settings.allow_weak_sandbox:
            log.error("sandbox.isolation_incomplete", missing=missing, refused=True)
            raise FailedPrecondition(
                "sandboxes cannot isolate tenants on this host, so tenant programs are refused "
                "(set allow_weak_sandbox, QRELAY_SANDBOX_ALLOW_WEAK_SANDBOX=true, to run them "
                "anyway). Missing: " + "; ".join(missing)
            )
        if missing:
            log.warning("sandbox.isolation_incomplete", missing=missing, refused=False)
        user = SandboxUser.of(isolation)
        python = user.resolve_python(self.settings.python)
        await anyio.to_thread.run_sync(self._protect_dirs, isolation, user)
        self._isolation = isolation
        self._pool = WarmPool(self.settings, isolation, python)
        await self._pool.fill()
        log.info(
            "sandbox.pool_started",
            size=self.settings.warm_pool_size,
            uids=str(isolation.uids) if isolation.uids is not None else "the executor's",
            namespaces=isolation.namespaces,
            seccomp=isolation.seccomp,
            cgroups=(
                f"v{isolation.cgroups.version} {isolation.cgroups.where}"
                if isolation.cgroups is not None
                else None
            ),
            python=python,
        )

    def _make_dirs(self) -> None:
        root = self.settings.cache_dir
        for d in (root, root / "idle", root / "programs", root / "envs", root / "work"):
            d.mkdir(parents=True, exist_ok=True)

    def _protect_dirs(self, isolation: Isolation, user: SandboxUser) -> None:
        """Isolated: the caches are root-only (a job sees its own program through a mount).
        Otherwise the sandbox user must reach them."""
        root = self.settings.cache_dir
        mode = 0o700 if isolation.namespaces else 0o755
        for d in (root, root / "idle", root / "programs", root / "envs", root / "work"):
            d.chmod(mode)
        self.bundles.dir_mode = self.environments.dir_mode = mode
        if not isolation.namespaces:
            user.check_reachable(root / "idle")

    async def aclose(self) -> None:
        """Kill the idle sandboxes; running jobs end with their own `run` calls."""
        if self._pool is not None:
            await self._pool.aclose()
        if self._isolation is not None and self._isolation.cgroups is not None:
            self._isolation.cgroups.close()  # once its last running job has ended, else next start

    async def __aenter__(self) -> ProgramRunner:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def run(
        self,
        job_id: str,
        bundle: executor_pb2.ProgramBundle,
        inputs_json: str,
        backend_info: backends_pb2.BackendInfo,
        emit: Emit,
    ) -> types_pb2.JobResult:
        """Run the program to completion; raises `ProgramFailed`; cancellation kills it."""
        bound = log.bind(job_id=job_id, program=bundle.id)
        _check_entry_point(bundle.entry_point)
        _check_inputs(inputs_json, bundle.input_schema_json)
        try:
            program_dir = await self.bundles.ensure(bundle)
            env_dir = await self.environments.ensure(list(bundle.requirements))
        except QRelayError as exc:
            raise ProgramFailed.of(exc.code, exc.message) from None
        work_dir: Path | None = None
        sandbox: Sandbox | None = None
        try:
            try:
                sandbox = await self.pool.take(refill=False)
            except QRelayError as exc:
                raise ProgramFailed.of(_INTERNAL, exc.message) from None
            if self.isolation.namespaces:
                # Mounted into the sandbox's own view by _jail.enter_job.
                cache = self.settings.cache_dir
                paths: dict[str, Any] = {
                    "work_dir": _jail.WORK_DIR,
                    "program_dir": _jail.PROGRAM_DIR,
                    "sys_path": [_jail.ENV_DIR] if env_dir else [],
                    "mounts": {
                        "program": str(program_dir.relative_to(cache)),
                        "env": str(env_dir.relative_to(cache)) if env_dir else None,
                    },
                    "uid": sandbox.uid,
                }
            else:
                work_dir = await anyio.to_thread.run_sync(self._make_work_dir, job_id, sandbox.uid)
                paths = {
                    "work_dir": str(work_dir),
                    "program_dir": str(program_dir),
                    "sys_path": [str(env_dir)] if env_dir else [],
                }
            job = {
                "job_id": job_id,
                **paths,
                "seccomp": self.isolation.seccomp,
                "entry_point": bundle.entry_point,
                "inputs_json": inputs_json,
                "backend_info": base64.b64encode(backend_info.SerializeToString()).decode(),
                "limits": {
                    "cpu_seconds": self.settings.cpu_seconds,
                    "memory_mb": self.settings.memory_mb,
                    "max_open_files": self.settings.max_open_files,
                    # With a cgroup, pids.max counts the job's processes; else its uid's.
                    "max_processes": None if sandbox.cgroup else self.settings.max_processes,
                    "file_size_mb": self.settings.file_size_mb,
                },
            }
            bound.info("program.started", pid=sandbox.pid)
            result = await self._supervise(sandbox, job, backend_info, emit)
            bound.info("program.finished")
            return result
        except ProgramFailed as exc:
            bound.info("program.failed", code=exc.code, reason=exc.job_error.message[:200])
            raise
        finally:
            with anyio.CancelScope(shield=True):
                if sandbox is not None:
                    await sandbox.kill()
                with contextlib.suppress(QRelayError, OSError):
                    await self.pool.fill()  # if the job failed before it was handed over
                if work_dir is not None:
                    await anyio.to_thread.run_sync(shutil.rmtree, work_dir, True)

    def _make_work_dir(self, job_id: str, uid: int | None) -> Path:
        """Without namespaces: a host directory only the job's uid may enter."""
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", job_id)[:64]
        path = self.settings.cache_dir / "work" / f"{safe}-{uuid.uuid4().hex[:8]}"
        path.mkdir(mode=0o700, parents=True)
        if uid is not None:
            os.chown(path, uid, uid)
        return path

    async def _supervise(
        self,
        sandbox: Sandbox,
        job: dict[str, Any],
        backend_info: backends_pb2.BackendInfo,
        emit: Emit,
    ) -> types_pb2.JobResult:
        logs = _LogBudget(emit, self.settings.max_log_bytes)
        outcome: types_pb2.JobResult | types_pb2.JobError | None = None
        timed_out = False
        async with anyio.create_task_group() as tg:
            assert sandbox.process.stdout is not None
            assert sandbox.process.stderr is not None
            tg.start_soon(_pump_output, sandbox.process.stdout, "stdout", logs)
            tg.start_soon(_pump_output, sandbox.process.stderr, "stderr", logs)
            with anyio.move_on_after(self.settings.wall_timeout_s) as deadline:
                self._limit_memory(sandbox)
                await sandbox.send(_ipc.JOB, json.dumps(job).encode())
                await self.pool.fill()  # the replacement, now that the job is on its way
                async with anyio.create_task_group() as serving:
                    serving.start_soon(_end_on_oom, sandbox, serving.cancel_scope)
                    outcome = await self._serve(sandbox, backend_info, emit, logs)
                    serving.cancel_scope.cancel()
            timed_out = deadline.cancelled_caught
            if outcome is not None and not timed_out:
                # It exits right after its last frame; let its final output drain.
                with anyio.move_on_after(2):
                    await sandbox.process.wait()
            await sandbox.terminate()  # the whole group: stray children, fork bombs
            oom_kills = self._oom_kills(sandbox)
            # Output readers end at EOF; a process that escaped the group could
            # hold the pipes open, so they get a deadline too.
            tg.cancel_scope.deadline = anyio.current_time() + 2
        if oom_kills:
            # As cgroup v2's memory.oom.group: a job whose memory ran out fails whole.
            raise ProgramFailed.of(
                _EXHAUSTED,
                f"memory limit of {self.settings.memory_mb} MB exceeded (the job's processes "
                "and the files it wrote to its tmpfs, together): the kernel killed "
                f"{oom_kills} of its processes",
            )
        if timed_out:
            raise ProgramFailed.of(
                _DEADLINE, f"wall-clock time limit of {self.settings.wall_timeout_s:g} s exceeded"
            )
        if isinstance(outcome, types_pb2.JobResult):
            return outcome
        if isinstance(outcome, types_pb2.JobError):
            raise ProgramFailed(outcome)
        raise ProgramFailed(self._death_error(sandbox.process.returncode))

    def _limit_memory(self, sandbox: Sandbox) -> None:
        """Tighten the cgroup from warm-up room to what the sandbox uses now + memory_mb."""
        if sandbox.cgroup is None:
            return
        try:
            usage = sandbox.cgroup.memory_usage()
            sandbox.cgroup.set_memory_limit(usage + (self.settings.memory_mb << 20))
        except OSError as exc:  # fail closed: no job runs without its limit
            raise ProgramFailed.of(
                _INTERNAL, f"could not set the sandbox's memory limit: {exc}"
            ) from None

    @staticmethod
    def _oom_kills(sandbox: Sandbox) -> int:
        if sandbox.cgroup is None:
            return 0
        try:
            return sandbox.cgroup.oom_kills()
        except OSError:
            return 0

    async def _serve(
        self,
        sandbox: Sandbox,
        backend_info: backends_pb2.BackendInfo,
        emit: Emit,
        logs: _LogBudget,
    ) -> types_pb2.JobResult | types_pb2.JobError | None:
        """Answer the sandbox until it reports an outcome (None: it died without one)."""
        while True:
            try:
                kind, payload = await _ipc.read_frame(sandbox.frames)
            except _ipc.ChannelClosed:
                return None
            except _ipc.FrameTooLarge as exc:
                return types_pb2.JobError(code=_EXHAUSTED, message=f"program sent {exc}")
            try:
                if kind == _ipc.INTERIM:
                    await emit(types_pb2.Interim.FromString(payload))
                elif kind == _ipc.LOG:
                    line = types_pb2.LogLine.FromString(payload)
                    line.stream = "log"
                    await logs.line(line)
                elif kind == _ipc.PRIMITIVE:
                    spec = types_pb2.JobSpec.FromString(payload)
                    spec.backend = backend_info.name
                    await self._answer_primitive(sandbox, spec)
                elif kind == _ipc.DONE:
                    return types_pb2.JobResult.FromString(payload)
                elif kind == _ipc.FAILED:
                    return types_pb2.JobError.FromString(payload)
                else:
                    return types_pb2.JobError(
                        code=_INTERNAL, message=f"sandbox sent an unknown frame kind {kind}"
                    )
            except DecodeError as exc:
                return types_pb2.JobError(
                    code=_INTERNAL, message=f"sandbox sent a malformed frame: {exc}"
                )

    async def _answer_primitive(self, sandbox: Sandbox, spec: types_pb2.JobSpec) -> None:
        try:
            result = await self._run_primitive(spec)
        except QRelayError as exc:
            err = types_pb2.JobError(code=exc.code, message=exc.message)
            await sandbox.send(_ipc.PRIMITIVE_ERROR, err.SerializeToString())
            return
        except Exception as exc:
            log.exception("program.primitive_crashed")
            err = types_pb2.JobError(
                code=_INTERNAL, message=f"the executor failed to run the primitive: {exc!r}"
            )
            await sandbox.send(_ipc.PRIMITIVE_ERROR, err.SerializeToString())
            return
        await sandbox.send(_ipc.PRIMITIVE_RESULT, result.SerializeToString())

    def _death_error(self, returncode: int | None) -> types_pb2.JobError:
        """Explain a sandbox that ended without reporting, in terms of the limit it hit."""
        s = self.settings
        if returncode is not None and returncode < 0:
            sig = -returncode
            name = (
                signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
            )
            if sig == signal.SIGXCPU:
                return types_pb2.JobError(
                    code=_EXHAUSTED, message=f"CPU time limit of {s.cpu_seconds:g} s exceeded"
                )
            if sig == signal.SIGKILL:
                return types_pb2.JobError(
                    code=_EXHAUSTED,
                    message=f"sandbox was killed (SIGKILL): the CPU time limit of "
                    f"{s.cpu_seconds:g} s or the memory limit of {s.memory_mb} MB was exceeded",
                )
            return types_pb2.JobError(
                code=_UNKNOWN,
                message=f"sandbox crashed with {name} (a native extension failed; allocation "
                f"failures under the memory limit of {s.memory_mb} MB can cause this)",
            )
        return types_pb2.JobError(
            code=_UNKNOWN,
            message=f"program exited with status {returncode} without returning a result",
        )


async def _end_on_oom(sandbox: Sandbox, serving: anyio.CancelScope) -> None:
    """Stop serving once the kernel killed a process of the job for memory.

    cgroup v2 (`memory.oom.group`) kills the whole job itself; v1 kills one
    process, which can leave the rest waiting for it forever. A read of one
    small file every quarter second.
    """
    if sandbox.cgroup is None:
        return
    while not ProgramRunner._oom_kills(sandbox):  # noqa: ASYNC110 - polling cgroupfs
        await anyio.sleep(0.25)
    serving.cancel()


async def _pump_output(stream: ByteReceiveStream, name: str, logs: _LogBudget) -> None:
    """Forward a sandbox pipe line by line (over-long lines split), draining past the cap."""
    level = types_pb2.LogLine.LEVEL_INFO if name == "stdout" else types_pb2.LogLine.LEVEL_WARNING
    pending = b""

    async def send(raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        await logs.line(types_pb2.LogLine(level=level, text=text, stream=name))

    async for chunk in stream:
        pending += chunk
        while True:
            nl = pending.find(b"\n")
            if nl < 0 or nl > _MAX_LINE:
                break
            await send(pending[:nl])
            pending = pending[nl + 1 :]
        while len(pending) > _MAX_LINE:
            await send(pending[:_MAX_LINE])
            pending = pending[_MAX_LINE:]
    if pending:
        await send(pending)


def _check_entry_point(entry_point: str) -> None:
    if not _ENTRY_POINT.match(entry_point):
        raise ProgramFailed.of(
            _INVALID, f"entry point must look like 'module:function', got {entry_point!r}"
        )


def _check_inputs(inputs_json: str, schema_json: str) -> None:
    """Inputs must be a JSON object and satisfy the program's schema (if it has one)."""
    try:
        raw = json.loads(inputs_json) if inputs_json.strip() else {}
    except json.JSONDecodeError as exc:
        raise ProgramFailed.of(_INVALID, f"inputs are not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ProgramFailed.of(
            _INVALID, f"inputs must be a JSON object of keyword arguments, got {type(raw).__name__}"
        )
    if not schema_json.strip():
        return
    try:
        schema = json.loads(schema_json)
        validator_cls = jsonschema.validators.validator_for(schema)
        validator_cls.check_schema(schema)
    except (json.JSONDecodeError, jsonschema.SchemaError) as exc:
        msg = getattr(exc, "message", str(exc))
        raise ProgramFailed.of(_INVALID, f"the program's input schema is invalid: {msg}") from None
    error = jsonschema.exceptions.best_match(validator_cls(schema).iter_errors(raw))
    if error is not None:
        where = "".join(f"[{p!r}]" for p in error.absolute_path) or "(top level)"
        raise ProgramFailed.of(
            _INVALID, f"inputs do not match the program's input schema at {where}: {error.message}"
        )
