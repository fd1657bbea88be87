"""The background event loop behind the synchronous SDK.

grpc.aio channels belong to one asyncio loop, and a Jupyter kernel already
runs a loop in the main thread, so the sync facade cannot simply call
`asyncio.run` per request. Each sync service owns one daemon thread running
an anyio (asyncio backend) loop with a `BlockingPortal`; sync calls hand
coroutines to it and block on the answer. The thread is a daemon so that a
script which forgets `close()` still exits; `close()` (also reached from
`__del__` and atexit) stops it cleanly.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

import anyio
from anyio.from_thread import BlockingPortal

T = TypeVar("T")

#: Stop tasks started from the loop's own thread, referenced until they finish.
_PENDING_STOPS: set[asyncio.Task[None]] = set()

#: How long `stop()` waits for the loop thread to finish its shutdown.
_STOP_TIMEOUT_S = 10.0


class LoopThread:
    """A daemon thread running an event loop that other threads submit coroutines to."""

    def __init__(self, name: str = "qrelay-client") -> None:
        self._ready = threading.Event()
        self._portal: BlockingPortal | None = None
        self._startup_error: BaseException | None = None
        self._lock = threading.Lock()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            raise RuntimeError("qrelay client event loop failed to start") from (
                self._startup_error
            )

    def _run(self) -> None:
        try:
            anyio.run(self._main, backend="asyncio")
        except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
            self._startup_error = exc
            self._ready.set()

    async def _main(self) -> None:
        async with BlockingPortal() as portal:
            self._portal = portal
            self._ready.set()
            await portal.sleep_until_stopped()

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def in_loop_thread(self) -> bool:
        """True when called from the loop's own thread (where blocking would deadlock)."""
        return threading.current_thread() is self._thread

    def _require_portal(self) -> BlockingPortal:
        if self._portal is None or self._stopped:
            raise RuntimeError("the qrelay client is closed")
        if self.in_loop_thread():
            raise RuntimeError(
                "a synchronous qrelay call was made from the client's own event loop thread; "
                "use the async API (AsyncQRelayService) there"
            )
        return self._portal

    def call(self, func: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run `func(*args)` on the loop and wait for it; Ctrl-C cancels the coroutine."""
        future: Future[T] = self._require_portal().start_task_soon(func, *args)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def iterate(self, agen: AsyncIterator[T]) -> Iterator[T]:
        """Drive an async iterator living on the loop from this thread, one item per call."""
        try:
            while True:
                try:
                    item = self.call(_anext, agen)
                except StopAsyncIteration:
                    return
                yield item
        finally:
            aclose = getattr(agen, "aclose", None)
            if aclose is not None and not self._stopped and not self.in_loop_thread():
                self.call(aclose)

    def stop(self, before: Callable[[], Awaitable[None]] | None = None) -> None:
        """Run `before` on the loop, stop it (cancelling what still runs), join. Idempotent."""
        with self._lock:
            if self._stopped:
                return
            portal = self._portal
            self._stopped = True
        if portal is None:
            return

        async def finish() -> None:
            try:
                if before is not None:
                    await before()
            finally:
                await portal.stop(cancel_remaining=True)

        if self.in_loop_thread():
            # Reached from a finaliser running on the loop itself: ask, don't wait.
            task = asyncio.get_running_loop().create_task(finish())
            _PENDING_STOPS.add(task)
            task.add_done_callback(_PENDING_STOPS.discard)
            return
        try:
            portal.call(finish)
        except RuntimeError:
            return  # the loop already ended (interpreter shutdown)
        self._thread.join(_STOP_TIMEOUT_S)


async def _anext(agen: AsyncIterator[T]) -> T:
    return await agen.__anext__()
