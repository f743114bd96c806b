"""HID keyboard-wedge scanners, read as Linux input devices with python-evdev.

The driver grabs the scanner's input device exclusively, so its keystrokes
reach no console or desktop, and decodes the key events with the layout the
scanner types in. A scan ends on Enter, keypad Enter or Tab.
"""

from __future__ import annotations

import asyncio
import functools
import os
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Literal, Protocol

import evdev
import msgspec
import structlog
from evdev import ecodes

from drivers.base import (
    DeviceSettings,
    Dropped,
    Duration,
    EventSink,
    HealthReporter,
    LogThrottle,
    Scan,
    deliver_in_order,
    name_matches,
    parse_duration,
    parse_positive_duration_setting,
    wait_readable,
)
from drivers.keymaps import LAYOUTS, DeadKey, Layout

log = structlog.get_logger(__name__)

# Seconds between two warnings about rejected scans of the same reason.
REJECT_LOG_INTERVAL = 60.0

KEY_PRESS = 1
KEY_AUTOREPEAT = 2

SHIFT_KEYS = frozenset({ecodes.KEY_LEFTSHIFT, ecodes.KEY_RIGHTSHIFT})
CTRL_KEYS = frozenset({ecodes.KEY_LEFTCTRL, ecodes.KEY_RIGHTCTRL})
MODIFIER_KEYS = SHIFT_KEYS | CTRL_KEYS | {ecodes.KEY_LEFTALT, ecodes.KEY_RIGHTALT}
END_KEYS = frozenset({ecodes.KEY_ENTER, ecodes.KEY_KPENTER, ecodes.KEY_TAB})
# Lock keys a scanner may press to set the host's state; they type nothing.
IGNORED_KEYS = frozenset({ecodes.KEY_NUMLOCK, ecodes.KEY_SCROLLLOCK})


class HidSettings(DeviceSettings, tag="hid"):
    """One ``[[devices]]`` table with ``kind = "hid"``.

    ``match`` is a glob on the input device name (as ``evdev`` and
    ``/proc/bus/input/devices`` show it), or an absolute path such as
    ``/dev/input/by-id/usb-Example_Scanner-event-kbd``.
    """

    match: Annotated[str, msgspec.Meta(min_length=1)]
    layout: Literal["us", "de"] = "us"
    poll_interval: Duration = 2.0
    partial_timeout: Duration = 1.0
    max_scan_length: Annotated[int, msgspec.Meta(gt=0)] = 2048

    def __post_init__(self) -> None:
        self.poll_interval = parse_positive_duration_setting(
            "poll_interval",
            self.poll_interval,
            "the driver would list the input devices without pause while none matches",
        )
        self.partial_timeout = parse_positive_duration_setting(
            "partial_timeout",
            self.partial_timeout,
            "a scan would be dropped as incomplete between two of its keystrokes",
        )


@dataclass(frozen=True, slots=True)
class TypedScan:
    """The text of one scan, without its Enter or Tab."""

    text: str


@dataclass(frozen=True, slots=True)
class RejectedScan:
    """A scan thrown away; ``reason`` is unmapped_key, too_long or incomplete."""

    reason: str
    length: int  # characters decoded before the scan was rejected


KeyResult = TypedScan | RejectedScan


class KeyDecoder:
    """Turn ``(type, code, value)`` input events into scans, using one layout.

    Both Shift keys, Caps Lock, the keypad and, on layouts that have it,
    AltGr (Right Alt, or Ctrl with Left Alt as Windows treats it) are
    decoded. A key the layout does not map, or any key pressed with Ctrl or
    Alt, spoils the scan: it is rejected at its end key rather than passed on
    with a character missing. Autorepeat events are ignored, because a
    scanner presses and releases every key.
    """

    def __init__(self, layout: Layout, max_length: int = 2048) -> None:
        self._layout = layout
        self._max_length = max_length
        self._held: set[int] = set()
        self._caps_lock = False
        self._dead: DeadKey | None = None
        self._text: list[str] = []
        self._spoiled: str | None = None

    @property
    def pending(self) -> bool:
        """Whether part of a scan has been typed but not ended yet."""
        return bool(self._text) or self._dead is not None or self._spoiled is not None

    def reset(self) -> None:
        """Forget modifiers, Caps Lock and any partial scan, as after a replug."""
        self._held.clear()
        self._caps_lock = False
        self._clear_scan()

    def flush(self) -> RejectedScan | None:
        """Drop a partial scan whose end key never came, keeping held modifiers and Caps Lock."""
        if not self.pending:
            return None
        length = self._typed_length()
        if self._dead is not None:
            # An end key would type the pending dead key in its spacing form, so it counts too.
            length += len(self._dead.spacing)
        rejected = RejectedScan("incomplete", length)
        self._clear_scan()
        return rejected

    def feed(self, event_type: int, code: int, value: int) -> KeyResult | None:
        """Take one input event; return a result when it ends a scan."""
        if event_type != ecodes.EV_KEY:
            return None

        if code in MODIFIER_KEYS:
            if value == KEY_PRESS:
                self._held.add(code)
            elif value != KEY_AUTOREPEAT:
                self._held.discard(code)
            return None

        if value != KEY_PRESS:
            return None
        if code == ecodes.KEY_CAPSLOCK:
            self._caps_lock = not self._caps_lock
            return None
        if code in IGNORED_KEYS:
            return None
        if code in END_KEYS:
            return self._end_scan()

        symbol = self._lookup(code)
        if symbol is None:
            self._spoiled = self._spoiled or "unmapped_key"
            return None
        self._type(symbol)
        return None

    def _lookup(self, code: int) -> str | DeadKey | None:
        shift = bool(self._held & SHIFT_KEYS)
        ctrl = bool(self._held & CTRL_KEYS)
        left_alt = ecodes.KEY_LEFTALT in self._held
        right_alt = ecodes.KEY_RIGHTALT in self._held

        altgr = False
        if self._layout.has_altgr and (right_alt or (ctrl and left_alt)):
            altgr = True
        elif ctrl or left_alt or right_alt:
            return None

        if code in self._layout.keypad:
            return None if altgr else self._layout.keypad[code]

        levels = self._layout.keys.get(code)
        if levels is None:
            return None
        if altgr:
            return levels.altgr or None
        if self._caps_lock and levels.follows_caps_lock:
            shift = not shift
        return levels.shift if shift else levels.plain

    def _type(self, symbol: str | DeadKey) -> None:
        if isinstance(symbol, DeadKey):
            if self._dead is not None:
                self._append(self._dead.spacing)
            self._dead = symbol
            return

        if self._dead is not None:
            symbol = _compose(self._dead, symbol)
            self._dead = None
        self._append(symbol)

    def _append(self, text: str) -> None:
        self._text.append(text)
        if self._typed_length() > self._max_length:
            self._spoiled = "too_long"

    def _typed_length(self) -> int:
        # A part has more than one character where a dead key did not compose with the next key.
        return sum(len(part) for part in self._text)

    def _end_scan(self) -> KeyResult | None:
        if self._dead is not None:
            self._append(self._dead.spacing)
        text = "".join(self._text)
        spoiled = self._spoiled
        self._clear_scan()

        if spoiled is not None:
            return RejectedScan(spoiled, len(text))
        if not text:
            return None
        return TypedScan(text)

    def _clear_scan(self) -> None:
        self._text.clear()
        self._dead = None
        self._spoiled = None


def _compose(dead: DeadKey, text: str) -> str:
    if text == " ":
        return dead.spacing
    composed = unicodedata.normalize("NFC", text + dead.combining)
    if len(composed) == 1:
        return composed
    return dead.spacing + text


class InputEvent(Protocol):
    """The fields of ``evdev.InputEvent`` that the driver reads."""

    type: int
    code: int
    value: int


class InputDevice(Protocol):
    """The part of ``evdev.InputDevice`` that the driver uses."""

    path: str
    name: str

    def fileno(self) -> int: ...

    def read(self) -> Iterable[InputEvent]: ...

    def grab(self) -> None: ...

    def ungrab(self) -> None: ...

    def close(self) -> None: ...


class InputBackend(Protocol):
    """Lists and opens input devices; tests replace it to play a device."""

    def list_devices(self) -> list[str]: ...

    def open(self, path: str) -> InputDevice: ...


class EvdevBackend:
    """The real input devices under ``/dev/input``."""

    def list_devices(self) -> list[str]:
        return evdev.list_devices()

    def open(self, path: str) -> InputDevice:
        return evdev.InputDevice(path)


class DeviceNotFoundError(Exception):
    """No input device matches the configured name pattern or path."""


class HidDriver:
    """Read scans from one keyboard-wedge scanner and find it again after a replug.

    Until a device matches, the driver polls the input devices every
    ``poll_interval``. The first match in path order is grabbed, so use a
    pattern that matches one scanner, or a ``/dev/input/by-id`` path. Reads
    run on the event loop with evdev's non-blocking descriptor; listing,
    opening, grabbing and closing run in worker threads.
    """

    def __init__(self, settings: HidSettings, *, backend: InputBackend | None = None) -> None:
        self.name = settings.name
        self.settings = settings
        self._backend = backend or EvdevBackend()
        self._decoder = KeyDecoder(LAYOUTS[settings.layout], settings.max_scan_length)
        self._poll_interval = parse_duration(settings.poll_interval)
        self._partial_timeout = parse_duration(settings.partial_timeout)
        self._reject_log = LogThrottle(REJECT_LOG_INTERVAL)

    async def run(self, sink: EventSink) -> None:
        """Find, grab and read the scanner until cancelled; the grab is released on exit."""
        health = HealthReporter(self.name, sink)

        while True:
            try:
                device = await asyncio.to_thread(self._find_and_grab)
            except (DeviceNotFoundError, OSError) as error:
                await health.unavailable(str(error), match=self.settings.match)
                await asyncio.sleep(self._poll_interval)
                continue

            await health.available(path=device.path, input_name=device.name)
            try:
                error = await self._read_until_lost(device, sink)
            finally:
                await asyncio.to_thread(self._release, device)

            await health.unavailable(error, match=self.settings.match)
            await asyncio.sleep(self._poll_interval)

    async def feedback(self, accepted: bool) -> None:
        """Do nothing: a keyboard wedge has no channel back to the scanner."""

    def _find_and_grab(self) -> InputDevice:
        device = self._find()
        try:
            device.grab()
        except OSError as error:
            device.close()
            raise OSError(
                error.errno, f"cannot grab {device.path} ({device.name!r}): {error.strerror}"
            ) from error
        return device

    def _find(self) -> InputDevice:
        pattern = self.settings.match
        if os.path.isabs(pattern):
            return self._backend.open(pattern)

        unreadable: list[str] = []
        for path in sorted(self._backend.list_devices()):
            try:
                device = self._backend.open(path)
            except OSError as error:
                log.debug("hid.open_failed", device=self.name, path=path, error=str(error))
                unreadable.append(f"{path}: {error.strerror or error}")
                continue
            if name_matches(device.name, pattern):
                return device
            device.close()

        message = f"no input device name matches {pattern!r}"
        if unreadable:
            # The scanner may be among the devices this user cannot open.
            message += f"; cannot open {', '.join(unreadable)}"
        raise DeviceNotFoundError(message)

    def _release(self, device: InputDevice) -> None:
        try:
            device.ungrab()
        except OSError as error:
            # An unplugged device cannot be ungrabbed; closing releases it anyway.
            log.debug("hid.ungrab_failed", device=self.name, error=str(error))
        device.close()

    async def _read_until_lost(self, device: InputDevice, sink: EventSink) -> str:
        self._decoder.reset()
        try:
            return await self._read_scans(device, sink)
        except asyncio.CancelledError:
            # The driver stops (the daemon stops, or a reload removes or changes the device's
            # table), so a scan still in the decoder can never end. It is counted as
            # incomplete, like a scan that an unplug cuts off.
            await self._drop_pending(sink)
            raise

    async def _read_scans(self, device: InputDevice, sink: EventSink) -> str:
        """Read and decode key events until a read fails, and return the error for the health."""
        fd = device.fileno()

        while True:
            timeout = self._partial_timeout if self._decoder.pending else None
            if not await wait_readable(fd, timeout):
                await self._drop_pending(sink)
                continue

            try:
                events = list(device.read())
            except BlockingIOError:
                continue
            except OSError as error:
                await self._drop_pending(sink)
                return f"read failed: {error}"

            # Decode the whole batch before delivering, so a cancel during a delivery still
            # finds the keys of a following partial scan in the decoder.
            results = [self._decoder.feed(event.type, event.code, event.value) for event in events]
            await self._deliver_batch(results, sink)

    async def _deliver_batch(self, results: list[KeyResult | None], sink: EventSink) -> None:
        """Deliver the results of one read in order, dropping the rest if the driver stops."""
        await deliver_in_order(
            results,
            functools.partial(self._deliver, sink=sink),
            functools.partial(self._drop_undelivered, sink=sink),
        )

    async def _drop_undelivered(self, results: list[KeyResult | None], sink: EventSink) -> None:
        """Count the scans of a batch that a stop cut off before their delivery.

        Each complete scan is dropped as ``stopped``, with one warning line for all of them
        that gives their count and no text. A rejected scan keeps its own reason.
        """
        stopped = sum(isinstance(result, TypedScan) for result in results)
        if stopped:
            log.warning("hid.scan_rejected", device=self.name, reason="stopped", count=stopped)

        for result in results:
            if isinstance(result, TypedScan):
                await sink(Dropped(self.name, "stopped"))
            else:
                await self._deliver(result, sink)

    async def _drop_pending(self, sink: EventSink) -> None:
        """Count and log the partial scan in the decoder as ``incomplete``, if there is one.

        The read loop calls this when partial_timeout passes, when the driver is cancelled,
        and before it returns for a lost device, so ``run`` reports the device unavailable
        after the drop. Held modifiers and Caps Lock alone are no partial scan.
        """
        await self._deliver(self._decoder.flush(), sink)

    async def _deliver(self, result: KeyResult | None, sink: EventSink) -> None:
        if result is None:
            return
        if isinstance(result, RejectedScan):
            fields = {"device": self.name, "reason": result.reason, "length": result.length}
            if self._reject_log.allow(result.reason, asyncio.get_running_loop().time()):
                log.warning("hid.scan_rejected", **fields)
            else:
                log.debug("hid.scan_rejected", **fields)
            await sink(Dropped(self.name, result.reason))
            return
        await sink(Scan(self.name, "OPTICAL", result.text, datetime.now(UTC)))
