"""Pull side of the sync: the changes feed, snapshot rebuilds and digest reconciliation."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from sync.client import HqClient
from sync.errors import CursorExpired, HqError, HqResponseInvalid
from sync.settings import SyncSettings
from sync.store import ApplyCounts, PreparedRecords, RebuildRestart, SyncStore

log = structlog.get_logger(__name__)

Progress = Callable[[str], None]
# `sync --now` prints one progress line per this many staged snapshot batches.
PROGRESS_EVERY_BATCHES = 10


@dataclass(slots=True)
class PullReport:
    pages: int = 0
    put: int = 0
    removed: int = 0
    rejected: int = 0
    rebuilt: bool = False
    identities: int | None = None
    """Size of the cache after a rebuild."""
    mismatch_after_rebuild: bool = False
    """The comparison right after a rebuild still found the cache unlike HQ's records."""
    rebuild_abandoned: bool = False
    """A rebuild failed, so the cache in use kept its records and cursor."""


class Puller:
    """Brings the local cache to HQ's latest cursor.

    Each page of changes commits together with its cursor, so a crash between pages
    resumes from the last committed one. A rebuild fills a new cache file while the old
    cache keeps serving, and switches to it, with the snapshot's cursor, in one commit.
    """

    def __init__(
        self,
        settings: SyncSettings,
        client: HqClient,
        store: SyncStore,
        progress: Progress | None = None,
    ) -> None:
        self.settings = settings
        self.client = client
        self.store = store
        self.progress = progress
        self.last_reconcile_at: float | None = None
        # Events logged at their level since the last pull, rebuild or comparison that
        # succeeded; their repeats on the retries in between go to debug level.
        self._logged_while_failing: set[str] = set()

    async def pull(self, report: PullReport | None = None) -> PullReport:
        """Pull every change up to HQ's latest cursor, rebuilding when there is no cursor yet
        or HQ expired it.

        Counts go into ``report`` as they are made, so a caller that passes one still has
        them when the pull fails halfway.
        """
        report = report if report is not None else PullReport()
        cursor = self.store.cursor()
        if cursor is None:
            await self.rebuild("no cursor yet", report)
        else:
            try:
                await self._follow_feed(cursor, report)
            except CursorExpired as exc:
                # The feed may have moved past the cursor the pull started from.
                expired = exc.cursor if exc.cursor is not None else cursor
                self._log_once("warning", "sync.cursor_expired", cursor=expired)
                await self.rebuild("cursor expired", report)
        self._logged_while_failing.clear()
        return report

    async def _follow_feed(self, cursor: str, report: PullReport) -> None:
        while True:
            page = await self.client.changes(cursor, self.settings.pull_batch_size)
            if page.has_more and page.cursor == cursor:
                # Following it would fetch the same page again and again.
                raise HqResponseInvalid(
                    f"HQ changes page has hasMore true but returns the cursor it was asked"
                    f" for ({cursor[:64]!r}); HQ must return a cursor past the page's changes"
                )
            counts = await self.store.apply_changes(page.changes, page.cursor, time.time())
            report.pages += 1
            _add(report, counts)
            if page.changes:
                log.info(
                    "sync.batch_applied",
                    changes=len(page.changes),
                    put=counts.put,
                    removed=counts.removed,
                    rejected=counts.rejected,
                    cursor=page.cursor,
                    has_more=page.has_more,
                )
                self._say(
                    f"pulled {len(page.changes)} changes"
                    f" ({counts.put} put, {counts.removed} removed, {counts.rejected} rejected)"
                )
            cursor = page.cursor
            if not page.has_more:
                return

    async def rebuild(self, reason: str, report: PullReport | None = None) -> int:
        """Rebuild the cache from HQ's snapshot; return the new number of identities."""
        report = report if report is not None else PullReport()
        started = time.monotonic()
        self._log_once("info", "sync.rebuild_started", reason=reason)
        self._say(f"rebuilding the cache from HQ's snapshot ({reason})")

        restarted = False
        while True:
            # Counts of this attempt only: a restarted attempt stages every record again.
            staged = PullReport()
            await self.store.begin_rebuild(restart=restarted)
            try:
                cursor = await self._stage_snapshot(staged)
            except RebuildRestart:
                await self.store.abandon_rebuild()
                if restarted:
                    raise
                restarted = True
                self._say("downloading HQ's snapshot again (the records staged so far were lost)")
                continue
            except Exception:
                # The old cache stays in use; a crash here instead leaves the new file,
                # which the next sync start deletes.
                await self.store.abandon_rebuild()
                report.rebuild_abandoned = True
                raise
            try:
                count = await self.store.finish_rebuild(cursor, time.time())
            except Exception:
                # The switch to the new file may have committed before the failure, so
                # whether the old cache is still in use is not known here.
                await self.store.abandon_rebuild()
                raise
            break
        _merge(report, staged)
        report.rebuilt = True
        report.identities = count
        log.info(
            "sync.rebuilt",
            reason=reason,
            identities=count,
            rejected=report.rejected,
            cursor=cursor,
            seconds=round(time.monotonic() - started, 2),
        )
        self._say(f"rebuilt the cache: {count} identities")
        if count == 0:
            # Legitimate only for a store that has no identities yet. After an export fault
            # at HQ every gate depends on online lookups, and every key is rejected offline.
            log.warning(
                "sync.cache_emptied",
                reason=reason,
                rejected=report.rejected,
                detail="HQ's snapshot held no valid identity for this store: every key is"
                " now decided by online lookups while HQ answers, and rejected while it does"
                " not; check HQ's export for the store",
            )

        await self._follow_snapshot_cursor(cursor, report)
        try:
            if not await self.reconcile(rebuild_on_mismatch=False):
                report.mismatch_after_rebuild = True
        except HqError as exc:
            log.warning("sync.reconcile_failed", error=str(exc), after="rebuild")
        return count

    async def _follow_snapshot_cursor(self, cursor: str, report: PullReport) -> None:
        """Pull the changes made since the snapshot, from the snapshot's own cursor.

        A 410 here means HQ handed out a cursor that it had already expired. Rebuilding at
        once would download the snapshot again at every pull, so the pull fails instead:
        HQ counts as degraded, and the next rebuild waits for the backoff.
        """
        try:
            await self._follow_feed(cursor, report)
        except CursorExpired as exc:
            retry = (
                "The next pull (the daemon's, after its backoff, or the next sync --now)"
                " rebuilds again"
            )
            if exc.cursor is None or exc.cursor == cursor:
                raise HqResponseInvalid(
                    f"HQ returned 410 Gone to the first changes call after a rebuild, for the"
                    f" snapshot's own cursor {cursor[:64]!r}; HQ must keep the cursor of a new"
                    f" snapshot valid in its changes feed. {retry}"
                ) from None
            raise HqResponseInvalid(
                f"HQ returned 410 Gone to a changes call after a rebuild, for the cursor"
                f" {exc.cursor[:64]!r} that its previous page had just returned (the snapshot's"
                f" cursor was {cursor[:64]!r}); HQ must keep the cursors it returns valid in its"
                f" changes feed. {retry}"
            ) from None

    async def _stage_snapshot(self, report: PullReport) -> str:
        # One block is staged while the next is read and prepared, so at most two blocks
        # are held in memory.
        writing: asyncio.Task[None] | None = None
        failure: BaseException | None = None
        received = 0
        try:
            async with self.client.snapshot() as stream:
                async for first_line, lines in stream.blocks(self.settings.snapshot_batch_size):
                    prepared = await self.store.prepare_lines(first_line, lines)
                    received += prepared.received
                    writing = await self._stage(prepared, writing, report)
                stream.check_count(received)
                cursor = stream.cursor
        finally:
            # A staging write still running must finish before the caller drops the file.
            if writing is not None:
                await asyncio.wait([writing])
                failure = writing.exception()
        if failure is not None:
            raise failure
        return cursor

    async def _stage(
        self,
        prepared: PreparedRecords,
        previous: asyncio.Task[None] | None,
        report: PullReport,
    ) -> asyncio.Task[None] | None:
        """Wait for the previous write, and start writing ``prepared``."""
        if previous is not None:
            await previous
        _add(report, prepared.counts)
        report.pages += 1
        if report.pages % PROGRESS_EVERY_BATCHES == 0:
            self._say(f"staged {report.put} snapshot records")
        return asyncio.create_task(self.store.stage_records(prepared), name="sync-stage")

    async def reconcile(
        self, rebuild_on_mismatch: bool = True, report: PullReport | None = None
    ) -> bool:
        """Compare the local digest with HQ's at the same cursor; rebuild on a mismatch.

        Returns whether the digests matched (True also when HQ's cursor kept moving and no
        comparison was possible this time). The changes pulled to catch up and the records
        of a rebuild are added to ``report`` when one is given.
        """
        report = report if report is not None else PullReport()
        remote = await self.client.digest()
        if remote.cursor != self.store.cursor():
            # Into the caller's report, so its counts survive when this pull fails.
            await self.pull(report)
            remote = await self.client.digest()
            if remote.cursor != self.store.cursor():
                log.info("sync.reconcile_skipped", reason="HQ's cursor moved during the check")
                return True

        count, digest = await self.store.local_digest()
        self.last_reconcile_at = time.time()
        if digest == remote.digest:
            log.info("sync.reconciled", identities=count, cursor=remote.cursor)
            self._logged_while_failing.clear()
            return True

        fields = {"local_count": count, "hq_count": remote.count, "cursor": remote.cursor}
        if rebuild_on_mismatch:
            self._log_once(
                "warning", "sync.digest_mismatch", **fields, action="rebuilding from the snapshot"
            )
        else:
            # Right after a rebuild, always at warning level. The mismatch that started the
            # rebuild was logged under the same name, and this one shows that the rebuild did
            # not help: HQ's snapshot and digest disagree.
            log.warning(
                "sync.digest_mismatch", **fields, action="none until the next reconciliation"
            )
        self._say(f"digest mismatch: {count} identities here, {remote.count} at HQ")
        if rebuild_on_mismatch:
            await self.rebuild("digest mismatch", report)
        return False

    def _log_once(self, level: str, event: str, **fields: object) -> None:
        """Log ``event`` at ``level``, or at debug level when it was logged since the last
        success: a rebuild that keeps failing retries with backoff, and each retry would
        repeat the same lines."""
        if event in self._logged_while_failing:
            log.debug(event, **fields)
            return
        self._logged_while_failing.add(event)
        getattr(log, level)(event, **fields)

    def _say(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)


def _merge(total: PullReport, part: PullReport) -> None:
    total.pages += part.pages
    _add(total, part)
    if part.rebuilt:
        total.rebuilt = True
        total.identities = part.identities
        total.mismatch_after_rebuild = part.mismatch_after_rebuild


def _add(report: PullReport, counts: ApplyCounts | PullReport) -> None:
    report.put += counts.put
    report.removed += counts.removed
    report.rejected += counts.rejected
