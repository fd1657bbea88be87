"""ProgramService and program jobs on a real broker, through raw gRPC stubs.

Executors here are `FakeExecutor`s (real ExecutorService peers) that announce
the "program" capability, except where a test proves that a plain one never
gets program work. One test runs a real executor agent and sandbox.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from qrelay._proto.v1 import (
    executor_pb2,
    jobs_pb2,
    jobs_pb2_grpc,
    programs_pb2,
    programs_pb2_grpc,
    types_pb2,
)
from qrelay.broker.programs import program_id
from qrelay.broker.server import Broker, running_broker
from tests.broker.conftest import (
    FakeExecutor,
    announce,
    broker_settings,
    sampler_spec,
    wait_state,
)

MAIN = b"def main(ctx, n=1):\n    return n\n"
SCHEMA = json.dumps(
    {
        "type": "object",
        "properties": {"n": {"type": "integer"}, "opts": {"type": "object"}},
        "additionalProperties": False,
    }
)


def tar_gz(files: dict[str, bytes], extra: list[tarfile.TarInfo] = ()) -> bytes:  # type: ignore[assignment]
    """A tar.gz of these files (plus hand-made members such as links)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)
    return buf.getvalue()


def member(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


ARCHIVE = tar_gz({"main.py": MAIN})


def upload_request(**overrides: Any) -> programs_pb2.UploadProgramRequest:
    fields: dict[str, Any] = {"name": "counter", "archive": ARCHIVE, "entry_point": "main:main"}
    fields.update(overrides)
    return programs_pb2.UploadProgramRequest(**fields)


class ProgramExecutor(FakeExecutor):
    """A FakeExecutor whose Hello announces the "program" capability."""

    def send(self, message: executor_pb2.ExecutorMessage) -> None:
        if message.WhichOneof("message") == "hello":
            message.hello.capabilities.append("program")
        super().send(message)


def program_spec(program: str, inputs: Any = None, **kwargs: Any) -> types_pb2.JobSpec:
    text = inputs if isinstance(inputs, str) else json.dumps({} if inputs is None else inputs)
    return types_pb2.JobSpec(
        backend="aer", program=types_pb2.ProgramTask(program=program, inputs_json=text), **kwargs
    )


@pytest.fixture
def programs(channel: grpc.aio.Channel) -> programs_pb2_grpc.ProgramServiceStub:
    return programs_pb2_grpc.ProgramServiceStub(channel)


async def expect_error(call: Any, code: grpc.StatusCode, *fragments: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    details = info.value.details() or ""
    for fragment in fragments:
        assert fragment in details, details
    return details


# --- upload, versions, get, list, delete ---------------------------------------


async def test_same_content_under_same_name_is_the_same_version(
    programs: programs_pb2_grpc.ProgramServiceStub,
) -> None:
    first = await programs.Upload(upload_request(description="counts", input_schema_json=SCHEMA))
    again = await programs.Upload(upload_request(description="counts", input_schema_json=SCHEMA))
    assert first.id == again.id
    assert first.id == program_id("counter", ARCHIVE, "main:main", (), SCHEMA)
    assert (first.version, first.size_bytes, first.description) == (1, len(ARCHIVE), "counts")
    assert first.input_schema_json == SCHEMA
    assert first.created_at.seconds > 0
    listed = await programs.List(programs_pb2.ListProgramsRequest())
    assert [p.id for p in listed.programs] == [first.id]


async def test_changed_content_is_the_next_version_and_a_name_means_the_newest(
    programs: programs_pb2_grpc.ProgramServiceStub,
) -> None:
    v1 = await programs.Upload(upload_request())
    v2 = await programs.Upload(upload_request(requirements=["six>=1.16"]))
    v3 = await programs.Upload(upload_request(archive=tar_gz({"main.py": MAIN + b"# v3\n"})))
    other = await programs.Upload(upload_request(name="other"))
    assert [v.version for v in (v1, v2, v3, other)] == [1, 2, 3, 1]
    assert len({v1.id, v2.id, v3.id, other.id}) == 4  # the name is part of the hash
    assert list(v2.requirements) == ["six>=1.16"]
    newest = await programs.Get(programs_pb2.GetProgramRequest(program="counter"))
    assert newest.id == v3.id
    by_id = await programs.Get(programs_pb2.GetProgramRequest(program=v1.id))
    assert by_id.version == 1

    latest = await programs.List(programs_pb2.ListProgramsRequest())
    assert [(p.name, p.version) for p in latest.programs] == [("counter", 3), ("other", 1)]
    every = await programs.List(programs_pb2.ListProgramsRequest(name="counter"))
    assert [p.version for p in every.programs] == [3, 2, 1]


async def test_delete_one_version_by_id_or_every_version_by_name(
    programs: programs_pb2_grpc.ProgramServiceStub,
) -> None:
    v1 = await programs.Upload(upload_request())
    v2 = await programs.Upload(
        upload_request(entry_point="main:main", description="x", requirements=["a"])
    )
    deleted = await programs.Delete(programs_pb2.DeleteProgramRequest(program=v2.id))
    assert deleted.deleted == 1
    assert (await programs.Get(programs_pb2.GetProgramRequest(program="counter"))).id == v1.id
    await programs.Upload(upload_request(requirements=["b"]))
    deleted = await programs.Delete(programs_pb2.DeleteProgramRequest(program="counter"))
    assert deleted.deleted == 2
    await expect_error(
        programs.Get(programs_pb2.GetProgramRequest(program="counter")),
        grpc.StatusCode.NOT_FOUND,
        "program 'counter' not found",
    )
    await expect_error(
        programs.Delete(programs_pb2.DeleteProgramRequest(program="counter")),
        grpc.StatusCode.NOT_FOUND,
        "counter",
    )
    assert not (await programs.List(programs_pb2.ListProgramsRequest())).programs


async def test_archive_over_the_limit_is_resource_exhausted_naming_the_limit(
    tmp_path: Path,
) -> None:
    settings = broker_settings(tmp_path, max_program_bytes=1000)
    async with (
        running_broker(settings) as broker,
        grpc.aio.insecure_channel(broker.address) as channel,
    ):
        stub = programs_pb2_grpc.ProgramServiceStub(channel)
        big = tar_gz({"main.py": MAIN, "data.bin": random.Random(7).randbytes(2000)})
        await expect_error(
            stub.Upload(upload_request(archive=big)),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"program archive is {len(big)} bytes; this broker accepts at most 1000 bytes",
            "QRELAY_MAX_PROGRAM_BYTES",
        )
        assert not (await stub.List(programs_pb2.ListProgramsRequest())).programs


def _plain_tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize(
    ("archive", "fragment"),
    [
        (b"", "archive is empty"),
        (_plain_tar({"main.py": MAIN}), "not gzip-compressed"),
        (b"\x1f\x8b" + b"garbage" * 10, "not a valid tar.gz"),
        (tar_gz({"main.py": MAIN, "/etc/evil.py": b""}), "'/etc/evil.py' has an absolute path"),
        (tar_gz({"main.py": MAIN, "a/../../evil.py": b""}), "leaves the program directory"),
        (
            tar_gz({"main.py": MAIN}, [member("pkg/link", tarfile.SYMTYPE, "../../etc/passwd")]),
            "links to '../../etc/passwd', outside the program directory",
        ),
        (
            tar_gz({"main.py": MAIN}, [member("abs", tarfile.SYMTYPE, "/etc/passwd")]),
            "outside the program directory",
        ),
        (
            tar_gz({"main.py": MAIN}, [member("hard", tarfile.LNKTYPE, "../x")]),
            "outside the program directory",
        ),
        (tar_gz({"main.py": MAIN}, [member("dev", tarfile.CHRTYPE)]), "special file"),
        (tar_gz({"other.py": MAIN}), "entry point module 'main' not found in the archive"),
    ],
    ids=[
        "empty",
        "not-gzip",
        "gzip-not-tar",
        "absolute",
        "dotdot",
        "symlink-out",
        "symlink-absolute",
        "hardlink-out",
        "device",
        "no-entry-module",
    ],
)
async def test_bad_archive_is_invalid_argument(
    programs: programs_pb2_grpc.ProgramServiceStub, archive: bytes, fragment: str
) -> None:
    await expect_error(
        programs.Upload(upload_request(archive=archive)), grpc.StatusCode.INVALID_ARGUMENT, fragment
    )
    assert not (await programs.List(programs_pb2.ListProgramsRequest())).programs


async def test_links_inside_the_program_and_packages_are_accepted(
    programs: programs_pb2_grpc.ProgramServiceStub,
) -> None:
    archive = tar_gz(
        {"pkg/__init__.py": MAIN, "pkg/data.txt": b"x"},
        [member("pkg/alias.txt", tarfile.SYMTYPE, "data.txt")],
    )
    program = await programs.Upload(upload_request(archive=archive, entry_point="pkg:main"))
    assert program.entry_point == "pkg:main"


@pytest.mark.parametrize(
    "entry_point", ["main", "main:", ":main", "1x:main", "a-b:main", "main:f()", "a..b:f"]
)
async def test_bad_entry_point_is_invalid_argument(
    programs: programs_pb2_grpc.ProgramServiceStub, entry_point: str
) -> None:
    await expect_error(
        programs.Upload(upload_request(entry_point=entry_point)),
        grpc.StatusCode.INVALID_ARGUMENT,
        f"entry_point {entry_point!r} must look like 'module:function'",
    )


@pytest.mark.parametrize(
    ("schema", "fragment"),
    [
        ("{not json", "input_schema_json is not valid JSON"),
        ("[1, 2]", "must be a JSON Schema object, got list"),
        ('{"type": "nope"}', "not a valid JSON Schema at ['type']"),
        ('{"properties": {"n": {"minimum": "zero"}}}', "['properties']['n']['minimum']"),
    ],
)
async def test_bad_input_schema_is_invalid_argument(
    programs: programs_pb2_grpc.ProgramServiceStub, schema: str, fragment: str
) -> None:
    await expect_error(
        programs.Upload(upload_request(input_schema_json=schema)),
        grpc.StatusCode.INVALID_ARGUMENT,
        fragment,
    )


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"name": ""}, "name is required"),
        ({"name": "has space"}, "must be 1-128 letters"),
        ({"name": "p-" + "0" * 64}, "looks like a program id"),
        ({"entry_point": ""}, "entry_point is required"),
        ({"requirements": ["--index-url=http://evil"]}, "pip options are not allowed"),
        ({"requirements": [""]}, "requirements[0]"),
    ],
)
async def test_bad_name_and_requirements_are_invalid_argument(
    programs: programs_pb2_grpc.ProgramServiceStub, overrides: dict[str, Any], fragment: str
) -> None:
    await expect_error(
        programs.Upload(upload_request(**overrides)), grpc.StatusCode.INVALID_ARGUMENT, fragment
    )


async def test_get_or_delete_without_a_program_is_invalid_argument(
    programs: programs_pb2_grpc.ProgramServiceStub,
) -> None:
    await expect_error(
        programs.Get(programs_pb2.GetProgramRequest()), grpc.StatusCode.INVALID_ARGUMENT, "required"
    )
    await expect_error(
        programs.Delete(programs_pb2.DeleteProgramRequest()),
        grpc.StatusCode.INVALID_ARGUMENT,
        "required",
    )


@pytest.fixture
async def two_tenants(tmp_path: Path) -> AsyncIterator[Broker]:
    settings = broker_settings(tmp_path, tokens={"tok-a": "alice", "tok-b": "bob"})
    async with running_broker(settings) as broker:
        await announce(broker.address)
        yield broker


async def test_another_tenants_program_is_not_found(two_tenants: Broker) -> None:
    alice = (("authorization", "Bearer tok-a"),)
    bob = (("authorization", "Bearer tok-b"),)
    async with grpc.aio.insecure_channel(two_tenants.address) as channel:
        stub = programs_pb2_grpc.ProgramServiceStub(channel)
        jobs = jobs_pb2_grpc.JobServiceStub(channel)
        mine = await stub.Upload(upload_request(), metadata=alice)
        for ref in (mine.id, "counter"):
            await expect_error(
                stub.Get(programs_pb2.GetProgramRequest(program=ref), metadata=bob),
                grpc.StatusCode.NOT_FOUND,
                ref,
            )
            await expect_error(
                stub.Delete(programs_pb2.DeleteProgramRequest(program=ref), metadata=bob),
                grpc.StatusCode.NOT_FOUND,
            )
            await expect_error(
                jobs.Submit(jobs_pb2.SubmitRequest(spec=program_spec(ref)), metadata=bob),
                grpc.StatusCode.NOT_FOUND,
                "upload it first",
            )
        assert not (await stub.List(programs_pb2.ListProgramsRequest(), metadata=bob)).programs
        # Bob's own upload of the same content is his, with his own version 1.
        his = await stub.Upload(upload_request(), metadata=bob)
        assert (his.id, his.version) == (mine.id, 1)
        await stub.Delete(programs_pb2.DeleteProgramRequest(program=his.id), metadata=bob)
        assert (await stub.Get(programs_pb2.GetProgramRequest(program=mine.id), metadata=alice)).id


# --- program jobs at submit -----------------------------------------------------


async def test_program_job_with_unknown_program_is_not_found(
    jobs: jobs_pb2_grpc.JobServiceStub,
) -> None:
    await expect_error(
        jobs.Submit(jobs_pb2.SubmitRequest(spec=program_spec("nope"))),
        grpc.StatusCode.NOT_FOUND,
        "program 'nope' not found",
    )


@pytest.mark.parametrize(
    ("inputs", "fragment"),
    [
        ("[1, 2]", "must be a JSON object of keyword arguments, got list"),
        ("3", "got int"),
        ("{oops", "inputs_json is not valid JSON"),
        ({"n": "three"}, "input schema at ['n']: 'three' is not of type 'integer'"),
        ({"opts": {"a": 1}, "extra": 1}, "at (top level): Additional properties are not allowed"),
        ({"opts": 5}, "at ['opts']: 5 is not of type 'object'"),
    ],
)
async def test_program_job_inputs_are_checked_at_submit(
    programs: programs_pb2_grpc.ProgramServiceStub,
    jobs: jobs_pb2_grpc.JobServiceStub,
    inputs: Any,
    fragment: str,
) -> None:
    await programs.Upload(upload_request(input_schema_json=SCHEMA))
    await expect_error(
        jobs.Submit(jobs_pb2.SubmitRequest(spec=program_spec("counter", inputs))),
        grpc.StatusCode.INVALID_ARGUMENT,
        fragment,
    )
    assert not (await jobs.List(jobs_pb2.ListJobsRequest())).jobs


async def test_program_job_runs_the_version_resolved_at_submit_on_a_program_executor(
    broker: Broker,
    programs: programs_pb2_grpc.ProgramServiceStub,
    jobs: jobs_pb2_grpc.JobServiceStub,
) -> None:
    v1 = await programs.Upload(upload_request(input_schema_json=SCHEMA))
    job = await jobs.Submit(jobs_pb2.SubmitRequest(spec=program_spec("counter", {"n": 2})))
    assert job.kind == types_pb2.JOB_KIND_PROGRAM
    await programs.Upload(upload_request(archive=tar_gz({"main.py": MAIN + b"# v2\n"})))
    # A plain executor (no "program" capability) is given the younger sampler
    # job, never the program job ahead of it.
    sampler = await jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec()))
    async with FakeExecutor(broker.address, executor_id="e-plain") as plain:
        got = await plain.recv("assignment")
        assert got.job_id == sampler.id
        assert not got.HasField("program")
        plain.finish(got)
        await wait_state(jobs, sampler.id, types_pb2.JOB_STATE_DONE)
    assert (await jobs.Get(jobs_pb2.GetJobRequest(job_id=job.id))).state == (
        types_pb2.JOB_STATE_QUEUED
    )
    async with ProgramExecutor(broker.address, executor_id="e-prog") as executor:
        assignment = await executor.recv("assignment")
        assert assignment.job_id == job.id
        assert assignment.spec.program.program == v1.id  # resolved at submit
        assert json.loads(assignment.spec.program.inputs_json) == {"n": 2}
        bundle = assignment.program
        assert (bundle.id, bundle.name, bundle.entry_point) == (v1.id, "counter", "main:main")
        assert bundle.archive == ARCHIVE
        assert bundle.input_schema_json == SCHEMA
        executor.finish(assignment)
        await wait_state(jobs, job.id, types_pb2.JOB_STATE_DONE)


async def test_deleting_a_program_keeps_queued_jobs_working(
    broker: Broker,
    programs: programs_pb2_grpc.ProgramServiceStub,
    jobs: jobs_pb2_grpc.JobServiceStub,
) -> None:
    program = await programs.Upload(upload_request())
    job = await jobs.Submit(jobs_pb2.SubmitRequest(spec=program_spec("counter")))
    await programs.Delete(programs_pb2.DeleteProgramRequest(program="counter"))
    await expect_error(
        programs.Get(programs_pb2.GetProgramRequest(program=program.id)),
        grpc.StatusCode.NOT_FOUND,
    )
    await expect_error(
        jobs.Submit(jobs_pb2.SubmitRequest(spec=program_spec("counter"))),
        grpc.StatusCode.NOT_FOUND,
        "counter",
    )
    async with ProgramExecutor(broker.address) as executor:
        assignment = await executor.recv("assignment")
        assert assignment.job_id == job.id
        assert assignment.program.archive == ARCHIVE  # kept for the queued job
        executor.finish(assignment)
        await wait_state(jobs, job.id, types_pb2.JOB_STATE_DONE)
    # Once no job needs it, the next delete of anything purges the hidden version.
    await programs.Upload(upload_request(name="other"))
    await programs.Delete(programs_pb2.DeleteProgramRequest(program="other"))
    with pytest.raises(Exception, match="not found"):
        await broker.store.get_program("default", program.id, include_deleted=True)


async def test_program_service_is_in_reflection_and_health(broker: Broker) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(broker.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("qrelay.v1.ProgramService", "qrelay.v1.SessionService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


# --- end to end with the real executor agent and sandbox ------------------------

TICKER = """
def main(ctx, n=3):
    for i in range(n):
        ctx.publish({"step": i, "square": i * i})
    return {"sum": sum(i * i for i in range(n))}
"""


async def test_real_executor_runs_a_program_and_interims_arrive_in_order(tmp_path: Path) -> None:
    from qrelay.program import pack_program
    from qrelay.testing import local_stack

    src = tmp_path / "ticker"
    src.mkdir()
    (src / "main.py").write_text(TICKER)
    async with (
        local_stack(backends=("aer",), executors=1, slots=1) as stack,
        grpc.aio.insecure_channel(stack.address) as channel,
    ):
        programs_stub = programs_pb2_grpc.ProgramServiceStub(channel)
        jobs_stub = jobs_pb2_grpc.JobServiceStub(channel)
        program = await programs_stub.Upload(
            programs_pb2.UploadProgramRequest(
                name="ticker", archive=pack_program(src), entry_point="main:main"
            )
        )
        job = await jobs_stub.Submit(
            jobs_pb2.SubmitRequest(spec=program_spec(program.id, {"n": 3}))
        )
        call = jobs_stub.Watch(jobs_pb2.WatchRequest(job_id=job.id), timeout=60)
        events = [event async for event in call]
    kinds = [e.WhichOneof("payload") for e in events]
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    interims = [json.loads(e.interim.value_json) for e in events if e.HasField("interim")]
    assert interims == [{"step": i, "square": i * i} for i in range(3)]
    assert kinds.index("result") > max(i for i, k in enumerate(kinds) if k == "interim")
    result = next(e.result for e in events if e.HasField("result"))
    assert json.loads(result.program_json) == {"sum": 5}
    assert events[-1].state.state == types_pb2.JOB_STATE_DONE


# --- the logic without a socket -----------------------------------------------------


def test_program_id_depends_on_every_hashed_field_and_their_boundaries() -> None:
    base = program_id("a", b"x", "m:f", ("r",), "")
    assert base == program_id("a", b"x", "m:f", ("r",), "")
    assert base.startswith("p-")
    assert len(base) == 2 + 64
    variants = {
        program_id("ab", b"", "m:f", ("r",), ""),  # same bytes, split differently
        program_id("a", b"x", "m:g", ("r",), ""),
        program_id("a", b"x", "m:f", ("r", ""), ""),
        program_id("a", b"x", "m:f", (), "r"),
        program_id("a", b"x", "m:f", ("r",), "{}"),
    }
    assert base not in variants
    assert len(variants) == 5


async def test_programs_logic_runs_on_a_store_alone(store: Any) -> None:
    from qrelay.broker.programs import Programs
    from qrelay.broker.settings import BrokerSettings
    from qrelay.errors import InvalidArgument, NotFound

    programs = Programs(store, BrokerSettings())
    record, created = await programs.upload(
        "t1", name="p", archive=ARCHIVE, entry_point="main:main", input_schema_json=SCHEMA
    )
    assert created
    spec = program_spec("p", {"n": 1})
    assert await programs.check_job("t1", spec) == record.id
    assert spec.program.program == record.id
    with pytest.raises(InvalidArgument, match=r"at \['n'\]"):
        await programs.check_job("t1", program_spec("p", {"n": 1.5}))
    with pytest.raises(NotFound):
        await programs.check_job("t2", program_spec("p"))
    bundle = await programs.bundle(spec, "t1")
    assert bundle is not None
    assert (bundle.id, bundle.archive) == (record.id, ARCHIVE)
    assert await programs.bundle(program_spec("p-unknown"), "t1") is None
