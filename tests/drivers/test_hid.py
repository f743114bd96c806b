"""HID keyboard-wedge driver: layouts fed recorded key events, and the driver on a fake device.

There is no /dev/uinput on the test machine, so the device side is played by
``FakeInputDevice``: a pipe that carries kernel ``struct input_event`` records,
read the way evdev reads an event node.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import re
import string
import struct
import termios
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import pytest
import structlog
from evdev import ecodes

from drivers.base import Dropped, Event, Health, Scan
from drivers.hid import (
    HidDriver,
    HidSettings,
    KeyDecoder,
    KeyResult,
    RejectedScan,
    TypedScan,
)
from drivers.keymaps import DE, LAYOUTS, US, DeadKey, Layout

if TYPE_CHECKING:
    from conftest import Recorder

    RunDriver = Callable[[HidDriver], contextlib.AbstractAsyncContextManager[Recorder]]

# struct input_event on 64-bit Linux: struct timeval, __u16 type, __u16 code, __s32 value.
INPUT_EVENT = struct.Struct("llHHi")
INPUT_EVENT_CODES = Path("/usr/include/linux/input-event-codes.h")

# One scanner keystroke: (key name, modifier key names held while it is pressed).
Stroke = tuple[str, tuple[str, ...]]


def key_events(strokes: list[Stroke]) -> list[tuple[int, int, int]]:
    """Encode keystrokes as a scanner sends them: modifiers down, key down and up, modifiers up.

    Each key press is preceded by an MSC_SCAN event and followed by a
    SYN_REPORT, as real USB keyboards report them.
    """
    events: list[tuple[int, int, int]] = []

    def press(name: str, value: int) -> None:
        events.append((ecodes.EV_MSC, ecodes.MSC_SCAN, 0x70000 + ecodes.ecodes[name]))
        events.append((ecodes.EV_KEY, ecodes.ecodes[name], value))
        events.append((ecodes.EV_SYN, ecodes.SYN_REPORT, 0))

    for key, modifiers in strokes:
        for modifier in modifiers:
            press(modifier, 1)
        press(key, 1)
        press(key, 0)
        for modifier in reversed(modifiers):
            press(modifier, 0)
    return events


def decode_all(layout: Layout, events: list[tuple[int, int, int]], **options: Any) -> list[Any]:
    decoder = KeyDecoder(layout, **options)
    results: list[KeyResult] = []
    for event in events:
        result = decoder.feed(*event)
        if result is not None:
            results.append(result)
    return results


def typed(layout: Layout, strokes: list[Stroke]) -> list[Any]:
    return decode_all(layout, key_events([*strokes, ("KEY_ENTER", ())]))


SHIFT = ("KEY_LEFTSHIFT",)
RIGHT_SHIFT = ("KEY_RIGHTSHIFT",)
ALTGR = ("KEY_RIGHTALT",)

# --- US layout: every printable ASCII character, from a table written apart from the driver's.

US_KEYS: dict[str, tuple[str, str]] = {
    "KEY_GRAVE": ("`", "~"),
    "KEY_1": ("1", "!"),
    "KEY_2": ("2", "@"),
    "KEY_3": ("3", "#"),
    "KEY_4": ("4", "$"),
    "KEY_5": ("5", "%"),
    "KEY_6": ("6", "^"),
    "KEY_7": ("7", "&"),
    "KEY_8": ("8", "*"),
    "KEY_9": ("9", "("),
    "KEY_0": ("0", ")"),
    "KEY_MINUS": ("-", "_"),
    "KEY_EQUAL": ("=", "+"),
    "KEY_LEFTBRACE": ("[", "{"),
    "KEY_RIGHTBRACE": ("]", "}"),
    "KEY_BACKSLASH": ("\\", "|"),
    "KEY_SEMICOLON": (";", ":"),
    "KEY_APOSTROPHE": ("'", '"'),
    "KEY_COMMA": (",", "<"),
    "KEY_DOT": (".", ">"),
    "KEY_SLASH": ("/", "?"),
    "KEY_SPACE": (" ", " "),
    **{f"KEY_{letter.upper()}": (letter, letter.upper()) for letter in string.ascii_lowercase},
}


def us_strokes(char: str) -> list[Stroke]:
    for key, (plain, shifted) in US_KEYS.items():
        if char == plain:
            return [(key, ())]
        if char == shifted:
            return [(key, SHIFT)]
    raise AssertionError(f"no US key types {char!r}")


PRINTABLE_ASCII = [chr(code) for code in range(0x20, 0x7F)]


def test_us_table_covers_printable_ascii() -> None:
    covered = {char for pair in US_KEYS.values() for char in pair}
    assert covered == set(PRINTABLE_ASCII)


@pytest.mark.parametrize("char", PRINTABLE_ASCII, ids=lambda char: f"U+{ord(char):04X}")
def test_us_round_trip(char: str) -> None:
    assert typed(US, us_strokes(char)) == [TypedScan(char)]


def test_us_round_trip_all_at_once() -> None:
    text = "".join(PRINTABLE_ASCII)
    strokes = [stroke for char in text for stroke in us_strokes(char)]
    assert typed(US, strokes) == [TypedScan(text)]


# --- German layout -----------------------------------------------------------------------

DE_SPECIAL: dict[str, list[Stroke]] = {
    "!": [("KEY_1", SHIFT)],
    '"': [("KEY_2", SHIFT)],
    "#": [("KEY_BACKSLASH", ())],
    "$": [("KEY_4", SHIFT)],
    "%": [("KEY_5", SHIFT)],
    "&": [("KEY_6", SHIFT)],
    "'": [("KEY_BACKSLASH", SHIFT)],
    "(": [("KEY_8", SHIFT)],
    ")": [("KEY_9", SHIFT)],
    "*": [("KEY_RIGHTBRACE", SHIFT)],
    "+": [("KEY_RIGHTBRACE", ())],
    ",": [("KEY_COMMA", ())],
    "-": [("KEY_SLASH", ())],
    ".": [("KEY_DOT", ())],
    "/": [("KEY_7", SHIFT)],
    ":": [("KEY_DOT", SHIFT)],
    ";": [("KEY_COMMA", SHIFT)],
    "<": [("KEY_102ND", ())],
    "=": [("KEY_0", SHIFT)],
    ">": [("KEY_102ND", SHIFT)],
    "?": [("KEY_MINUS", SHIFT)],
    "@": [("KEY_Q", ALTGR)],
    "[": [("KEY_8", ALTGR)],
    "\\": [("KEY_MINUS", ALTGR)],
    "]": [("KEY_9", ALTGR)],
    "^": [("KEY_GRAVE", ()), ("KEY_SPACE", ())],
    "_": [("KEY_SLASH", SHIFT)],
    "`": [("KEY_EQUAL", SHIFT), ("KEY_SPACE", ())],
    "{": [("KEY_7", ALTGR)],
    "|": [("KEY_102ND", ALTGR)],
    "}": [("KEY_0", ALTGR)],
    "~": [("KEY_RIGHTBRACE", ALTGR)],
    " ": [("KEY_SPACE", ())],
}


def de_strokes(char: str) -> list[Stroke]:
    if char in DE_SPECIAL:
        return DE_SPECIAL[char]
    if char.isdigit():
        return [(f"KEY_{char}", ())]
    swapped = {"y": "z", "z": "y"}.get(char.lower(), char.lower())
    key = f"KEY_{swapped.upper()}"
    return [(key, SHIFT if char.isupper() else ())]


@pytest.mark.parametrize("char", PRINTABLE_ASCII, ids=lambda char: f"U+{ord(char):04X}")
def test_de_round_trip(char: str) -> None:
    assert typed(DE, de_strokes(char)) == [TypedScan(char)]


@pytest.mark.parametrize(
    ("strokes", "expected"),
    [
        ([("KEY_Y", ())], "z"),
        ([("KEY_Z", ())], "y"),
        ([("KEY_Y", SHIFT)], "Z"),
        ([("KEY_Z", RIGHT_SHIFT)], "Y"),
        ([("KEY_Q", ALTGR)], "@"),
        ([("KEY_Q", ("KEY_LEFTCTRL", "KEY_LEFTALT"))], "@"),
        ([("KEY_E", ALTGR)], "€"),
        ([("KEY_M", ALTGR)], "µ"),
        ([("KEY_APOSTROPHE", ())], "ä"),
        ([("KEY_SEMICOLON", ())], "ö"),
        ([("KEY_LEFTBRACE", ())], "ü"),
        ([("KEY_APOSTROPHE", SHIFT)], "Ä"),
        ([("KEY_SEMICOLON", SHIFT)], "Ö"),
        ([("KEY_LEFTBRACE", SHIFT)], "Ü"),
        ([("KEY_MINUS", ())], "ß"),
        ([("KEY_3", SHIFT)], "§"),
        ([("KEY_GRAVE", SHIFT)], "°"),
        ([("KEY_2", ALTGR)], "²"),
        ([("KEY_EQUAL", ()), ("KEY_E", ())], "é"),
        ([("KEY_EQUAL", SHIFT), ("KEY_A", ())], "à"),
        ([("KEY_GRAVE", ()), ("KEY_O", ())], "ô"),
        ([("KEY_GRAVE", ()), ("KEY_X", ())], "^x"),
        ([("KEY_EQUAL", ()), ("KEY_SPACE", ())], "´"),
        ([("KEY_GRAVE", ()), ("KEY_GRAVE", ()), ("KEY_SPACE", ())], "^^"),
        ([("KEY_KPDOT", ())], ","),
    ],
    ids=lambda value: repr(value) if isinstance(value, str) else None,
)
def test_de_table(strokes: list[Stroke], expected: str) -> None:
    assert typed(DE, strokes) == [TypedScan(expected)]


def test_de_dead_key_before_enter() -> None:
    assert typed(DE, [("KEY_1", ()), ("KEY_GRAVE", ())]) == [TypedScan("1^")]


# --- Keys and modifiers, both layouts ----------------------------------------------------


@pytest.mark.parametrize(
    ("layout", "strokes", "expected"),
    [
        (US, [("KEY_A", RIGHT_SHIFT), ("KEY_1", RIGHT_SHIFT)], "A!"),
        (US, [("KEY_CAPSLOCK", ()), ("KEY_A", ()), ("KEY_1", ())], "A1"),
        (US, [("KEY_CAPSLOCK", ()), ("KEY_A", SHIFT), ("KEY_SLASH", SHIFT)], "a?"),
        (US, [("KEY_CAPSLOCK", ()), ("KEY_CAPSLOCK", ()), ("KEY_A", ())], "a"),
        (DE, [("KEY_CAPSLOCK", ()), ("KEY_APOSTROPHE", ()), ("KEY_MINUS", ())], "Äß"),
        (US, [(f"KEY_KP{digit}", ()) for digit in "1234567890"], "1234567890"),
        (
            US,
            [(f"KEY_{key}", ()) for key in ("KPDOT", "KPPLUS", "KPMINUS", "KPASTERISK", "KPSLASH")],
            ".+-*/",
        ),
        (US, [("KEY_KP5", SHIFT)], "5"),
        (US, [("KEY_NUMLOCK", ()), ("KEY_KP5", ())], "5"),
        (DE, [("KEY_KP4", ()), ("KEY_KPDOT", ()), ("KEY_KP2", ())], "4,2"),
    ],
    ids=[
        "right_shift",
        "caps_lock_letters_only",
        "caps_lock_with_shift",
        "caps_lock_toggles_off",
        "caps_lock_umlaut_not_sharp_s",
        "keypad_digits",
        "keypad_operators",
        "keypad_ignores_shift",
        "num_lock_ignored",
        "keypad_decimal_comma_de",
    ],
)
def test_decoder_keys(layout: Layout, strokes: list[Stroke], expected: str) -> None:
    assert typed(layout, strokes) == [TypedScan(expected)]


@pytest.mark.parametrize("end_key", ["KEY_ENTER", "KEY_KPENTER", "KEY_TAB"])
def test_decoder_end_keys(end_key: str) -> None:
    events = key_events([("KEY_4", ()), ("KEY_2", ()), (end_key, ()), ("KEY_7", ())])
    assert decode_all(US, events) == [TypedScan("42")]


def test_decoder_two_scans() -> None:
    events = key_events([("KEY_A", ()), ("KEY_ENTER", ()), ("KEY_B", ()), ("KEY_TAB", ())])
    assert decode_all(US, events) == [TypedScan("a"), TypedScan("b")]


def test_decoder_empty_scan_ignored() -> None:
    assert decode_all(US, key_events([("KEY_ENTER", ()), ("KEY_TAB", ())])) == []


@pytest.mark.parametrize(
    ("layout", "strokes", "reason"),
    [
        (US, [("KEY_A", ()), ("KEY_F1", ())], "unmapped_key"),
        (US, [("KEY_A", ALTGR)], "unmapped_key"),
        (DE, [("KEY_A", ALTGR)], "unmapped_key"),
        # GS (0x1D) as Ctrl+], the way some scanners type GS1 separators.
        (US, [("KEY_0", ()), ("KEY_RIGHTBRACE", ("KEY_LEFTCTRL",)), ("KEY_1", ())], "unmapped_key"),
        (US, [("KEY_A", ("KEY_LEFTALT",))], "unmapped_key"),
        (US, [("KEY_KP0", ("KEY_LEFTALT",))], "unmapped_key"),
    ],
    ids=["function_key", "right_alt_us", "altgr_nothing_de", "ctrl_gs", "alt_letter", "alt_keypad"],
)
def test_decoder_rejects_spoiled_scan(layout: Layout, strokes: list[Stroke], reason: str) -> None:
    [result] = typed(layout, strokes)
    assert isinstance(result, RejectedScan)
    assert result.reason == reason


def test_decoder_recovers_after_rejected_scan() -> None:
    strokes = [("KEY_F1", ()), ("KEY_ENTER", ()), ("KEY_O", ()), ("KEY_K", ())]
    results = typed(US, strokes)
    assert results[1:] == [TypedScan("ok")]


def test_decoder_too_long() -> None:
    events = key_events([("KEY_1", ())] * 5 + [("KEY_ENTER", ())])
    assert decode_all(US, events, max_length=4) == [RejectedScan("too_long", 5)]


def test_decoder_autorepeat_ignored() -> None:
    events = [
        (ecodes.EV_KEY, ecodes.KEY_A, 1),
        (ecodes.EV_KEY, ecodes.KEY_A, 2),
        (ecodes.EV_KEY, ecodes.KEY_A, 2),
        (ecodes.EV_KEY, ecodes.KEY_A, 0),
        (ecodes.EV_KEY, ecodes.KEY_ENTER, 1),
    ]
    assert decode_all(US, events) == [TypedScan("a")]


def test_decoder_shift_released() -> None:
    strokes: list[Stroke] = [("KEY_A", SHIFT), ("KEY_A", ())]
    assert typed(US, strokes) == [TypedScan("Aa")]


def test_decoder_flush_partial() -> None:
    decoder = KeyDecoder(US)
    for event in key_events([("KEY_A", ()), ("KEY_B", ())]):
        decoder.feed(*event)
    assert decoder.flush() == RejectedScan("incomplete", 2)


@pytest.mark.parametrize(
    ("strokes", "length"),
    [
        ([("KEY_1", ()), ("KEY_GRAVE", ())], 2),
        ([("KEY_GRAVE", ()), ("KEY_X", ())], 2),
        ([("KEY_EQUAL", ()), ("KEY_E", ())], 1),
    ],
    ids=["pending_dead_key", "dead_key_not_composed", "composed"],
)
def test_decoder_flush_length_de(strokes: list[Stroke], length: int) -> None:
    # The length counts characters, as at an end key, not the decoder's internal parts.
    decoder = KeyDecoder(DE)
    for event in key_events(strokes):
        decoder.feed(*event)
    assert decoder.flush() == RejectedScan("incomplete", length)


def test_decoder_not_pending_after_flush() -> None:
    decoder = KeyDecoder(US)
    for event in key_events([("KEY_A", ())]):
        decoder.feed(*event)
    decoder.flush()
    assert not decoder.pending


def header_codes() -> dict[str, int]:
    text = INPUT_EVENT_CODES.read_text()
    return {
        name: int(value, 0)
        for name, value in re.findall(r"#define\s+(KEY_\w+)\s+(0x[0-9a-fA-F]+|\d+)", text)
    }


@pytest.mark.skipif(not INPUT_EVENT_CODES.exists(), reason="linux-libc-dev is not installed")
@pytest.mark.parametrize("layout", list(LAYOUTS.values()), ids=lambda layout: layout.name)
def test_layout_codes_match_kernel_header(layout: Layout) -> None:
    kernel = header_codes()
    used = {*layout.keys, *layout.keypad}
    names = {code: ecodes.KEY[code] for code in used}
    mismatched = {
        name: code
        for code, name in names.items()
        if kernel.get(name if isinstance(name, str) else name[0]) != code
    }
    assert mismatched == {}


@pytest.mark.parametrize("layout", list(LAYOUTS.values()), ids=lambda layout: layout.name)
def test_layout_dead_keys_have_combining_marks(layout: Layout) -> None:
    dead = [
        symbol
        for levels in layout.keys.values()
        for symbol in (levels.plain, levels.shift, levels.altgr)
        if isinstance(symbol, DeadKey)
    ]
    assert all(len(key.combining) == 1 for key in dead)


# --- Settings ------------------------------------------------------------------------------


def make_settings(**overrides: Any) -> HidSettings:
    table = {
        "name": "test-wedge",
        "kind": "hid",
        "station": "station-2",
        "match": "Example Scanner*",
        "poll_interval": 0.05,
        "partial_timeout": 0.3,
    }
    table.update(overrides)
    return msgspec.convert(table, HidSettings)


def test_settings_decode_durations() -> None:
    settings = make_settings(poll_interval="1.5s", partial_timeout="200ms", layout="de")
    assert (settings.poll_interval, settings.partial_timeout, settings.layout) == (1.5, 0.2, "de")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"layout": "fr"}, "layout"),
        ({"match": ""}, "match"),
        ({"poll_interval": "0s"}, "poll_interval"),
        ({"partial_timeout": "soon"}, "partial_timeout"),
        ({"grab": False}, "grab"),
    ],
    ids=lambda value: str(value),
)
def test_settings_reject_invalid(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=message):
        make_settings(**overrides)


# --- The driver on a fake input device ----------------------------------------------------


class FakeEvent:
    def __init__(self, event_type: int, code: int, value: int) -> None:
        self.type = event_type
        self.code = code
        self.value = value


class FakeInputDevice:
    """An input device node: the test writes ``struct input_event`` records into a pipe."""

    def __init__(self, path: str, name: str) -> None:
        self.path = path
        self.name = name
        self._reader, self._writer = os.pipe()
        os.set_blocking(self._reader, False)
        self.grabbed = False
        self.open_handles = 0
        self.grab_error: OSError | None = None
        self.unplugged = False

    # Methods the driver calls.

    def fileno(self) -> int:
        return self._reader

    def read(self) -> Iterator[FakeEvent]:
        data = os.read(self._reader, INPUT_EVENT.size * 64)
        if not data:
            raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))
        for _sec, _usec, event_type, code, value in INPUT_EVENT.iter_unpack(data):
            yield FakeEvent(event_type, code, value)

    def grab(self) -> None:
        if self.grab_error is not None:
            raise self.grab_error
        self.grabbed = True

    def ungrab(self) -> None:
        if self.unplugged:
            raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))
        self.grabbed = False

    def close(self) -> None:
        self.open_handles -= 1

    # Methods the test calls to play the scanner.

    def type(self, strokes: list[Stroke]) -> None:
        self.send(key_events(strokes))

    def send(self, events: list[tuple[int, int, int]]) -> None:
        records = b"".join(INPUT_EVENT.pack(0, 0, *event) for event in events)
        os.write(self._writer, records)

    def unread_bytes(self) -> int:
        """Return how many bytes of written events the driver has not read yet."""
        count = fcntl.ioctl(self._reader, termios.FIONREAD, b"\0\0\0\0")
        return int.from_bytes(count, "little")

    def unplug(self) -> None:
        self.unplugged = True
        os.close(self._writer)

    def release(self) -> None:
        os.close(self._reader)
        if not self.unplugged:
            os.close(self._writer)


class FakeBackend:
    """Input devices by path, as ``/dev/input`` lists them."""

    def __init__(self) -> None:
        self.devices: dict[str, FakeInputDevice] = {}
        self.retired: list[FakeInputDevice] = []

    def add(self, path: str, name: str) -> FakeInputDevice:
        device = FakeInputDevice(path, name)
        self.devices[path] = device
        return device

    def remove(self, path: str) -> None:
        device = self.devices.pop(path)
        device.unplug()
        self.retired.append(device)

    def list_devices(self) -> list[str]:
        return list(self.devices)

    def open(self, path: str) -> FakeInputDevice:
        if path not in self.devices:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        device = self.devices[path]
        device.open_handles += 1
        return device


@pytest.fixture
def backend() -> Iterator[FakeBackend]:
    fake = FakeBackend()
    yield fake
    for device in [*fake.devices.values(), *fake.retired]:
        device.release()


SCAN_STROKES: list[Stroke] = [
    ("KEY_S", SHIFT),
    ("KEY_MINUS", ()),
    ("KEY_4", ()),
    ("KEY_2", ()),
    ("KEY_ENTER", ()),
]


def test_driver_reads_scan(backend: FakeBackend, run_driver: RunDriver) -> None:
    keyboard = backend.add("/dev/input/event0", "AT Translated Set 2 keyboard")
    scanner = backend.add("/dev/input/event3", "Example Scanner Keyboard")
    driver = HidDriver(make_settings(), backend=backend)

    async def scenario() -> None:
        async with run_driver(driver) as recorder:
            await recorder.wait_health(available=True)
            scanner.type(SCAN_STROKES)
            [scan] = await recorder.wait_scans(1)

            assert scanner.grabbed
            assert not keyboard.grabbed
            assert keyboard.open_handles == 0

        assert (scan.device, scan.channel, scan.value) == ("test-wedge", "OPTICAL", "S-42")

    asyncio.run(scenario())


def test_driver_releases_grab_on_exit(backend: FakeBackend, run_driver: RunDriver) -> None:
    scanner = backend.add("/dev/input/event3", "Example Scanner Keyboard")
    driver = HidDriver(make_settings(), backend=backend)

    async def scenario() -> None:
        async with run_driver(driver) as recorder:
            await recorder.wait_health(available=True)

    asyncio.run(scenario())
    assert not scanner.grabbed
    assert scanner.open_handles == 0


def test_driver_explicit_path(backend: FakeBackend, run_driver: RunDriver) -> None:
    scanner = backend.add("/dev/input/by-id/usb-Example-event-kbd", "Unnamed")
    driver = HidDriver(make_settings(match=scanner.path), backend=backend)

    async def scenario() -> None:
        async with run_driver(driver) as recorder:
            await recorder.wait_health(available=True)
            scanner.type(SCAN_STROKES)
            [scan] = await recorder.wait_scans(1)

        assert scan.value == "S-42"

    asyncio.run(scenario())


def test_driver_matches_full_name_with_brackets(
    backend: FakeBackend, run_driver: RunDriver
) -> None:
    # A name copied in full is matched as written, although a glob reads "[...]" as a set.
    name = "Example Scanner [Keyboard Wedge] 01"
    scanner = backend.add("/dev/input/event3", name)
    driver = HidDriver(make_settings(match=name), backend=backend)

    async def scenario() -> None:
        async with run_driver(driver) as recorder:
            await recorder.wait_health(available=True)

        assert scanner.open_handles == 0

    asyncio.run(scenario())


def test_driver_german_layout(backend: FakeBackend, run_driver: RunDriver) -> None:
    scanner = backend.add("/dev/input/event3", "Example Scanner Keyboard")
    driver = HidDriver(make_settings(layout="de"), backend=backend)

    async def scenario() -> None:
        async with run_driver(driver) as recorder:
            await recorder.wait_health(available=True)
            scanner.type([("KEY_Y", ()), ("KEY_Q", ALTGR), ("KEY_Z", ()), ("KEY_KPENTER", ())])
            [scan] = await recorder.wait_scans(1)

        assert scan.value == "z@y"

    asyncio.run(scenario())


def test_driver_waits_for_device(backend: FakeBackend, run_driver: RunDriver) -> None:
    driver = HidDriver(make_settings(), backend=backend)

    async def scenario() -> None:
        async with run_driver(driver) as recorder:
            missing = await recorder.wait_health(available=False)
            assert missing.error == "no input device name matches 'Example Scanner*'"

            scanner = backend.add("/dev/input/event5", "Example Scanner Keyboard")
            await recorder.wait_health(available=True)
            scanner.type(SCAN_STROKES)
            await recorder.wait_scans(1)

    asyncio.run(scenario())


def test_driver_reports_unreadable_devices(backend: FakeBackend, run_driver: RunDriver) -> None:
    driver = HidDriver(make_settings(), backend=backend)
    backend.list_devices = lambda: ["/dev/input/event9"]  # type: ignore[method-assign]

    async def scenario() -> None:
        async with run_driver(driver) as recorder:
            missing = await recorder.wait_health(available=False)

        assert missing.error == (
            "no input device name matches 'Example Scanner*'; "
            "cannot open /dev/input/event9: No such file or directory"
        )

    asyncio.run(scenario())


def test_driver_grab_busy(backend: FakeBackend, run_driver: RunDriver) -> None:
    scanner = backend.add("/dev/input/event3", "Example Scanner Keyboard")
    scanner.grab_error = OSError(errno.EBUSY, os.strerror(errno.EBUSY))
    driver = HidDriver(make_settings(), backend=backend)

    async def scenario() -> None:
        async with run_driver(driver) as recorder:
            busy = await recorder.wait_health(available=False)
            assert busy.error is not None
            assert "cannot grab /dev/input/event3" in busy.error

            scanner.grab_error = None
            await recorder.wait_health(available=True)

    asyncio.run(scenario())


def test_driver_unplug_and_replug(backend: FakeBackend, run_driver: RunDriver) -> None:
    first = backend.add("/dev/input/event3", "Example Scanner Keyboard")
    driver = HidDriver(make_settings(), backend=backend)

    async def scenario() -> None:
        async with run_driver(driver) as recorder:
            await recorder.wait_health(available=True)
            first.type(SCAN_STROKES)
            await recorder.wait_scans(1)

            backend.remove(first.path)
            lost = await recorder.wait_health(available=False)
            assert lost.error is not None
            assert "No such device" in lost.error
            await recorder.wait_for(lambda recorder: len(recorder.health) >= 3)

            second = backend.add("/dev/input/event7", "Example Scanner Keyboard")
            await recorder.wait_health(available=True, count=2)
            second.type([("KEY_O", ()), ("KEY_K", ()), ("KEY_TAB", ())])
            await recorder.wait_scans(2)

        assert [scan.value for scan in recorder.scans] == ["S-42", "ok"]

    with structlog.testing.capture_logs() as logs:
        asyncio.run(scenario())

    events = [entry["event"] for entry in logs if entry["log_level"] != "debug"]
    assert events.count("device.unavailable") == 1


def test_driver_drops_partial_scan(backend: FakeBackend, run_driver: RunDriver) -> None:
    scanner = backend.add("/dev/input/event3", "Example Scanner Keyboard")
    driver = HidDriver(make_settings(partial_timeout=0.2), backend=backend)

    async def scenario() -> None:
        async with run_driver(driver) as recorder:
            await recorder.wait_health(available=True)
            scanner.type([("KEY_X", ()), ("KEY_X", ())])
            await asyncio.sleep(0.6)
            scanner.type(SCAN_STROKES)
            [scan] = await recorder.wait_scans(1)

        assert scan.value == "S-42"
        assert recorder.dropped == [Dropped("test-wedge", "incomplete")]

    with structlog.testing.capture_logs() as logs:
        asyncio.run(scenario())

    [rejected] = [entry for entry in logs if entry["event"] == "hid.scan_rejected"]
    assert rejected["reason"] == "incomplete"


SECRET_STROKES: list[Stroke] = [stroke for char in "SECRET-12" for stroke in us_strokes(char)]


def rejected_lines(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == "hid.scan_rejected"]


def test_driver_unplug_counts_partial_scan(backend: FakeBackend, run_driver: RunDriver) -> None:
    scanner = backend.add("/dev/input/event3", "Example Scanner Keyboard")
    # A partial_timeout longer than the test, so only the unplug can drop the scan.
    driver = HidDriver(make_settings(partial_timeout=60), backend=backend)

    async def scenario() -> None:
        async with run_driver(driver) as recorder:
            await recorder.wait_health(available=True)
            # The driver reads the keys still in the pipe before its read fails with ENODEV.
            scanner.type(SECRET_STROKES)
            backend.remove(scanner.path)
            lost = await recorder.wait_health(available=False)

        assert recorder.scans == []
        assert recorder.dropped == [Dropped("test-wedge", "incomplete")]
        assert recorder.events.index(recorder.dropped[0]) < recorder.events.index(lost)

    with structlog.testing.capture_logs() as logs:
        asyncio.run(scenario())

    [rejected] = rejected_lines(logs)
    assert (rejected["reason"], rejected["length"]) == ("incomplete", 9)
    assert rejected["log_level"] == "warning"
    assert "SECRET" not in repr(logs)


def test_driver_cancel_counts_partial_scan(backend: FakeBackend, run_driver: RunDriver) -> None:
    scanner = backend.add("/dev/input/event3", "Example Scanner Keyboard")
    # A partial_timeout longer than the test, so only the cancel can drop the scan.
    driver = HidDriver(make_settings(partial_timeout=60), backend=backend)

    async def scenario() -> None:
        async with run_driver(driver) as recorder:
            await recorder.wait_health(available=True)
            scanner.type(SECRET_STROKES)
            # The driver decodes the events in the same step as its last read of the pipe.
            await recorder.until(lambda: scanner.unread_bytes() == 0)

        assert recorder.scans == []
        assert recorder.dropped == [Dropped("test-wedge", "incomplete")]

    with structlog.testing.capture_logs() as logs:
        asyncio.run(scenario())

    [rejected] = rejected_lines(logs)
    assert (rejected["reason"], rejected["length"]) == ("incomplete", 9)
    assert rejected["log_level"] == "warning"
    assert "SECRET" not in repr(logs)


def test_driver_cancel_during_scan_delivery(backend: FakeBackend) -> None:
    scanner = backend.add("/dev/input/event3", "Example Scanner Keyboard")
    driver = HidDriver(make_settings(partial_timeout=60), backend=backend)
    events: list[Event] = []

    async def slow_sink(event: Event) -> None:
        # Holds the driver inside the delivery of a scan, as a slow database write would.
        events.append(event)
        if isinstance(event, Scan):
            await asyncio.Event().wait()

    async def poll(condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(10):
            while not condition():
                await asyncio.sleep(0.01)

    async def scenario() -> None:
        task = asyncio.create_task(driver.run(slow_sink))
        await poll(lambda: any(isinstance(event, Health) for event in events))
        # One write, so the driver reads the scan and the partial scan after it in one batch.
        scanner.type([*SCAN_STROKES, ("KEY_A", ()), ("KEY_B", ())])
        await poll(lambda: any(isinstance(event, Scan) for event in events))
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(scenario())

    assert [event.value for event in events if isinstance(event, Scan)] == ["S-42"]
    assert [event for event in events if isinstance(event, Dropped)] == [
        Dropped("test-wedge", "incomplete")
    ]


def test_driver_cancel_drops_undelivered_scans(backend: FakeBackend) -> None:
    scanner = backend.add("/dev/input/event3", "Example Scanner Keyboard")
    driver = HidDriver(make_settings(partial_timeout=60), backend=backend)
    events: list[Event] = []

    async def slow_sink(event: Event) -> None:
        # Holds the driver inside the delivery of the first scan, as a slow database write would.
        events.append(event)
        if isinstance(event, Scan):
            await asyncio.Event().wait()

    async def scenario() -> None:
        task = asyncio.create_task(driver.run(slow_sink))
        async with asyncio.timeout(10):
            while not any(isinstance(event, Health) for event in events):
                await asyncio.sleep(0.01)
            # One write of 60 events, so the driver reads them in one batch (a read returns at
            # most 64). The batch has the scan that the driver delivers, two complete scans
            # around one that Ctrl rejects, and a partial scan.
            scanner.type(
                [
                    ("KEY_7", ()),
                    ("KEY_ENTER", ()),
                    ("KEY_9", ()),
                    ("KEY_TAB", ()),
                    ("KEY_A", ("KEY_LEFTCTRL",)),
                    ("KEY_ENTER", ()),
                    ("KEY_5", ()),
                    ("KEY_TAB", ()),
                    ("KEY_B", ()),
                ]
            )
            while not any(isinstance(event, Scan) for event in events):
                await asyncio.sleep(0.01)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    with structlog.testing.capture_logs() as logs:
        asyncio.run(scenario())

    assert [event.value for event in events if isinstance(event, Scan)] == ["7"]
    assert [event for event in events if isinstance(event, Dropped)] == [
        Dropped("test-wedge", "stopped"),
        Dropped("test-wedge", "unmapped_key"),
        Dropped("test-wedge", "stopped"),
        Dropped("test-wedge", "incomplete"),
    ]
    lines = {entry["reason"]: entry for entry in rejected_lines(logs)}
    assert sorted(lines) == ["incomplete", "stopped", "unmapped_key"]
    # One line for both stopped scans, with their count and no text.
    assert lines["stopped"] == {
        "event": "hid.scan_rejected",
        "log_level": "warning",
        "device": "test-wedge",
        "reason": "stopped",
        "count": 2,
    }
    assert (lines["unmapped_key"]["length"], lines["incomplete"]["length"]) == (0, 1)


@pytest.mark.parametrize("end", ["unplug", "cancel"])
def test_driver_modifiers_only_not_dropped(
    backend: FakeBackend, run_driver: RunDriver, end: str
) -> None:
    scanner = backend.add("/dev/input/event3", "Example Scanner Keyboard")
    driver = HidDriver(make_settings(partial_timeout=60), backend=backend)

    async def scenario() -> None:
        async with run_driver(driver) as recorder:
            await recorder.wait_health(available=True)
            # Caps Lock on and Shift held: decoder state, but no character of a scan.
            scanner.type([("KEY_CAPSLOCK", ())])
            scanner.send([(ecodes.EV_KEY, ecodes.KEY_LEFTSHIFT, 1)])
            if end == "unplug":
                backend.remove(scanner.path)
                await recorder.wait_health(available=False)
            else:
                await recorder.until(lambda: scanner.unread_bytes() == 0)

        assert recorder.dropped == []

    with structlog.testing.capture_logs() as logs:
        asyncio.run(scenario())

    assert rejected_lines(logs) == []


def test_driver_feedback_is_noop(backend: FakeBackend) -> None:
    driver = HidDriver(make_settings(), backend=backend)
    assert asyncio.run(driver.feedback(True)) is None


def test_driver_evdev_backend_without_devices(run_driver: RunDriver) -> None:
    driver = HidDriver(make_settings(match="No Such Scanner For Tests*"))

    async def scenario() -> None:
        async with run_driver(driver) as recorder:
            missing = await recorder.wait_health(available=False)

        assert missing.error == "no input device name matches 'No Such Scanner For Tests*'"

    asyncio.run(scenario())
