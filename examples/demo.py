"""`make demo`: start `qrelay dev`, run the examples against it, shut down.

Everything a new user would do by hand, in one command: a real broker and
executor in their own process on a free loopback port, SQLite under .qrelay/.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from rich.console import Console

from examples import estimator_sweep, sampler_ghz
from qrelay.testing import free_port, wait_serving


def _wait_backends(address: str, names: tuple[str, ...], timeout: float = 60.0) -> None:
    """The broker serves before its executor has announced; wait for the backends too."""
    from qrelay.client import QRelayService

    deadline = time.monotonic() + timeout
    with QRelayService(address) as service:
        while time.monotonic() < deadline:
            online = {b.name for b in service.backends() if b.online}
            if online.issuperset(names):
                return
            time.sleep(0.2)
    raise SystemExit(f"backends {', '.join(names)} did not come online within {timeout:.0f}s")


def main() -> int:
    console = Console()
    port = free_port()
    address = f"127.0.0.1:{port}"
    console.rule("[bold]qrelay demo")
    console.print(
        f"starting [cyan]qrelay dev --port {port}[/] (broker + executor: aer, fake_manila)"
    )
    env = {**os.environ, "QRELAY_LOG_LEVEL": os.environ.get("QRELAY_LOG_LEVEL", "warning")}
    dev = subprocess.Popen([sys.executable, "-m", "qrelay", "dev", "--port", str(port)], env=env)
    try:
        try:
            wait_serving(address, dev, timeout=60)
        except (RuntimeError, TimeoutError) as exc:
            raise SystemExit(f"qrelay dev did not start: {exc}") from None
        _wait_backends(address, ("aer", "fake_manila"))
        console.rule("Sampler: GHZ on an ideal and a noisy device")
        sampler_ghz.main(address)
        console.rule("Estimator: a parameter sweep in one job")
        estimator_sweep.main(address)
        extra = os.path.join(os.path.dirname(__file__), "vqe", "run_program.py")
        if os.path.exists(extra):
            from examples.vqe import run_program

            console.rule("Program: VQE running beside the backend, streamed live")
            run_program.main(address)
    finally:
        dev.send_signal(signal.SIGINT)
        try:
            dev.wait(timeout=30)
        except subprocess.TimeoutExpired:
            dev.kill()
    console.rule(f"[green]done[/] (qrelay dev exited with {dev.returncode})")
    return 0 if dev.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
