"""Framing of the sandbox channel: length-prefixed, typed frames over a Unix socketpair.

A frame is a 4-byte big-endian payload length, one kind byte, then the
payload (protobuf bytes or UTF-8 JSON depending on the kind). Both sides use
this module: the parent with anyio streams, the sandbox with a blocking
socket. See docs/programs.md for the table of kinds.
"""

from __future__ import annotations

import socket
import struct

from anyio.streams.buffered import BufferedByteReceiveStream

HEADER = struct.Struct(">IB")
# Refuse frames beyond this: a hostile program cannot make the executor
# allocate without bound.
MAX_FRAME = 64 << 20

# child -> parent
READY = ord("H")  # JSON {"pid": ...}: imports done, waiting for a job
PRIMITIVE = ord("P")  # types_pb2.JobSpec: run this sampler/estimator task
INTERIM = ord("I")  # types_pb2.Interim
LOG = ord("L")  # types_pb2.LogLine (ctx.log)
DONE = ord("D")  # types_pb2.JobResult: the program returned
FAILED = ord("F")  # types_pb2.JobError: the program failed
# parent -> child
JOB = ord("J")  # JSON job description (see runner._job_message)
PRIMITIVE_RESULT = ord("R")  # types_pb2.JobResult answering PRIMITIVE
PRIMITIVE_ERROR = ord("E")  # types_pb2.JobError answering PRIMITIVE


class ChannelClosed(Exception):
    """The peer closed the channel (normally: the other process ended)."""


class FrameTooLarge(Exception):
    """A frame announced a payload over MAX_FRAME."""


def encode_frame(kind: int, payload: bytes) -> bytes:
    if len(payload) > MAX_FRAME:
        raise FrameTooLarge(f"frame of {len(payload)} bytes exceeds {MAX_FRAME}")
    return HEADER.pack(len(payload), kind) + payload


# --- blocking side (inside the sandbox) -------------------------------------


def send_frame(sock: socket.socket, kind: int, payload: bytes) -> None:
    sock.sendall(encode_frame(kind, payload))


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks: list[bytes] = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise ChannelClosed("channel closed")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def recv_frame(sock: socket.socket) -> tuple[int, bytes]:
    length, kind = HEADER.unpack(_recv_exactly(sock, HEADER.size))
    if length > MAX_FRAME:
        raise FrameTooLarge(f"frame of {length} bytes exceeds {MAX_FRAME}")
    return kind, _recv_exactly(sock, length)


# --- async side (the executor) -----------------------------------------------


async def read_frame(stream: BufferedByteReceiveStream) -> tuple[int, bytes]:
    """Next frame from the sandbox; ChannelClosed at end of stream."""
    from anyio import BrokenResourceError, EndOfStream, IncompleteRead

    try:
        length, kind = HEADER.unpack(await stream.receive_exactly(HEADER.size))
        if length > MAX_FRAME:
            raise FrameTooLarge(f"frame of {length} bytes exceeds {MAX_FRAME}")
        return kind, await stream.receive_exactly(length)
    except (EndOfStream, IncompleteRead, BrokenResourceError) as exc:
        # Broken: a frame was sent after the sandbox died (the socket reset).
        raise ChannelClosed("sandbox closed its channel") from exc
