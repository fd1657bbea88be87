"""In-memory fan-out of committed job events to Watch subscribers.

The store is the source of truth; the hub only shortens the path from a
commit to a waiting Watch. A subscriber registers before it reads history
from the store, drops duplicates by seq, and fills any gap (e.g. two commits
published out of order, or an overflowing queue) from the store again, so a
Watch never skips or repeats an event.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager, nullcontext

from google.protobuf.timestamp_pb2 import Timestamp

from qrelay._proto.v1 import types_pb2
from qrelay.broker.store import JobStore, StoredEvent

# A subscriber further behind than this re-reads from the store instead.
_QUEUE_LIMIT = 1024


class Subscription:
    """Live events of one job for one Watch."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[StoredEvent | None] = asyncio.Queue(_QUEUE_LIMIT)
        self.overflowed = False
        self.last_seq = 0  # the last seq its Watch delivered (kept by `follow`)

    def offer(self, event: StoredEvent) -> None:
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflowed = True


class EventHub:
    """job_id -> live subscriptions; publish() after the events are committed."""

    def __init__(self) -> None:
        self._subs: defaultdict[str, set[Subscription]] = defaultdict(set)

    @property
    def subscriber_count(self) -> int:
        return sum(len(s) for s in self._subs.values())

    @contextmanager
    def subscribe(self, job_id: str) -> Iterator[Subscription]:
        """Register for live events; removed on exit, whatever the exit."""
        sub = Subscription()
        self._subs[job_id].add(sub)
        try:
            yield sub
        finally:
            subs = self._subs.get(job_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subs[job_id]

    def watching(self) -> dict[str, int]:
        """job_id -> the lowest seq a local Watch of it has delivered.

        Lets a replica fan-out fetch exactly the events other brokers wrote
        that its Watches have not seen yet."""
        return {
            job_id: min(sub.last_seq for sub in subs) for job_id, subs in self._subs.items() if subs
        }

    def publish(self, events: Sequence[StoredEvent]) -> None:
        for event in events:
            for sub in self._subs.get(event.job_id, ()):
                sub.offer(event)

    def close(self) -> None:
        """Wake every subscriber so Watch streams end at shutdown."""
        for subs in self._subs.values():
            for sub in subs:
                try:
                    sub.queue.put_nowait(None)
                except asyncio.QueueFull:
                    sub.overflowed = True


class HubClosed(Exception):
    """The broker is shutting down; the Watch should be resumed elsewhere."""


async def follow(
    store: JobStore,
    hub: EventHub,
    job_id: str,
    after_seq: int,
    *,
    terminal_seq: int | None,
    subscription: Subscription | None = None,
    history: Sequence[StoredEvent] | None = None,
) -> AsyncIterator[StoredEvent]:
    """Events with seq > after_seq, replayed then live, until the terminal event.

    `terminal_seq` is the job's last seq if it is already finished (nothing
    live can follow), else None. A caller that subscribed before the job's
    first commit (Run) passes that `subscription` and the `history` committed
    before it (the first event), which spares reading it back from the store.
    """
    last = after_seq
    with nullcontext(subscription) if subscription is not None else hub.subscribe(job_id) as sub:
        sub.last_seq = last
        if history is None:
            history = await store.events_after(job_id, last)
        for event in history:
            last = sub.last_seq = event.seq
            yield event
            if event.terminal:
                return
        if terminal_seq is not None and last >= terminal_seq:
            return
        while True:
            live = await sub.queue.get()
            if live is None:
                raise HubClosed("broker is shutting down")
            if sub.overflowed or live.seq > last + 1:
                sub.overflowed = False
                catch_up = await store.events_after(job_id, last)
            elif live.seq <= last:
                continue
            else:
                catch_up = [live]
            for event in catch_up:
                last = sub.last_seq = event.seq
                yield event
                if event.terminal:
                    return


def to_proto(event: StoredEvent) -> types_pb2.JobEvent:
    """The wire JobEvent for a stored event."""
    message = types_pb2.JobEvent.FromString(event.payload)
    message.job_id = event.job_id
    message.seq = event.seq
    message.time.CopyFrom(timestamp(event.time))
    return message


def timestamp(seconds: float) -> Timestamp:
    """A protobuf Timestamp for seconds since the epoch (how the store keeps times)."""
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts
