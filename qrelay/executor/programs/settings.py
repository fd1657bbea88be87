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
        description="Address space a program may add on top of the warm interpreter (RLIMIT_AS).",
    )
    max_open_files: int = Field(256, gt=16, description="Open file descriptors (RLIMIT_NOFILE).")
    max_processes: int = Field(
        64,
        gt=1,
        description="Processes and threads of one job (RLIMIT_NPROC of the job's own uid).",
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
