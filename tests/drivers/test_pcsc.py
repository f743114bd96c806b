"""PC/SC driver against a real pcscd, the vpcd reader driver and pyscard.

The tests play the card by speaking vpcd's socket protocol (tests/drivers/vpcd.py),
so everything between the card and the driver is the production stack.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import pytest
from structlog.testing import capture_logs

pytest.importorskip("smartcard", reason="pyscard is not installed: pip install '.[pcsc]'")

from daemon.devices import NOT_STARTED, device_table_error
from drivers.base import Dropped, Event, Health, Scan
from drivers.pcsc import (
    ACR122U_ACCEPTED_APDU,
    ACR122U_REJECTED_APDU,
    PcscDriver,
    PcscSettings,
)
from tests.conftest import Daemon, free_port, make_daemon, run_cli, write_config
from tests.drivers import vpcd

if TYPE_CHECKING:
    from tests.drivers.pcsc_fixtures import Pcscd

EVENT_TIMEOUT = 10.0  # seconds; generous for a loaded 2-core machine
QUIET_PERIOD = 1.0  # seconds without events that prove nothing else was sent
DEVICE = "station-1-reader"
FEEDBACK_PREFIX = bytes.fromhex("FF0040")


def make_settings(**overrides: Any) -> PcscSettings:
    table = {
        "name": DEVICE,
        "kind": "pcsc",
        "station": "STATION-1",
        "reader": vpcd.VPCD_READER,
        "feedback": "off",
        "poll_interval": "100ms",
        "reconnect_delay": "100ms",
        "reconnect_delay_max": "400ms",
    }
    return msgspec.convert(table | overrides, PcscSettings)


class DriverHarness:
    """A PcscDriver running as a task, its events collected in a queue."""

    def __init__(self, driver: PcscDriver) -> None:
        self.driver = driver
        self.events: asyncio.Queue[Event] = asyncio.Queue()

    async def next_event(self) -> Event:
        return await asyncio.wait_for(self.events.get(), EVENT_TIMEOUT)

    async def next_scan(self) -> Scan:
        event = await self.next_event()
        assert isinstance(event, Scan), f"expected a scan, got {event!r}"
        return event

    async def next_health(self) -> Health:
        event = await self.next_event()
        assert isinstance(event, Health), f"expected a health change, got {event!r}"
        return event

    async def assert_quiet(self) -> None:
        await asyncio.sleep(QUIET_PERIOD)
        assert self.events.empty(), f"unexpected event {self.events.get_nowait()!r}"


@asynccontextmanager
async def running_driver(settings: PcscSettings) -> AsyncIterator[DriverHarness]:
    harness = DriverHarness(PcscDriver(settings))
    task = asyncio.create_task(harness.driver.run(harness.events.put), name="pcsc-driver")
    try:
        yield harness
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


@asynccontextmanager
async def presented(
    card: vpcd.VirtualCard, *, settle: bool = True
) -> AsyncIterator[vpcd.VirtualCard]:
    """Hold ``card`` on the reader; with ``settle``, return once pcscd has seen it leave."""
    await card.insert()
    try:
        yield card
    finally:
        await card.remove()
    if settle:
        await asyncio.to_thread(vpcd.wait_until_card_absent, vpcd.VPCD_READER, EVENT_TIMEOUT)


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 60))


@pytest.mark.parametrize(
    ("atr", "responder", "overrides", "expected_value", "expected_channel"),
    [
        pytest.param(
            vpcd.MIFARE_CLASSIC_ATR, vpcd.uid_card("04A1B2C3"), {}, "04A1B2C3", "RADIO",
            id="4-byte",
        ),
        pytest.param(
            vpcd.MIFARE_CLASSIC_ATR, vpcd.uid_card("04112233445566"), {}, "04112233445566",
            "RADIO", id="7-byte",
        ),
        pytest.param(
            vpcd.MIFARE_CLASSIC_ATR, vpcd.uid_card("04112233445566778899"), {},
            "04112233445566778899", "RADIO", id="10-byte",
        ),
        pytest.param(
            vpcd.MIFARE_CLASSIC_ATR, vpcd.uid_card("88a1b2c3"), {}, "88A1B2C3", "RADIO",
            id="4-byte-starting-88",
        ),
        pytest.param(
            vpcd.MIFARE_CLASSIC_ATR, vpcd.uid_card("04112233445566"),
            {"uid_byte_order": "lsb"}, "66554433221104", "RADIO", id="lsb-byte-order",
        ),
        pytest.param(
            vpcd.CONTACT_ATR, vpcd.uid_card("0A0B0C0D"), {}, "0A0B0C0D", "CONTACT",
            id="contact-atr",
        ),
        pytest.param(
            vpcd.MIFARE_CLASSIC_ATR, vpcd.uid_card("0A0B0C0D"), {"interface": "contact"},
            "0A0B0C0D", "CONTACT", id="interface-setting-wins",
        ),
        pytest.param(
            vpcd.MIFARE_CLASSIC_ATR,
            vpcd.answers(
                {
                    vpcd.GET_UID: bytes.fromhex("6C07"),
                    bytes.fromhex("FFCA000007"): bytes.fromhex("041122334455669000"),
                }
            ),
            {}, "04112233445566", "RADIO", id="wrong-le-6C-retried",
        ),
        pytest.param(
            vpcd.MIFARE_CLASSIC_ATR,
            vpcd.answers(
                {
                    vpcd.GET_UID: bytes.fromhex("6104"),
                    bytes.fromhex("00C0000004"): bytes.fromhex("04A1B2C39000"),
                }
            ),
            {}, "04A1B2C3", "RADIO", id="more-data-61-fetched",
        ),
    ],
)  # fmt: skip
def test_card_read_yields_scan(
    pcscd: Pcscd,
    atr: bytes,
    responder: vpcd.Responder,
    overrides: dict[str, str],
    expected_value: str,
    expected_channel: str,
) -> None:
    async def scenario() -> None:
        async with running_driver(make_settings(**overrides)) as harness:
            health = await harness.next_health()
            assert health.available, health.error

            started = datetime.now(UTC)
            async with presented(vpcd.VirtualCard(atr, responder)):
                scan = await harness.next_scan()

            assert scan.value == expected_value
            assert scan.channel == expected_channel
            assert scan.device == DEVICE
            assert started <= scan.captured_at <= datetime.now(UTC)

    run(scenario)


@pytest.mark.parametrize(
    ("responder", "expected_reason"),
    [
        pytest.param(vpcd.uid_card("08A1B2C3"), "uid_random", id="random-uid-08"),
        pytest.param(
            vpcd.answers({vpcd.GET_UID: bytes.fromhex("6A81")}), "uid_missing",
            id="function-not-supported-6A81",
        ),
        pytest.param(
            vpcd.answers({vpcd.GET_UID: bytes.fromhex("6300")}), "uid_missing",
            id="failed-6300",
        ),
        pytest.param(vpcd.uid_card("0411223344"), "uid_length_invalid", id="5-byte-uid"),
        pytest.param(vpcd.uid_card(""), "uid_length_invalid", id="empty-uid"),
        pytest.param(vpcd.answers({vpcd.GET_UID: None}), "card_removed", id="removed-mid-read"),
    ],
)  # fmt: skip
def test_unusable_card_skipped_without_scan(
    pcscd: Pcscd, responder: vpcd.Responder, expected_reason: str
) -> None:
    async def scenario() -> None:
        async with running_driver(make_settings()) as harness:
            assert (await harness.next_health()).available

            with capture_logs() as logs:
                async with presented(vpcd.VirtualCard(vpcd.MIFARE_CLASSIC_ATR, responder)) as card:
                    await card.wait_for_command(vpcd.GET_UID[:2], EVENT_TIMEOUT)
                    dropped = await harness.next_event()
                    await harness.assert_quiet()

            assert dropped == Dropped(DEVICE, expected_reason)
            skipped = [entry for entry in logs if entry["event"] == "card.skipped"]
            assert [entry["reason"] for entry in skipped] == [expected_reason]

            # The driver keeps reading: the next card is scanned as usual.
            async with presented(
                vpcd.VirtualCard(vpcd.MIFARE_CLASSIC_ATR, vpcd.uid_card("04A1B2C3"))
            ):
                assert (await harness.next_scan()).value == "04A1B2C3"

    run(scenario)


def test_held_card_scanned_once_until_reinserted(pcscd: Pcscd) -> None:
    async def scenario() -> None:
        card = vpcd.VirtualCard(vpcd.MIFARE_CLASSIC_ATR, vpcd.uid_card("04A1B2C3"))
        async with running_driver(make_settings()) as harness:
            assert (await harness.next_health()).available

            async with presented(card):
                first = await harness.next_scan()
                await harness.assert_quiet()

            async with presented(card):
                second = await harness.next_scan()

            assert first.value == second.value
            assert second.captured_at > first.captured_at
            assert card.commands.count(vpcd.GET_UID) == 2

    run(scenario)


@pytest.mark.parametrize(
    ("accepted", "expected_command"),
    [
        pytest.param(True, bytes(ACR122U_ACCEPTED_APDU), id="accepted"),
        pytest.param(False, bytes(ACR122U_REJECTED_APDU), id="rejected"),
    ],
)
def test_feedback_sends_acr122u_command(
    pcscd: Pcscd, accepted: bool, expected_command: bytes
) -> None:
    async def scenario() -> None:
        responder = vpcd.answers(
            {vpcd.GET_UID: bytes.fromhex("04A1B2C39000"), expected_command: b"\x90\x00"}
        )
        async with running_driver(make_settings(feedback="acr122u")) as harness:
            assert (await harness.next_health()).available

            with capture_logs() as logs:
                async with presented(vpcd.VirtualCard(vpcd.MIFARE_CLASSIC_ATR, responder)) as card:
                    await harness.next_scan()
                    await harness.driver.feedback(accepted)
                    command = await card.wait_for_command(FEEDBACK_PREFIX, EVENT_TIMEOUT)

            assert command == expected_command
            assert not [entry for entry in logs if entry["event"] == "pcsc.feedback_failed"]

    run(scenario)


def test_random_uid_gets_rejected_feedback(pcscd: Pcscd) -> None:
    async def scenario() -> None:
        async with running_driver(make_settings(feedback="acr122u")) as harness:
            assert (await harness.next_health()).available

            card = vpcd.VirtualCard(vpcd.MIFARE_CLASSIC_ATR, vpcd.uid_card("08A1B2C3"))
            async with presented(card):
                command = await card.wait_for_command(FEEDBACK_PREFIX, EVENT_TIMEOUT)

            assert command == bytes(ACR122U_REJECTED_APDU)

    run(scenario)


@pytest.mark.parametrize(
    ("feedback", "expected_log"),
    [
        # vpcd's reader name is not an ACR122U, so "auto" sends nothing.
        pytest.param("auto", "pcsc.feedback_skipped", id="auto-on-other-reader"),
        pytest.param("off", "pcsc.feedback_skipped", id="off"),
    ],
)
def test_feedback_skipped_sends_nothing(pcscd: Pcscd, feedback: str, expected_log: str) -> None:
    async def scenario() -> None:
        async with running_driver(make_settings(feedback=feedback)) as harness:
            assert (await harness.next_health()).available

            card = vpcd.VirtualCard(vpcd.MIFARE_CLASSIC_ATR, vpcd.uid_card("04A1B2C3"))
            with capture_logs() as logs:
                async with presented(card):
                    await harness.next_scan()
                    await harness.driver.feedback(True)
                    await asyncio.sleep(QUIET_PERIOD)

            assert card.commands == [vpcd.GET_UID]
            assert expected_log in [entry["event"] for entry in logs]

    run(scenario)


def test_feedback_without_card_logs_failure(pcscd: Pcscd) -> None:
    async def scenario() -> None:
        async with running_driver(make_settings(feedback="acr122u")) as harness:
            assert (await harness.next_health()).available

            with capture_logs() as logs:
                # No card: the command goes to the reader's escape IOCTL, which vpcd lacks.
                await harness.driver.feedback(True)

            failures = [entry for entry in logs if entry["event"] == "pcsc.feedback_failed"]
            assert len(failures) == 1
            assert "SCardControl" in failures[0]["error"]

    run(scenario)


def test_pcscd_restart_recovers(pcscd: Pcscd) -> None:
    async def scenario() -> None:
        async with running_driver(make_settings()) as harness:
            assert (await harness.next_health()).available

            with capture_logs() as logs:
                # SIGKILL plays a crash: pcscd gets no chance to tell its clients.
                await asyncio.to_thread(pcscd.stop, signal.SIGKILL)
                lost = await harness.next_health()
                # Several reconnect attempts fail (delay 100 ms doubling to 400 ms).
                await asyncio.sleep(1.5)
                await asyncio.to_thread(pcscd.start)
                back = await harness.next_health()

            assert not lost.available
            assert "0x8010" in (lost.error or "")
            assert back.available
            events = [entry["event"] for entry in logs]
            assert events.count("device.unavailable") == 1
            assert events.count("device.available") == 1
            assert events.count("pcsc.reconnect_scheduled") >= 2

            async with presented(
                vpcd.VirtualCard(vpcd.MIFARE_CLASSIC_ATR, vpcd.uid_card("04A1B2C3"))
            ):
                assert (await harness.next_scan()).value == "04A1B2C3"

    run(scenario)


def test_pcscd_stop_with_card_recovers(pcscd: Pcscd) -> None:
    """pcscd stops cleanly with a card on the reader; vpcd's card connection ends with it."""

    async def scenario() -> None:
        async with running_driver(make_settings()) as harness:
            assert (await harness.next_health()).available
            card = vpcd.VirtualCard(vpcd.MIFARE_CLASSIC_ATR, vpcd.uid_card("04A1B2C3"))

            async with presented(card, settle=False):
                await harness.next_scan()
                await asyncio.to_thread(pcscd.stop, signal.SIGTERM)
                assert not (await harness.next_health()).available

            await asyncio.to_thread(pcscd.start)
            assert (await harness.next_health()).available
            async with presented(card):
                assert (await harness.next_scan()).value == "04A1B2C3"

    run(scenario)


def test_reader_absent_then_present(pcscd: Pcscd) -> None:
    async def scenario() -> None:
        await asyncio.to_thread(pcscd.stop)
        await asyncio.to_thread(pcscd.start, with_reader=False)

        async with running_driver(make_settings()) as harness:
            missing = await harness.next_health()
            assert not missing.available
            assert missing.error == f"no PC/SC reader matches {vpcd.VPCD_READER!r}"

            # The reader returns when pcscd restarts with it configured; a
            # reader from reader.conf cannot appear without a restart.
            await asyncio.to_thread(pcscd.stop)
            await asyncio.to_thread(pcscd.start, with_reader=True)
            assert (await harness.next_health()).available

            async with presented(
                vpcd.VirtualCard(vpcd.MIFARE_CLASSIC_ATR, vpcd.uid_card("04A1B2C3"))
            ):
                assert (await harness.next_scan()).value == "04A1B2C3"

    run(scenario)


def test_reader_removed_while_watched(pcscd: Pcscd) -> None:
    async def scenario() -> None:
        async with running_driver(make_settings()) as harness:
            assert (await harness.next_health()).available

            await asyncio.to_thread(pcscd.stop)
            await asyncio.to_thread(pcscd.start, with_reader=False)
            lost = await harness.next_health()
            await harness.assert_quiet()

            assert not lost.available
            await asyncio.to_thread(pcscd.stop)
            await asyncio.to_thread(pcscd.start, with_reader=True)
            assert (await harness.next_health()).available

    run(scenario)


@pytest.mark.parametrize(
    ("glob", "available", "ambiguous_logged"),
    [
        pytest.param("ACS ACR122U*", False, False, id="no-match"),
        pytest.param("virtual pcd 00 00", False, False, id="case-sensitive"),
        pytest.param("Virtual PCD*", True, True, id="two-matches-first-wins"),
        pytest.param("Virtual PCD 00 0[0]", True, False, id="character-class"),
    ],
)
def test_reader_glob(pcscd: Pcscd, glob: str, available: bool, ambiguous_logged: bool) -> None:
    async def scenario() -> None:
        with capture_logs() as logs:
            async with running_driver(make_settings(reader=glob)) as harness:
                health = await harness.next_health()

        assert health.available == available
        events = [entry["event"] for entry in logs]
        assert ("pcsc.reader_ambiguous" in events) == ambiguous_logged

    run(scenario)


def test_cancel_stops_worker_thread(pcscd: Pcscd) -> None:
    async def scenario() -> None:
        async with running_driver(make_settings(poll_interval="5s")) as harness:
            assert (await harness.next_health()).available

    run(scenario)

    # SCardCancel ends the 5 s wait, so the worker leaves well before it would time out.
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline and _worker_threads():
        time.sleep(0.05)
    assert _worker_threads() == []


def _worker_threads() -> list[str]:
    return [thread.name for thread in threading.enumerate() if thread.name.startswith("pcsc-")]


@pytest.mark.parametrize(
    ("overrides", "message_part"),
    [
        pytest.param({"colour": "red"}, "unknown field", id="unknown-field"),
        pytest.param({"uid_byte_order": "big"}, "uid_byte_order", id="bad-byte-order"),
        pytest.param({"interface": "radio"}, "interface", id="bad-interface"),
        pytest.param({"poll_interval": "fast"}, "invalid duration", id="bad-duration"),
        pytest.param({"reconnect_delay": "0ms"}, "use more than 0", id="zero-duration"),
        pytest.param({"reader": ""}, "invalid reader", id="empty-reader"),
        pytest.param({"kind": "serial"}, "kind", id="wrong-kind"),
    ],
)
def test_settings_reject_invalid(overrides: dict[str, str], message_part: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=message_part):
        make_settings(**overrides)


def test_settings_defaults() -> None:
    settings = msgspec.convert(
        {"name": "r1", "kind": "pcsc", "station": "S1", "reader": "ACS ACR122U*"}, PcscSettings
    )

    assert settings.uid_byte_order == "msb"
    assert settings.interface == "auto"
    assert settings.feedback == "auto"
    assert settings.poll_seconds == 0.5
    assert settings.reconnect_seconds == 0.5
    assert settings.reconnect_max_seconds == 30.0


# --- One reader, one device table --------------------------------------------------------

OWNER = "station-1-reader-a"
SECOND = "station-1-reader-b"
# Both globs match "Virtual PCD 00 00" and nothing else among vpcd's two readers, and
# neither is a literal name, so check-config accepts the pair.
OWNER_GLOB = "Virtual PCD 00 0[0]"
SECOND_GLOB = "Virtual PCD*00 00"
SECOND_VPCD_READER = "Virtual PCD 00 01"


def reader_in_use_warnings(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == "pcsc.reader_in_use"]


def test_second_driver_skips_claimed_reader(pcscd: Pcscd) -> None:
    async def scenario() -> None:
        card = vpcd.VirtualCard(vpcd.MIFARE_CLASSIC_ATR, vpcd.uid_card("04A1B2C3"))
        owner_stack = AsyncExitStack()
        owner = await owner_stack.enter_async_context(
            running_driver(make_settings(name=OWNER, reader=OWNER_GLOB))
        )
        try:
            assert (await owner.next_health()).available

            with capture_logs() as logs:
                async with running_driver(make_settings(name=SECOND, reader=SECOND_GLOB)) as second:
                    skipped = await second.next_health()
                    # Ten polls of 100 ms: the conflict is still logged once.
                    await second.assert_quiet()

                    async with presented(card, settle=False):
                        assert (await owner.next_scan()).value == "04A1B2C3"
                        await second.assert_quiet()

                        # The owner stops, so the second driver takes the reader and
                        # reads the card left on it.
                        await owner_stack.aclose()
                        took_over = await second.next_health()
                        assert (await second.next_scan()).value == "04A1B2C3"
        finally:
            await owner_stack.aclose()

        assert not skipped.available
        assert skipped.error == (
            f"reader {vpcd.VPCD_READER!r} is read by device {OWNER!r}, whose reader glob"
            f" {OWNER_GLOB!r} matches it too; make the two globs disjoint"
        )
        assert took_over.available
        # One cause, one warning: the device.unavailable line names the reader, its owner
        # and the fix, and no pcsc.reader_in_use line repeats it.
        warnings = [entry for entry in logs if entry["log_level"] == "warning"]
        assert [entry["event"] for entry in warnings] == ["device.unavailable"]
        assert warnings[0]["device"] == SECOND
        assert warnings[0]["reader"] == vpcd.VPCD_READER
        assert warnings[0]["owner"] == OWNER
        assert warnings[0]["error"] == skipped.error
        assert card.commands.count(vpcd.GET_UID) == 2

    run(scenario)


def test_glob_skips_claimed_reader_for_next(pcscd: Pcscd) -> None:
    async def scenario() -> None:
        async with running_driver(make_settings(name=OWNER, reader=OWNER_GLOB)) as owner:
            assert (await owner.next_health()).available

            with capture_logs() as logs:
                async with running_driver(
                    make_settings(name=SECOND, reader="Virtual PCD*")
                ) as second:
                    available = await second.next_health()
                    async with presented(
                        vpcd.VirtualCard(vpcd.MIFARE_CLASSIC_ATR, vpcd.uid_card("04A1B2C3"))
                    ):
                        assert (await owner.next_scan()).value == "04A1B2C3"
                        await second.assert_quiet()

        assert available.available
        readers = [entry["reader"] for entry in logs if entry["event"] == "device.available"]
        assert readers == [SECOND_VPCD_READER]
        warnings = reader_in_use_warnings(logs)
        assert [(entry["device"], entry["owner"]) for entry in warnings] == [(SECOND, OWNER)]

    run(scenario)


def test_all_readers_claimed_logs_each_once(pcscd: Pcscd) -> None:
    third = "station-1-reader-c"

    async def scenario() -> None:
        async with AsyncExitStack() as stack:
            owners = [(OWNER, OWNER_GLOB), (SECOND, SECOND_VPCD_READER)]
            for name, reader in owners:
                harness = await stack.enter_async_context(
                    running_driver(make_settings(name=name, reader=reader))
                )
                assert (await harness.next_health()).available

            with capture_logs() as logs:
                async with running_driver(
                    make_settings(name=third, reader="Virtual PCD*")
                ) as harness:
                    skipped = await harness.next_health()
                    # Ten polls of 100 ms: each conflict is still logged once.
                    await harness.assert_quiet()

        assert not skipped.available
        warnings = [entry for entry in logs if entry["log_level"] == "warning"]
        # The health error names the first reader in use, so its conflict is logged once as
        # device.unavailable, and the other reader's as pcsc.reader_in_use.
        assert [(entry["event"], entry["reader"], entry["owner"]) for entry in warnings] == [
            ("pcsc.reader_in_use", SECOND_VPCD_READER, SECOND),
            ("device.unavailable", vpcd.VPCD_READER, OWNER),
        ]
        assert [entry["device"] for entry in warnings] == [third, third]
        assert warnings[1]["error"] == skipped.error

    run(scenario)


@pytest.mark.parametrize(
    ("first_reader", "second_reader", "message_part"),
    [
        pytest.param(
            "Virtual PCD*", "Virtual PCD 00 00",
            "reader 'Virtual PCD 00 00' is matched by the glob 'Virtual PCD*' of devices.0"
            " ('desk-a')",
            id="literal-after-glob",
        ),
        pytest.param(
            "Virtual PCD 00 00", "Virtual PCD 00 0?",
            "glob 'Virtual PCD 00 0?' matches the reader 'Virtual PCD 00 00' of devices.0"
            " ('desk-a')",
            id="glob-after-literal",
        ),
        pytest.param(
            "ACS ACR122U PICC Interface 00 00", "ACS ACR122U [P]ICC*",
            "glob 'ACS ACR122U [P]ICC*' matches the reader",
            id="character-class-glob",
        ),
        pytest.param(
            "Virtual PCD*", "Virtual PCD*", "duplicate reader 'Virtual PCD*'", id="equal-globs"
        ),
    ],
)  # fmt: skip
def test_overlapping_readers_rejected(
    first_reader: str, second_reader: str, message_part: str
) -> None:
    tables = [
        {"name": "desk-a", "kind": "pcsc", "station": "DESK", "reader": first_reader},
        {"name": "desk-b", "kind": "pcsc", "station": "DESK", "reader": second_reader},
    ]

    problem = device_table_error(tables)

    assert problem is not None
    key, detail = problem
    assert key == "devices.1.reader"
    assert message_part in detail
    if "duplicate" not in message_part:
        assert detail.endswith(
            "make the two patterns disjoint, for example by writing the"
            " full reader name in each table"
        )


@pytest.mark.parametrize(
    ("first_reader", "second_reader"),
    [
        pytest.param("Virtual PCD 00 00", "Virtual PCD 00 01", id="two-literal-names"),
        pytest.param("Virtual PCD 00 0[0]", "Virtual PCD 00 01", id="glob-missing-literal"),
        # Both match "Virtual PCD 00 00", but which names exist is known only at run time.
        pytest.param(OWNER_GLOB, SECOND_GLOB, id="two-different-globs"),
    ],
)
def test_disjoint_or_undecidable_readers_accepted(first_reader: str, second_reader: str) -> None:
    tables = [
        {"name": "desk-a", "kind": "pcsc", "station": "DESK", "reader": first_reader},
        {"name": "desk-b", "kind": "pcsc", "station": "DESK", "reader": second_reader},
    ]

    assert device_table_error(tables) is None


def pcsc_table(name: str, reader: str) -> str:
    return f"""
[[devices]]
name = "{name}"
kind = "pcsc"
station = "STATION-1"
reader = "{reader}"
feedback = "off"
poll_interval = "100ms"
"""


def test_check_config_names_overlapping_tables(tmp_path: Path) -> None:
    extra = pcsc_table("desk-a", "Virtual PCD*") + pcsc_table("desk-b", vpcd.VPCD_READER)
    config = write_config(tmp_path, free_port(), extra)

    result = run_cli("check-config", str(config))

    assert result.returncode == 2, result.stdout
    assert "key devices.1.reader:" in result.stderr
    assert "of devices.0 ('desk-a')" in result.stderr
    assert "make the two patterns disjoint" in result.stderr


# The sample badge of associate-1, accepted on the RADIO channel.
BADGE_UID = "04A23B1C5D6E80"


class DaemonWatch:
    """Reads a daemon subprocess's device health and its JSON log lines."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def devices(self) -> dict[str, dict[str, Any]]:
        reply = self.daemon.request("GET", "/v1/local/devices")
        assert reply.status == 200, reply.body
        return {device["device"]: device for device in reply.json()["devices"]}

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.daemon.log_lines() if line.get("event") == name]

    async def wait(self, condition: Callable[[], bool], description: str) -> None:
        """Check ``condition`` every 50 ms; fail with the daemon's log after EVENT_TIMEOUT."""
        deadline = time.monotonic() + EVENT_TIMEOUT
        while not await asyncio.to_thread(condition):
            if time.monotonic() > deadline:
                log_tail = self.daemon.log_path.read_text(encoding="utf-8")[-3000:]
                raise AssertionError(
                    f"{description} within {EVENT_TIMEOUT} s; daemon log:\n{log_tail}"
                )
            await asyncio.sleep(0.05)

    async def wait_decisions(self, count: int) -> list[dict[str, Any]]:
        await self.wait(
            lambda: len(self.events("scan.decided")) >= count, f"no {count} scan.decided lines"
        )
        return self.events("scan.decided")

    def reload(self, config_text: str) -> None:
        assert self.daemon.process is not None
        self.daemon.config.write_text(config_text, encoding="utf-8")
        self.daemon.process.send_signal(signal.SIGHUP)


def one_owner(devices: dict[str, dict[str, Any]]) -> bool:
    """Tell whether one device is available and the others report why they are not."""
    available = [state["available"] for state in devices.values()]
    opened = all(state["error"] != NOT_STARTED for state in devices.values())
    return opened and sorted(available) == [False, True]


def test_daemon_decides_badge_once_per_reader(pcscd: Pcscd, tmp_path: Path) -> None:
    globs = {OWNER: OWNER_GLOB, SECOND: SECOND_GLOB}
    tables = {name: pcsc_table(name, glob) for name, glob in globs.items()}
    local = '\n[local]\ndebounce = "0ms"\n'
    daemon = make_daemon(tmp_path / "daemon", local + tables[OWNER] + tables[SECOND])
    base_config = daemon.config.read_text(encoding="utf-8")
    base_config = base_config.replace(tables[OWNER], "").replace(tables[SECOND], "")
    watch = DaemonWatch(daemon)

    async def scenario() -> None:
        badge = vpcd.VirtualCard(vpcd.MIFARE_CLASSIC_ATR, vpcd.uid_card(BADGE_UID))
        await asyncio.to_thread(daemon.start)
        try:
            await watch.wait(lambda: one_owner(watch.devices()), "no single owner of the reader")
            states = await asyncio.to_thread(watch.devices)
            owner = next(name for name, state in states.items() if state["available"])
            second = next(name for name in states if name != owner)

            async with presented(badge, settle=False):
                first = await watch.wait_decisions(1)
                await asyncio.sleep(QUIET_PERIOD)
                after_quiet = await asyncio.to_thread(watch.events, "scan.decided")

                # Removing the owner's table hands the reader to the other table, which
                # reads the badge left on it: the same badge at the station closes the session.
                watch.reload(base_config + tables[second])
                handed_over = (await watch.wait_decisions(2))[1]

                # A reload that changes the table restarts its device, which reads the
                # badge again and opens a new session.
                watch.reload(base_config + tables[second].replace('"100ms"', '"200ms"'))
                restarted = (await watch.wait_decisions(3))[2]
        finally:
            await asyncio.to_thread(daemon.stop)

        assert states[second]["error"] == (
            f"reader {vpcd.VPCD_READER!r} is read by device {owner!r}, whose reader glob"
            f" {globs[owner]!r} matches it too; make the two globs disjoint"
        )
        assert after_quiet == first
        assert first[0]["device"] == owner
        assert first[0]["identity_id"] == "associate-1"
        assert first[0]["session"] == "opened"
        assert watch.events("pcsc.reader_in_use") == []
        unavailable = [
            entry for entry in watch.events("device.unavailable") if entry["device"] == second
        ]
        assert [(entry["reader"], entry["owner"]) for entry in unavailable] == [
            (vpcd.VPCD_READER, owner)
        ]
        assert handed_over["device"] == second
        assert handed_over["session"] == "closed"
        assert restarted["device"] == second
        assert restarted["session"] == "opened"

    run(scenario)
