"""Upload side of the sync: outbox events to HQ, in order, deleted once acknowledged."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from sync.client import HqClient
from sync.errors import HqResponseInvalid
from sync.settings import SyncSettings
from sync.store import OutboxEvent, SyncStore

log = structlog.get_logger(__name__)

LAST_UPLOAD_META_KEY = "last_upload_at"


@dataclass(slots=True)
class UploadReport:
    sent: int = 0
    accepted: int = 0
    batches: int = 0


class Uploader:
    """Sends the oldest outbox events in batches and deletes those HQ lists as accepted.

    Events HQ does not list stay at the head of the outbox and go again in the next batch,
    so delivery is at least once and in order; HQ drops repeats by eventId.
    """

    def __init__(
        self,
        settings: SyncSettings,
        client: HqClient,
        store: SyncStore,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.client = client
        self.store = store
        self.progress = progress
        self.dropped_total = 0

    async def upload_once(self, force: bool = False) -> UploadReport | None:
        """Send one batch; return None when nothing is due.

        Without ``force`` a batch waits until it is full or its oldest event is older than
        ``upload_max_delay``, so a quiet store sends few small requests.
        """
        events = await self.store.outbox_batch(self.settings.upload_batch_size)
        if not events:
            return None
        chosen = self._fit_size(events)
        full = len(chosen) < len(events) or len(events) >= self.settings.upload_batch_size
        age = time.time() - events[0].created_at
        if not force and not full and age < self.settings.upload_max_delay:
            return None

        body = b'{"events":[' + b",".join(event.body for event in chosen) + b"]}"
        accepted = await self.client.post_events(body)

        sent_ids = {event.event_id for event in chosen}
        acknowledged = [event_id for event_id in dict.fromkeys(accepted) if event_id in sent_ids]
        unknown = len(set(accepted) - sent_ids)
        if not acknowledged:
            # Not an upload: last_upload_at stays, and the loop logs the failure and backs off.
            self._say(f"uploaded {len(chosen)} events, HQ accepted none")
            raise HqResponseInvalid(
                f"HQ accepted none of the {len(chosen)} events sent (unknown ids in its"
                f" answer: {unknown}); they stay in the outbox"
            )
        deleted = await self.store.delete_events(acknowledged)
        await self.store.set_meta({LAST_UPLOAD_META_KEY: repr(time.time())})

        log.info(
            "sync.events_uploaded",
            sent=len(chosen),
            accepted=len(acknowledged),
            deleted=deleted,
            unknown_ids=unknown or None,
            oldest_age_seconds=round(age, 1),
        )
        self._say(f"uploaded {len(chosen)} events, HQ accepted {len(acknowledged)}")
        return UploadReport(sent=len(chosen), accepted=len(acknowledged), batches=1)

    def _fit_size(self, events: list[OutboxEvent]) -> list[OutboxEvent]:
        """Take events from the head while the request body stays under upload_max_bytes."""
        chosen: list[OutboxEvent] = []
        size = len(b'{"events":[]}')
        for event in events:
            size += len(event.body) + 1
            if chosen and size > self.settings.upload_max_bytes:
                break
            chosen.append(event)
        return chosen

    async def drain(self, total: UploadReport | None = None) -> UploadReport:
        """Upload batch after batch until the outbox is empty; for `sync --now`.

        Counts go into ``total`` as batches succeed, so a caller that passes one keeps them
        when a later batch raises.
        """
        total = UploadReport() if total is None else total
        while True:
            report = await self.upload_once(force=True)
            if report is None:
                return total
            total.sent += report.sent
            total.accepted += report.accepted
            total.batches += 1

    async def trim(self) -> int:
        """Enforce the outbox bounds; return how many events were dropped."""
        settings = self.settings
        dropped = await self.store.trim_outbox(
            settings.outbox_max_events,
            settings.outbox_max_age,
            settings.outbox_overflow,
            time.time(),
        )
        if dropped:
            self.dropped_total += dropped
            log.warning(
                "outbox.events_dropped",
                dropped=dropped,
                dropped_since_start=self.dropped_total,
                policy=settings.outbox_overflow,
                max_events=settings.outbox_max_events,
                max_age_seconds=settings.outbox_max_age,
            )
        return dropped

    def _say(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)
