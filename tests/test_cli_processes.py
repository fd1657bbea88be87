"""`qrelay dev` as a real process, inspected with the CLI's own client commands.

Every command runs as its own process, as a user runs it (grpc.aio in one
process across many short-lived event loops is not a supported pattern).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from qrelay._proto.v1 import jobs_pb2, jobs_pb2_grpc
from tests.dev_process import qrelay_dev
from tests.integration.rawstubs import BELL_QASM3, sampler_spec

pytestmark = pytest.mark.slow


@pytest.fixture
def dev_stack(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """`qrelay dev --port 0` in its own process; yields the address it printed."""
    with qrelay_dev(tmp_path / "q") as running:
        yield running


@dataclass
class Ran:
    exit_code: int
    output: str


def qrelay(*args: str) -> Ran:
    """Run `qrelay ARGS` as a process; stdout and stderr together, like a terminal."""
    done = subprocess.run(
        [sys.executable, "-m", "qrelay", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200", "QRELAY_LOG_LEVEL": "warning"},
    )
    return Ran(done.returncode, done.stdout)


def test_dev_stack_lists_its_backends_and_stops_cleanly_on_sigint(
    dev_stack: tuple[str, subprocess.Popen[str]],
) -> None:
    address, proc = dev_stack
    listed = qrelay("backends", "--broker", address)
    assert listed.exit_code == 0, listed.output
    rows = {line.split()[0]: line.split() for line in listed.output.splitlines() if line.strip()}
    assert rows["aer"][1] == "online"
    assert rows["fake_manila"][1] == "online"

    # A job submitted with a raw stub shows up in `jobs list`, `show` and `watch`.
    with grpc.insecure_channel(address) as channel:
        job = jobs_pb2_grpc.JobServiceStub(channel).Submit(
            jobs_pb2.SubmitRequest(spec=sampler_spec("aer", BELL_QASM3, shots=64)), timeout=10
        )
    watched = qrelay("jobs", "watch", job.id, "--broker", address)
    assert watched.exit_code == 0, watched.output
    assert "QUEUED" in watched.output
    assert "RUNNING" in watched.output
    assert "DONE" in watched.output
    assert "64 shots" in watched.output
    listed_jobs = qrelay("jobs", "list", "--broker", address)
    assert listed_jobs.exit_code == 0, listed_jobs.output
    assert job.id in listed_jobs.output
    shown = qrelay("jobs", "show", job.id, "--broker", address)
    assert shown.exit_code == 0, shown.output
    assert "DONE" in shown.output
    cancelled = qrelay("jobs", "cancel", job.id, "--broker", address)
    assert cancelled.exit_code == 0, cancelled.output
    assert "DONE" in cancelled.output, "cancelling a finished job changes nothing"
    missing = qrelay("jobs", "show", "j-nope", "--broker", address)
    assert missing.exit_code == 1
    assert "NOT_FOUND" in missing.output

    # A job that fails: watch shows the error's code and message and exits 1.
    with grpc.insecure_channel(address) as channel:
        bad = jobs_pb2_grpc.JobServiceStub(channel).Submit(
            jobs_pb2.SubmitRequest(spec=sampler_spec("aer", "OPENQASM 3.0;\nnot qasm;\n")),
            timeout=10,
        )
    failed = qrelay("jobs", "watch", bad.id, "--broker", address)
    assert failed.exit_code == 1, failed.output
    assert "FAILED" in failed.output
    assert "INVALID_ARGUMENT" in failed.output

    proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.returncode == 0
