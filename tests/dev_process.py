"""`qrelay dev --port 0` as a real process, for the CLI tests that talk to one."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ADDRESS = re.compile(r"broker on (127\.0\.0\.1:\d+)")


@contextmanager
def qrelay_dev(directory: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """Start `qrelay dev` (broker + aer/fake_manila executor) keeping its database in
    `directory`; yield the address it printed once serving, and the process.
    On exit it is asked to stop (SIGTERM) and killed if it does not."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "qrelay", "dev", "--port", "0", "--dir", str(directory)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "QRELAY_LOG_LEVEL": "warning", "COLUMNS": "200"},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # printed once broker and executor are up
        match = ADDRESS.search(line)
        assert match, f"qrelay dev printed {line!r} (exit code {proc.poll()})"
        yield match.group(1), proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
