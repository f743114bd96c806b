"""Pseudo-terminal scanners and an event recorder for the driver tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tty
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from drivers.base import Driver, Dropped, Event, Health, Scan
from tests.drivers.pcsc_fixtures import pcscd, pcscd_session  # noqa: F401  # fixtures for test_pcsc

# Generous, because the suite must pass on a loaded two-core machine.
WAIT = 10.0


class PtyScanner:
    """A pseudo-terminal pair that plays a serial scanner.

    The test writes scanner output to the master side; the driver opens the
    slave side by path, as it would open ``/dev/ttyACM0``. Closing the master
    is an unplug: the slave then reads as hung up.
    """

    def __init__(self) -> None:
        self.master, self._slave = os.openpty()
        # Raw mode, so nothing echoes back or rewrites CR before the driver
        # sets its own line settings.
        tty.setraw(self._slave)
        self.path = os.ttyname(self._slave)
        self.closed = False

    def write(self, data: bytes) -> None:
        """Send bytes as the scanner would."""
        os.write(self.master, data)

    async def read_exactly(self, size: int, timeout: float = WAIT) -> bytes:
        """Read what the driver wrote to the scanner, waiting up to ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        received = b""
        os.set_blocking(self.master, False)
        while len(received) < size and loop.time() < deadline:
            try:
                received += os.read(self.master, size - len(received))
            except BlockingIOError:
                await asyncio.sleep(0.01)
        return received

    def unplug(self) -> None:
        """Close both sides, so the slave path disappears as a USB tty does."""
        if self.closed:
            return
        self.closed = True
        os.close(self.master)
        os.close(self._slave)


@pytest.fixture
def pty_factory() -> Iterator[Callable[[], PtyScanner]]:
    """Create pseudo-terminal scanners and close any left open after the test."""
    created: list[PtyScanner] = []

    def create() -> PtyScanner:
        scanner = PtyScanner()
        created.append(scanner)
        return scanner

    yield create

    for scanner in created:
        scanner.unplug()


class Recorder:
    """An event sink that keeps every event and lets a test wait for one."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._changed = asyncio.Condition()

    async def sink(self, event: Event) -> None:
        async with self._changed:
            self.events.append(event)
            self._changed.notify_all()

    @property
    def scans(self) -> list[Scan]:
        return [event for event in self.events if isinstance(event, Scan)]

    @property
    def health(self) -> list[Health]:
        return [event for event in self.events if isinstance(event, Health)]

    @property
    def dropped(self) -> list[Dropped]:
        return [event for event in self.events if isinstance(event, Dropped)]

    async def wait_for(self, predicate: Callable[[Recorder], bool], timeout: float = WAIT) -> None:
        """Wait until ``predicate(self)`` holds; raise TimeoutError after ``timeout`` seconds."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: predicate(self))

    async def wait_scans(self, count: int, timeout: float = WAIT) -> list[Scan]:
        """Wait for ``count`` scans in total and return them."""
        await self.wait_for(lambda recorder: len(recorder.scans) >= count, timeout)
        return self.scans

    async def wait_health(self, available: bool, count: int = 1, timeout: float = WAIT) -> Health:
        """Wait for the ``count``-th health event with this availability and return it."""

        def matching(recorder: Recorder) -> list[Health]:
            return [event for event in recorder.health if event.available is available]

        await self.wait_for(lambda recorder: len(matching(recorder)) >= count, timeout)
        return matching(self)[count - 1]

    async def until(self, condition: Callable[[], bool], timeout: float = WAIT) -> None:
        """Poll ``condition`` every 10 ms until it holds; raise TimeoutError after ``timeout``."""
        async with asyncio.timeout(timeout):
            while not condition():
                await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(driver: Driver) -> AsyncIterator[Recorder]:
    """Run ``driver`` in a task for the duration of the block, then cancel it.

    A driver that stops with an error of its own fails the test when the
    block ends.
    """
    recorder = Recorder()
    task = asyncio.create_task(driver.run(recorder.sink), name=f"driver-{driver.name}")
    try:
        yield recorder
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
def run_driver() -> Callable[[Driver], contextlib.AbstractAsyncContextManager[Recorder]]:
    """Return the ``running`` context manager, so test modules need not import this file."""
    return running
