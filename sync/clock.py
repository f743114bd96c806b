"""Estimate of HQ's clock offset from the Date headers of its responses."""

from __future__ import annotations

from collections import deque
from datetime import UTC
from email.utils import parsedate_to_datetime
from statistics import median

import structlog

log = structlog.get_logger(__name__)

# Samples kept for the median; one slow response then cannot swing the estimate.
SAMPLES = 5
# A Date header has whole seconds, so HQ's true time lies in [date, date + 1 s).
DATE_RESOLUTION = 1.0


class ClockEstimator:
    """Median offset of HQ's clock from ours, in seconds (positive: HQ is ahead).

    Each sample compares the middle of HQ's one-second Date window with the midpoint of
    the local send and receive times, so the error of one sample is at most half the
    round trip plus half a second.
    """

    def __init__(self, threshold: float) -> None:
        self.threshold = float(threshold)
        # A second, or half of a threshold shorter than two seconds, which would otherwise
        # leave no offset at which the clocks count as agreeing again.
        self._margin = min(DATE_RESOLUTION, self.threshold / 2)
        self._samples: deque[float] = deque(maxlen=SAMPLES)
        self._warned = False

    @property
    def offset(self) -> float | None:
        return median(self._samples) if self._samples else None

    @property
    def uncertain(self) -> bool:
        """Whether our clock is off from HQ's by more than the threshold."""
        return self.exceeds(self.offset)

    def exceeds(self, offset: float | None) -> bool:
        """Return whether ``offset`` is over the threshold, so that events are flagged."""
        return offset is not None and abs(offset) > self.threshold

    def observe(self, date_header: str | None, sent_at: float, received_at: float) -> None:
        """Add one sample from a response; a missing or invalid Date header is ignored."""
        if not date_header:
            return
        try:
            moment = parsedate_to_datetime(date_header)
            if moment.tzinfo is None:
                # The zone "-0000" parses without one; HTTP dates are always in GMT.
                moment = moment.replace(tzinfo=UTC)
            hq_time = moment.timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            return
        local_midpoint = (sent_at + received_at) / 2
        self._samples.append(hq_time + DATE_RESOLUTION / 2 - local_midpoint)

        if self.uncertain and not self._warned:
            log.warning(
                "hq.clock_offset",
                offset_seconds=round(self.offset or 0.0, 1),
                threshold_seconds=self.threshold,
                detail="events are flagged clockUncertain until the clocks agree; check NTP",
            )
            self._warned = True
        elif self._warned and abs(self.offset or 0.0) <= self.threshold - self._margin:
            # Below the threshold by a margin, so that an offset near it, which the
            # estimate's own error of up to a second moves across, does not log a line per
            # sample.
            log.info("hq.clock_agrees", offset_seconds=round(self.offset or 0.0, 1))
            self._warned = False
