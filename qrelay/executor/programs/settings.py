"""Sandbox limits and locations, one pydantic-settings object (env prefix QRELAY_SANDBOX_)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class SandboxSettings(BaseSettings):
    """How program sandboxes are started and what they may use.

    Defaults suit a laptop; every field is also `QRELAY_SANDBOX_<NAME>`.
    """

    model_config = SettingsConfigDict(env_prefix="QRELAY_SANDBOX_", extra="ignore")

    cpu_seconds: float = Field(300.0, gt=0, description="CPU time a program may use (RLIMIT_CPU).")
    memory_mb: int = Field(
        2048,
        gt=0,
        description="Memory a job may add on top of its warm interpreter: its cgroup's limit "
        "(every process of the job and the files it writes to its tmpfs, together) and each "
        "process's address space (RLIMIT_AS).",
    )
    warm_memory_mb: int = Field(
        1024,
        gt=0,
        description="Memory limit of a sandbox's cgroup while it imports qiskit and waits for "
        "a job; when a job is assigned the limit becomes what it uses then + memory_mb.",
    )
    cpu_weight: int = Field(
        100,
        ge=1,
        le=10000,
        description="CPU weight of each sandbox's cgroup (cgroup v2 scale, 100 = default; v1 "
        "cpu.shares = weight x 1024 / 100): busy jobs share the CPU equally whatever their "
        "process counts, and all sandboxes together form one group beside the executor.",
    )
    cpu_quota: float | None = Field(
        None,
        gt=0,
        description="CPUs one sandbox may use at most (1.0 = one core; cpu.max or "
        "cpu.cfs_quota_us); unset: no cap beyond the weight.",
    )
    cgroup_parent: str = Field(
        "",
        description="cgroup (a path inside each hierarchy, e.g. /qrelay.slice) under which "
        "sandbox cgroups are made; empty: the executor's own cgroup. It must be writable by "
        "the executor (root, or a delegated cgroup).",
    )
    max_open_files: int = Field(256, gt=16, description="Open file descriptors (RLIMIT_NOFILE).")
    max_processes: int = Field(
        64,
        gt=1,
        description="Processes and threads of one job (its cgroup's pids.max; without "
        "cgroups RLIMIT_NPROC of the job's own uid).",
    )
    file_size_mb: int = Field(
        1024, gt=0, description="Largest file a program may write (RLIMIT_FSIZE)."
    )
    disk_mb: int = Field(
        1024,
        gt=0,
        description="Size of the job's private tmpfs: its work directory, /tmp, /var/tmp and "
        "/dev/shm together (memory-backed, gone with the job).",
    )
    wall_timeout_s: float = Field(600.0, gt=0, description="Wall-clock limit per program run.")
    max_log_bytes: int = Field(1 << 20, ge=0, description="Log bytes forwarded per job.")
    warm_pool_size: int = Field(1, ge=0, description="Interpreters kept started and imported.")
    warm_nice: int = Field(
        19,
        ge=0,
        le=19,
        description="Nice value a sandbox imports at, ahead of need, so a replacement's 1-2 s "
        "of imports never takes the CPU from running jobs; a job taking it gets the executor's "
        "priority back (needs root or RLIMIT_NICE; otherwise sandboxes are not niced).",
    )
    cache_dir: Path = Field(
        Path(tempfile.gettempdir()) / "qrelay-sandbox",
        description="Unpacked programs, requirement environments and work directories.",
    )
    uid_range_start: int = Field(
        200_000,
        ge=1000,
        description="First uid of the range sandboxes run as (one uid per sandbox, so per job, "
        "when the executor runs as root). The uids need no passwd entry. Executors sharing a "
        "host may share a range: each uid is claimed with a lock in uid_lock_dir.",
    )
    uid_range_size: int = Field(
        1000, ge=1, description="How many uids from uid_range_start sandboxes may use."
    )
    uid_lock_dir: Path = Field(
        Path("/run/qrelay/uids"),
        description="Host-wide directory of per-uid lock files (`<uid>.lock`, an exclusive "
        "flock held for the life of each sandbox), so executors on one host never hand the "
        "same uid to two jobs. Containers on one host must share it (a host path volume).",
    )
    extra_read_only_paths: list[str] = Field(
        default_factory=list,
        description="Host paths an isolated sandbox may read besides the system directories, "
        "the interpreter, its site-packages and qrelay (e.g. a shared data set).",
    )
    allow_weak_sandbox: bool = Field(
        False,
        description="Run tenant programs even when this host cannot isolate them fully (not "
        "root, or namespaces refused); the missing protections are logged at start.",
    )
    python: str = Field(sys.executable, description="Interpreter for sandboxes (has qiskit).")
    start_timeout_s: float = Field(120.0, gt=0, description="Deadline for a sandbox to warm up.")
    pip_timeout_s: float = Field(600.0, gt=0, description="Deadline for installing requirements.")
