"""`qrelay jobs delete ID` and `qrelay jobs list --tag KEY`, each as its own process
(as a user runs them) against a real broker and executor."""

from __future__ import annotations

import os
import subprocess
import sys

import grpc

from qrelay._proto.v1 import jobs_pb2, jobs_pb2_grpc, types_pb2
from qrelay.testing import LocalStack
from tests.integration.rawstubs import BELL_QASM3, sampler_spec


def qrelay(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qrelay", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200", "QRELAY_LOG_LEVEL": "warning"},
    )


def test_jobs_list_by_tag_then_delete_a_finished_job(sync_stack: LocalStack) -> None:
    address = sync_stack.address
    with grpc.insecure_channel(address) as channel:
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        spec = sampler_spec("aer", BELL_QASM3, shots=16)
        spec.tags["exp"] = "vqe"
        tagged = stub.Submit(jobs_pb2.SubmitRequest(spec=spec), timeout=10)
        plain = stub.Submit(
            jobs_pb2.SubmitRequest(spec=sampler_spec("aer", BELL_QASM3, shots=16)), timeout=10
        )
        for event in stub.Watch(jobs_pb2.WatchRequest(job_id=tagged.id), timeout=30):
            last = event
        assert last.state.state == types_pb2.JOB_STATE_DONE

    listed = qrelay("jobs", "list", "--tag", "exp", "--broker", address)
    assert listed.returncode == 0, listed.stdout
    assert tagged.id in listed.stdout
    assert plain.id not in listed.stdout

    deleted = qrelay("jobs", "delete", tagged.id, "--broker", address)
    assert deleted.returncode == 0, deleted.stdout
    assert f"{tagged.id}: deleted" in deleted.stdout
    again = qrelay("jobs", "delete", tagged.id, "--broker", address)
    assert again.returncode == 1
    assert "NOT_FOUND" in again.stdout
    assert f"job '{tagged.id}' not found" in again.stdout
