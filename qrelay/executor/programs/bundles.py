"""Uploaded program archives, unpacked once per program id on the executor.

The archive is a tar.gz whose entries are paths relative to the program
directory (`qrelay.program.pack_program` writes one deterministically).
Unpacking uses tarfile's "data" filter: no absolute paths, no `..`, no
links out of the tree, no device files. With isolated sandboxes the cache
directory is root-only: a job sees its own program through a read-only bind
mount in its own mount namespace, and no other program.
"""

from __future__ import annotations

import hashlib
import io
import re
import shutil
import tarfile
import uuid
from pathlib import Path

import anyio

from qrelay._proto.v1 import executor_pb2
from qrelay.errors import InvalidArgument
from qrelay.executor.programs.environments import _make_readable

_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


class BundleCache:
    """Unpacked programs under `root`, keyed by program id."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # 0o700 when sandboxes are isolated: only a job's own mount reaches a program.
        self.dir_mode = 0o755

    async def ensure(self, bundle: executor_pb2.ProgramBundle) -> Path:
        """The directory holding the unpacked program (unpacking it if needed)."""
        key = _SAFE.sub("_", bundle.id) or "sha-" + hashlib.sha256(bundle.archive).hexdigest()[:32]
        target = self.root / key
        if target.is_dir():
            return target
        return await anyio.to_thread.run_sync(self._unpack, bundle.archive, target)

    def _unpack(self, archive: bytes, target: Path) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(self.dir_mode)
        staging = self.root / f".{target.name}.{uuid.uuid4().hex[:8]}"
        try:
            with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
                tar.extractall(staging, filter="data")
        except (tarfile.TarError, OSError, EOFError) as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise InvalidArgument(f"program archive is not a valid tar.gz: {exc}") from None
        staging.mkdir(exist_ok=True)  # an empty archive is still a (useless) program
        _make_readable(staging)
        try:
            staging.rename(target)
        except OSError:
            # Another job unpacked the same program first: use theirs.
            shutil.rmtree(staging, ignore_errors=True)
        return target
