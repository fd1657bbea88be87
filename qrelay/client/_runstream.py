"""Every job the SDK submits and follows, on one JobService.RunStream per service.

Why: a gRPC call costs both ends several times what one more message on an
open stream does, and the broker batches the events of many jobs into one
reply. A client sending many small jobs (a parameter sweep, a client-side
loop) pays a fraction of a call per job.

Each job gets a `TagCall`, which reads like the Run call it replaces
(`read()` returns events, then `grpc.aio.EOF`; a broken stream raises its
`AioRpcError`), so `AsyncRuntimeJob` follows it and falls back to Watch
exactly as it would for a dropped Run. A broker without RunStream answers
UNIMPLEMENTED once and the SDK uses Run from then on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable
from typing import Any

import grpc

from qrelay._proto.v1 import jobs_pb2, types_pb2
from qrelay.client._connection import Connection
from qrelay.client._log import get_logger
from qrelay.client.job import is_terminal
from qrelay.errors import QRelayError, error_for_code

log = get_logger(__name__)

#: Items held for one job whose events nobody reads yet; beyond this its
#: share of the stream is dropped and the job resumes from the store by Watch.
MAX_BUFFERED_EVENTS = 1000
# How long closing waits for the stream's cancellation to come back from gRPC.
_CANCEL_WAIT_S = 2.0

_EOF: Any = grpc.aio.EOF
#: What a TagCall's queue holds: an event, EOF, or what `read()` raises.
_Item = types_pb2.JobEvent | BaseException | Any


class TagCall:
    """One job's share of a RunStream, read like a Run call."""

    def __init__(self, owner: RunStreamMux, tag: str) -> None:
        self._owner = owner
        self.tag = tag
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._callbacks: list[Callable[[TagCall], None]] = []
        self._ended = False

    async def read(self) -> Any:
        """The job's next event; `grpc.aio.EOF` once its share ended; raises a stream failure."""
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._queue.put_nowait(item)  # every later read fails the same way
            raise item
        if item is _EOF:
            self._queue.put_nowait(_EOF)
        return item

    def cancel(self) -> bool:
        """Stop delivering this job's events here (the job itself goes on)."""
        self._owner.forget(self.tag)
        self._end(_EOF)
        return True

    def add_done_callback(self, callback: Callable[[TagCall], None]) -> None:
        if self._ended:
            callback(self)
        else:
            self._callbacks.append(callback)

    def _deliver(self, item: _Item) -> None:
        if self._ended:
            return
        if self._queue.qsize() >= MAX_BUFFERED_EVENTS:
            # Nobody reads: stop buffering; the reader resumes with Watch from its last seq.
            self._owner.forget(self.tag)
            self._end(_EOF)
            return
        self._queue.put_nowait(item)

    def _end(self, last: _Item) -> None:
        if self._ended:
            return
        self._queue.put_nowait(last)
        self._ended = True
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(self)


class RunStreamMux:
    """The service's RunStream: opened on first use, reopened after it breaks."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._tags: dict[str, TagCall] = {}
        self._counter = itertools.count(1)
        self._write_lock = asyncio.Lock()
        self._closed = False
        #: False once the broker answered RunStream with UNIMPLEMENTED.
        self.supported = True

    @property
    def following(self) -> int:
        """Jobs whose events this stream currently delivers."""
        return len(self._tags)

    async def start(self, request: jobs_pb2.SubmitRequest) -> TagCall:
        """Send one submission; its events then arrive on the returned TagCall."""
        if self._closed:
            raise QRelayError("the service is closed")
        tag = f"r{next(self._counter)}"
        tag_call = TagCall(self, tag)
        self._tags[tag] = tag_call
        async with self._write_lock:  # one write at a time on a gRPC stream
            call = self._ensure_open()
            try:
                await call.write(jobs_pb2.RunStreamRequest(tag=tag, submit=request))
            except grpc.aio.AioRpcError as exc:
                # this job too: its read() raises the stream's own status
                self._broken(call, await _status_error(call, exc))
            except BaseException:
                tag_call.cancel()
                if call.done():
                    self._broken(call, None)
                raise
        return tag_call

    def forget(self, tag: str) -> None:
        self._tags.pop(tag, None)

    async def aclose(self) -> None:
        self._closed = True
        if self._call is not None:
            self._call.cancel()
            # The cancellation completes on gRPC's completion queue; wait for it here,
            # or it lands after a sync client's loop has closed ("Event loop is closed").
            with contextlib.suppress(Exception):  # TimeoutError, or the call's own error
                async with asyncio.timeout(_CANCEL_WAIT_S):
                    await self._call.code()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self._end_all(_EOF)

    def _ensure_open(self) -> Any:
        if self._call is None:
            self._call = self._conn.jobs.RunStream(metadata=self._conn.metadata)
            self._reader = asyncio.create_task(self._read(self._call), name="qrelay RunStream")
        return self._call

    async def _read(self, call: Any) -> None:
        try:
            while (reply := await call.read()) is not _EOF:
                for item in reply.items:
                    tag_call = self._tags.get(item.tag)
                    if tag_call is None:
                        continue  # a job nobody follows here any more
                    if item.HasField("error"):
                        self.forget(item.tag)
                        tag_call._end(error_for_code(item.error.code, item.error.message))
                        continue
                    event = item.event
                    tag_call._deliver(event)
                    if is_terminal(event):
                        self.forget(item.tag)
                        tag_call._end(_EOF)
            self._broken(call, None)
        except grpc.aio.AioRpcError as exc:
            self._broken(call, exc)
        except Exception as exc:  # handed to every job's reader, not lost
            log.error("runstream.reader_failed", exc_info=exc)
            self._call = None
            self._end_all(exc)

    def _broken(self, call: Any, exc: grpc.aio.AioRpcError | None) -> None:
        """The stream ended: every job on it sees `exc` (or EOF) and resumes by Watch."""
        if self._call is not call:
            return
        self._call = None
        if exc is not None and exc.code() == grpc.StatusCode.UNIMPLEMENTED:
            self.supported = False
        if exc is not None and not self._closed:
            log.info("runstream.broken", code=exc.code().name, following=len(self._tags))
        self._end_all(exc if exc is not None else _EOF)

    def _end_all(self, last: _Item) -> None:
        tags, self._tags = self._tags, {}
        for tag_call in tags.values():
            tag_call._end(last)


async def _status_error(call: Any, fallback: grpc.aio.AioRpcError) -> grpc.aio.AioRpcError:
    """The status the broker ended the stream with, when a write failed because of it.

    A broker that refuses a stream at once (a bad token: its interceptor
    answers before reading) can end it while the first write is still being
    sent; the write then fails INTERNAL ("Internal error from Core") although
    the stream's status says why.
    """
    try:
        async with asyncio.timeout(_CANCEL_WAIT_S):
            code = await call.code()
        if code is None or code in (grpc.StatusCode.OK, fallback.code()):
            return fallback
        return grpc.aio.AioRpcError(
            code,
            await call.initial_metadata(),
            await call.trailing_metadata(),
            details=await call.details(),
        )
    except Exception:  # noqa: BLE001 - keep the write's own error
        return fallback
