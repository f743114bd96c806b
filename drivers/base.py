"""The shape every scanner driver shares.

A driver reads one configured device, frames scans and reports health
changes. It decides nothing: the daemon resolves each scan and may hand a
verdict back through ``feedback`` for devices that can beep or blink.
"""

from __future__ import annotations

import asyncio
import fnmatch
import math
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Literal, Protocol, TypeVar

import msgspec
import structlog

log = structlog.get_logger(__name__)

Channel = Literal["OPTICAL", "RADIO", "CONTACT"]


@dataclass(frozen=True, slots=True)
class Scan:
    """One framed read from a device; ``value`` is secret and must never be logged."""

    device: str
    channel: Channel
    value: str
    captured_at: datetime


@dataclass(frozen=True, slots=True)
class Health:
    """An availability change of a device, with the last error when unavailable."""

    device: str
    available: bool
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Dropped:
    """A read that a driver threw away without a scan, such as a malformed frame.

    The driver logs the drop itself; the daemon counts it per device and ``reason``.
    """

    device: str
    reason: str


Event = Scan | Health | Dropped
EventSink = Callable[[Event], Awaitable[None]]


class Driver(Protocol):
    """A running device driver; ``run`` returns only when cancelled."""

    name: str

    async def run(self, sink: EventSink) -> None:
        """Read the device until cancelled, sending scans, drops and health changes to ``sink``."""
        ...

    async def feedback(self, accepted: bool) -> None:
        """Signal a good or bad read on the device, where it supports it."""
        ...


# Doublings past this many always reach any cap: 2**64 times a millisecond is far longer
# than any setting. Without the limit, base * 2**attempt raises OverflowError once attempt
# passes 1023, which a scanner left unplugged for hours reaches.
MAX_BACKOFF_DOUBLINGS = 64


def name_matches(name: str, pattern: str) -> bool:
    """Tell whether a device or reader name matches a configured glob (case-sensitive).

    A pattern equal to the name matches it as written. A name with brackets, such as
    ``Example Reader [Contactless] 00 00``, would otherwise match nothing when copied in
    full, because a glob reads "[...]" as a set of characters.
    """
    return name == pattern or fnmatch.fnmatchcase(name, pattern)


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Return base * 2**attempt seconds, capped at ``cap``, for any attempt number."""
    return min(cap, base * 2.0 ** min(attempt, MAX_BACKOFF_DOUBLINGS))


async def sleep_backoff(attempt: int, base: float, cap: float) -> None:
    """Sleep ``backoff_delay`` seconds between reconnect attempts."""
    await asyncio.sleep(backoff_delay(attempt, base, cap))


# Durations in settings: seconds as a number, or a string of number-unit pairs
# such as "1.5s", "200ms", "5m", "1h30m" or "7d".
Duration = float | str

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# One or more number-unit pairs, with optional spaces around and between numbers and units:
# "90s", "1h30m", "1m 30s" and "90 s". ASCII digits and whitespace only.
_DURATION_TEXT = re.compile(r"\s*(?:\d+(?:\.\d+)?\s*(?:ms|s|m|h|d)\s*)+", re.ASCII)
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)", re.ASCII)


def parse_duration_text(text: str, accepted_forms: str) -> float:
    """Convert a string of number-unit pairs, such as "1h30m", to seconds.

    [[devices]] tables and the other tables of the configuration both read duration strings
    with this function. Raises ValueError for text of another form, with ``accepted_forms``
    after the value as the fix, and for pairs whose total is too large for a float.
    """
    if _DURATION_TEXT.fullmatch(text) is None:
        raise ValueError(f"invalid duration {text!r}: {accepted_forms}")
    parts = _DURATION_PART.findall(text)
    seconds = sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)
    if not math.isfinite(seconds):
        raise ValueError(
            f"invalid duration {text!r}: the total is too large; use a shorter duration,"
            ' such as "7d"'
        )
    return seconds


def parse_duration(value: float | str) -> float:
    """Convert a duration setting to seconds; raise ValueError on a negative or malformed one."""
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}: expected seconds or a string like '200ms'")

    if isinstance(value, str):
        return parse_duration_text(
            value, "expected seconds or a string like '1.5s', '200ms', '5m' or '1h30m'"
        )

    seconds = float(value)
    if not math.isfinite(seconds):
        # TOML writes inf and nan as numbers.
        raise ValueError(f"invalid duration {value!r}: use a finite number of seconds")
    if seconds < 0:
        raise ValueError(
            f"invalid duration {value!r}: remove the minus sign, because a duration cannot be"
            " negative"
        )
    return seconds


def parse_duration_setting(key: str, value: float | str) -> float:
    """Convert the duration setting ``key`` to seconds, raising a ValueError that starts with it."""
    try:
        return parse_duration(value)
    except ValueError as error:
        raise ValueError(f"{key}: {error}") from None


def parse_positive_duration_setting(key: str, value: float | str, reason: str) -> float:
    """Convert the duration setting ``key`` to seconds, rejecting 0 with ``reason`` as the cause."""
    seconds = parse_duration_setting(key, value)
    if seconds == 0:
        raise ValueError(f"{key}: invalid duration {value!r}: use more than 0, because {reason}")
    return seconds


class DeviceSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, tag_field="kind"):
    """Keys of every ``[[devices]]`` table.

    Each driver subclasses this with ``tag`` set to its ``kind``, so the daemon
    can decode a list of tables into a union of the driver settings types.
    """

    name: Annotated[str, msgspec.Meta(min_length=1)]
    station: Annotated[str, msgspec.Meta(min_length=1)]


async def wait_readable(fd: int, timeout: float | None) -> bool:
    """Wait on the event loop until ``fd`` is readable; return False when ``timeout`` passes.

    A hung-up descriptor counts as readable, so the caller's next read raises the error.
    """
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def mark_ready() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, mark_ready)
    try:
        await asyncio.wait_for(ready, timeout)
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)
    return True


class HealthReporter:
    """Send a device's health changes to the sink and log them once per change.

    The sink gets a ``Health`` event whenever availability or the error text
    changes. The log gets one ``device.unavailable`` warning when the device goes
    away and one ``device.available`` line when it returns. Repeated failures in
    between are logged at debug level only.
    """

    def __init__(self, device: str, sink: EventSink) -> None:
        self._device = device
        self._sink = sink
        self._last: Health | None = None
        self._failures = 0

    async def available(self, **fields: object) -> None:
        """Record that the device is open and readable."""
        if self._last is not None and self._last.available:
            return

        log.info("device.available", device=self._device, failed_attempts=self._failures, **fields)
        self._failures = 0
        self._last = Health(self._device, available=True)
        await self._sink(self._last)

    async def unavailable(self, error: str, **fields: object) -> None:
        """Record a failed open or a lost device, with the error that caused it."""
        self._failures += 1
        was_available = self._last is None or self._last.available
        if was_available:
            log.warning("device.unavailable", device=self._device, error=error, **fields)
        else:
            log.debug(
                "device.still_unavailable",
                device=self._device,
                error=error,
                failed_attempts=self._failures,
                **fields,
            )

        if self._last is not None and not self._last.available and self._last.error == error:
            return
        self._last = Health(self._device, available=False, error=error)
        await self._sink(self._last)


class LogThrottle:
    """Allow one log line per key per interval, so a noisy device cannot flood the journal."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._next_allowed: dict[str, float] = {}

    def allow(self, key: str, now: float) -> bool:
        """Return True when a line for ``key`` may be logged at ``now`` (monotonic seconds)."""
        if now < self._next_allowed.get(key, float("-inf")):
            return False
        self._next_allowed[key] = now + self._interval
        return True


_Result = TypeVar("_Result")


async def deliver_in_order(
    results: list[_Result],
    deliver: Callable[[_Result], Awaitable[None]],
    drop_undelivered: Callable[[list[_Result]], Awaitable[None]],
) -> None:
    """Deliver the results of one read in order; when the driver stops, drop the rest.

    A cancel during one delivery passes the results after it to ``drop_undelivered``, so
    that the driver counts them, and then ends the driver as the cancel asked.
    """
    for index, result in enumerate(results):
        try:
            await deliver(result)
        except asyncio.CancelledError:
            await drop_undelivered(results[index + 1 :])
            raise
