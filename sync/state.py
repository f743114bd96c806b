"""HQ connection state machine and the capped exponential backoff its loops share."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from enum import StrEnum

import structlog

from sync.errors import HqError

log = structlog.get_logger(__name__)


class HqState(StrEnum):
    """How HQ behaves, as the last calls saw it."""

    ONLINE = "online"
    """The last call succeeded."""
    DEGRADED = "degraded"
    """HQ answers, but with errors or invalid bodies, or fewer than ``offline_after`` calls in
    a row found it unreachable."""
    OFFLINE = "offline"
    """``offline_after`` calls in a row got no HTTP answer at all."""


class Backoff:
    """Capped exponential delays with jitter: ``initial * 2**n``, at most ``maximum``.

    Each delay is drawn from the upper half of that value, so several boxes that lost HQ
    together do not retry in step.
    """

    def __init__(self, initial: float, maximum: float, rng: random.Random | None = None) -> None:
        self.initial = initial
        self.maximum = maximum
        self.failures = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        ceiling = min(self.maximum, self.initial * (2 ** min(self.failures, 32)))
        self.failures += 1
        return self._rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.failures = 0


StateListener = Callable[[HqState, HqState], None]


class HqHealth:
    """Tracks the HQ state from call outcomes and logs each change that matters once.

    Going OFFLINE logs ``hq.unavailable``, HQ answering with errors logs ``hq.degraded``,
    and the next success after either logs ``hq.available``. A single unreachable call
    below ``offline_after`` changes the state to DEGRADED at debug level only, so a short
    blip logs nothing.
    """

    def __init__(self, offline_after: int, on_change: StateListener | None = None) -> None:
        self.offline_after = max(1, offline_after)
        # The daemon starts as if HQ were away, so the first success logs hq.available
        # and online lookups wait until one call has shown HQ reachable.
        self.state = HqState.OFFLINE
        self.since = time.time()
        self.unreachable_in_row = 0
        self.last_error: str | None = None
        self.last_success_at: float | None = None
        self._on_change = on_change
        self._announced: HqState | None = None

    @property
    def reachable(self) -> bool:
        return self.state is not HqState.OFFLINE

    def succeeded(self) -> None:
        first_success = self.last_success_at is None
        self.unreachable_in_row = 0
        self.last_error = None
        self.last_success_at = time.time()
        if self._announced is not None or first_success:
            downtime = round(time.time() - self.since, 1)
            # The state before the first success is only the assumption made at start.
            previous = "none" if first_success else self.state.value
            log.info("hq.available", previous_state=previous, after_seconds=downtime)
            self._announced = None
        if self.state is not HqState.ONLINE:
            self._set(HqState.ONLINE)

    def failed(self, error: HqError) -> None:
        self.last_error = str(error)
        if error.reachable:
            self.unreachable_in_row = 0
            target = HqState.DEGRADED
        else:
            self.unreachable_in_row += 1
            offline = self.unreachable_in_row >= self.offline_after
            target = HqState.OFFLINE if offline else HqState.DEGRADED

        if target is HqState.OFFLINE and self._announced is not HqState.OFFLINE:
            log.warning("hq.unavailable", error=self.last_error, failures=self.unreachable_in_row)
            self._announced = HqState.OFFLINE
        elif error.reachable and self._announced is None:
            log.warning("hq.degraded", error=self.last_error)
            self._announced = HqState.DEGRADED
        else:
            log.debug("hq.call_failed", state=target.value, error=self.last_error)
        if target is not self.state:
            self._set(target)

    def _set(self, state: HqState) -> None:
        previous = self.state
        self.state = state
        self.since = time.time()
        if self._on_change is not None:
            self._on_change(previous, state)
