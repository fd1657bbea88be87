"""A cgroup per sandbox: memory (tmpfs pages included), pids, CPU weight and quota, kill.

Both cgroup versions, found out at start (`detect`):

- **v2** (unified, most production hosts): one directory per sandbox with
  `memory.max` (+ `memory.swap.max` 0, `memory.oom.group` 1: out of memory,
  the whole job dies), `pids.max`, `cpu.weight`, `cpu.max`; killed with
  `cgroup.kill` (Linux 5.14+; else freeze, SIGKILL every pid, thaw).
- **v1** (separate hierarchies, e.g. this CI host): a directory per
  sandbox in the `memory`, `pids`, `cpu` (and `freezer`, if mounted)
  hierarchies with `memory.limit_in_bytes` (+ `memsw` when swap accounting
  is on), `pids.max`, `cpu.shares`, `cpu.cfs_quota_us`; killed by freezing,
  SIGKILLing every pid of `cgroup.procs`, thawing. A hybrid host (v1
  controllers plus an empty `unified` v2 mount) is v1.

Layout: `<parent>/qrelay-<executor pid>-<random>/sb-<n>`, where `<parent>` is
the executor's own cgroup (or `cgroup_parent`) in each hierarchy, so a job's
memory still counts against the executor's (container's) limit, and the
sandboxes together form one group beside the executor's own processes when
the CPU is shared. On v2 a cgroup with processes cannot hand controllers to
children: the executor moves itself into a leaf `qrelay-<pid>-<random>-executor`
first, and gives up (saying why) when the cgroup has other processes.

The sandbox's outer process joins its cgroup itself, first thing after exec
(it writes its pid into every `cgroup.procs` of `SandboxCgroup.procs_files`),
so everything it starts is inside before it exists. Nothing here ever fails a
job because clean-up raced: removal retries while the kernel still reaps,
then logs what it left.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import signal
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import structlog

log = structlog.get_logger(__name__)

V1_CONTROLLERS = ("memory", "pids", "cpu")  # required; freezer is used when mounted
V2_CONTROLLERS = ("memory", "pids", "cpu")
_CFS_PERIOD_US = 100_000


@dataclass(frozen=True)
class CgroupLimits:
    memory_bytes: int
    pids: int
    cpu_weight: int  # v2's scale: 1..10000, 100 = the default share
    cpu_quota: float | None  # CPUs at most (1.0 = one core); None: no cap


def _write(path: Path, value: str) -> None:
    with open(path, "w", encoding="ascii") as f:
        f.write(value)


def _read(path: Path) -> str:
    return path.read_text(encoding="ascii")


def _keyed(path: Path, key: str) -> int:
    """The value of `key` in a flat-keyed file (memory.events, memory.oom_control); 0 if absent."""
    with contextlib.suppress(OSError):
        for line in _read(path).splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    return 0


def _pids_in(procs_file: Path) -> set[int]:
    with contextlib.suppress(OSError):
        return {int(p) for p in _read(procs_file).split()}
    return set()


def _kill_all(pids: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


class SandboxCgroup(ABC):
    """The cgroup of one sandbox (in one or several hierarchies)."""

    name: str
    _on_gone: Callable[[], None] | None = None  # the driver's count of live cgroups

    @property
    @abstractmethod
    def procs_files(self) -> list[str]:
        """The `cgroup.procs` files the sandbox's outer process writes its pid into."""

    @property
    @abstractmethod
    def paths(self) -> list[Path]:
        """Its directories (one per hierarchy)."""

    @abstractmethod
    def set_memory_limit(self, limit: int) -> None: ...

    @abstractmethod
    def memory_usage(self) -> int: ...

    @abstractmethod
    def oom_kills(self) -> int:
        """How many processes the kernel killed because the group ran out of memory."""

    @abstractmethod
    def pids(self) -> set[int]:
        """Every process in the group (pids of the executor's namespace)."""

    @abstractmethod
    async def kill(self) -> None:
        """SIGKILL every process in the group, none escaping by forking meanwhile."""

    def remove(self) -> None:
        """rmdir every directory; OSError (EBUSY) while processes remain."""
        for path in self.paths:
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(path)

    async def destroy(self, attempts: int = 100) -> bool:
        """Kill and remove, retrying while the kernel finishes reaping; never raises.

        Returns whether every directory is gone (else the leftovers are logged
        and reaped by the next executor start).
        """
        try:
            with anyio.CancelScope(shield=True):
                removed = await self._destroy(attempts)
        finally:
            on_gone, self._on_gone = self._on_gone, None
            if on_gone is not None:
                on_gone()
        return removed

    async def _destroy(self, attempts: int) -> bool:
        for attempt in range(attempts):
            try:
                if attempt % 10 == 0:
                    await self.kill()
                self.remove()
                return True
            except OSError as exc:
                if exc.errno not in (errno.EBUSY, errno.EAGAIN):
                    log.warning("sandbox.cgroup_left", cgroup=self.name, error=str(exc))
                    return False
            await anyio.sleep(0.02)
        log.warning("sandbox.cgroup_left", cgroup=self.name, pids=sorted(self.pids()))
        return False


class Cgroups(ABC):
    """One cgroup driver per executor: makes each sandbox's cgroup under its own group."""

    version: int

    def __init__(self) -> None:
        self.group = f"qrelay-{os.getpid()}-{secrets.token_hex(3)}"
        self._count = 0
        self._live = 0

    @property
    @abstractmethod
    def where(self) -> str:
        """Where sandbox cgroups are made, for the start-up log."""

    @abstractmethod
    def setup(self) -> None:
        """Make the executor's group (idempotent); OSError saying what failed."""

    @abstractmethod
    def _make(self, name: str, limits: CgroupLimits) -> SandboxCgroup: ...

    @abstractmethod
    def _group_dirs(self) -> list[Path]: ...

    def create(self, limits: CgroupLimits) -> SandboxCgroup:
        """A new, empty cgroup with `limits` (the group is re-made if someone removed it)."""
        self._count += 1
        name = f"sb-{self._count}"
        try:
            cgroup = self._make(name, limits)
        except FileNotFoundError:
            self.setup()
            cgroup = self._make(name, limits)
        self._live += 1
        cgroup._on_gone = self._gone
        return cgroup

    def _gone(self) -> None:
        """The executor's group exists only while it has sandboxes (so none is left)."""
        self._live -= 1
        if self._live == 0:
            self.close()

    async def probe(self, limits: CgroupLimits) -> None:
        """Make the group and one cgroup with limits, then remove it; OSError if refused."""
        self.setup()
        cgroup = self._make("probe", limits)
        if not await cgroup.destroy():
            raise OSError(errno.EBUSY, f"could not remove the probe cgroup {cgroup.paths}")
        self.close()  # made again with the first sandbox

    def close(self) -> None:
        """Remove the executor's group (once its sandboxes are gone); never raises."""
        for path in self._group_dirs():
            with contextlib.suppress(OSError):
                os.rmdir(path)

    def reap_stale(self) -> int:
        """Remove the empty groups of executors that died (their sandboxes died with them)."""
        removed = 0
        for parent in {p.parent for p in self._group_dirs()}:
            with contextlib.suppress(OSError):
                for entry in os.scandir(parent):
                    if entry.is_dir() and _stale(entry.name, self.group):
                        removed += _remove_tree(Path(entry.path))
        return removed


def _stale(name: str, ours: str) -> bool:
    parts = name.split("-")
    if len(parts) < 3 or parts[0] != "qrelay" or not parts[1].isdigit() or name == ours:
        return False
    return not Path(f"/proc/{parts[1]}").exists()


def _remove_tree(path: Path) -> int:
    """rmdir a dead executor's group bottom-up, where empty.

    Nothing is killed: its sandboxes died with it (parent-death signal), and a
    group that still holds processes may belong to a live executor in another
    PID namespace sharing `cgroup_parent`; rmdir fails on those.
    """
    removed = 0
    for dirpath, _, _ in sorted(os.walk(path), key=lambda w: -len(w[0])):
        with contextlib.suppress(OSError):
            os.rmdir(dirpath)
            removed += 1
    return removed


# --- v1 -------------------------------------------------------------------------


class _V1Cgroup(SandboxCgroup):
    def __init__(self, name: str, dirs: dict[str, Path]) -> None:
        self.name = name
        self._dirs = dirs  # controller -> directory (controllers sharing a mount share one)

    @property
    def paths(self) -> list[Path]:
        return list(dict.fromkeys(self._dirs.values()))

    @property
    def procs_files(self) -> list[str]:
        return [str(p / "cgroup.procs") for p in self.paths]

    def set_memory_limit(self, limit: int) -> None:
        mem = self._dirs["memory"]
        memsw = mem / "memory.memsw.limit_in_bytes"
        try:
            _write(mem / "memory.limit_in_bytes", str(limit))
        except OSError as exc:
            if exc.errno != errno.EINVAL or not memsw.exists():
                raise
            _write(memsw, str(limit))  # raising: memsw (>= the limit) first
            _write(mem / "memory.limit_in_bytes", str(limit))
        if memsw.exists():  # with swap accounting: no swap beyond the limit either
            _write(memsw, str(limit))

    def memory_usage(self) -> int:
        return int(_read(self._dirs["memory"] / "memory.usage_in_bytes"))

    def oom_kills(self) -> int:
        return _keyed(self._dirs["memory"] / "memory.oom_control", "oom_kill")

    def pids(self) -> set[int]:
        return set().union(*(_pids_in(p / "cgroup.procs") for p in self.paths))

    async def kill(self) -> None:
        freezer = self._dirs.get("freezer")
        if freezer is None:
            for _ in range(20):  # without a freezer: until no fork outruns the kills
                pids = self.pids()
                if not pids:
                    return
                _kill_all(pids)
                await anyio.sleep(0.005)
            return
        state = freezer / "freezer.state"
        try:
            _write(state, "FROZEN")
            with anyio.move_on_after(1):
                while _read(state).strip() != "FROZEN":  # noqa: ASYNC110 - polling cgroupfs
                    await anyio.sleep(0.002)
            _kill_all(self.pids())
        finally:
            with contextlib.suppress(FileNotFoundError):
                _write(state, "THAWED")  # the kills land once thawed


class CgroupsV1(Cgroups):
    version = 1

    def __init__(self, bases: dict[str, Path]) -> None:
        super().__init__()
        self._bases = bases  # controller -> the parent directory in its hierarchy

    @property
    def where(self) -> str:
        return ", ".join(str(p / self.group) for p in dict.fromkeys(self._bases.values()))

    def _group_dirs(self) -> list[Path]:
        return [p / self.group for p in dict.fromkeys(self._bases.values())]

    def setup(self) -> None:
        for path in self._group_dirs():
            path.mkdir(exist_ok=True)

    def _make(self, name: str, limits: CgroupLimits) -> SandboxCgroup:
        made: dict[Path, Path] = {}
        dirs: dict[str, Path] = {}
        try:
            for controller, base in self._bases.items():
                if base not in made:
                    made[base] = base / self.group / name
                    made[base].mkdir()
                dirs[controller] = made[base]
            cgroup = _V1Cgroup(name, dirs)
            cgroup.set_memory_limit(limits.memory_bytes)
            _write(dirs["pids"] / "pids.max", str(limits.pids))
            _write(dirs["cpu"] / "cpu.shares", str(max(2, limits.cpu_weight * 1024 // 100)))
            if limits.cpu_quota is not None:
                period_file = dirs["cpu"] / "cpu.cfs_period_us"
                period = int(_read(period_file)) if period_file.exists() else _CFS_PERIOD_US
                quota = max(1000, int(limits.cpu_quota * period))
                _write(dirs["cpu"] / "cpu.cfs_quota_us", str(quota))
        except BaseException:
            for path in made.values():
                with contextlib.suppress(OSError):
                    os.rmdir(path)
            raise
        return cgroup


# --- v2 -------------------------------------------------------------------------


class _V2Cgroup(SandboxCgroup):
    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path

    @property
    def paths(self) -> list[Path]:
        return [self.path]

    @property
    def procs_files(self) -> list[str]:
        return [str(self.path / "cgroup.procs")]

    def set_memory_limit(self, limit: int) -> None:
        _write(self.path / "memory.max", str(limit))

    def memory_usage(self) -> int:
        return int(_read(self.path / "memory.current"))

    def oom_kills(self) -> int:
        events = self.path / "memory.events"
        return max(_keyed(events, "oom_kill"), _keyed(events, "oom_group_kill"))

    def pids(self) -> set[int]:
        return _pids_in(self.path / "cgroup.procs")

    async def kill(self) -> None:
        if (self.path / "cgroup.kill").exists():
            _write(self.path / "cgroup.kill", "1")
            return
        freeze = self.path / "cgroup.freeze"  # before Linux 5.14
        try:
            _write(freeze, "1")
            with anyio.move_on_after(1):
                while _keyed(self.path / "cgroup.events", "frozen") != 1:  # noqa: ASYNC110
                    await anyio.sleep(0.002)
            _kill_all(self.pids())
        finally:
            with contextlib.suppress(FileNotFoundError):
                _write(freeze, "0")


class CgroupsV2(Cgroups):
    version = 2

    def __init__(self, parent: Path) -> None:
        super().__init__()
        self._parent = parent

    @property
    def where(self) -> str:
        return str(self._parent / self.group)

    def _group_dirs(self) -> list[Path]:
        return [self._parent / self.group, self._parent / f"{self.group}-executor"]

    def setup(self) -> None:
        """Enable the controllers for the executor's group, moving the executor to a leaf
        if its cgroup holds processes (v2's "no internal processes" rule)."""
        available = _read(self._parent / "cgroup.controllers").split()
        missing = [c for c in V2_CONTROLLERS if c not in available]
        if missing:
            raise OSError(
                errno.ENOTSUP,
                f"controllers {', '.join(missing)} are not delegated to {self._parent}",
            )
        enable = " ".join(f"+{c}" for c in V2_CONTROLLERS)
        subtree = self._parent / "cgroup.subtree_control"
        if not set(V2_CONTROLLERS) <= set(_read(subtree).split()):
            try:
                _write(subtree, enable)
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                self._leave_parent()
                _write(subtree, enable)
        group = self._parent / self.group
        group.mkdir(exist_ok=True)
        _write(group / "cgroup.subtree_control", enable)

    def _leave_parent(self) -> None:
        """Move the executor into a leaf of its own; refuse if others share its cgroup."""
        others = _pids_in(self._parent / "cgroup.procs") - {os.getpid()}
        if others:
            raise OSError(
                errno.EBUSY,
                f"{self._parent} holds processes other than the executor ({len(others)}), so "
                "it cannot hand controllers to sandboxes; give the executor a cgroup of its own "
                "(systemd Delegate=yes, a container) or set cgroup_parent",
            )
        leaf = self._parent / f"{self.group}-executor"
        leaf.mkdir(exist_ok=True)
        _write(leaf / "cgroup.procs", str(os.getpid()))
        log.info("sandbox.cgroup_executor_moved", to=str(leaf))

    def _make(self, name: str, limits: CgroupLimits) -> SandboxCgroup:
        path = self._parent / self.group / name
        path.mkdir()
        try:
            cgroup = _V2Cgroup(name, path)
            cgroup.set_memory_limit(limits.memory_bytes)
            if (path / "memory.swap.max").exists():
                _write(path / "memory.swap.max", "0")
            if (path / "memory.oom.group").exists():
                _write(path / "memory.oom.group", "1")
            _write(path / "pids.max", str(limits.pids))
            _write(path / "cpu.weight", str(limits.cpu_weight))
            if limits.cpu_quota is not None:
                quota = max(1000, int(limits.cpu_quota * _CFS_PERIOD_US))
                _write(path / "cpu.max", f"{quota} {_CFS_PERIOD_US}")
        except BaseException:
            with contextlib.suppress(OSError):
                os.rmdir(path)
            raise
        return cgroup


# --- detection --------------------------------------------------------------------


@dataclass(frozen=True)
class _Mount:
    root: str  # the path of the hierarchy this mount shows
    point: Path
    fstype: str
    options: frozenset[str]  # super options: the v1 controllers


def _mounts(mountinfo: str) -> list[_Mount]:
    out = []
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3 or not tail[0].startswith("cgroup"):
            continue
        point = Path(fields[4].replace("\\040", " "))
        out.append(_Mount(fields[3], point, tail[0], frozenset(tail[2].split(","))))
    return out


def _own_cgroups(text: str) -> dict[str, str]:
    """controller -> this process's cgroup path ("" for the v2 hierarchy)."""
    own: dict[str, str] = {}
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        for name in controllers.split(",") if controllers else [""]:
            own[name.removeprefix("name=")] = path
    return own


def _inside(mount: _Mount, path: str) -> Path:
    """The directory of cgroup `path` under `mount` (whose root may be a sub-cgroup)."""
    root = mount.root.rstrip("/")
    if root and (path == root or path.startswith(root + "/")):
        path = path[len(root) :]
    return mount.point / path.lstrip("/")


def detect(
    parent: str = "",
    mountinfo: str | None = None,
    own: str | None = None,
) -> Cgroups | str:
    """The driver for this host, or why there is none. `parent`: cgroup_parent."""
    if mountinfo is None:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    if own is None:
        own = Path("/proc/self/cgroup").read_text()
    mounts, cgroups = _mounts(mountinfo), _own_cgroups(own)
    v1 = {c: m for m in mounts if m.fstype == "cgroup" for c in m.options}
    if "memory" in v1:
        lacking = [c for c in V1_CONTROLLERS if c not in v1]
        if lacking:
            return f"cgroup v1 without the {', '.join(lacking)} controller(s)"
        bases = {
            c: _inside(v1[c], parent or cgroups.get(c, "/"))
            for c in (*V1_CONTROLLERS, "freezer")
            if c in v1
        }
        return CgroupsV1(bases)
    unified = [m for m in mounts if m.fstype == "cgroup2"]
    if unified:
        mount = min(unified, key=lambda m: len(str(m.point)))
        return CgroupsV2(_inside(mount, parent or cgroups.get("", "/")))
    return "no cgroup file system is mounted"
