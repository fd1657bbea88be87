"""Requests that are not valid protobuf, and values a message would echo unbounded.

gRPC decodes a request before any servicer code runs; without qrelay's
DecodeGuard the caller got UNKNOWN "Unexpected DecodeError". Each case
here must answer INVALID_ARGUMENT saying what is wrong, and the broker
keeps serving the next call.
"""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.internal.encoder import _VarintBytes

from qrelay._proto.v1 import jobs_pb2, jobs_pb2_grpc, types_pb2
from qrelay.rpc import MAX_STATUS_MESSAGE
from tests.broker.conftest import sampler_spec


def _raw(channel: grpc.aio.Channel, method: str, stream: bool = False) -> object:
    identity = bytes
    if stream:
        return channel.stream_stream(
            method, request_serializer=identity, response_deserializer=identity
        )
    return channel.unary_unary(method, request_serializer=identity, response_deserializer=identity)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _VarintBytes(field << 3 | 2) + _VarintBytes(len(payload)) + payload


def _nested_options(depth: int) -> bytes:
    """A google.protobuf.Struct {"a": {"a": ... }} `depth` levels deep, as bytes (the
    Python library refuses to build one this deep, so it is written by hand)."""
    struct = b""
    for _ in range(depth):
        value = _length_delimited(5, struct)  # Value.struct_value
        entry = _length_delimited(1, b"a") + _length_delimited(2, value)
        struct = _length_delimited(1, entry)  # Struct.fields
    return struct


def _submit_with_options(options: bytes) -> bytes:
    spec = sampler_spec().SerializeToString() + _length_delimited(5, options)  # JobSpec.options
    return _length_delimited(1, spec)  # SubmitRequest.spec


async def _code_and_details(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    return err.value.code(), err.value.details() or ""


@pytest.mark.parametrize(
    ("request_bytes", "reason"),
    [
        (b"\xff\xff\xff\xff\x0f not protobuf", "Wire format was corrupt"),
        (
            jobs_pb2.SubmitRequest(spec=sampler_spec(), idempotency_key="k")
            .SerializeToString()
            .replace(b"\x12\x01k", b"\x12\x01\xff"),
            "bad UTF-8",
        ),
        (_submit_with_options(_nested_options(40)), "MaxDepth"),
    ],
    ids=["garbage", "bad utf-8", "options nested 40 deep"],
)
async def test_undecodable_unary_request_is_invalid_argument(
    channel: grpc.aio.Channel,
    jobs: jobs_pb2_grpc.JobServiceStub,
    request_bytes: bytes,
    reason: str,
) -> None:
    submit = _raw(channel, "/qrelay.v1.JobService/Submit")
    code, details = await _code_and_details(submit(request_bytes))  # type: ignore[operator]
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("the request is not a valid Submit message: ")
    assert reason in details
    # The broker is unharmed: a good request right after is served.
    job = await jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec()))
    assert job.state == types_pb2.JOB_STATE_QUEUED


async def test_options_nested_within_the_decoders_limit_are_judged_by_name(
    channel: grpc.aio.Channel,
) -> None:
    submit = _raw(channel, "/qrelay.v1.JobService/Submit")
    code, details = await _code_and_details(submit(_submit_with_options(_nested_options(20))))  # type: ignore[operator]
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("unknown option 'a'")


async def test_undecodable_message_on_a_request_stream_is_invalid_argument(
    channel: grpc.aio.Channel,
) -> None:
    run_stream = _raw(channel, "/qrelay.v1.JobService/RunStream", stream=True)

    async def requests() -> object:
        yield b"\xff\xff\xff\xff\x0f"

    call = run_stream(requests())  # type: ignore[operator]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in call:
            pass
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid RunStream message" in (err.value.details() or "")


async def test_garbage_on_executor_connect_is_invalid_argument(channel: grpc.aio.Channel) -> None:
    connect = _raw(channel, "/qrelay.v1.ExecutorService/Connect", stream=True)

    async def requests() -> object:
        yield b"\x0a\xff\xff\xff\xff\x0f garbage"

    call = connect(requests())  # type: ignore[operator]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in call:
            pass
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid Connect message" in (err.value.details() or "")


async def test_an_unbounded_id_is_not_echoed_in_full(jobs: jobs_pb2_grpc.JobServiceStub) -> None:
    """A 100 000-character id echoed whole would exceed gRPC's 16 KiB trailer limit and
    reach the caller as a transport error instead of NOT_FOUND."""
    code, details = await _code_and_details(
        jobs.Get(jobs_pb2.GetJobRequest(job_id="j-" + "x" * 100_000))
    )
    assert code is grpc.StatusCode.NOT_FOUND
    assert len(details) < MAX_STATUS_MESSAGE + 100
    assert details.endswith("more characters)")
