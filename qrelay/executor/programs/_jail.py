"""The first code a sandbox runs: namespaces, private mounts, the per-job uid switch.

Mechanism: Linux namespace system calls made here directly (`unshare(2)`,
`mount(2)`, `prctl(2)` through ctypes), not bubblewrap or nsjail. The reason
is the warm pool: a sandbox is started and imports qiskit BEFORE it knows
which job (tenant, program, requirements) it will run, and the program and
its requirement environment can only be mounted into its private view once
the job arrives. A tool that sets the sandbox up at exec time (bwrap,
nsjail) fixes the mounts and drops the capability to change them before the
interpreter starts, so the program would have to be readable by every
sandbox or copied in. Done here, the warm interpreter keeps root only in
its own fresh namespaces until the job is assigned, then mounts that job's
program and environment read-only, switches to the job's uid and drops every
privilege before any user code runs. It also needs nothing installed: a
fresh CI machine needs only a kernel with namespaces and a root executor.

Process tree of an isolated sandbox (all in the executor's new session, so
one `killpg` from the executor reaches each of them, and all in the
sandbox's own cgroup, which outer joins first thing: `_cgroups`)::

    outer   host PID namespace; parent-death signal = SIGKILL (executor dies ->
      |     it dies); waits for init and exits the way init's worker did
    init    PID 1 of a new PID namespace (also new mount, network, IPC and UTS
      |     namespaces); parent-death signal = SIGKILL; when it dies the kernel
      |     kills every process in the namespace, `setsid` daemons included
    worker  imports qiskit while warm; on its job: mounts, setuid, user code

Inside, the root is a small read-only tmpfs that shows only the system
directories (`SYSTEM_PATHS`), the interpreter, the executor's site-packages
and qrelay (read-only bind mounts), a few device nodes, `/proc` of its own
PID namespace (hidepid=2), and a private tmpfs of `disk_mb` at `/tmp` that
also backs `/var/tmp`, `/dev/shm` and the work directory (the only writable
places; all vanish with the namespace). No other host path exists there: no
other tenant's files, no Unix socket of a host service (PostgreSQL's under
/run). The network namespace has only a loopback that is down. The program
is at `/tmp/.qrelay/program` and its requirements at `/tmp/.qrelay/env`
(read-only bind mounts from the cache, whose directories are root-only on
the host).

Run as a script (``python -I -S -u -B _jail.py <config-json> <fd>``) it imports
nothing but the standard library until the worker is forked; `main` is the
whole start-up. It hands `_child` its `enter_job` for the job's mounts.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import stat
import sys
from typing import Any

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
NAMESPACES = CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWPID | CLONE_NEWNET

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_MOVE = 0x2000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2

SYS_MOUNT_SETATTR = 442  # the same number on every architecture
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38

# Paths inside an isolated sandbox (the runner puts them in the job message).
SCRATCH = "/tmp"
PRIVATE = "/tmp/.qrelay"
PROGRAM_DIR = "/tmp/.qrelay/program"
ENV_DIR = "/tmp/.qrelay/env"
WORK_DIR = "/tmp/work"
HIDDEN_CACHE = "/.qrelay-cache"  # root-only, unmounted before the job's code runs
DEVICES = ("null", "zero", "full", "random", "urandom")
# Shown (read-only) in every isolated sandbox besides the interpreter's paths.
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/sys")

_libc: Any = None


def _c() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    _check(_c().unshare(flags), "unshare")


def _bytes(text: str | None) -> bytes | None:
    return text.encode() if text else None


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    result = _c().mount(_bytes(source), target.encode(), _bytes(fstype), flags, _bytes(data))
    _check(result, f"mount {target}")


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def read_only_everywhere() -> None:
    """Make every mount of this namespace read-only (the host's files stay untouched)."""
    attr = _MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0)
    size = ctypes.sizeof(attr)
    if _c().syscall(SYS_MOUNT_SETATTR, AT_FDCWD, b"/", AT_RECURSIVE, ctypes.byref(attr), size):
        # Before Linux 5.12: at least the root mount (the writable tmpfs mounts come next).
        mount(None, "/", None, MS_BIND | MS_REMOUNT | MS_RDONLY)


def prctl(option: int, arg: int) -> None:
    _check(_c().prctl(option, arg, 0, 0, 0), "prctl")


def die_with_parent() -> None:
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


# --- start-up ----------------------------------------------------------------


def _outermost(paths: list[str]) -> list[str]:
    """`paths` (absolute, normalised) without those inside another of them."""
    out: list[str] = []
    for path in sorted({os.path.normpath(p) for p in paths}):
        if not any(path == o or path.startswith(o.rstrip("/") + "/") for o in out):
            out.append(path)
    return out


def _private_view(config: dict[str, Any]) -> None:
    """In the new mount namespace, build the sandbox's root and move into it.

    The root is a small read-only tmpfs showing only: the system directories
    and the interpreter, site-packages and qrelay paths in `config["binds"]`
    (read-only bind mounts), a handful of device nodes, its own /proc, and a
    writable tmpfs of `disk_mb` at /tmp (also /var/tmp and /dev/shm). No
    other host path exists in it, so neither do the host's Unix sockets
    (PostgreSQL's, a database's, D-Bus) nor other tenants' files. The cache
    is bound at a root-only HIDDEN_CACHE until the job's mounts are made.
    """
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    # Even what is shown cannot be written: nothing a job writes outlives it.
    read_only_everywhere()
    # Handles on what the root will show, taken before /tmp is covered (a
    # path under it would be hidden then); bind sources must be mounts of
    # this namespace, as these are.
    shown: dict[str, int | str] = {}
    for path in _outermost([p for p in config["binds"] if os.path.lexists(p)]):
        if os.path.islink(path) and os.path.dirname(path) == "/":
            shown[path] = os.readlink(path)  # /bin -> usr/bin on a merged-/usr system
        else:
            shown[path] = os.open(path, os.O_PATH | os.O_CLOEXEC)
    cache = os.open(config["cache_dir"], os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    new = SCRATCH  # built on a tmpfs over /tmp, then moved onto /
    mount("qrelay-root", new, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    # The job's scratch first: shown paths that live under /tmp (an executor
    # installed in /tmp/...) are then bound inside it, not covered by it.
    scratch = new + SCRATCH
    os.mkdir(scratch)
    mount("tmpfs", scratch, "tmpfs", MS_NOSUID | MS_NODEV, f"size={config['disk_mb']}m,mode=1777")
    for path, handle in shown.items():
        target = new + path
        if isinstance(handle, str):
            os.symlink(handle, target)
            continue
        is_dir = stat.S_ISDIR(os.fstat(handle).st_mode)
        os.makedirs(target if is_dir else os.path.dirname(target), exist_ok=True)
        if not is_dir:
            os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
        mount(f"/proc/self/fd/{handle}", target, None, MS_BIND | MS_REC)
        os.close(handle)
    os.mkdir(new + HIDDEN_CACHE, 0o700)
    mount(f"/proc/self/fd/{cache}", new + HIDDEN_CACHE, None, MS_BIND)
    os.close(cache)

    os.mkdir(new + "/dev", 0o755)
    for name in DEVICES:
        os.close(os.open(f"{new}/dev/{name}", os.O_CREAT | os.O_WRONLY, 0o666))
        mount(f"/dev/{name}", f"{new}/dev/{name}", None, MS_BIND)
    for name, link in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0")):
        os.symlink(link, f"{new}/dev/{name}")
    for n, name in ((1, "stdout"), (2, "stderr")):
        os.symlink(f"/proc/self/fd/{n}", f"{new}/dev/{name}")

    os.mkdir(new + "/proc", 0o555)
    proc_flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    try:
        mount("proc", new + "/proc", "proc", proc_flags, "hidepid=2")
    except OSError:
        mount("proc", new + "/proc", "proc", proc_flags)

    for name, target in ((".var-tmp", "/var/tmp"), (".shm", "/dev/shm")):
        source = f"{scratch}/{name}"
        os.mkdir(source)
        os.chmod(source, 0o1777)
        os.makedirs(new + target, exist_ok=True)
        mount(source, new + target, None, MS_BIND)
    for d in (PRIVATE, PROGRAM_DIR, ENV_DIR):
        os.mkdir(new + d, 0o755)

    # Into the new root (as switch_root does); the old one is covered for good.
    os.chdir(new)
    mount(new, "/", None, MS_MOVE)
    os.chroot(".")
    os.chdir(SCRATCH)
    mount(None, "/", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    _c().sethostname(b"sandbox", 7)  # cosmetic: the host's name is not the job's business


def _exit_like(status: int) -> None:
    """Exit as init's worker did: init reports a signal n as status 128+n, re-raised here."""
    code = os.waitstatus_to_exitcode(status)
    sig = -code if code < 0 else code - 128 if code > 128 else 0
    if sig:
        if sig not in (signal.SIGKILL, signal.SIGSTOP):  # those cannot be caught anyway
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    os._exit(code)


def _init(config: dict[str, Any], outer_alive: int, argv: list[str]) -> None:
    """PID 1 of the sandbox's namespace: set up the view, run the worker, exit with it."""
    die_with_parent()
    # The parent may have died before the line above: then the pipe is at EOF.
    if select.select([outer_alive], [], [], 0)[0]:
        os._exit(1)
    _private_view(config)
    worker = os.fork()
    if worker == 0:
        os.close(outer_alive)
        _worker(config, argv)
        os._exit(0)
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(0)
        if pid == worker:
            # A signal as 128+n (PID 1 cannot re-raise it on itself); outer re-raises it.
            if os.WIFSIGNALED(status):
                os._exit(128 + os.WTERMSIG(status))
            os._exit(min(os.waitstatus_to_exitcode(status), 128))


def _worker(config: dict[str, Any], argv: list[str]) -> None:
    import site

    uid = config.get("uid")
    if uid is not None and not config["namespaces"]:
        # Weak mode: no private mounts to make, so drop privileges at once.
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    for path in config["site"]:
        site.addsitedir(path)
    sys.path.append(config["root"])
    from qrelay.executor.programs._child import main as child_main

    # _child enters the job's mounts through this module's `enter_job`, handed
    # over rather than imported back (this file runs as the bootstrap script).
    child_main(argv, enter_job)


def main(argv: list[str]) -> None:
    """``argv``: [script, config JSON, channel fd]."""
    config = json.loads(argv[1])
    die_with_parent()
    if os.getppid() != config["parent"]:
        os._exit(1)  # the executor died before the line above
    # Into the sandbox's cgroup before anything else: all it starts is born inside.
    for procs in config.get("cgroup_procs", []):
        with open(procs, "w", encoding="ascii") as f:
            f.write(str(os.getpid()))
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # Every process of the sandbox at the warm priority; the pool gives the
    # whole group the executor's priority back when a job takes it.
    os.nice(int(config["nice"]))
    child_argv = [argv[0], argv[2]]
    if not config["namespaces"]:
        _worker(config, child_argv)
        return
    unshare(NAMESPACES)
    alive_r, alive_w = os.pipe()
    init = os.fork()
    if init == 0:
        os.close(alive_w)
        _init(config, alive_r, child_argv)
        os._exit(0)
    os.close(alive_r)
    # Nothing to do but wait: the executor kills the whole group when done.
    while True:
        try:
            _, status = os.waitpid(init, 0)
            break
        except InterruptedError:
            continue
    _exit_like(status)


def probe(cache_dir: str) -> None:
    """What `main` needs, tried in a throwaway child; raises OSError naming what failed."""
    unshare(NAMESPACES)
    pid = os.fork()
    if pid == 0:
        try:
            _private_view({"cache_dir": cache_dir, "disk_mb": 1, "binds": list(SYSTEM_PATHS)})
        except OSError as exc:
            os.write(2, str(exc).encode())
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise OSError("setting up the private mounts failed")


# --- the job (called by _child in the worker, still root) --------------------


def enter_job(job: dict[str, Any]) -> None:
    """Mount the job's program and environment read-only, then become the job's uid.

    After this the process has no privilege left (no capabilities, no way to
    gain them: no_new_privs) and no way to the cache.
    """
    mounts = job["mounts"]
    for rel, target in ((mounts.get("program"), PROGRAM_DIR), (mounts.get("env"), ENV_DIR)):
        if rel:
            mount(f"{HIDDEN_CACHE}/{rel}", target, None, MS_BIND)
            ro = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV
            mount(None, target, None, ro)
    _check(_c().umount2(HIDDEN_CACHE.encode(), MNT_DETACH), "umount cache")
    uid = int(job["uid"])
    os.mkdir(WORK_DIR, 0o700)
    os.chown(WORK_DIR, uid, uid)
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    prctl(PR_SET_NO_NEW_PRIVS, 1)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--probe"]:
        try:
            probe(sys.argv[2])
        except OSError as exc:
            print(exc, file=sys.stderr)
            sys.exit(1)
        sys.exit(0)
    main(sys.argv)
