"""The shape every scanner driver shares.

A driver reads one configured device, frames scans and reports health
changes. It decides nothing: the daemon resolves each scan and may hand a
verdict back through ``feedback`` for devices that can beep or blink.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol

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


Event = Scan | Health
EventSink = Callable[[Event], Awaitable[None]]


class Driver(Protocol):
    """A running device driver; ``run`` returns only when cancelled."""

    name: str

    async def run(self, sink: EventSink) -> None:
        """Read the device until cancelled, sending scans and health changes to ``sink``."""
        ...

    async def feedback(self, accepted: bool) -> None:
        """Signal a good or bad read on the device, where it supports it."""
        ...


async def sleep_backoff(attempt: int, base: float, cap: float) -> None:
    """Sleep base * 2**attempt seconds, capped, between reconnect attempts."""
    await asyncio.sleep(min(cap, base * (2**attempt)))
