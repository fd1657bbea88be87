"""Real qrelay processes for crash tests (`kill -9` needs a process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from qrelay import testing


class Proc:
    """A `python -m qrelay ...` child with its output in a log file."""

    def __init__(
        self, args: Sequence[str], log_path: Path, env: dict[str, str] | None = None
    ) -> None:
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "qrelay", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "QRELAY_LOG_JSON": "1", **(env or {})},
        )

    def kill9(self) -> None:
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=10)
        self._log.close()

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=5)
        self._log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


def wait_serving(address: str, proc: Proc, timeout: float = 30.0) -> None:
    """`qrelay.testing.wait_serving`, with the process's log in the error."""
    try:
        testing.wait_serving(address, proc.popen, timeout)
    except (RuntimeError, TimeoutError) as exc:
        raise type(exc)(f"{exc}:\n{proc.output()[-4000:]}") from None


def start_broker(port: int, db: Path, log_dir: Path, env: dict[str, str] | None = None) -> Proc:
    proc = Proc(
        ["broker", "serve", "--listen", f"127.0.0.1:{port}", "--db", str(db)],
        log_dir / "broker.log",
        env,
    )
    wait_serving(f"127.0.0.1:{port}", proc)
    return proc
