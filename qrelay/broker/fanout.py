"""Cross-replica fan-out: brokers sharing one PostgreSQL database hear each other.

The PostgreSQL store sends `pg_notify` hints inside its transactions (so they
go out exactly when the change commits): events appended to a job, a job
queued, a running job to stop, backends announced, executors come or gone.
`ReplicaFanout` LISTENs on one dedicated connection and turns hints from
*other* replicas into what the local broker would have done itself:

- events: a local Watch of that job re-reads the store after its last seq and
  the local `EventHub` delivers the events (the store is the truth; the hint
  only says "look now");
- queued: the local dispatcher wakes and claims for its executors;
- cancel: if the executor holding the lease is connected here, it gets
  CancelJob;
- backends: the names become known here, so Submit accepts them;
- presence: the table of executors connected to each replica is re-read, so
  BackendService counts executors on every replica.

Hints can be lost (the listening connection drops, a replica restarts), so a
sync tick every `replica_sync_interval_s` does the same work from the store
alone: Watches that fell behind catch up, every idle executor claims once more,
backends and presence are re-read, and this replica's presence is refreshed.
A replica that dies stops refreshing its presence rows; after three ticks
the others no longer count its executors.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Mapping
from typing import Any

import asyncpg
import structlog

from qrelay.broker.events import EventHub
from qrelay.broker.scheduler import RemoteExecutors, Scheduler
from qrelay.broker.store import JobKind
from qrelay.broker.store.base import ReplicaStore

log = structlog.get_logger(__name__)

# Hints waiting to be handled; past this the fan-out resyncs from the store instead.
_INBOX_LIMIT = 10_000
# Presence rows older than this many sync intervals belong to a dead replica.
_PRESENCE_TICKS = 3
_PING_TIMEOUT_S = 5.0


class ReplicaFanout:
    """LISTEN/NOTIFY link between this broker and its sibling replicas."""

    def __init__(
        self,
        store: ReplicaStore,
        remote: RemoteExecutors,
        hub: EventHub,
        scheduler: Scheduler,
        broker_id: str,
        sync_interval_s: float,
    ) -> None:
        self.store = store
        self.remote = remote  # the scheduler's view of other replicas' executors
        self.hub = hub
        self.scheduler = scheduler
        self.broker_id = broker_id
        self.sync_interval_s = sync_interval_s
        self.connected = asyncio.Event()
        self.listener_pid: int | None = None  # server pid of the LISTEN connection
        self._inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue(_INBOX_LIMIT)
        self._overflowed = False

    # --- lifecycle ----------------------------------------------------------------
    async def run(self) -> None:
        """Listen, handle hints and tick until cancelled; reconnects on its own."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._listen_forever())
            tg.create_task(self._handle_forever())
            tg.create_task(self._presence_forever())
            tg.create_task(self._tick_forever())

    async def withdraw(self) -> None:
        """At shutdown: this replica's executors are gone (others stop counting them)."""
        try:
            await self.store.withdraw_presence(self.broker_id)
        except Exception as exc:  # shutdown goes on; the rows age out anyway (logged)
            log.warning("presence.withdraw_failed", broker_id=self.broker_id, exc_info=exc)

    # --- listening ----------------------------------------------------------------
    async def _listen_forever(self) -> None:
        backoff = 0.1
        while True:
            try:
                await self._listen_once()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError) as exc:
                self.connected.clear()
                delay = backoff * (0.5 + random.random())
                log.warning("fanout.disconnected", error=str(exc), retry_in_s=round(delay, 3))
                await asyncio.sleep(delay)
                backoff = min(backoff * 2, 5.0)
            else:  # pragma: no cover - _listen_once only returns by raising
                backoff = 0.1

    async def _listen_once(self) -> None:
        async with asyncio.timeout(_PING_TIMEOUT_S):
            conn = await asyncpg.connect(**self.store.connect_kwargs())
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        try:
            await conn.add_listener(self.store.channel, self._on_notify)
            self.listener_pid = conn.get_server_pid()
            self.connected.set()
            log.info("fanout.listening", channel=self.store.channel, broker_id=self.broker_id)
            # Anything committed before LISTEN took effect is picked up here.
            await self._resync()
            while not lost.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.sync_interval_s):
                        await lost.wait()
                if not lost.is_set():
                    # A silently dead link would never report: ping it with a deadline.
                    async with asyncio.timeout(_PING_TIMEOUT_S):
                        await conn.fetchval("SELECT 1")
            raise ConnectionError("listening connection to PostgreSQL was lost")
        finally:
            self.connected.clear()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(_PING_TIMEOUT_S):
                    await conn.close()
            if not conn.is_closed():
                conn.terminate()

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            notice = json.loads(payload)
        except ValueError:
            log.warning("fanout.bad_notice", payload=payload[:200])
            return
        if notice.get("o") == self.store.origin:
            return  # our own change: already handled locally
        try:
            self._inbox.put_nowait(notice)
        except asyncio.QueueFull:
            self._overflowed = True

    # --- handling hints -----------------------------------------------------------
    async def _handle_forever(self) -> None:
        while True:
            batch = [await self._inbox.get()]
            while not self._inbox.empty():
                batch.append(self._inbox.get_nowait())
            try:
                await self._handle(batch)
            except Exception as exc:  # a hint lost to a bad moment; the tick catches up
                log.error("fanout.handle_failed", notices=len(batch), exc_info=exc)

    async def _handle(self, batch: list[dict[str, Any]]) -> None:
        if self._overflowed:
            self._overflowed = False
            await self._resync()
        job_seqs: dict[str, int] = {}
        reload_presence = False
        for notice in batch:
            kind = notice.get("k")
            if kind == "e":
                job_seqs[notice["j"]] = max(job_seqs.get(notice["j"], 0), int(notice["s"]))
            elif kind == "q":
                self.scheduler.queued(str(notice["b"]), JobKind(int(notice["n"])))
            elif kind == "c":
                self.scheduler.send_cancel(
                    str(notice["x"]), str(notice["j"]), str(notice["l"]), str(notice["r"])
                )
            elif kind == "b":
                self.scheduler.known_backends.update(str(n) for n in notice["n"])
            elif kind == "p":
                reload_presence = True
        if job_seqs:
            await self._catch_up(job_seqs)
        if reload_presence:
            await self._reload_presence()

    async def _catch_up(self, store_seqs: Mapping[str, int]) -> None:
        """Publish, from the store, events local Watches have not seen yet."""
        watching = self.hub.watching()
        for job_id, seq in store_seqs.items():
            seen = watching.get(job_id)
            if seen is not None and seq > seen:
                self.hub.publish(await self.store.events_after(job_id, seen))

    # --- presence -----------------------------------------------------------------
    async def _presence_forever(self) -> None:
        """Publish this replica's executors on change, and refresh them every tick."""
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
            # cancellation that races the event, and this loop then never ends.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.sync_interval_s):
                    await self.remote.changed.wait()
            self.remote.changed.clear()
            executors = [
                (link.executor_id, link.backends, link.slots)
                for link in list(self.scheduler.executors.values())
                if not link.closed
            ]
            try:
                await self.store.publish_presence(self.broker_id, executors, time.time())
            except Exception as exc:  # retried next tick (logged)
                log.warning("presence.publish_failed", exc_info=exc)

    async def _reload_presence(self) -> None:
        since = time.time() - _PRESENCE_TICKS * self.sync_interval_s
        rows = await self.store.list_presence(since)
        self.remote.backends = {
            p.executor_id: p.backends for p in rows if p.broker_id != self.broker_id
        }

    # --- the sync tick --------------------------------------------------------------
    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sync_interval_s * (0.8 + 0.4 * random.random()))
            try:
                await self._resync()
            except Exception as exc:  # retried next tick (logged)
                log.warning("fanout.resync_failed", exc_info=exc)

    async def _resync(self) -> None:
        """Do from the store alone what hints would have done (see module docstring)."""
        watching = self.hub.watching()
        if watching:
            await self._catch_up(await self.store.job_seqs(list(watching)))
        self.scheduler.known_backends.update(b.name for b in await self.store.list_backends())
        await self._reload_presence()
        self.scheduler.rescan()
