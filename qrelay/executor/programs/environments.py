"""Program requirements, installed once per distinct set and cached by its hash.

``pip install --target <cache>/envs/<hash>`` and the directory goes on the
sandbox's sys.path ahead of the executor's site-packages, which the sandbox
interpreter already has: qiskit, qiskit-aer and qrelay are never reinstalled
(a --system-site-packages venv would let pip shadow them with a second copy).
Concurrency-safe across jobs and executor processes: an flock on
``<hash>.lock`` serialises installers, the install goes to a temporary
directory renamed into place, and a ``.complete`` marker says it finished.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import anyio
import structlog

from qrelay.errors import DeadlineExceeded, InvalidArgument

log = structlog.get_logger(__name__)

_MARKER = ".complete"


def requirements_hash(requirements: Sequence[str]) -> str:
    """Content hash of a requirement set, per interpreter version (wheels differ by ABI)."""
    lines = sorted({r.strip() for r in requirements if r.strip()})
    tag = f"py{sys.version_info.major}.{sys.version_info.minor}"
    return hashlib.sha256("\n".join([tag, *lines]).encode()).hexdigest()[:32]


class EnvironmentCache:
    """Requirement environments under `root`, each built once."""

    def __init__(self, root: Path, python: str, pip_timeout_s: float) -> None:
        self.root = root
        self._python = python
        self._pip_timeout_s = pip_timeout_s
        # 0o700 when sandboxes are isolated: a job reaches only its own environment,
        # through a read-only bind mount.
        self.dir_mode = 0o755
        self.installs = 0  # pip runs by this object (tests and metrics read it)

    async def ensure(self, requirements: Sequence[str]) -> Path | None:
        """The directory holding `requirements` (installing them if needed); None for none.

        A failed install raises `InvalidArgument` carrying pip's own message.
        """
        if not any(r.strip() for r in requirements):
            return None
        digest = requirements_hash(requirements)
        target = self.root / digest
        if (target / _MARKER).exists():
            return target
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, self.dir_mode)
        async with _file_lock(self.root / f"{digest}.lock"):
            if (target / _MARKER).exists():
                return target
            await self._install(requirements, target)
        return target

    async def _install(self, requirements: Sequence[str], target: Path) -> None:
        staging = self.root / f".{target.name}.{uuid.uuid4().hex[:8]}"
        bound = log.bind(env=target.name, requirements=list(requirements))
        bound.info("environment.installing")
        cmd = [
            self._python,
            "-m",
            "pip",
            "install",
            "--no-input",
            "--disable-pip-version-check",
            "--no-warn-script-location",
            "--target",
            str(staging),
            *[r.strip() for r in requirements if r.strip()],
        ]
        self.installs += 1
        try:
            with anyio.fail_after(self._pip_timeout_s):
                proc = await anyio.run_process(cmd, check=False, stdin=subprocess.DEVNULL)
        except TimeoutError:
            await anyio.to_thread.run_sync(shutil.rmtree, staging, True)
            raise DeadlineExceeded(
                f"installing requirements took longer than {self._pip_timeout_s:g} s"
            ) from None
        if proc.returncode != 0:
            await anyio.to_thread.run_sync(shutil.rmtree, staging, True)
            message = _pip_message(proc.stderr.decode("utf-8", "replace"))
            bound.warning("environment.install_failed", returncode=proc.returncode)
            raise InvalidArgument(f"installing requirements failed: {message}")
        (staging / _MARKER).touch()
        await anyio.to_thread.run_sync(_make_readable, staging)
        # Replaces a stale, unfinished one left by a crashed installer.
        await anyio.to_thread.run_sync(shutil.rmtree, target, True)
        staging.rename(target)
        bound.info("environment.installed")


def _pip_message(stderr: str) -> str:
    """pip's ERROR lines (its own explanation), or the tail of its output."""
    lines = [line.rstrip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    chosen = errors or lines[-8:]
    return "\n".join(chosen)[-4000:] or "pip exited without a message"


def _make_readable(root: Path) -> None:
    """Sandboxes run as another user: directories searchable, files readable."""
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, os.stat(path).st_mode | 0o444)


@contextlib.asynccontextmanager
async def _file_lock(path: Path) -> AsyncIterator[None]:
    """An exclusive flock, polled so waiting stays cancellable and off the event loop."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                await anyio.sleep(0.05)
        yield
    finally:
        os.close(fd)  # closing releases the lock
