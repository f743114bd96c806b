"""The sync service: pull and upload loops, online lookups and one-shot runs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import structlog

from sync.client import HqClient
from sync.clock import ClockEstimator
from sync.errors import HqError
from sync.pull import Puller, PullReport
from sync.settings import SyncSettings
from sync.state import PULL, UPLOAD, Backoff, HqHealth, HqState
from sync.store import SyncStore
from sync.upload import Uploader, UploadReport

log = structlog.get_logger(__name__)

HQ_STATE_META_KEY = "hq_state"
HQ_STATE_SINCE_META_KEY = "hq_state_since"
CLOCK_OFFSET_META_KEY = "hq_clock_offset"
LAST_RECONCILE_META_KEY = "last_reconcile_at"
# The clock offset is stored for `status` when it moved by more than this, in seconds.
CLOCK_PERSIST_STEP = 0.5
# Seconds between two log lines about lookups that timed out or failed; the lines between
# are counted in the next one.
LOOKUP_LOG_INTERVAL = 60.0


@dataclass(slots=True)
class RunReport:
    pull: PullReport
    upload: UploadReport
    pull_error: Exception | None = None
    """The error that failed the pull, after which the upload still ran: an HqError, or a
    failure of the store (a full disk, say) or of the daemon's own code."""
    upload_error: Exception | None = None
    """The error that stopped the upload, of HQ or of the store; ``upload`` counts the
    batches sent before it."""


class _FailureLog:
    """Logs the first failure of a streak, and a changed error, at warning; repeats at debug."""

    def __init__(self, event: str) -> None:
        self.event = event
        self._last: str | None = None

    def failed(self, error: BaseException, retry_in: float) -> None:
        text = str(error)
        level = log.debug if text == self._last else log.warning
        level(self.event, error=text, retry_in_seconds=round(retry_in, 2))
        self._last = text

    def succeeded(self) -> None:
        self._last = None


class _CrashLog:
    """Logs a loop's failures on something other than HQ, such as a full disk.

    The first failure, and a failure with another error, log the traceback at error level.
    A repeat of the same error logs one warning line with the count of repeats, because a
    disk that stays full fails every retry in the same way. The first success after a
    failure logs ``recovered_event`` at info level.
    """

    def __init__(self, event: str, recovered_event: str) -> None:
        self.event = event
        self.recovered_event = recovered_event
        self._last: tuple[type, str] | None = None
        self._repeats = 0
        self._failures = 0

    def failed(self, error: Exception, **fields: Any) -> None:
        """Log ``error`` with ``fields``, such as the seconds until the next retry."""
        key = (type(error), str(error))
        self._failures += 1
        if key == self._last:
            self._repeats += 1
            log.warning(self.event, error=str(error), repeats=self._repeats, **fields)
            return
        self._last = key
        self._repeats = 0
        log.error(self.event, error=str(error), exc_info=error, **fields)

    def succeeded(self) -> None:
        if self._last is None:
            return
        log.info(self.recovered_event, previous_error=self._last[1], failed_attempts=self._failures)
        self._last = None
        self._repeats = 0
        self._failures = 0


class _ThrottledLog:
    """Logs an event at most once per ``interval`` seconds, counting the repeats between."""

    def __init__(self, event: str, interval: float) -> None:
        self.event = event
        self.interval = interval
        self._next_at = 0.0
        self._suppressed = 0

    def emit(self, **fields: Any) -> None:
        now = time.monotonic()
        if now < self._next_at:
            self._suppressed += 1
            return
        log.warning(self.event, suppressed_since_last_line=self._suppressed, **fields)
        self._suppressed = 0
        self._next_at = now + self.interval


class SyncService:
    """Runs the HQ sync for one store against a ``SyncStore`` the daemon provides."""

    def __init__(
        self,
        settings: SyncSettings,
        store: SyncStore,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.clock = ClockEstimator(settings.clock_offset_threshold)
        self.health = HqHealth(settings.offline_after, on_change=self._state_changed)
        self.client = HqClient(settings, self.health, self.clock)
        self.puller = Puller(settings, self.client, store, progress)
        self.uploader = Uploader(settings, self.client, store, progress)
        # Strong references: the event loop keeps only weak ones to running tasks.
        self._tasks: set[asyncio.Task[Any]] = set()
        self._wake_pull = asyncio.Event()
        self._lookup_timeouts = _ThrottledLog("hq.lookup_timed_out", LOOKUP_LOG_INTERVAL)
        self._lookup_failures = _ThrottledLog("hq.lookup_failed", LOOKUP_LOG_INTERVAL)
        self._persisted_offset: float | None = None
        # A full disk fails every save of the sync state in the same way.
        self._save_failures = _CrashLog("sync.state_not_saved", "sync.state_saved")
        self.state_listeners: list[Callable[[str], None]] = []
        """Called with the new state name at each change of the HQ state."""

    @property
    def state(self) -> HqState:
        return self.health.state

    @property
    def clock_uncertain(self) -> bool:
        return self.clock.uncertain

    async def start(self) -> None:
        """Open the HTTP session and start the pull and upload loops."""
        await self._forget_clock_offset()
        await self.client.open()
        self._spawn(self._pull_loop(), "hq-pull")
        self._spawn(self._upload_loop(), "hq-upload")
        log.info(
            "sync.started",
            url=self.settings.base_url,
            store_id=self.settings.store_id,
            pull_interval=float(self.settings.pull_interval),
        )

    def wake(self) -> None:
        """Make the pull loop pull at once instead of waiting out its interval or backoff."""
        self._wake_pull.set()

    async def stop(self) -> None:
        """Cancel the loops and pending cache writes, then close the HTTP session."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.client.close()
        log.info("sync.stopped")

    async def run_once(self) -> RunReport:
        """Pull to the latest cursor, reconcile, and upload the whole outbox, in the foreground.

        A failed pull is reported and the upload still runs: the events may reach HQ even
        when its identity feed fails, or when the store cannot take a new cache file. A
        failure other than HQ's leaves the HQ state as it is, as in the pull loop. A failed
        upload is reported the same way.
        """
        await self._forget_clock_offset()
        await self.client.open()
        pulled = PullReport()
        pull_error: Exception | None = None
        try:
            try:
                await self.puller.pull(pulled)
                if not pulled.rebuilt:
                    # A mismatch rebuilds here, and its counts belong in the report.
                    await self.puller.reconcile(report=pulled)
            except HqError as exc:
                pull_error = exc
                self.health.attempt_failed(PULL, exc)
            except Exception as exc:
                # A store failure such as a full disk: the caller reports it.
                pull_error = exc
            else:
                self.health.attempt_succeeded(PULL)
            uploaded = UploadReport()
            upload_error: Exception | None = None
            try:
                await self.uploader.drain(uploaded)
            except HqError as exc:
                upload_error = exc
                self.health.attempt_failed(UPLOAD, exc)
            except Exception as exc:
                # A store failure such as a locked outbox: the caller reports it.
                upload_error = exc
            else:
                self.health.attempt_succeeded(UPLOAD)
        finally:
            await self._persist_state()
            await self.client.close()
        return RunReport(
            pull=pulled, upload=uploaded, pull_error=pull_error, upload_error=upload_error
        )

    async def lookup(self, key: str) -> dict[str, Any] | None:
        """Ask HQ for a key within ``lookup_timeout``; return the record or None.

        None covers "not found" as well as an HQ that is offline, slow or failing, so the
        caller decides by its offline policy. The caller checks a record found and passes it
        to ``cache_looked_up``.

        A lookup slower than ``lookup_timeout`` does not change the HQ state: HQ may serve
        pulls and uploads well and only be slow to search, and marking it unavailable would
        stop lookups and point operators at the network.
        """
        if not self.health.reachable:
            return None
        try:
            async with asyncio.timeout(self.settings.lookup_timeout):
                record = await self.client.lookup(key)
        except TimeoutError:
            self._lookup_timeouts.emit(
                timeout_seconds=float(self.settings.lookup_timeout),
                detail="HQ did not answer a lookup within lookup_timeout, so the decision"
                " was made without HQ; HQ must answer lookups faster",
            )
            return None
        except HqError as exc:
            self._lookup_failures.emit(error=str(exc))
            return None
        return record

    def cache_looked_up(self, record: dict[str, Any], cursor: str | None) -> None:
        """Store a record that a lookup found, in the background, unless a pull moved
        ``cursor`` (the cursor when the lookup was sent) since."""
        self._spawn(self._cache(record, cursor), "hq-cache-record")

    async def _cache(self, record: dict[str, Any], cursor: str | None) -> None:
        # The store logs why it keeps a record out.
        try:
            await self.store.cache_record(record, cursor)
        except Exception as exc:
            log.error("sync.lookup_cache_failed", error=str(exc))

    def _spawn(self, coroutine: Coroutine[Any, Any, Any], name: str) -> None:
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _pull_loop(self) -> None:
        backoff = Backoff(self.settings.backoff_initial, self.settings.backoff_max)
        failures = _FailureLog("sync.pull_failed")
        crashes = _CrashLog("sync.pull_crashed", "sync.pull_recovered")
        next_reconcile = 0.0
        while True:
            try:
                report = await self.puller.pull()
                if report.rebuilt:
                    next_reconcile = time.monotonic() + self.settings.reconcile_interval
                elif time.monotonic() >= next_reconcile:
                    await self.puller.reconcile()
                    next_reconcile = time.monotonic() + self.settings.reconcile_interval
            except HqError as exc:
                self.health.attempt_failed(PULL, exc)
                delay = self._retry_delay(backoff, exc)
                failures.failed(exc, delay)
            except Exception as exc:
                # A store failure (disk full, writer stopped) must not end the loop silently.
                delay = backoff.next_delay()
                crashes.failed(exc, retry_in_seconds=round(delay, 1))
            else:
                self.health.attempt_succeeded(PULL)
                backoff.reset()
                failures.succeeded()
                crashes.succeeded()
                delay = self.settings.pull_interval
            await self._persist_state()
            await self._sleep(delay)

    def _retry_delay(self, backoff: Backoff, error: HqError) -> float:
        """Return the next backoff delay, or HQ's Retry-After when longer, up to backoff_max."""
        delay = backoff.next_delay()
        if error.retry_after is not None:
            delay = max(delay, min(error.retry_after, self.settings.backoff_max))
        return delay

    async def _sleep(self, delay: float) -> None:
        try:
            async with asyncio.timeout(delay):
                await self._wake_pull.wait()
        except TimeoutError:
            pass
        self._wake_pull.clear()

    async def _upload_loop(self) -> None:
        backoff = Backoff(self.settings.backoff_initial, self.settings.backoff_max)
        failures = _FailureLog("sync.upload_failed")
        crashes = _CrashLog("sync.upload_crashed", "sync.upload_recovered")
        next_trim = 0.0
        while True:
            delay = self.settings.upload_interval
            # A round that touches neither the outbox nor HQ does not end a crash streak.
            attempted = False
            try:
                if time.monotonic() >= next_trim:
                    attempted = True
                    await self.uploader.trim()
                    next_trim = time.monotonic() + self.settings.outbox_trim_interval
                if self.health.reachable:
                    attempted = True
                    report = await self.uploader.upload_once()
                    # Nothing due also ends a failure: the events that failed are old, so
                    # they would be due unless they left the outbox.
                    self.health.attempt_succeeded(UPLOAD)
                    # A full batch means more may be waiting: send the next one at once.
                    if report is not None and report.sent >= self.settings.upload_batch_size:
                        delay = 0.0
                backoff.reset()
                failures.succeeded()
                if attempted:
                    crashes.succeeded()
            except HqError as exc:
                self.health.attempt_failed(UPLOAD, exc)
                delay = self._retry_delay(backoff, exc)
                failures.failed(exc, delay)
            except Exception as exc:
                delay = backoff.next_delay()
                crashes.failed(exc, retry_in_seconds=round(delay, 1))
            await asyncio.sleep(delay)

    def _state_changed(self, previous: HqState, current: HqState) -> None:
        # The pull loop is not woken here. While HQ is offline only the pull loop calls it,
        # so its own retries find HQ back. A wake when its own call made HQ online would
        # skip the backoff after a rebuild that then failed.
        for listener in self.state_listeners:
            listener(current.value)
        # Only a started service persists from here; `sync --now` saves once at its end.
        if self._tasks:
            self._spawn(self._persist_state(), "hq-persist-state")

    async def _forget_clock_offset(self) -> None:
        """Clear the offset an earlier run stored.

        This run flags events by its own estimate, which has no value until HQ responds, so
        `status` must not warn from the old one.
        """
        try:
            await self.store.set_meta({CLOCK_OFFSET_META_KEY: ""})
        except Exception as exc:
            self._save_failures.failed(exc)
        else:
            self._save_failures.succeeded()

    async def _persist_state(self) -> None:
        values = {
            HQ_STATE_META_KEY: self.health.state.value,
            HQ_STATE_SINCE_META_KEY: repr(self.health.since),
        }
        offset = self.clock.offset
        # Also stored when it crosses the threshold, so that `status` warns when events
        # start to be flagged and stops when they no longer are.
        if offset is not None and (
            self._persisted_offset is None
            or abs(offset - self._persisted_offset) > CLOCK_PERSIST_STEP
            or self.clock.exceeds(offset) != self.clock.exceeds(self._persisted_offset)
        ):
            values[CLOCK_OFFSET_META_KEY] = repr(round(offset, 3))
            self._persisted_offset = offset
        if self.puller.last_reconcile_at is not None:
            values[LAST_RECONCILE_META_KEY] = repr(self.puller.last_reconcile_at)
        try:
            await self.store.set_meta(values)
        except Exception as exc:
            self._save_failures.failed(exc)
        else:
            self._save_failures.succeeded()
