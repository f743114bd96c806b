"""Device supervisor: restarts with backoff and stops, with serial drivers on pseudo-terminals."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from daemon.devices import DeviceConfig, DeviceManager, RestartBackoff, device_configs
from drivers.base import Driver, Dropped, Health, Scan
from tests.drivers.conftest import WAIT
from tests.drivers.test_serial import FAST, point_link, write_and_wait_read

if TYPE_CHECKING:
    from tests.drivers.conftest import PtyScanner

    PtyFactory = Callable[[], PtyScanner]

DEVICE = "desk-scanner"
# Health errors of the serial driver when the scanner's tty hangs up.
LINK_LOST_ERRORS = ("device disconnected", "read failed")


class LinkLostFault(Exception):
    """The fault that the test's health handler raises when the scanner's link is lost."""


class Handlers:
    """The handlers a DeviceManager calls, recording every event with its monotonic time.

    With ``fail_on_link_lost``, the health handler raises when the driver reports a lost
    link. The serial driver reopens a lost port by itself without raising, so this fault
    is what makes its ``run`` fail and the supervisor restart it.
    """

    def __init__(self, *, fail_on_link_lost: bool = False) -> None:
        self.fail_on_link_lost = fail_on_link_lost
        self.health: list[tuple[float, Health]] = []
        self.dropped: list[Dropped] = []
        self.scans: list[Scan] = []

    async def on_scan(self, device: DeviceConfig, driver: Driver, scan: Scan) -> None:
        self.scans.append(scan)

    def on_health(self, device: DeviceConfig, health: Health) -> None:
        self.health.append((time.monotonic(), health))
        if self.fail_on_link_lost and (health.error or "").startswith(LINK_LOST_ERRORS):
            raise LinkLostFault(f"health handler failed on {health.error!r}")

    def on_drop(self, device: DeviceConfig, dropped: Dropped) -> None:
        self.dropped.append(dropped)

    def count(self, predicate: Callable[[Health], bool]) -> int:
        return sum(1 for _, health in self.health if predicate(health))

    def manager(self, restart_backoff: RestartBackoff) -> DeviceManager:
        return DeviceManager(
            self.on_scan, self.on_health, self.on_drop, restart_backoff=restart_backoff
        )


def is_available(health: Health) -> bool:
    return health.available


def is_driver_failure(health: Health) -> bool:
    return (health.error or "").startswith("driver failed")


async def until(condition: Callable[[], bool], description: str) -> None:
    """Poll ``condition`` every 10 ms; fail naming ``description`` after WAIT seconds."""
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {description}"
        await asyncio.sleep(0.01)


def serial_device(link: Path, **overrides: Any) -> DeviceConfig:
    table = {"name": DEVICE, "kind": "serial", "station": "DESK", "path": str(link)}
    [device] = device_configs([table | FAST | overrides])
    return device


def test_supervisor_backoff_resets_after_long_run(pty_factory: PtyFactory, tmp_path: Path) -> None:
    link = tmp_path / "usb-Example_Scanner-if00"
    backoff = RestartBackoff(delay=0.1, delay_max=10.0, reset_after=2.0)
    quick_failures = 4
    # The wait after the long run if the backoff were not reset: 0.1 s doubled 4 times.
    delay_without_reset = backoff.delay * 2**quick_failures
    handlers = Handlers(fail_on_link_lost=True)
    manager = handlers.manager(backoff)
    restart_waits: list[float] = []

    async def unplug_and_replug(scanner: PtyScanner, failures: int) -> PtyScanner:
        """Unplug ``scanner`` and plug in a new one once the supervisor has seen the failure.

        Appends the seconds from that failure to the restarted driver's open to
        ``restart_waits``, and returns the new scanner.
        """
        scanner.unplug()
        await until(
            lambda: handlers.count(is_driver_failure) >= failures, f"driver failure {failures}"
        )
        failed_at = next(
            at for at, health in reversed(handlers.health) if is_driver_failure(health)
        )

        replugged = pty_factory()
        point_link(link, replugged.path)
        await until(lambda: handlers.count(is_available) > failures, f"open {failures + 1}")
        opened_at = next(at for at, health in reversed(handlers.health) if health.available)
        restart_waits.append(opened_at - failed_at)
        return replugged

    async def scenario() -> None:
        scanner = pty_factory()
        point_link(link, scanner.path)
        await manager.apply([serial_device(link)])
        try:
            await until(lambda: handlers.count(is_available) >= 1, "open 1")

            # Each run ends at once, so each restart waits twice as long as the one before.
            for failures in range(1, quick_failures + 1):
                scanner = await unplug_and_replug(scanner, failures)

            # This run outlasts reset_after before the scanner goes away.
            await asyncio.sleep(backoff.reset_after + 0.5)
            await unplug_and_replug(scanner, quick_failures + 1)
        finally:
            await manager.stop()

    with structlog.testing.capture_logs() as logs:
        asyncio.run(scenario())

    failures = [entry for entry in logs if entry["event"] == "device.driver_failed"]
    assert [entry["attempt"] for entry in failures] == [0, 1, 2, 3, 0]
    assert [entry["restart_in"] for entry in failures] == [0.1, 0.2, 0.4, 0.8, 0.1]
    assert all(isinstance(entry["exc_info"], LinkLostFault) for entry in failures)
    # The wait itself, not only the logged delay, is the first delay again.
    assert restart_waits[-1] < delay_without_reset, restart_waits


def test_manager_reload_counts_partial_frame(pty_factory: PtyFactory, tmp_path: Path) -> None:
    link = tmp_path / "usb-Example_Scanner-if00"
    scanner = pty_factory()
    point_link(link, scanner.path)
    handlers = Handlers()
    manager = handlers.manager(RestartBackoff())

    async def scenario() -> None:
        # A partial_timeout longer than the test, so only the stop can drop the frame.
        await manager.apply([serial_device(link, partial_timeout=60)])
        try:
            await until(lambda: handlers.count(is_available) >= 1, "first open")
            # The driver reads the bytes before the reload stops it.
            await write_and_wait_read(scanner, b"SECRET-12")
            # A reload whose configuration no longer has the device.
            await manager.apply([])
        finally:
            await manager.stop()

    with structlog.testing.capture_logs() as logs:
        asyncio.run(scenario())

    assert handlers.scans == []
    assert handlers.dropped == [Dropped(DEVICE, "incomplete")]
    drops = [entry for entry in logs if entry["event"] == "serial.frame_dropped"]
    assert [(entry["reason"], entry["size"]) for entry in drops] == [("incomplete", 9)]
    assert "SECRET" not in repr(logs)
