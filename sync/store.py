"""What the sync needs from the daemon's store, as a protocol the daemon implements.

The sync package never imports the daemon: the daemon hands an object of this shape to
``SyncService`` at start-up. Every write method runs in one transaction of the daemon's
single writer, off the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from sync.settings import OutboxOverflow


@dataclass(frozen=True, slots=True)
class Change:
    """One entry of the changes feed: a PUT carries a record, a REMOVE a credential id."""

    op: str
    record: dict[str, Any] | None = None
    credential_id: str | None = None


@dataclass(slots=True)
class ApplyCounts:
    put: int = 0
    removed: int = 0
    rejected: int = 0
    """Records that failed validation; they are skipped and logged by credential id."""


@dataclass(slots=True)
class PreparedRecords:
    """Snapshot records validated and hashed, ready for ``SyncStore.stage_records``."""

    counts: ApplyCounts
    """``put`` counts the valid records, ``rejected`` the invalid ones."""
    rows: Any
    """The valid records in the store's own form; the sync package only passes it on."""
    received: int = 0
    """Records in the block, valid or not, for the check against HQ's announced count."""


class RebuildRestart(Exception):
    """The records staged so far are lost; the rebuild must begin again with a new snapshot.

    The store raises it when its snapshot worker died, and with it the rows it was writing.
    It then stages the next attempt without a worker, so a rebuild restarts at most once;
    ``Puller.rebuild`` raises it on a second time.
    """


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    seq: int
    event_id: str
    created_at: float
    body: bytes
    """The event as JSON, exactly as it will be sent."""


@dataclass(frozen=True, slots=True)
class OutboxStats:
    depth: int
    oldest_created_at: float | None


class SyncStore(Protocol):
    def cursor(self) -> str | None:
        """Return the stored feed cursor, or None before the first snapshot."""
        ...

    async def apply_changes(
        self, changes: list[Change], cursor: str, pulled_at: float
    ) -> ApplyCounts:
        """Apply changes in order, store ``cursor`` and ``last_pull_at``, in one transaction."""
        ...

    async def begin_rebuild(self, restart: bool = False) -> None:
        """Start an empty cache file, dropping what an interrupted rebuild of this process left.

        ``restart`` is True for the attempt after a RebuildRestart, which reads the snapshot
        again: invalid records already logged by the rebuild are not logged again.
        """
        ...

    async def prepare_lines(self, first_line: int, lines: bytes) -> PreparedRecords:
        """Validate and hash a block of snapshot lines without the writer; log invalid records.

        ``first_line`` numbers the block's first line in the stream. Raise HqResponseInvalid
        for a line that is not a JSON object or is too long, and RebuildRestart when the
        records staged so far are lost.
        """
        ...

    async def stage_records(self, prepared: PreparedRecords) -> None:
        """Add prepared records to the cache file being built, apart from the cache in use.

        Records staged later take over the credential id and the key of records staged
        earlier.
        """
        ...

    async def finish_rebuild(self, cursor: str, pulled_at: float) -> int:
        """Index the new cache file, store the cursor in it, then put it in place of the cache.

        The switch is one short commit; the old cache serves until then.

        Returns the number of identities in the new cache.
        """
        ...

    async def abandon_rebuild(self) -> None:
        """Delete the cache file being built; the old cache stays in use."""
        ...

    async def local_digest(self) -> tuple[int, str]:
        """Return the record count and digest of the cache, computed off the event loop."""
        ...

    async def cache_record(self, record: dict[str, Any], cursor: str | None) -> bool:
        """Upsert one record that an online lookup returned; return whether it was stored.

        ``cursor`` is the sync cursor when the lookup was sent. A pull that moved it since
        may have removed or changed the credential, so the record is then not stored.
        """
        ...

    async def outbox_batch(self, limit: int) -> list[OutboxEvent]:
        """Return the oldest outbox events, in order."""
        ...

    async def delete_events(self, event_ids: list[str]) -> int:
        """Delete acknowledged events by id; return how many were deleted."""
        ...

    async def trim_outbox(
        self, max_events: int, max_age: float, overflow: OutboxOverflow, now: float
    ) -> int:
        """Drop events beyond the bounds, count them in the store; return how many."""
        ...

    async def outbox_stats(self) -> OutboxStats:
        """Return the outbox depth and the creation time of its oldest event."""
        ...

    async def set_meta(self, values: dict[str, str]) -> None:
        """Store sync state (last upload, HQ state, clock offset) for `status`."""
        ...
