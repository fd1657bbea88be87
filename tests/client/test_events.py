"""Decoding of wire job events into `JobEvent`s: every payload kind, errors with tracebacks."""

from __future__ import annotations

import numpy as np
import pytest
from qiskit.providers import JobStatus

from qrelay._proto.v1 import types_pb2
from qrelay.client import Progress
from qrelay.client.job import decode_event, decode_job_result, job_error, state_for_status
from qrelay.errors import Internal, InvalidArgument, QRelayError, ResourceExhausted
from qrelay.values import encode_value


async def test_interim_and_program_result_values_are_decoded() -> None:
    value = {"energy": -1.25, "params": np.array([0.1, 0.2])}
    ev = types_pb2.JobEvent(
        job_id="j-1", seq=5, interim=types_pb2.Interim(value_json=encode_value(value))
    )
    decoded = await decode_event(ev)
    assert decoded.kind == "interim"
    assert decoded.seq == 5
    assert decoded.data["energy"] == -1.25
    np.testing.assert_array_equal(decoded.data["params"], [0.1, 0.2])

    final = types_pb2.JobResult(program_json=encode_value([1, 2, 3]))
    assert await decode_job_result(final) == [1, 2, 3]


async def test_log_and_state_events_carry_text_and_job_status() -> None:
    log = types_pb2.JobEvent(
        job_id="j-1", seq=3, log=types_pb2.LogLine(text="step 1", stream="stdout")
    )
    decoded = await decode_event(log)
    assert (decoded.kind, decoded.data, decoded.message) == ("log", "step 1", "stdout")

    state = types_pb2.JobEvent(
        job_id="j-1",
        seq=4,
        state=types_pb2.StateChange(state=types_pb2.JOB_STATE_FAILED, message="boom"),
    )
    decoded = await decode_event(state)
    assert (decoded.kind, decoded.data, decoded.message) == ("state", JobStatus.ERROR, "boom")


async def test_error_event_becomes_the_exception_of_its_code_with_the_user_traceback() -> None:
    error = types_pb2.JobError(
        code=2,
        message="division by zero",
        type="ZeroDivisionError",
        traceback=['  File "main.py", line 3, in main', "    1 / 0"],
    )
    decoded = await decode_event(types_pb2.JobEvent(job_id="j-1", seq=6, error=error))
    assert decoded.kind == "error"
    exc = decoded.data
    assert type(exc) is QRelayError
    assert str(exc) == "ZeroDivisionError: division by zero"
    assert exc.__notes__ == ['  File "main.py", line 3, in main\n    1 / 0\n']
    limit = job_error(types_pb2.JobError(code=8, message="memory limit of 512 MiB exceeded"))
    assert isinstance(limit, ResourceExhausted)


async def test_malformed_events_are_internal_errors() -> None:
    with pytest.raises(Internal, match="without a payload"):
        await decode_event(types_pb2.JobEvent(job_id="j-1", seq=1))
    bad_state = types_pb2.JobEvent(job_id="j-1", seq=1, state=types_pb2.StateChange(state=0))
    with pytest.raises(Internal, match="unknown job state 0"):
        await decode_event(bad_state)
    with pytest.raises(Internal, match="without a value"):
        await decode_job_result(types_pb2.JobResult())


def test_state_names_map_to_wire_states() -> None:
    assert state_for_status("error") == types_pb2.JOB_STATE_FAILED
    assert state_for_status(" Queued ") == types_pb2.JOB_STATE_QUEUED
    assert state_for_status(JobStatus.CANCELLED) == types_pb2.JOB_STATE_CANCELLED
    with pytest.raises(ValueError, match="unknown job state 'later'"):
        state_for_status("later")
    assert not isinstance(job_error(types_pb2.JobError(code=3)), ResourceExhausted)
    assert isinstance(job_error(types_pb2.JobError(code=3)), InvalidArgument)


async def test_a_progress_event_decodes_to_stage_and_pubs() -> None:
    wire = types_pb2.JobEvent(
        job_id="j-1", seq=4, progress=types_pb2.Progress(stage="run", done=3, total=12), attempt=1
    )
    event = await decode_event(wire)
    assert event.kind == "progress"
    assert event.data == Progress(stage="run", done=3, total=12)
    assert event.data.fraction == 0.25
