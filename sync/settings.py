"""Settings of the HQ sync, filled in by the daemon from its configuration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

OutboxOverflow = Literal["drop_oldest", "drop_newest"]


@dataclass(frozen=True, slots=True)
class SyncSettings:
    """Everything the sync needs to know; durations are in seconds."""

    url: str
    store_id: str
    token: str | None = None
    client_cert_file: str | None = None
    client_key_file: str | None = None
    ca_file: str | None = None

    pull_interval: float = 30.0
    pull_batch_size: int = 1000
    snapshot_batch_size: int = 2000
    reconcile_interval: float = 3600.0
    request_timeout: float = 10.0
    lookup_timeout: float = 0.3

    upload_interval: float = 1.0
    upload_batch_size: int = 500
    upload_max_bytes: int = 1_048_576
    upload_max_delay: float = 2.0
    gzip_uploads: bool = False

    outbox_max_events: int = 1_000_000
    outbox_max_age: float = 30 * 86400.0
    outbox_overflow: OutboxOverflow = "drop_oldest"
    outbox_trim_interval: float = 10.0

    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    offline_after: int = 3
    clock_offset_threshold: float = 10.0

    @property
    def base_url(self) -> str:
        return self.url.rstrip("/")
