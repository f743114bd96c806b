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
    """The last pull and upload attempts succeeded and HQ responds to calls."""
    DEGRADED = "degraded"
    """The last pull or upload attempt failed, or fewer than ``offline_after`` calls in a row
    found HQ unreachable."""
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

PULL = "pull"
"""The work of the pull loop: changes, rebuilds from the snapshot and reconciliation."""
UPLOAD = "upload"
"""The work of the upload loop: event batches."""


class HqHealth:
    """Tracks the HQ state from call outcomes and from the attempts of the pull and upload loops.

    The client reports each call: ``call_answered`` when HQ sent an HTTP response,
    ``call_unanswered`` when it did not (or a gateway returned 502, 503 or 504). The loops
    report each whole attempt with ``attempt_succeeded`` or ``attempt_failed``. The state is
    OFFLINE after ``offline_after`` unanswered calls in a row, DEGRADED while the last pull
    or upload attempt failed or a shorter run of calls went unanswered, and ONLINE otherwise.

    Only a whole attempt clears its loop's failure. So a call that HQ answers inside an
    attempt that then fails, such as a 410 before a broken snapshot, does not switch the
    state to ONLINE and back. Lookups report only their calls, so they count towards OFFLINE
    but never make HQ degraded.

    Going OFFLINE logs ``hq.unavailable``, a failed attempt on an answering HQ logs
    ``hq.degraded``, and the next ONLINE after either logs ``hq.available``, as does the first
    attempt that succeeds after start. An unanswered
    call below ``offline_after`` changes the state to DEGRADED at debug level only, so a
    short blip logs nothing.
    """

    def __init__(self, offline_after: int, on_change: StateListener | None = None) -> None:
        self.offline_after = max(1, offline_after)
        # The daemon starts as if HQ were away, so the first ONLINE logs hq.available and
        # online lookups wait until one call has shown HQ reachable.
        self.state = HqState.OFFLINE
        self.since = time.time()
        self.unreachable_in_row = 0
        self.last_error: str | None = None
        self.failing: dict[str, str] = {}
        """The error of each loop whose last attempt failed, by loop (PULL or UPLOAD)."""
        # Failing loops during whose failure HQ responded to some call, such as the pull's while
        # the upload times out: a further failure of theirs is HQ misbehaving, not an outage.
        self._answered_while_failing: set[str] = set()
        self._on_change = on_change
        self._announced: HqState | None = None
        self._announced_at = self.since
        self._been_online = False

    @property
    def reachable(self) -> bool:
        return self.state is not HqState.OFFLINE

    def call_answered(self) -> None:
        """Record a call that got an HTTP response, whatever its status."""
        self.unreachable_in_row = 0
        self._answered_while_failing.update(self.failing)
        self._update()

    def call_unanswered(self, error: HqError) -> None:
        """Record a call that got no HTTP response, or 502, 503 or 504 from a gateway."""
        self.unreachable_in_row += 1
        self.last_error = str(error)
        if self._target() is HqState.OFFLINE and self._announced is not HqState.OFFLINE:
            log.warning("hq.unavailable", error=self.last_error, failures=self.unreachable_in_row)
            self._announce(HqState.OFFLINE)
        else:
            log.debug("hq.call_failed", error=self.last_error, failures=self.unreachable_in_row)
        self._update()

    def attempt_succeeded(self, loop: str) -> None:
        """Record a whole pull or upload attempt that succeeded; it clears the loop's failure."""
        self.failing.pop(loop, None)
        self._answered_while_failing.discard(loop)
        self._update(attempt_done=True)

    def attempt_failed(self, loop: str, error: HqError) -> None:
        """Record a failed pull or upload attempt; the state is DEGRADED until one succeeds.

        The client has already counted an unanswered call, so ``error`` is not counted again.
        """
        # An unanswered call alone may be the start of an outage, which hq.unavailable
        # reports. Failing again while HQ answered other calls meanwhile is no outage.
        answered_meanwhile = loop in self._answered_while_failing
        self.failing[loop] = str(error)
        self.last_error = str(error)
        if (
            (error.reachable or answered_meanwhile)
            and self._announced is not HqState.DEGRADED
            and self._target() is not HqState.OFFLINE
        ):
            log.warning("hq.degraded", error=self.last_error, loop=loop)
            self._announce(HqState.DEGRADED)
        self._update()

    def _announce(self, state: HqState) -> None:
        if self._announced is None:
            self._announced_at = time.time()
        self._announced = state

    def _target(self) -> HqState:
        if self.unreachable_in_row >= self.offline_after:
            return HqState.OFFLINE
        if self.failing or self.unreachable_in_row:
            return HqState.DEGRADED
        return HqState.ONLINE

    def _update(self, attempt_done: bool = False) -> None:
        target = self._target()
        # The first contact after start is announced once a whole attempt succeeds: an HQ
        # that responds to every call with an error would log hq.available, then hq.degraded.
        first_contact = not self._been_online and attempt_done
        if target is HqState.ONLINE and (self._announced is not None or first_contact):
            # The state before HQ was first online is only the assumption made at start,
            # unless hq.unavailable or hq.degraded reported another state. Otherwise the announced
            # state is reported, which a short DEGRADED between
            # OFFLINE and ONLINE (HQ answers, the pull has not finished yet) does not hide.
            previous = "none"
            if self._been_online or self._announced is not None:
                previous = (self._announced or self.state).value
            downtime = round(time.time() - min(self.since, self._announced_at), 1)
            log.info("hq.available", previous_state=previous, after_seconds=downtime)
            self._announced = None
            self._been_online = True
            self.last_error = None
        if target is not self.state:
            self._set(target)

    def _set(self, state: HqState) -> None:
        previous = self.state
        self.state = state
        self.since = time.time()
        if self._on_change is not None:
            self._on_change(previous, state)
