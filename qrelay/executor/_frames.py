"""Length-prefixed, typed frames over a stream socket, blocking and async.

A frame is a 4-byte big-endian payload length, one kind byte, then the
payload. The executor's worker channel uses it (see `workers.py`); the
receiver names its own size limit, so a peer cannot make it allocate
without bound.
"""

from __future__ import annotations

import socket
import struct

from anyio import EndOfStream, IncompleteRead
from anyio.streams.buffered import BufferedByteReceiveStream

HEADER = struct.Struct(">IB")


class ChannelClosed(Exception):
    """The peer closed the channel (normally: the other process ended)."""


class FrameTooLarge(Exception):
    """A frame announced a payload over the receiver's limit."""


def encode_frame(kind: int, payload: bytes) -> bytes:
    return HEADER.pack(len(payload), kind) + payload


def send_frame(sock: socket.socket, kind: int, payload: bytes) -> None:
    sock.sendall(encode_frame(kind, payload))


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buffer = bytearray(n)
    view = memoryview(buffer)
    got = 0
    while got < n:
        count = sock.recv_into(view[got:], min(n - got, 1 << 22))
        if not count:
            raise ChannelClosed("channel closed")
        got += count
    return bytes(buffer)


def recv_frame(sock: socket.socket, max_bytes: int) -> tuple[int, bytes]:
    length, kind = HEADER.unpack(_recv_exactly(sock, HEADER.size))
    if length > max_bytes:
        raise FrameTooLarge(f"frame of {length} bytes exceeds {max_bytes}")
    return kind, _recv_exactly(sock, length)


async def read_frame(stream: BufferedByteReceiveStream, max_bytes: int) -> tuple[int, bytes]:
    """Next frame; ChannelClosed at end of stream."""
    try:
        length, kind = HEADER.unpack(await stream.receive_exactly(HEADER.size))
        if length > max_bytes:
            raise FrameTooLarge(f"frame of {length} bytes exceeds {max_bytes}")
        return kind, await stream.receive_exactly(length)
    except (EndOfStream, IncompleteRead) as exc:
        raise ChannelClosed("peer closed its channel") from exc
