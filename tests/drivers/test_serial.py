"""Serial scanner driver: framing rules, and the driver on real pseudo-terminals."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sys
import termios
import time
import tomllib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import pytest
import serial
import structlog

from drivers import serial as serial_driver
from drivers.base import Dropped, Event, Health, Scan, backoff_delay, parse_duration
from drivers.serial import (
    MAX_FRAME_LENGTH_LIMIT,
    DroppedFrame,
    Frame,
    FrameDecoder,
    SerialDriver,
    SerialSettings,
)
from tests.drivers.conftest import WAIT

if TYPE_CHECKING:
    from conftest import PtyScanner, Recorder

    RunDriver = Callable[[SerialDriver], contextlib.AbstractAsyncContextManager[Recorder]]
    PtyFactory = Callable[[], PtyScanner]

# Short timing for tests; the defaults are sized for real scanners.
FAST: dict[str, Any] = {
    "idle_gap": 0.05,
    "partial_timeout": 1.0,
    "reconnect_delay": 0.02,
    "reconnect_delay_max": 0.1,
}


def make_settings(path: str = "/dev/null", **overrides: Any) -> SerialSettings:
    table = {"name": "test-scanner", "kind": "serial", "station": "station-1", "path": path}
    table.update(FAST)
    table.update(overrides)
    return msgspec.convert(table, SerialSettings)


def tty_unread_bytes(fd: int) -> int:
    """Return how many received bytes wait unread in the input queue of the tty open as ``fd``."""
    count = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    return int.from_bytes(count, sys.byteorder)


async def write_and_wait_read(scanner: PtyScanner, data: bytes) -> None:
    """Send ``data`` as the scanner, and wait until the driver has read all of it.

    The kernel moves bytes written to the pty master into the slave's input queue from a
    workqueue, so right after the write the queue may still be empty. The first wait
    therefore blocks the event loop until all of ``data`` is queued, which keeps the driver
    from reading part of it. The second wait lets the driver run until the queue is empty.
    Each raises TimeoutError after WAIT seconds. ``data`` must fit in the queue, which takes
    at most 4095 bytes in raw mode on Linux 6.18.
    """
    fd = os.open(scanner.path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        scanner.write(data)
        deadline = time.monotonic() + WAIT
        while tty_unread_bytes(fd) < len(data):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{len(data)} bytes written to {scanner.path} did not reach its input queue"
                    f" within {WAIT:g} s"
                )
            time.sleep(0.001)

        async with asyncio.timeout(WAIT):
            while tty_unread_bytes(fd) > 0:
                await asyncio.sleep(0.01)
    finally:
        os.close(fd)


def point_link(link: Path, target: str) -> None:
    """Point the symlink ``link`` at ``target`` atomically, as udev replaces a by-id link."""
    staging = link.with_name(link.name + ".new")
    with contextlib.suppress(FileNotFoundError):
        staging.unlink()
    staging.symlink_to(target)
    os.replace(staging, link)


# --- Framing, fed byte chunks directly -------------------------------------------------------


@dataclass(frozen=True)
class FramingCase:
    name: str
    settings: dict[str, Any]
    chunks: list[tuple[float, bytes]]  # (loop time, bytes received)
    expected: list[str]  # values, or "!reason" for a dropped frame
    expire_at: float | None = None  # loop time of a final expiry check


def decode(case: FramingCase) -> list[str]:
    decoder = FrameDecoder(make_settings(**case.settings))
    results: list[Frame | DroppedFrame] = []
    for now, chunk in case.chunks:
        results.extend(decoder.expire(now))
        results.extend(decoder.feed(chunk, now))
    if case.expire_at is not None:
        results.extend(decoder.expire(case.expire_at))
    return [r.value if isinstance(r, Frame) else f"!{r.reason}" for r in results]


FRAMING_CASES = [
    FramingCase("cr", {"terminator": "CR"}, [(0, b"ABC\rDEF\r")], ["ABC", "DEF"]),
    FramingCase("lf", {"terminator": "LF"}, [(0, b"ABC\nDEF\n")], ["ABC", "DEF"]),
    FramingCase("crlf", {"terminator": "CRLF"}, [(0, b"ABC\r\nDEF\r\n")], ["ABC", "DEF"]),
    FramingCase("tab", {"terminator": "TAB"}, [(0, b"ABC\tDEF\t")], ["ABC", "DEF"]),
    FramingCase("etx", {"terminator": "ETX"}, [(0, b"ABC\x03DEF\x03")], ["ABC", "DEF"]),
    FramingCase(
        "crlf_split_between_chunks",
        {"terminator": "CRLF"},
        [(0, b"ABC\r"), (0.01, b"\nDEF\r"), (0.02, b"\n")],
        ["ABC", "DEF"],
    ),
    FramingCase(
        "crlf_one_byte_per_chunk",
        {"terminator": "CRLF"},
        [(i * 0.001, bytes([byte])) for i, byte in enumerate(b"AB\r\nC\rD\r\n")],
        ["AB", "C\rD"],
    ),
    FramingCase(
        "frame_split_between_chunks",
        {"terminator": "CR"},
        [(0, b"12"), (0.01, b"34"), (0.02, b"56\r")],
        ["123456"],
    ),
    FramingCase(
        "crlf_counted_once_with_cr",
        {"terminator": "CR"},
        [(0, b"ABC\r\nDEF\r\n")],
        ["ABC", "DEF"],
    ),
    FramingCase(
        "crlf_counted_once_with_cr_split",
        {"terminator": "CR"},
        [(0, b"ABC\r"), (0.01, b"\nDEF\r"), (0.02, b"\n")],
        ["ABC", "DEF"],
    ),
    FramingCase(
        "crlf_counted_once_with_lf",
        {"terminator": "LF"},
        [(0, b"ABC\r\nDEF\r\n")],
        ["ABC", "DEF"],
    ),
    FramingCase("empty_frames_ignored", {"terminator": "CR"}, [(0, b"\r\rABC\r")], ["ABC"]),
    FramingCase(
        "idle_gap_ends_frame",
        {"terminator": "none", "idle_gap": 0.1},
        [(0, b"ABC"), (0.05, b"DEF"), (0.3, b"GHI")],
        ["ABCDEF", "GHI"],
        expire_at=0.5,
    ),
    FramingCase(
        "idle_gap_keeps_control_bytes",
        {"terminator": "none", "idle_gap": 0.1},
        [(0, b"01\x1d21\r")],
        ["01\x1d21\r"],
        expire_at=0.2,
    ),
    FramingCase(
        "idle_gap_not_yet_passed",
        {"terminator": "none", "idle_gap": 0.1},
        [(0, b"ABC")],
        [],
        expire_at=0.05,
    ),
    FramingCase("aim_id_stripped", {"aim_ids": True}, [(0, b"]C0123456\r")], ["123456"]),
    FramingCase(
        "aim_qr_with_cr_framed_by_idle_gap",
        {"aim_ids": True, "idle_gap": 0.1},
        [(0, b"]Q1LINE1\rLINE2\r")],
        ["LINE1\rLINE2"],
        expire_at=0.2,
    ),
    FramingCase(
        "aim_qr_with_cr_split_between_chunks",
        {"aim_ids": True, "idle_gap": 0.1},
        [(0, b"]Q1LINE1\r"), (0.02, b"LINE2\r")],
        ["LINE1\rLINE2"],
        expire_at=0.2,
    ),
    FramingCase(
        "aim_qr_waits_for_idle_gap",
        {"aim_ids": True, "idle_gap": 0.1},
        [(0, b"]Q1LINE1\rLINE2\r")],
        [],
        expire_at=0.05,
    ),
    FramingCase(
        "aim_qr_with_crlf_terminator",
        {"aim_ids": True, "idle_gap": 0.1, "terminator": "CR"},
        [(0, b"]Q1A\rB\r\n")],
        ["A\rB"],
        expire_at=0.2,
    ),
    FramingCase(
        "aim_qr_two_scans_in_one_write",
        {"aim_ids": True, "prefix": "\u0002", "suffix": "\u0003", "idle_gap": 0.1},
        [(0, b"\x02]Q1SHOPPER-0001\x03\r\x02]Q1SHOPPER-0003\x03\r")],
        ["SHOPPER-0001", "SHOPPER-0003"],
        expire_at=0.2,
    ),
    FramingCase(
        "aim_qr_second_scan_within_idle_gap",
        {"aim_ids": True, "prefix": "\u0002", "suffix": "\u0003", "idle_gap": 0.1},
        [(0, b"\x02]Q1A\rB\x03\r"), (0.02, b"\x02]Q1C\x03\r")],
        ["A\rB", "C"],
        expire_at=0.2,
    ),
    FramingCase(
        "aim_qr_split_waits_for_whole_prefix",
        {"aim_ids": True, "prefix": "S:", "idle_gap": 0.1},
        [(0, b"S:]Q1A\rS"), (0.02, b":]Q1B\r")],
        ["A", "B"],
        expire_at=0.2,
    ),
    FramingCase(
        "aim_qr_cr_inside_kept_without_suffix_before_it",
        {"aim_ids": True, "prefix": "\u0002", "suffix": "\u0003", "idle_gap": 0.1},
        [(0, b"\x02]Q1A\r\x02B\x03\r")],
        ["A\r\x02B"],
        expire_at=0.2,
    ),
    FramingCase(
        "aim_qr_then_code128_without_prefix",
        {"aim_ids": True, "idle_gap": 0.1},
        [(0, b"]Q1A\rB\r]C0C\r")],
        ["A\rB", "C"],
        expire_at=0.2,
    ),
    FramingCase(
        "aim_qr_two_scans_with_crlf",
        {"aim_ids": True, "idle_gap": 0.1, "terminator": "CR"},
        [(0, b"]Q1A\r\n]Q1B\r\n")],
        ["A", "B"],
        expire_at=0.2,
    ),
    FramingCase(
        "aim_qr_two_scans_with_lf_terminator",
        {"aim_ids": True, "idle_gap": 0.1, "terminator": "LF", "suffix": "#"},
        [(0, b"]Q1A\nB#\r\n]Q1C#\n")],
        ["A\nB", "C"],
        expire_at=0.2,
    ),
    FramingCase(
        "aim_code128_ends_at_terminator",
        {"aim_ids": True, "idle_gap": 0.1},
        [(0, b"]C0AB\rCD\r")],
        ["AB", "!malformed"],
    ),
    FramingCase(
        "aim_qr_framed_by_length",
        {"aim_ids": True, "length_digits": 3},
        [(0, b"]Q1011LINE1\rLINE2\r]C0002OK\r")],
        ["LINE1\rLINE2", "OK"],
    ),
    FramingCase(
        "length_without_aim",
        {"length_digits": 4},
        [(0, b"0005AB\rCD\r"), (0.01, b"0002EF\r")],
        ["AB\rCD", "EF"],
    ),
    FramingCase(
        "length_split_between_chunks",
        {"length_digits": 2, "terminator": "CRLF"},
        [(0, b"05A"), (0.01, b"B\r\nC"), (0.02, b"\r\n")],
        ["AB\r\nC"],
    ),
    FramingCase(
        "length_mismatch_resynchronises",
        {"length_digits": 3},
        [(0, b"003ABCD\r002OK\r")],
        ["!malformed", "OK"],
    ),
    FramingCase(
        "length_digits_invalid",
        {"length_digits": 3},
        [(0, b"0x3ABC\r002OK\r")],
        ["!malformed", "OK"],
    ),
    FramingCase(
        "max_frame_length_kept",
        {"max_frame_length": 8},
        [(0, b"12345678\r")],
        ["12345678"],
    ),
    FramingCase(
        "frame_over_max_dropped",
        {"max_frame_length": 8},
        [(0, b"123456789\rOK\r")],
        ["!too_long", "OK"],
    ),
    FramingCase(
        "frame_over_max_across_chunks",
        {"max_frame_length": 8},
        [(0, b"1234567890"), (0.01, b"1234567890"), (0.02, b"12\rOK\r")],
        ["!too_long", "OK"],
    ),
    FramingCase(
        "frame_over_max_without_terminator",
        {"max_frame_length": 8, "terminator": "none", "idle_gap": 0.1},
        [(0, b"1234567890"), (0.3, b"OK")],
        ["!too_long", "OK"],
        expire_at=0.5,
    ),
    FramingCase(
        "length_declared_over_max",
        {"max_frame_length": 8, "length_digits": 2},
        [(0, b"12ABCDEFGHIJKL\r02OK\r")],
        ["!too_long", "OK"],
    ),
    FramingCase(
        "undecodable_bytes_dropped",
        {},
        [(0, b"\xff\xfe\x80\rOK\r")],
        ["!undecodable", "OK"],
    ),
    FramingCase(
        "latin1_encoding",
        {"encoding": "latin-1"},
        [(0, b"M\xfcller\r")],
        ["Müller"],
    ),
    FramingCase(
        "partial_frame_dropped_after_silence",
        {"partial_timeout": 0.5},
        [(0, b"noise"), (1.0, b"OK\r")],
        ["!incomplete", "OK"],
    ),
    FramingCase(
        "prefix_and_suffix_stripped",
        {"prefix": "\u0002", "suffix": "#E"},
        [(0, b"\x02ABC#E\r")],
        ["ABC"],
    ),
    FramingCase(
        "prefix_then_aim_id",
        {"prefix": "S:", "aim_ids": True},
        [(0, b"S:]E0400638133393\r")],
        ["400638133393"],
    ),
    FramingCase(
        "garbage_before_prefix_resynchronises",
        {"prefix": "\u0002"},
        [(0, b"zz\x02ABC\r\x02DEF\r")],
        ["!malformed", "DEF"],
    ),
    FramingCase("suffix_missing", {"suffix": "#E"}, [(0, b"ABC\rDEF#E\r")], ["!malformed", "DEF"]),
    FramingCase(
        "aim_id_missing", {"aim_ids": True}, [(0, b"ABC\r]C0DEF\r")], ["!malformed", "DEF"]
    ),
]


@pytest.mark.parametrize("case", FRAMING_CASES, ids=lambda case: case.name)
def test_frame_decoder_cases(case: FramingCase) -> None:
    assert decode(case) == case.expected


def test_frame_decoder_deadline_idle() -> None:
    decoder = FrameDecoder(make_settings())
    assert decoder.deadline() is None


def test_frame_decoder_deadline_partial() -> None:
    decoder = FrameDecoder(make_settings(partial_timeout=0.5))
    decoder.feed(b"AB", 2.0)
    assert decoder.deadline() == pytest.approx(2.5)


def test_frame_decoder_deadline_idle_gap() -> None:
    decoder = FrameDecoder(make_settings(terminator="none", idle_gap=0.1))
    decoder.feed(b"AB", 2.0)
    assert decoder.deadline() == pytest.approx(2.1)


def test_frame_decoder_frame_end_time() -> None:
    decoder = FrameDecoder(make_settings(terminator="none", idle_gap=0.1))
    decoder.feed(b"AB", 2.0)
    [frame] = decoder.expire(3.0)
    assert frame == Frame("AB", 2.0)


# --- Settings ------------------------------------------------------------------------------

EXAMPLE_TOML = """
[[devices]]
name = "station-1-handheld"
kind = "serial"
station = "station-1"
path = "/dev/serial/by-id/usb-Example_Scanner-if00"
baudrate = 9600
terminator = "CR"
idle_gap = "200ms"
silence_timeout = "10m"
good_read_feedback = "07"
"""


def test_settings_decode_toml() -> None:
    table = tomllib.loads(EXAMPLE_TOML)["devices"][0]
    settings = msgspec.convert(table, SerialSettings)
    assert (settings.name, settings.idle_gap, settings.silence_timeout) == (
        "station-1-handheld",
        0.2,
        600.0,
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"baudrate": 0}, "baudrate"),
        ({"parity": "sometimes"}, "parity"),
        ({"bytesize": 9}, "bytesize"),
        ({"stopbits": 3}, "stopbits"),
        ({"terminator": "NUL"}, "terminator"),
        ({"idle_gap": "fast"}, "idle_gap"),
        ({"silence_timeout": "-1s"}, "silence_timeout"),
        ({"encoding": "no-such-codec"}, "encoding"),
        ({"good_read_feedback": "0g"}, "good_read_feedback"),
        ({"multiline_symbologies": ["QR"]}, "multiline_symbologies"),
        ({"partial_timeout": 0.01, "idle_gap": 0.1}, "partial_timeout"),
        ({"length_digits": 7}, "length_digits"),
        ({"max_frame_length": MAX_FRAME_LENGTH_LIMIT + 1}, "max_frame_length"),
        ({"path": "ttyACM0"}, "path: invalid relative path 'ttyACM0'"),
        ({"exclusive": False}, "exclusive"),
        ({"kind": "hid"}, "kind"),
    ],
    ids=lambda value: str(value),
)
def test_settings_reject_invalid(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=message):
        make_settings(**overrides)


def test_settings_max_frame_length_at_limit() -> None:
    settings = make_settings(max_frame_length=MAX_FRAME_LENGTH_LIMIT)
    assert settings.max_frame_length == MAX_FRAME_LENGTH_LIMIT


# Spaces around and between numbers and units are accepted, as in the rest of the file.
@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        (0.25, 0.25),
        (2, 2.0),
        ("1.5s", 1.5),
        ("200ms", 0.2),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("1m 30s", 90.0),
        ("90 s", 90.0),
        (" 1h 30 m ", 5400.0),
    ],
)
def test_parse_duration_valid(text: float | str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "1.5x", "s", "5 5s", "5m s", "-1", -1.0, True])
def test_parse_duration_invalid(text: Any) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


def test_parse_duration_rejects_infinite_total() -> None:
    # Each digit is valid, but the number is larger than a float can hold.
    text = "1" + "0" * 400 + "s"

    with pytest.raises(ValueError, match="the total is too large; use a shorter duration"):
        parse_duration(text)


# --- The driver on pseudo-terminals --------------------------------------------------------


@pytest.fixture
def link(tmp_path: Path) -> Path:
    """Path of a by-id style symlink that tests point at a pseudo-terminal."""
    return tmp_path / "usb-Example_Scanner-if00"


def test_driver_reads_scan(pty_factory: PtyFactory, run_driver: RunDriver, link: Path) -> None:
    scanner = pty_factory()
    point_link(link, scanner.path)
    driver = SerialDriver(make_settings(str(link)))

    async def scenario() -> None:
        async with run_driver(driver) as recorder:
            await recorder.wait_health(available=True)
            before = datetime.now(UTC)
            scanner.write(b"SHOPPER-0001\r")
            [scan] = await recorder.wait_scans(1)

        assert scan.value == "SHOPPER-0001"
        assert scan.device == "test-scanner"
        assert scan.channel == "OPTICAL"
        assert before - timedelta(seconds=1) <= scan.captured_at <= datetime.now(UTC)

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("terminator", "wire"),
    [
        ("CR", b"A1\rB2\r"),
        ("LF", b"A1\nB2\n"),
        ("CRLF", b"A1\r\nB2\r\n"),
        ("TAB", b"A1\tB2\t"),
        ("ETX", b"A1\x03B2\x03"),
    ],
)
def test_driver_terminator_kinds(
    pty_factory: PtyFactory, run_driver: RunDriver, terminator: str, wire: bytes
) -> None:
    scanner = pty_factory()
    driver = SerialDriver(make_settings(scanner.path, terminator=terminator))

    async def scenario() -> None:
        async with run_driver(driver) as recorder:
            await recorder.wait_health(available=True)
            scanner.write(wire)
            scans = await recorder.wait_scans(2)

        assert [scan.value for scan in scans] == ["A1", "B2"]

    asyncio.run(scenario())


def test_driver_crlf_split_across_reads(pty_factory: PtyFactory, run_driver: RunDriver) -> None:
    scanner = pty_factory()
    driver = SerialDriver(make_settings(scanner.path, terminator="CRLF"))

    async def scenario() -> None:
        async with run_driver(driver) as recorder:
            await recorder.wait_health(available=True)
            for chunk in (b"ABC\r", b"\nDE", b"F\r", b"\n"):
                scanner.write(chunk)
                await asyncio.sleep(0.05)
            scans = await recorder.wait_scans(2)

        assert [scan.value for scan in scans] == ["ABC", "DEF"]

    asyncio.run(scenario())


def test_driver_crlf_counted_once(pty_factory: PtyFactory, run_driver: RunDriver) -> None:
    scanner = pty_factory()
    driver = SerialDriver(make_settings(scanner.path, terminator="CR"))

    async def scenario() -> None:
        async with run_driver(driver) as recorder:
            await recorder.wait_health(available=True)
            scanner.write(b"ABC\r")
            await asyncio.sleep(0.05)
            scanner.write(b"\nDEF\r\nEND\r")
            scans = await recorder.wait_scans(3)

        assert [scan.value for scan in scans] == ["ABC", "DEF", "END"]

    asyncio.run(scenario())


def test_driver_idle_gap_framing(pty_factory: PtyFactory, run_driver: RunDriver) -> None:
    scanner = pty_factory()
    driver = SerialDriver(make_settings(scanner.path, terminator="none", idle_gap=0.1))

    async def scenario() -> None:
        async with run_driver(driver) as recorder:
            await recorder.wait_health(available=True)
            scanner.write(b"]d2\x1d0104012345678901")
            [scan] = await recorder.wait_scans(1)

        assert scan.value == "]d2\x1d0104012345678901"

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("overrides", "wire"),
    [
        ({"aim_ids": True}, b"]Q1WIFI:T:WPA;\rS:store;\r"),
        ({"aim_ids": True, "length_digits": 4}, b"]Q10020WIFI:T:WPA;\rS:store;\r"),
    ],
    ids=["aim_idle_gap", "aim_length"],
)
def test_driver_qr_payload_with_cr(
    pty_factory: PtyFactory, run_driver: RunDriver, overrides: dict[str, Any], wire: bytes
) -> None:
    scanner = pty_factory()
    driver = SerialDriver(make_settings(scanner.path, **overrides))

    async def scenario() -> None:
        async with run_driver(driver) as recorder:
            await recorder.wait_health(available=True)
            scanner.write(wire)
            [scan] = await recorder.wait_scans(1)

        assert scan.value == "WIFI:T:WPA;\rS:store;"

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("overrides", "bad", "reason"),
    [
        ({"max_frame_length": 16}, b"SECRET-" + b"9" * 20 + b"\r", "too_long"),
        ({}, b"SECRET-\xff\xfe\r", "undecodable"),
        ({"prefix": "\u0002"}, b"SECRET-1\r", "malformed"),
    ],
    ids=["too_long", "undecodable", "malformed"],
)
def test_driver_drops_bad_frame(
    pty_factory: PtyFactory,
    run_driver: RunDriver,
    overrides: dict[str, Any],
    bad: bytes,
    reason: str,
) -> None:
    scanner = pty_factory()
    driver = SerialDriver(make_settings(scanner.path, **overrides))
    good = overrides.get("prefix", "").encode() + b"GOOD\r"

    async def scenario() -> None:
        async with run_driver(driver) as recorder:
            await recorder.wait_health(available=True)
            scanner.write(bad)
            scanner.write(good)
            await recorder.wait_scans(1)

        assert [scan.value for scan in recorder.scans] == ["GOOD"]
        assert driver.stats.dropped[reason] == 1
        assert recorder.dropped == [Dropped("test-scanner", reason)]

    with structlog.testing.capture_logs() as logs:
        asyncio.run(scenario())

    [dropped] = [entry for entry in logs if entry["event"] == "serial.frame_dropped"]
    assert dropped["reason"] == reason
    assert dropped["size"] == len(bad) - 1
    assert "SECRET" not in repr(logs)


def test_driver_too_long_line_logs_limit(pty_factory: PtyFactory, run_driver: RunDriver) -> None:
    scanner = pty_factory()
    driver = SerialDriver(make_settings(scanner.path))

    async def scenario() -> None:
        async with run_driver(driver) as recorder:
            await recorder.wait_health(available=True)
            scanner.write(b"9" * 10_000 + b"\rGOOD\r")
            await recorder.wait_scans(1)

        assert [scan.value for scan in recorder.scans] == ["GOOD"]
        assert recorder.dropped == [Dropped("test-scanner", "too_long")]

    with structlog.testing.capture_logs() as logs:
        asyncio.run(scenario())

    [dropped] = [entry for entry in logs if entry["event"] == "serial.frame_dropped"]
    assert dropped["reason"] == "too_long"
    assert dropped["max_frame_length"] == 2048
    # Only part of the line was buffered when it crossed the limit, so no size is logged.
    assert "size" not in dropped


def test_driver_two_qr_scans_in_one_write(pty_factory: PtyFactory, run_driver: RunDriver) -> None:
    scanner = pty_factory()
    settings = make_settings(scanner.path, aim_ids=True, prefix="\u0002", suffix="\u0003")
    driver = SerialDriver(settings)

    async def scenario() -> None:
        async with run_driver(driver) as recorder:
            await recorder.wait_health(available=True)
            scanner.write(b"\x02]Q1SHOPPER-0001\x03\r\x02]Q1SHOPPER-0003\x03\r")
            await recorder.wait_scans(2)

        assert [scan.value for scan in recorder.scans] == ["SHOPPER-0001", "SHOPPER-0003"]
        assert recorder.dropped == []

    asyncio.run(scenario())


def test_driver_strips_prefix_and_suffix(pty_factory: PtyFactory, run_driver: RunDriver) -> None:
    scanner = pty_factory()
    driver = SerialDriver(make_settings(scanner.path, prefix="\u0002", suffix="\u0003"))

    async def scenario() -> None:
        async with run_driver(driver) as recorder:
            await recorder.wait_health(available=True)
            scanner.write(b"\x02LOYALTY-42\x03\r")
            [scan] = await recorder.wait_scans(1)

        assert scan.value == "LOYALTY-42"

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("accepted", "expected"),
    [(True, b"\x07"), (False, b"\x1b\x42")],
    ids=["good_read", "bad_read"],
)
def test_driver_feedback_written(
    pty_factory: PtyFactory, run_driver: RunDriver, accepted: bool, expected: bytes
) -> None:
    scanner = pty_factory()
    settings = make_settings(scanner.path, good_read_feedback="07", bad_read_feedback="1b 42")
    driver = SerialDriver(settings)

    async def scenario() -> None:
        async with run_driver(driver) as recorder:
            await recorder.wait_health(available=True)
            await driver.feedback(accepted)
            received = await scanner.read_exactly(len(expected))

        assert received == expected

    asyncio.run(scenario())


def test_driver_feedback_while_closed(pty_factory: PtyFactory) -> None:
    scanner = pty_factory()
    driver = SerialDriver(make_settings(scanner.path, good_read_feedback="07"))

    async def scenario() -> bytes:
        await driver.feedback(True)
        return await scanner.read_exactly(1, timeout=0.2)

    assert asyncio.run(scenario()) == b""


def test_driver_opens_exclusively(pty_factory: PtyFactory, run_driver: RunDriver) -> None:
    scanner = pty_factory()
    driver = SerialDriver(make_settings(scanner.path))

    async def scenario() -> None:
        async with run_driver(driver) as recorder:
            await recorder.wait_health(available=True)
            with pytest.raises(serial.SerialException, match="exclusively lock"):
                serial.Serial(scanner.path, exclusive=True)

    asyncio.run(scenario())


def test_driver_missing_path_unavailable(
    pty_factory: PtyFactory, run_driver: RunDriver, link: Path
) -> None:
    driver = SerialDriver(make_settings(str(link)))

    async def scenario() -> None:
        async with run_driver(driver) as recorder:
            health = await recorder.wait_health(available=False)
            assert health.error is not None
            assert "No such file" in health.error

            scanner = pty_factory()
            point_link(link, scanner.path)
            await recorder.wait_health(available=True)
            scanner.write(b"LATE\r")
            [scan] = await recorder.wait_scans(1)

        assert scan.value == "LATE"

    asyncio.run(scenario())


def test_driver_missing_path_retried_often(
    pty_factory: PtyFactory, run_driver: RunDriver, link: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(serial_driver, "MISSING_PATH_RETRY", 0.1)
    driver = SerialDriver(make_settings(str(link), reconnect_delay=0.05, reconnect_delay_max=30))

    async def scenario() -> None:
        async with run_driver(driver) as recorder:
            # With the backoff alone, 0.05 s doubling, the first 9 opens would take 12.75 s.
            await recorder.until(lambda: driver.stats.failed_opens >= 9, timeout=4.0)

            scanner = pty_factory()
            point_link(link, scanner.path)
            await recorder.wait_health(available=True, timeout=1.0)

    asyncio.run(scenario())


def test_driver_open_error_keeps_backoff(
    run_driver: RunDriver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(serial_driver, "MISSING_PATH_RETRY", 0.05)
    regular_file = tmp_path / "not-a-tty"
    regular_file.write_bytes(b"")
    settings = make_settings(str(regular_file), reconnect_delay=0.2, reconnect_delay_max=30)
    driver = SerialDriver(settings)

    async def scenario() -> None:
        async with run_driver(driver) as recorder:
            await recorder.wait_health(available=False)
            await asyncio.sleep(1.0)

    asyncio.run(scenario())
    # The backoff opens at 0, 0.2, 0.6 and 1.4 s. The short retry, which applies only to a
    # missing path, would open about 20 times.
    assert driver.stats.failed_opens <= 4


@pytest.mark.parametrize(
    ("attempt", "seconds"), [(0, 1.0), (3, 8.0), (5, 32.0), (6, 60.0), (1024, 60.0), (10**6, 60.0)]
)
def test_backoff_delay_capped(attempt: int, seconds: float) -> None:
    assert backoff_delay(attempt, 1.0, 60.0) == seconds


def test_driver_backoff_past_1024_attempts(run_driver: RunDriver, tmp_path: Path) -> None:
    regular_file = tmp_path / "not-a-tty"
    regular_file.write_bytes(b"")
    settings = make_settings(str(regular_file), reconnect_delay=0.001, reconnect_delay_max=0.001)
    driver = SerialDriver(settings)

    async def scenario() -> None:
        async with run_driver(driver) as recorder:
            # 2**1024 seconds is more than a float holds: the delay must stay at its cap.
            await recorder.until(lambda: driver.stats.failed_opens > 1100, timeout=20.0)

    asyncio.run(scenario())


@pytest.mark.parametrize("through_link", [False, True], ids=["file", "link"])
def test_driver_path_not_a_tty(
    run_driver: RunDriver, link: Path, tmp_path: Path, through_link: bool
) -> None:
    regular_file = tmp_path / "scanner.log"
    regular_file.write_bytes(b"")
    if through_link:
        point_link(link, str(regular_file))
    path = str(link) if through_link else str(regular_file)
    driver = SerialDriver(make_settings(path))

    async def scenario() -> str | None:
        async with run_driver(driver) as recorder:
            health = await recorder.wait_health(available=False)
        return health.error

    with structlog.testing.capture_logs() as logs:
        error = asyncio.run(scenario())

    assert error is not None
    assert error.startswith(f"{path} ")
    assert "is not a serial device" in error
    if through_link:
        assert f"(resolved to {regular_file})" in error
    [unavailable] = [entry for entry in logs if entry["event"] == "device.unavailable"]
    assert unavailable["error"] == error
    assert unavailable["path"] == path


def test_driver_unplug_and_replug(
    pty_factory: PtyFactory, run_driver: RunDriver, link: Path
) -> None:
    first = pty_factory()
    point_link(link, first.path)
    driver = SerialDriver(make_settings(str(link)))

    async def scenario() -> None:
        async with run_driver(driver) as recorder:
            await recorder.wait_health(available=True)
            first.write(b"BEFORE\r")
            await recorder.wait_scans(1)

            first.unplug()
            lost = await recorder.wait_health(available=False)
            assert lost.error is not None
            assert "disconnected" in lost.error or "read failed" in lost.error
            await recorder.until(lambda: driver.stats.failed_opens >= 3)

            second = pty_factory()
            point_link(link, second.path)
            await recorder.wait_health(available=True, count=2)
            second.write(b"AFTER\r")
            await recorder.wait_scans(2)

        assert [scan.value for scan in recorder.scans] == ["BEFORE", "AFTER"]

    with structlog.testing.capture_logs() as logs:
        asyncio.run(scenario())

    events = [entry["event"] for entry in logs if entry["log_level"] != "debug"]
    assert events.count("device.unavailable") == 1
    assert events.count("device.available") == 2


@pytest.mark.parametrize(
    ("terminator", "writes", "expected"),
    [
        ("CR", [b"SECRET-12"], [("incomplete", 9)]),
        # The frame grew past max_frame_length and was counted as too_long. The decoder
        # still contains its last CR, which may start the CRLF that ends it, so the unplug
        # finds buffered bytes that it must not count again as incomplete.
        ("CRLF", [b"SECRET-" + b"9" * 3000 + b"\r"], [("too_long", None)]),
        (
            "CR",
            [b"SECRET-" + b"9" * 3000, b"\rSECRET-1"],
            [("too_long", None), ("incomplete", 8)],
        ),
    ],
    ids=["partial", "discarding_too_long", "too_long_then_partial"],
)
def test_driver_unplug_counts_partial_frame(
    pty_factory: PtyFactory,
    run_driver: RunDriver,
    link: Path,
    terminator: str,
    writes: list[bytes],
    expected: list[tuple[str, int | None]],
) -> None:
    scanner = pty_factory()
    point_link(link, scanner.path)
    # A partial_timeout longer than the test, so only the unplug can drop the frame.
    driver = SerialDriver(make_settings(str(link), terminator=terminator, partial_timeout=60))
    reasons = [reason for reason, _ in expected]

    async def scenario() -> None:
        async with run_driver(driver) as recorder:
            await recorder.wait_health(available=True)
            # The driver reads each write before the next one and before the unplug hangs up
            # the line, so a too_long frame crosses the limit before its terminator arrives.
            for data in writes:
                await write_and_wait_read(scanner, data)
            scanner.unplug()
            lost = await recorder.wait_health(available=False)
            # The reopens that fail must not count the frame again.
            await recorder.until(lambda: driver.stats.failed_opens >= 2)

        assert recorder.scans == []
        assert recorder.dropped == [Dropped("test-scanner", reason) for reason in reasons]
        assert driver.stats.dropped == Counter(reasons)
        last_drop = max(i for i, event in enumerate(recorder.events) if isinstance(event, Dropped))
        assert last_drop < recorder.events.index(lost)

    with structlog.testing.capture_logs() as logs:
        asyncio.run(scenario())

    drops = [entry for entry in logs if entry["event"] == "serial.frame_dropped"]
    assert [(entry["reason"], entry.get("size")) for entry in drops] == expected
    assert "SECRET" not in repr(logs)
    events = [entry["event"] for entry in logs if entry["log_level"] != "debug"]
    last_drop_line = len(events) - 1 - events[::-1].index("serial.frame_dropped")
    assert last_drop_line < events.index("device.unavailable")


def test_driver_cancel_counts_partial_frame(pty_factory: PtyFactory, run_driver: RunDriver) -> None:
    scanner = pty_factory()
    # A partial_timeout longer than the test, so only the cancel can drop the frame.
    driver = SerialDriver(make_settings(scanner.path, partial_timeout=60))

    async def scenario() -> None:
        async with run_driver(driver) as recorder:
            await recorder.wait_health(available=True)
            # The driver reads the bytes before the block ends and cancels it.
            await write_and_wait_read(scanner, b"SECRET-12")

        assert recorder.scans == []
        assert recorder.dropped == [Dropped("test-scanner", "incomplete")]
        assert driver.stats.dropped == Counter({"incomplete": 1})

    with structlog.testing.capture_logs() as logs:
        asyncio.run(scenario())

    drops = [entry for entry in logs if entry["event"] == "serial.frame_dropped"]
    assert [(entry["reason"], entry["size"]) for entry in drops] == [("incomplete", 9)]
    assert drops[0]["log_level"] == "warning"
    assert "SECRET" not in repr(logs)


def test_driver_cancel_drops_undelivered_frames(pty_factory: PtyFactory) -> None:
    scanner = pty_factory()
    driver = SerialDriver(make_settings(scanner.path, partial_timeout=60))
    events: list[Event] = []

    async def slow_sink(event: Event) -> None:
        # Holds the driver inside the delivery of the first scan, as a slow database write would.
        events.append(event)
        if isinstance(event, Scan):
            await asyncio.Event().wait()

    async def scenario() -> None:
        task = asyncio.create_task(driver.run(slow_sink))
        async with asyncio.timeout(WAIT):
            while not any(isinstance(event, Health) for event in events):
                await asyncio.sleep(0.01)
            # The driver reads this write at once. It has the frame that the driver delivers,
            # two complete frames around an undecodable one, and a partial frame.
            await write_and_wait_read(scanner, b"FIRST\rSECRET-1\r\xff\rSECRET-2\rPART")
            while not any(isinstance(event, Scan) for event in events):
                await asyncio.sleep(0.01)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    with structlog.testing.capture_logs() as logs:
        asyncio.run(scenario())

    assert [event.value for event in events if isinstance(event, Scan)] == ["FIRST"]
    assert [event for event in events if isinstance(event, Dropped)] == [
        Dropped("test-scanner", "stopped"),
        Dropped("test-scanner", "undecodable"),
        Dropped("test-scanner", "stopped"),
        Dropped("test-scanner", "incomplete"),
    ]
    assert driver.stats.scans == 1
    assert driver.stats.dropped == Counter({"stopped": 2, "undecodable": 1, "incomplete": 1})

    lines = {entry["reason"]: entry for entry in logs if entry["event"] == "serial.frame_dropped"}
    assert sorted(lines) == ["incomplete", "stopped", "undecodable"]
    # One line for both stopped frames, with their count and no content.
    assert lines["stopped"] == {
        "event": "serial.frame_dropped",
        "log_level": "warning",
        "device": "test-scanner",
        "reason": "stopped",
        "count": 2,
        "dropped_total": 2,
    }
    assert (lines["undecodable"]["size"], lines["incomplete"]["size"]) == (1, 4)
    assert "SECRET" not in repr(logs)


def test_driver_health_events_on_unplug(
    pty_factory: PtyFactory, run_driver: RunDriver, link: Path
) -> None:
    scanner = pty_factory()
    point_link(link, scanner.path)
    driver = SerialDriver(make_settings(str(link)))

    async def scenario() -> None:
        async with run_driver(driver) as recorder:
            await recorder.wait_health(available=True)
            scanner.unplug()
            await recorder.wait_health(available=False)
            await recorder.until(lambda: driver.stats.failed_opens >= 3)

        availability = [event.available for event in recorder.health]
        # The lost link and the first failed reopen carry different errors, so
        # the sink gets two unavailable events. Further failures repeat the
        # last error and send nothing.
        assert availability[:2] == [True, False]
        assert len(availability) <= 3

    asyncio.run(scenario())


def test_driver_silence_reopens_stale_link(
    pty_factory: PtyFactory, run_driver: RunDriver, link: Path
) -> None:
    stale = pty_factory()
    point_link(link, stale.path)
    driver = SerialDriver(make_settings(str(link), silence_timeout=0.3))

    async def scenario() -> None:
        async with run_driver(driver) as recorder:
            await recorder.wait_health(available=True)

            # The device came back as another tty, but the old one never
            # reported an error: only the silence check can notice.
            fresh = pty_factory()
            point_link(link, fresh.path)
            await recorder.until(lambda: driver.stats.silence_reopens >= 1)
            await recorder.until(lambda: driver.stats.opens >= 2)
            fresh.write(b"FRESH\r")
            [scan] = await recorder.wait_scans(1)

        assert scan.value == "FRESH"
        assert [event.available for event in recorder.health] == [True]

    asyncio.run(scenario())


def test_driver_silence_check_off_by_default(
    pty_factory: PtyFactory, run_driver: RunDriver
) -> None:
    scanner = pty_factory()
    driver = SerialDriver(make_settings(scanner.path))

    async def scenario() -> None:
        async with run_driver(driver) as recorder:
            await recorder.wait_health(available=True)
            await asyncio.sleep(0.5)

        assert driver.stats.opens == 1

    asyncio.run(scenario())


def test_driver_cancel_closes_port(pty_factory: PtyFactory, run_driver: RunDriver) -> None:
    scanner = pty_factory()
    driver = SerialDriver(make_settings(scanner.path))

    async def scenario() -> None:
        async with run_driver(driver) as recorder:
            await recorder.wait_health(available=True)

    asyncio.run(scenario())
    # The exclusive lock is gone once the driver has stopped.
    serial.Serial(scanner.path, exclusive=True).close()
