"""JobService.RunStream: many Runs on one stream, their events merged into batches.

Why: a gRPC call costs the broker (and the client) several times what one
more message on an open stream costs, and a busy client has many events
ready at once. One stream per client, with every event that is ready sent
in one reply, makes a job cost a fraction of a call on both sides.

Each submission is exactly `Jobs.run` (validation, limits, idempotency,
durability), followed in its own task; all of them feed one bounded queue
that a single writer drains into batches. Per job, events keep their order.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from qrelay._proto.v1 import types_pb2
from qrelay.broker import validation
from qrelay.broker.jobs import Jobs
from qrelay.broker.store import StoredEvent
from qrelay.errors import InvalidArgument, QRelayError, exception_leaves

#: Longest tag accepted (tags are held while their job is followed).
MAX_TAG_CHARS = 128
#: Items in one reply at most (keeps a reply far below the message limits
#: for small events; a big result travels alone soon enough).
MAX_BATCH_ITEMS = 256
#: Items waiting for the writer before followers pause (bounded memory when
#: the client reads slowly; a paused follower catches up from the store).
MAX_PENDING_ITEMS = 4096


@dataclass(frozen=True)
class Submission:
    """One request on the stream, already off the wire."""

    tag: str
    spec: types_pb2.JobSpec
    idempotency_key: str


#: One reply item: a tag and either the job's next event or why it was refused.
Item = tuple[str, StoredEvent | QRelayError]
#: Sends one batch to the client (the servicer's write).
Send = Callable[[list[Item]], Awaitable[None]]


class RunStreams:
    """Serves RunStream calls for one broker."""

    def __init__(self, jobs: Jobs, max_jobs_per_stream: int) -> None:
        self.jobs = jobs
        self.max_jobs_per_stream = max_jobs_per_stream

    async def serve(self, tenant: str, submissions: AsyncIterator[Submission], send: Send) -> None:
        """Run every submission until the client stops sending and all its jobs ended.

        Cancelled (the client went away) it cancels every follower; nothing
        is lost, the jobs themselves go on and can be watched. A malformed tag
        is a client bug that no reply item could name unambiguously: the
        stream ends with InvalidArgument (its jobs go on, as above).
        """
        pending: asyncio.Queue[Item | None] = asyncio.Queue(MAX_PENDING_ITEMS)
        slots = asyncio.Semaphore(self.max_jobs_per_stream)
        live: set[str] = set()

        async def follow(sub: Submission) -> None:
            # The tag is free again before its last item can reach the client,
            # so a client may reuse it as soon as it has seen that item.
            try:
                # Unary calls are checked by the server's DecodeGuard; a stream's
                # submissions here, so that one bad submission is one error item.
                validation.check_no_nul(sub.spec, "submit.spec")
                validation.check_text(sub.idempotency_key, "submit.idempotency_key")
                async for event in self.jobs.run(tenant, sub.spec, sub.idempotency_key):
                    if event.terminal:
                        live.discard(sub.tag)
                    await pending.put((sub.tag, event))
            except QRelayError as exc:
                live.discard(sub.tag)
                await pending.put((sub.tag, exc))
            finally:
                live.discard(sub.tag)
                slots.release()

        async def read() -> None:
            async with asyncio.TaskGroup() as followers:
                async for sub in submissions:
                    _check_tag(sub.tag, live)
                    await slots.acquire()
                    live.add(sub.tag)
                    followers.create_task(follow(sub))
            await pending.put(None)  # the client is done sending and every job ended

        async def write() -> None:
            while True:
                first = await pending.get()
                if first is None:
                    return
                # One turn of the loop lets events published together (one commit,
                # several jobs) reach the queue, so they share this reply.
                await asyncio.sleep(0)
                batch = [first]
                done = False
                while len(batch) < MAX_BATCH_ITEMS and not pending.empty():
                    item = pending.get_nowait()
                    if item is None:
                        done = True
                        break
                    batch.append(item)
                await send(batch)
                if done:
                    return

        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(read())
                tg.create_task(write())
        except BaseExceptionGroup as group:
            leaves = exception_leaves(group)
            if len(leaves) == 1 and isinstance(leaves[0], QRelayError):
                raise leaves[0] from None  # the status the stream ends with
            raise


def _check_tag(tag: str, live: set[str]) -> None:
    if not tag:
        raise InvalidArgument("RunStream request needs a tag to name its job in the replies")
    if len(tag) > MAX_TAG_CHARS:
        raise InvalidArgument(f"tag is {len(tag)} characters; at most {MAX_TAG_CHARS} allowed")
    if "\x00" in tag:
        raise InvalidArgument(f"tag {tag!r} contains a NUL character (\\x00)")
    if tag in live:
        raise InvalidArgument(f"tag {tag!r} already names a job this stream is following")
