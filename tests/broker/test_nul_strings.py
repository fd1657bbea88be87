"""NUL characters in string fields, through every RPC, on both stores.

Protobuf strings may hold NUL; PostgreSQL text may not, so before this check
a NUL in a job id, backend, session id, tag, program name, page token,
idempotency key... answered INTERNAL/UNKNOWN on PostgreSQL (and was stored
as is on SQLite). Every string field of every request is generated from the
request's descriptor, so a field added later is covered without touching
this file. Each must answer INVALID_ARGUMENT naming the field, the same on
both stores, and the broker keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from qrelay._proto.v1 import (
    backends_pb2,
    backends_pb2_grpc,
    executor_pb2,
    executor_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    programs_pb2,
    programs_pb2_grpc,
    sessions_pb2,
    sessions_pb2_grpc,
)
from qrelay.broker.server import Broker, running_broker
from tests.broker.conftest import announce, broker_settings, postgres_schema, sampler_spec

NUL = "a\x00b"
# Setting one field of a request: the path shown in a failure, and the setter.
Case = tuple[str, Callable[[Message], None]]


def _nul_cases(descriptor: Descriptor, seen: tuple[str, ...] = ()) -> Iterator[Case]:
    """Every way to put a NUL into one string of a message of this type: each string
    field (singular or repeated), each map key and value, inside nested messages
    (each message type once per path, so Struct's recursion ends)."""
    seen = (*seen, descriptor.full_name)
    for field in descriptor.fields:
        name = field.name
        if field.type == FieldDescriptor.TYPE_STRING:
            if field.is_repeated:
                yield name, lambda m, n=name: getattr(m, n).append(NUL)
            else:
                yield name, lambda m, n=name: setattr(m, n, NUL)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            sub = field.message_type
            if sub.GetOptions().map_entry:
                key, value = sub.fields_by_name["key"], sub.fields_by_name["value"]
                if key.type != FieldDescriptor.TYPE_STRING:
                    continue
                if value.type == FieldDescriptor.TYPE_STRING:
                    yield f"{name} key", lambda m, n=name: getattr(m, n).__setitem__(NUL, "v")
                    yield f"{name} value", lambda m, n=name: getattr(m, n).__setitem__("k", NUL)
                elif value.type == FieldDescriptor.TYPE_MESSAGE:
                    yield f"{name} key", lambda m, n=name: getattr(m, n)[NUL].SetInParent()
                    if value.message_type.full_name not in seen:
                        for path, setter in _nul_cases(value.message_type, seen):
                            yield (
                                f"{name}['k'].{path}",
                                lambda m, n=name, s=setter: s(getattr(m, n)["k"]),
                            )
            elif sub.full_name not in seen:
                for path, setter in _nul_cases(sub, seen):
                    if field.is_repeated:
                        yield (
                            f"{name}[0].{path}",
                            lambda m, n=name, s=setter: s(getattr(m, n).add()),
                        )
                    else:
                        yield f"{name}.{path}", lambda m, n=name, s=setter: s(getattr(m, n))


def _valid_submit() -> jobs_pb2.SubmitRequest:
    return jobs_pb2.SubmitRequest(spec=sampler_spec(), idempotency_key="k-1")


# Every unary (or server-streaming) RPC whose request has a string field:
# (service stub, method, request type, a valid request to put the NUL into).
UNARY_RPCS: list[tuple[type[Any], str, type[Message], Callable[[], Message]]] = [
    (jobs_pb2_grpc.JobServiceStub, "Submit", jobs_pb2.SubmitRequest, _valid_submit),
    (jobs_pb2_grpc.JobServiceStub, "Run", jobs_pb2.SubmitRequest, _valid_submit),
    (jobs_pb2_grpc.JobServiceStub, "Get", jobs_pb2.GetJobRequest, jobs_pb2.GetJobRequest),
    (jobs_pb2_grpc.JobServiceStub, "List", jobs_pb2.ListJobsRequest, jobs_pb2.ListJobsRequest),
    (jobs_pb2_grpc.JobServiceStub, "Cancel", jobs_pb2.CancelJobRequest, jobs_pb2.CancelJobRequest),
    (jobs_pb2_grpc.JobServiceStub, "Watch", jobs_pb2.WatchRequest, jobs_pb2.WatchRequest),
    (
        jobs_pb2_grpc.JobServiceStub,
        "GetResult",
        jobs_pb2.GetResultRequest,
        jobs_pb2.GetResultRequest,
    ),
    (jobs_pb2_grpc.JobServiceStub, "Delete", jobs_pb2.DeleteJobRequest, jobs_pb2.DeleteJobRequest),
    (
        jobs_pb2_grpc.JobServiceStub,
        "UpdateTags",
        jobs_pb2.UpdateTagsRequest,
        jobs_pb2.UpdateTagsRequest,
    ),
    (
        programs_pb2_grpc.ProgramServiceStub,
        "Upload",
        programs_pb2.UploadProgramRequest,
        lambda: programs_pb2.UploadProgramRequest(
            name="p", archive=b"x", entry_point="main:main", requirements=["numpy"]
        ),
    ),
    (
        programs_pb2_grpc.ProgramServiceStub,
        "Get",
        programs_pb2.GetProgramRequest,
        programs_pb2.GetProgramRequest,
    ),
    (
        programs_pb2_grpc.ProgramServiceStub,
        "List",
        programs_pb2.ListProgramsRequest,
        programs_pb2.ListProgramsRequest,
    ),
    (
        programs_pb2_grpc.ProgramServiceStub,
        "Delete",
        programs_pb2.DeleteProgramRequest,
        programs_pb2.DeleteProgramRequest,
    ),
    (
        sessions_pb2_grpc.SessionServiceStub,
        "Create",
        sessions_pb2.CreateSessionRequest,
        lambda: sessions_pb2.CreateSessionRequest(backend="aer"),
    ),
    (
        sessions_pb2_grpc.SessionServiceStub,
        "Get",
        sessions_pb2.GetSessionRequest,
        sessions_pb2.GetSessionRequest,
    ),
    (
        sessions_pb2_grpc.SessionServiceStub,
        "Close",
        sessions_pb2.CloseSessionRequest,
        sessions_pb2.CloseSessionRequest,
    ),
    (
        sessions_pb2_grpc.SessionServiceStub,
        "Cancel",
        sessions_pb2.CancelSessionRequest,
        sessions_pb2.CancelSessionRequest,
    ),
    (
        backends_pb2_grpc.BackendServiceStub,
        "Get",
        backends_pb2.GetBackendRequest,
        backends_pb2.GetBackendRequest,
    ),
]
STREAMING = {"Run", "Watch"}


@contextlib.asynccontextmanager
async def broker_on(store: str, tmp_path: Path) -> AsyncIterator[Broker]:
    async with contextlib.AsyncExitStack() as stack:
        overrides: dict[str, Any] = {}
        if store == "postgres":
            dsn, schema = await stack.enter_async_context(postgres_schema())
            overrides = {"database_url": dsn, "database_schema": schema}
        broker = await stack.enter_async_context(
            running_broker(broker_settings(tmp_path, **overrides))
        )
        await announce(broker.address)
        yield broker


async def _status(call: Any, streaming: bool) -> tuple[grpc.StatusCode, str]:
    try:
        if streaming:
            async for _ in call:
                pass
        else:
            await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


async def _still_serves(channel: grpc.aio.Channel) -> None:
    """A good Submit and Get right after: the broker is unharmed."""
    jobs = jobs_pb2_grpc.JobServiceStub(channel)
    job = await jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec()), timeout=10)
    assert (await jobs.Get(jobs_pb2.GetJobRequest(job_id=job.id), timeout=10)).id == job.id


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
@pytest.mark.parametrize(
    ("stub_type", "method", "request_type", "valid"),
    UNARY_RPCS,
    ids=[f"{stub.__name__.removesuffix('Stub')}.{method}" for stub, method, *_ in UNARY_RPCS],
)
async def test_a_nul_in_any_string_field_is_invalid_argument_naming_the_field(
    tmp_path: Path,
    store: str,
    stub_type: type[Any],
    method: str,
    request_type: type[Message],
    valid: Callable[[], Message],
) -> None:
    cases = list(_nul_cases(request_type.DESCRIPTOR))
    assert cases, f"{request_type.__name__} has no string field"
    wrong: list[str] = []
    async with (
        broker_on(store, tmp_path) as broker,
        grpc.aio.insecure_channel(broker.address) as channel,
    ):
        call = getattr(stub_type(channel), method)
        for path, put_nul in cases:
            request = valid()
            put_nul(request)
            code, details = await _status(call(request, timeout=10), method in STREAMING)
            # The message names the field: its last name (map keys shown apart).
            field = path.split(" ")[0].split(".")[-1].split("[")[0]
            if code is not grpc.StatusCode.INVALID_ARGUMENT or "NUL character" not in details:
                wrong.append(f"{path}: {code.name} {details!r}")
            elif field not in details:
                wrong.append(f"{path}: message does not name {field!r}: {details!r}")
        await _still_serves(channel)
    assert not wrong, f"{method} with a NUL:\n" + "\n".join(wrong)


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
async def test_a_nul_in_one_run_stream_submission_is_one_error_item(
    tmp_path: Path, store: str
) -> None:
    async with (
        broker_on(store, tmp_path) as broker,
        grpc.aio.insecure_channel(broker.address) as channel,
    ):
        jobs = jobs_pb2_grpc.JobServiceStub(channel)
        bad_tags = sampler_spec(tags={"run": NUL})
        requests = [
            jobs_pb2.RunStreamRequest(
                tag="bad-key",
                submit=jobs_pb2.SubmitRequest(spec=sampler_spec(), idempotency_key=NUL),
            ),
            jobs_pb2.RunStreamRequest(tag="bad-tag", submit=jobs_pb2.SubmitRequest(spec=bad_tags)),
            jobs_pb2.RunStreamRequest(
                tag="bad-session", submit=jobs_pb2.SubmitRequest(spec=sampler_spec(session_id=NUL))
            ),
            jobs_pb2.RunStreamRequest(
                tag="good", submit=jobs_pb2.SubmitRequest(spec=sampler_spec())
            ),
        ]
        call = jobs.RunStream(iter(requests), timeout=10)
        errors: dict[str, str] = {}
        good_events = 0
        async with asyncio.timeout(10):
            async for reply in call:
                for item in reply.items:
                    if item.HasField("error"):
                        assert item.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
                        errors[item.tag] = item.error.message
                    else:
                        assert item.tag == "good"
                        good_events += 1
                if len(errors) == 3 and good_events:
                    call.cancel()  # the good job stays queued (no executor): stop here
                    break
        assert "submit.idempotency_key contains a NUL character" in errors["bad-key"]
        assert "submit.spec.tags['run'] contains a NUL character" in errors["bad-tag"]
        assert "submit.spec.session_id contains a NUL character" in errors["bad-session"]
        await _still_serves(channel)


async def test_a_nul_in_a_run_stream_tag_ends_the_stream_with_invalid_argument(
    tmp_path: Path,
) -> None:
    async with (
        broker_on("sqlite", tmp_path) as broker,
        grpc.aio.insecure_channel(broker.address) as channel,
    ):
        jobs = jobs_pb2_grpc.JobServiceStub(channel)
        request = jobs_pb2.RunStreamRequest(tag=NUL, submit=_valid_submit())
        code, details = await _status(jobs.RunStream(iter([request]), timeout=10), True)
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert "contains a NUL character" in details
        await _still_serves(channel)


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
@pytest.mark.parametrize("where", ["executor_id", "backend name", "held job_id"])
async def test_a_nul_in_an_executors_hello_is_invalid_argument(
    tmp_path: Path, store: str, where: str
) -> None:
    hello = executor_pb2.Hello(
        executor_id="e-1",
        backends=[backends_pb2.BackendInfo(name="aer", num_qubits=5, simulator=True)],
        slots=1,
    )
    if where == "executor_id":
        hello.executor_id = NUL
    elif where == "backend name":
        hello.backends[0].name = NUL
    else:
        hello.held.add(job_id=NUL, lease_id="l-1")
    async with (
        broker_on(store, tmp_path) as broker,
        grpc.aio.insecure_channel(broker.address) as channel,
    ):
        connect = executor_pb2_grpc.ExecutorServiceStub(channel).Connect
        call = connect(iter([executor_pb2.ExecutorMessage(hello=hello)]), timeout=10)
        code, details = await _status(call, True)
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert details.startswith("hello.")
        assert "contains a NUL character" in details
        await _still_serves(channel)
