"""Sandbox processes, the isolation this host allows them, and the warm pool.

A sandbox is one interpreter (fork+exec, never multiprocessing fork) in its
own session and process group, started with a scrubbed environment. It
imports qiskit and the program runtime, says READY, runs one job and is
discarded. How it is isolated is in `_jail`'s docstring (and why namespace
system calls rather than bubblewrap): its own uid from `uid_range_*` per
sandbox, so per job; its own PID, mount, network, IPC and UTS namespaces; a
private size-limited tmpfs for every writable place; a parent-death signal
so it never outlives the executor. `Isolation.probe` finds out at start which
of these the host grants; the runner refuses tenant programs when any is
missing unless `allow_weak_sandbox` is set.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import resource
import signal
import site
import socket
import stat
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import structlog
from anyio.abc import Process, SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

import qrelay
from qrelay.errors import FailedPrecondition, Internal, ResourceExhausted
from qrelay.executor.programs import _cgroups, _ipc, _jail
from qrelay.executor.programs._cgroups import Cgroups, SandboxCgroup
from qrelay.executor.programs.settings import SandboxSettings

log = structlog.get_logger(__name__)

# Environment of every sandbox: nothing inherited from the executor (no
# tokens, broker address or cloud credentials); BLAS/Rayon single-threaded
# because threads count against RLIMIT_NPROC and the cores are the executor's.
_BASE_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "RAYON_NUM_THREADS": "1",
    "QISKIT_PARALLEL": "FALSE",
}

# Appended to the sandbox's sys.path so qrelay imports even when not installed.
_QRELAY_ROOT = str(Path(qrelay.__file__).resolve().parent.parent)
# The executor's site-packages (with their .pth files) are added to the
# sandbox's path: qiskit, qiskit-aer and qrelay come from there, never
# reinstalled, even when the sandbox interpreter is another build of the
# same Python version (e.g. the system one, when the executor's lives in a
# directory the sandbox user cannot enter). The interpreter runs with -S so a
# system interpreter's own dist-packages (older compiled builds of cffi,
# cryptography, ...) never shadow the executor's.
_EXECUTOR_SITE = [p for p in site.getsitepackages() if os.path.isdir(p)]
# The start-up script, run by path with -I (so its directory is not on
# sys.path) and nothing but the standard library until the worker forks.
# Privileges and namespaces are handled there, as the first statements after
# exec, rather than by Popen(user=, group=, preexec_fn=): with those, CPython
# forks with plain fork() instead of vfork(), so every native pthread_atfork
# child handler in the executor (OpenMP, OpenBLAS, gRPC) runs in the child
# while other threads are busy, which crashed the child before exec now and
# then ("sandbox failed to start: exit status -11").
_JAIL = str(Path(__file__).with_name("_jail.py"))
_SECCOMP = str(Path(__file__).with_name("_seccomp.py"))


def _shown_paths(python: str, extra: list[str]) -> list[str]:
    """Host paths an isolated sandbox sees (read-only): the system's, the interpreter's
    (as configured and as resolved: a venv and its base), the executor's site-packages
    and qrelay, and what the operator adds."""
    prefixes = [str(Path(p).parent.parent) for p in (python, os.path.realpath(python))]
    return [*_jail.SYSTEM_PATHS, *prefixes, *_EXECUTOR_SITE, _QRELAY_ROOT, *extra]


@dataclass(frozen=True)
class Isolation:
    """The protections this host grants sandboxes, found out once at start."""

    uids: range | None  # a uid per sandbox from this range (root executor), else None
    namespaces: bool  # PID, mount, network, IPC and UTS namespaces and private mounts
    refused: str = ""  # why namespaces are unavailable
    seccomp: bool = False  # the sandbox's seccomp filter (`_seccomp`) loads and answers
    seccomp_refused: str = "not probed"
    cgroups: Cgroups | None = None  # a cgroup per sandbox (memory, pids, CPU, kill)
    cgroups_refused: str = "not probed"

    @classmethod
    async def probe(cls, settings: SandboxSettings) -> Isolation:
        root = os.geteuid() == 0
        uids = (
            range(settings.uid_range_start, settings.uid_range_start + settings.uid_range_size)
            if root
            else None
        )
        no_seccomp = await _probe_script(_SECCOMP, "--probe")
        if not root:
            namespaces, refused = False, "the executor is not root"
        elif why := await _probe_script(_JAIL, "--probe", str(settings.cache_dir)):
            namespaces, refused = False, f"the kernel refused namespaces ({why})"
        else:
            namespaces, refused = True, ""
        cgroups, no_cgroups = await _probe_cgroups(settings)
        return cls(
            uids,
            namespaces,
            refused,
            seccomp=not no_seccomp,
            seccomp_refused=no_seccomp,
            cgroups=cgroups,
            cgroups_refused=no_cgroups,
        )

    @property
    def complete(self) -> bool:
        return (
            self.uids is not None and self.namespaces and self.seccomp and self.cgroups is not None
        )

    def missing(self) -> list[str]:
        """Each protection this host cannot give, with what it means for tenants."""
        out = []
        if self.uids is None:
            out += [
                "a uid per job (the executor is not root): jobs may read, write and signal "
                "each other, and RLIMIT_NPROC counts every job's processes together",
            ]
        if not self.namespaces:
            out += [
                f"namespaces ({self.refused}): no private /tmp, /var/tmp, /dev/shm or work "
                "directory and no disk limit; the network is reachable; other processes' "
                "command lines are visible; kill reaches only the process group, not "
                "setsid descendants; program and requirement caches readable by every job",
            ]
        if self.cgroups is None:
            out += [
                f"a cgroup per job ({self.cgroups_refused}): memory is limited per process only "
                "(RLIMIT_AS) and tmpfs files use memory outside any limit; processes are "
                "limited per uid (RLIMIT_NPROC); no CPU share, so one job's busy program can "
                "starve another's and the executor",
            ]
        if not self.seccomp:
            out += [
                f"a seccomp filter ({self.seccomp_refused}): programs may call mount, unshare, "
                "ptrace, bpf, keyctl, perf_event_open and the other system calls the filter "
                "refuses, so the kernel's whole attack surface is theirs",
            ]
        return out


async def _probe_script(script: str, *args: str) -> str:
    """Run a probe script (stdlib only) in a throwaway process: "" if it passed, else why not."""
    proc = await anyio.run_process(
        [sys.executable, "-I", "-S", "-B", script, *args],
        check=False,
        stdin=subprocess.DEVNULL,
    )
    if proc.returncode == 0:
        return ""
    return proc.stderr.decode("utf-8", "replace").strip()[-500:] or f"exit {proc.returncode}"


def sandbox_limits(settings: SandboxSettings) -> _cgroups.CgroupLimits:
    """A sandbox cgroup's limits while warm: room to import qiskit; pids for the job
    (its processes and threads, plus the sandbox's own outer and init processes)."""
    return _cgroups.CgroupLimits(
        memory_bytes=settings.warm_memory_mb << 20,
        pids=settings.max_processes + 2,
        cpu_weight=settings.cpu_weight,
        cpu_quota=settings.cpu_quota,
    )


async def _probe_cgroups(settings: SandboxSettings) -> tuple[Cgroups | None, str]:
    """The cgroup driver if this host lets the executor make limited cgroups, else why not."""
    try:
        found = await anyio.to_thread.run_sync(_cgroups.detect, settings.cgroup_parent)
    except OSError as exc:
        return None, f"cannot read this process's cgroups: {exc}"
    if isinstance(found, str):
        return None, found
    try:
        await anyio.to_thread.run_sync(found.reap_stale)
        await found.probe(sandbox_limits(settings))
    except OSError as exc:
        return None, f"cgroup v{found.version} at {found.where}: {exc}"
    return found, ""


class UidPool:
    """Hands each sandbox a uid of the range that nobody else on this host uses.

    Two guards: no live process of the host has the uid, and this pool holds
    an exclusive `flock` on `<lock_dir>/<uid>.lock` for as long as the
    sandbox lives. Every executor on the host locks in the same directory, so
    two executors configured with overlapping ranges (or a uid whose warm
    sandbox has not started its process yet) never hand one uid to two
    tenants' jobs; a lock held by another executor is skipped. The kernel
    drops the lock when its holder dies, SIGKILL included, so a crashed
    executor's uids come back without clean-up. Lock files are never deleted
    (deleting one could let two holders lock two different inodes of it).

    Round robin, so a uid comes back only after the rest of the range was
    used. A uid is safe to reuse once no process has it: an isolated job can
    write only to its own tmpfs, which is gone with its namespace.
    """

    def __init__(self, uids: range, lock_dir: Path) -> None:
        self._uids = uids
        self._lock_dir = lock_dir
        self._held: dict[int, int] = {}  # uid -> the fd holding its lock
        self._next = 0
        try:
            lock_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        except OSError as exc:
            raise FailedPrecondition(
                f"cannot create the sandbox uid lock directory {lock_dir} ({exc.strerror}); "
                "set QRELAY_SANDBOX_UID_LOCK_DIR to a directory every executor on this host shares"
            ) from None

    def acquire(self) -> int:
        busy = set(self._held) | _uids_with_processes()
        for i in range(len(self._uids)):
            uid = self._uids[(self._next + i) % len(self._uids)]
            if uid in busy:
                continue
            fd = self._lock(uid)
            if fd is None:
                continue  # another executor on this host holds it
            self._held[uid] = fd
            self._next = (self._next + i + 1) % len(self._uids)
            return uid
        raise ResourceExhausted(
            f"all {len(self._uids)} sandbox uids from {self._uids.start} are in use on this "
            "host (by this or another executor); raise QRELAY_SANDBOX_UID_RANGE_SIZE or give "
            "executors sharing the host disjoint ranges"
        )

    def _lock(self, uid: int) -> int | None:
        path = self._lock_dir / f"{uid}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return fd

    def release(self, uid: int) -> None:
        fd = self._held.pop(uid, None)
        if fd is not None:
            os.close(fd)  # closing the last descriptor drops the lock

    def close(self) -> None:
        for uid in list(self._held):
            self.release(uid)


def _uids_with_processes() -> set[int]:
    """Real uids of every process on the host (a uid still in use is never handed out)."""
    uids = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                uids.add(entry.stat().st_uid)
    return uids


@dataclass(frozen=True)
class SandboxUser:
    """A uid the sandboxes run as, for checking what it can reach (None: the executor's)."""

    uid: int | None
    name: str

    @classmethod
    def of(cls, isolation: Isolation) -> SandboxUser:
        if isolation.uids is None:
            return cls(None, "the executor's user")
        return cls(isolation.uids.start, f"uid {isolation.uids.start}")

    def _searchable(self, st: os.stat_result) -> bool:
        return st.st_uid == self.uid or bool(st.st_mode & stat.S_IXOTH)

    def can_execute(self, program: str) -> bool:
        """Whether the sandbox user can exec `program` (every directory on the way too)."""
        if self.uid is None:
            return os.access(program, os.X_OK)
        for path in {Path(program).absolute(), Path(os.path.realpath(program))}:
            try:
                if not all(self._searchable(p.stat()) for p in path.parents):
                    return False
            except OSError:
                return False
        try:
            return self._searchable(os.stat(program))
        except OSError:
            return False

    def resolve_python(self, configured: str) -> str:
        """The configured interpreter, or the same Python version elsewhere if the user
        cannot run it (e.g. a pyenv build under /root)."""
        if self.can_execute(configured):
            return configured
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        for candidate in (f"/usr/bin/python{version}", f"/usr/local/bin/python{version}"):
            if os.path.exists(candidate) and self.can_execute(candidate):
                log.info("sandbox.python_fallback", configured=configured, using=candidate)
                return candidate
        raise FailedPrecondition(
            f"sandbox user {self.name!r} cannot execute {configured}, and no python{version} "
            "it can run was found; set QRELAY_SANDBOX_PYTHON to one"
        )

    def check_reachable(self, path: Path) -> None:
        """Fail early, with the culprit named, if the sandbox user cannot reach `path`."""
        if self.uid is None:
            return
        for parent in [path, *path.parents]:
            st = parent.stat()
            if st.st_uid != self.uid and not st.st_mode & 0o001:
                raise FailedPrecondition(
                    f"sandbox user {self.name!r} cannot reach {path}: {parent} is not "
                    "searchable by others (chmod o+x, or choose another cache_dir)"
                )


class Sandbox:
    """One started sandbox process, the uid it runs its job as, and its channel."""

    def __init__(
        self,
        process: Process,
        channel: SocketStream,
        uid: int | None = None,
        cgroup: SandboxCgroup | None = None,
    ) -> None:
        self.process = process
        self.cgroup = cgroup
        self.channel = channel
        self.frames = BufferedByteReceiveStream(channel)
        self.ready = False
        self.pid = process.pid
        self.uid = uid
        self.on_close: list[Callable[[], None]] = []  # run once it is killed
        self._ready_lock = anyio.Lock()

    @classmethod
    async def spawn(
        cls,
        settings: SandboxSettings,
        isolation: Isolation,
        python: str,
        uid: int | None,
        nice: int = 0,
        cgroup: SandboxCgroup | None = None,
    ) -> Sandbox:
        """Start one sandbox; it joins `cgroup` and lowers its priority by `nice` first."""
        config = {
            "cgroup_procs": cgroup.procs_files if cgroup is not None else [],
            "parent": os.getpid(),
            "namespaces": isolation.namespaces,
            "uid": uid,
            "nice": int(nice),
            "site": _EXECUTOR_SITE,
            "root": _QRELAY_ROOT,
            "cache_dir": str(settings.cache_dir),
            "disk_mb": settings.disk_mb,
            "binds": _shown_paths(python, settings.extra_read_only_paths),
        }
        # Isolated: cwd and HOME are set inside, on the private tmpfs.
        home = "/tmp" if isolation.namespaces else str(settings.cache_dir / "idle")
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            process = await anyio.open_process(
                [
                    python,
                    "-I",
                    "-S",  # no system site-packages: only the executor's, added by _jail
                    "-u",
                    "-B",
                    _JAIL,
                    json.dumps(config),
                    str(child_sock.fileno()),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=settings.cache_dir / "idle",
                env=dict(_BASE_ENV, HOME=home, TMPDIR=home),
                start_new_session=True,
                pass_fds=(child_sock.fileno(),),
            )
        except BaseException:
            parent_sock.close()
            raise
        finally:
            child_sock.close()
        try:
            channel = await SocketStream.from_socket(parent_sock)
        except BaseException:
            # Cancelled between start and wrapping (an executor stopping mid-refill):
            # the process is ours to kill and reap, or it outlives its loop.
            parent_sock.close()
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)
                await process.aclose()
            raise
        return cls(process, channel, uid, cgroup)

    async def wait_ready(self, timeout: float) -> None:  # noqa: ASYNC109 - start deadline
        """Wait for READY (normally already in the socket buffer for a warm sandbox)."""
        async with self._ready_lock:
            if not self.ready:
                await self._read_ready(timeout)

    async def _read_ready(self, timeout: float) -> None:  # noqa: ASYNC109 - start deadline
        try:
            with anyio.fail_after(timeout):
                kind, _ = await _ipc.read_frame(self.frames)
        except TimeoutError:
            await self.kill()
            raise Internal(f"sandbox did not start within {timeout:g} s") from None
        except _ipc.ChannelClosed:
            detail = await self._stderr_tail()
            await self.kill()
            raise Internal(f"sandbox failed to start: {detail}") from None
        if kind != _ipc.READY:
            await self.kill()
            raise Internal(f"sandbox sent {kind!r} before READY")
        # (READY's pid is the worker's, in its own PID namespace: self.pid stays
        # the executor's view of the sandbox, the leader of its process group.)
        self.ready = True

    async def _stderr_tail(self) -> str:
        if self.process.stderr is None:
            return "no stderr"
        chunks: list[bytes] = []
        with anyio.move_on_after(2):
            async for chunk in self.process.stderr:
                chunks.append(chunk)
        text = b"".join(chunks).decode("utf-8", "replace").strip()
        return text[-2000:] or f"exit status {self.process.returncode}"

    def alive(self) -> bool:
        return self.process.returncode is None

    def set_priority(self, niceness: int) -> None:
        """Set the nice value of the sandbox's whole process group (every thread in it)."""
        # Already gone: take() or the job finds out.
        with contextlib.suppress(ProcessLookupError):
            os.setpriority(os.PRIO_PGRP, self.process.pid, niceness)

    async def send(self, kind: int, payload: bytes) -> None:
        """Send a frame; to a sandbox already dead, nothing (its reader sees the end)."""
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            await self.channel.send(_ipc.encode_frame(kind, payload))

    async def kill(self) -> None:
        """SIGKILL the whole process group, reap the sandbox, close its streams."""
        with anyio.CancelScope(shield=True):
            await self.terminate()
            await self._drain_pipes()
            await self.channel.aclose()
            await self.process.aclose()
            if self.cgroup is not None:
                await self.cgroup.destroy()
            while self.on_close:
                self.on_close.pop()()

    async def _drain_pipes(self) -> None:
        """Read a dead sandbox's stdout and stderr to their end.

        A pipe closes its transport only at EOF; one nobody read (an idle
        sandbox killed at shutdown) would be closed from its finalizer after
        the event loop has ended, printing "RuntimeError: Event loop is closed".
        """
        with anyio.move_on_after(1):
            for stream in (self.process.stdout, self.process.stderr):
                if stream is None:
                    continue
                with contextlib.suppress(
                    anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError
                ):
                    while True:
                        await stream.receive()

    async def terminate(self) -> None:
        """SIGKILL the whole process group and reap the sandbox.

        The group holds the sandbox's outer process, its namespace's init and
        the worker; init's death makes the kernel kill every other process of
        the namespace, whatever session or group it moved to.
        """
        with anyio.CancelScope(shield=True):
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            except PermissionError:
                log.warning("sandbox.kill_denied", pid=self.process.pid)
            if self.cgroup is not None:
                try:  # what left the group (none can leave the namespace) dies here
                    await self.cgroup.kill()
                except OSError as exc:
                    log.warning(
                        "sandbox.cgroup_kill_failed", cgroup=self.cgroup.name, error=str(exc)
                    )
            with anyio.move_on_after(5):
                await self.process.wait()


class WarmPool:
    """Up to `size` sandboxes started and imported ahead of need; each used once.

    No background task: spawning is a quick fork+exec and the slow part (the
    imports) happens in the new process, so `take` (or its caller, right after
    handing the job over) starts the replacement, and the caller waits for
    READY only if the pool was empty (a cold start).
    """

    def __init__(self, settings: SandboxSettings, isolation: Isolation, python: str) -> None:
        self._settings = settings
        self._isolation = isolation
        self._uids = (
            UidPool(isolation.uids, settings.uid_lock_dir) if isolation.uids is not None else None
        )
        self._python = python
        # Replacements import at low priority, so a job that just took a warm
        # sandbox is not slowed by the next one's imports (measured: they cost
        # 1-2 s of CPU). Only if the executor may give the priority back.
        self._base_nice = os.getpriority(os.PRIO_PROCESS, 0)
        self.nice = settings.warm_nice if _may_lower_nice(self._base_nice) else 0
        if settings.warm_nice and not self.nice:
            log.info(
                "sandbox.not_niced",
                reason="the executor may not raise a process's priority (no root, RLIMIT_NICE)",
            )
        self._idle: deque[Sandbox] = deque()
        self._closed = False
        self._spawning = 0
        self.cold_starts = 0
        self.warm_starts = 0

    async def fill(self) -> None:
        """Replace dead idle sandboxes and top the pool up to its size."""
        for dead in [sb for sb in self._idle if not sb.alive()]:
            self._idle.remove(dead)
            await dead.kill()
        while not self._closed and len(self._idle) + self._spawning < self._settings.warm_pool_size:
            self._spawning += 1
            try:
                sandbox = await self._spawn(self.nice)
            finally:
                self._spawning -= 1
            if self._closed:
                await sandbox.kill()
                return
            self._idle.append(sandbox)

    async def take(self, refill: bool = True) -> Sandbox:
        """A sandbox that has said READY; the pool is topped up first unless `refill` is
        False (then the caller calls `fill` once the job is on its way: starting the
        replacement costs a fork+exec and a scan of /proc, time a warm job need not wait)."""
        sandbox: Sandbox | None = None
        while self._idle and sandbox is None:
            candidate = self._idle.popleft()
            if candidate.alive():
                sandbox = candidate
            else:
                await candidate.kill()
        warm = sandbox is not None
        try:
            if sandbox is None:
                sandbox = await self._spawn(0)
            elif self.nice:
                self._restore_priority(sandbox)
            if refill:
                await self.fill()
            await sandbox.wait_ready(self._settings.start_timeout_s)
        except BaseException:
            if sandbox is not None:
                await sandbox.kill()
            raise
        if warm:
            self.warm_starts += 1
        else:
            self.cold_starts += 1
        return sandbox

    async def _spawn(self, nice: int) -> Sandbox:
        """A new sandbox holding a uid of its own until it is killed."""
        uid = self._uids.acquire() if self._uids is not None else None
        cgroup: SandboxCgroup | None = None
        try:
            if self._isolation.cgroups is not None:
                cgroup = self._isolation.cgroups.create(sandbox_limits(self._settings))
            sandbox = await Sandbox.spawn(
                self._settings, self._isolation, self._python, uid, nice, cgroup
            )
        except BaseException:
            if uid is not None and self._uids is not None:
                self._uids.release(uid)
            if cgroup is not None:
                await cgroup.destroy()
            raise
        if uid is not None and self._uids is not None:
            pool = self._uids
            sandbox.on_close.append(lambda: pool.release(uid))
        return sandbox

    def _restore_priority(self, sandbox: Sandbox) -> None:
        """The job runs at the executor's priority; if that is refused, stop nicing."""
        try:
            sandbox.set_priority(self._base_nice)
        except PermissionError:
            log.warning("sandbox.renice_denied", pid=sandbox.pid, nice=self.nice)
            self.nice = 0

    async def warmed(self) -> None:
        """Wait until every idle sandbox has finished its imports (for benchmarks and tests)."""
        for sandbox in list(self._idle):
            await sandbox.wait_ready(self._settings.start_timeout_s)

    async def aclose(self) -> None:
        self._closed = True
        killed = 0
        while self._idle:
            await self._idle.popleft().kill()
            killed += 1
        log.debug("sandbox.pool_closed", killed=killed, spawning=self._spawning)

    def describe(self) -> dict[str, Any]:
        return {"idle": len(self._idle), "warm": self.warm_starts, "cold": self.cold_starts}


def _may_lower_nice(base: int) -> bool:
    """Whether this process may set another's nice value back down to `base`."""
    if os.geteuid() == 0:
        return True
    soft, _ = resource.getrlimit(resource.RLIMIT_NICE)
    # RLIMIT_NICE allows nice values down to 20 - soft.
    return soft == resource.RLIM_INFINITY or 20 - soft <= base
