"""Prometheus metrics: decisions, latency, cache, outbox, devices, HQ state, database size."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from daemon.certs import certificate_validity
from daemon.store import (
    CURSOR_CHANGED_META_KEY,
    LAST_PULL_META_KEY,
    LAST_REBUILD_META_KEY,
    OUTBOX_DROPPED_META_KEY,
    parse_meta_count,
    parse_meta_time,
)
from sync.service import LAST_RECONCILE_META_KEY

if TYPE_CHECKING:
    from daemon.runtime import Runtime
    from daemon.store import StoreReader

log = structlog.get_logger(__name__)

META_VALUE_LOGGED_CHARS = 40
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
HQ_STATES = ("not configured", "online", "degraded", "offline")

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Metrics:
    """The daemon's metrics in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.decisions = Counter(
            "identity_connector_decisions",
            "Decisions made, by action, internal reason and identity type (empty when a device"
            " scan's key is unknown).",
            ["action", "reason", "type", "source"],
            registry=self.registry,
        )
        self.replays = Counter(
            "identity_connector_replays",
            "Repeated scanEvent.id calls answered from the stored decision.",
            registry=self.registry,
        )
        self.latency = Histogram(
            "identity_connector_decision_latency_seconds",
            "Time from request received to decision recorded.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.http_errors = Counter(
            "identity_connector_http_errors",
            "Error responses sent, by status code.",
            ["status"],
            registry=self.registry,
        )
        self.device_dropped_reads = Counter(
            "identity_connector_device_dropped_reads",
            "Reads from a device that were dropped without a decision, by device and reason.",
            ["device", "reason"],
            registry=self.registry,
        )

        # Labelled children by label values: labels() takes a lock and builds a key each call.
        self._decision_children: dict[tuple[str, str, str, str], Any] = {}

    def count_decision(
        self, action: str, reason: str, type_: str | None, source: str = "gateway"
    ) -> None:
        """Count one decision under its labels, with None as the empty ``type`` label value.

        Prometheus treats an empty label value as a missing label, the nearest it has to the
        null ``type`` that the log and the event stream show for an unknown key.
        """
        key = (action, reason, type_ or "", source)
        child = self._decision_children.get(key)
        if child is None:
            child = self._decision_children[key] = self.decisions.labels(*key)
        child.inc()

    def count_http_error(self, status: int) -> None:
        """Count one error response under its status code."""
        self.http_errors.labels(str(status)).inc()

    def count_dropped_read(self, device: str, reason: str) -> None:
        """Count one read that a device dropped, such as a malformed serial frame."""
        self.device_dropped_reads.labels(device, reason).inc()

    def attach(self, runtime: Runtime) -> None:
        self.registry.register(_StateCollector(runtime))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector(Collector):
    """Reads gauges from the store and the runtime at scrape time."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        # Meta keys whose invalid value was logged. Each is logged again only after it had
        # a valid value, so a scrape every few seconds does not repeat the warning.
        self._invalid_meta_keys: set[str] = set()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        runtime = self.runtime
        reader = runtime.store.reader
        now = time.time()

        # Counting ten million rows takes seconds, so scrapes and the registration (which
        # collects once) read the count that the status task makes in a thread. Until that
        # first count the gauge has no sample.
        identities = GaugeMetricFamily(
            "identity_connector_cache_identities", "Identities in the local cache."
        )
        if runtime.identity_count is not None:
            identities.add_metric([], runtime.identity_count)
        yield identities

        depth, oldest, dropped = 0, None, 0
        last_pull = cursor_changed = last_rebuild = last_reconcile = None
        try:
            depth = reader.count("outbox")
            oldest = reader.oldest_outbox_time()
            dropped = self._meta_count(reader, OUTBOX_DROPPED_META_KEY)
            # A database that synced before keeps these in meta, but without [hq] nothing
            # pulls or compares any more.
            if runtime.config.hq is not None:
                last_pull = self._meta_time(reader, LAST_PULL_META_KEY, now)
                cursor_changed = self._meta_time(reader, CURSOR_CHANGED_META_KEY, now)
                last_rebuild = self._meta_time(reader, LAST_REBUILD_META_KEY, now)
                last_reconcile = self._meta_time(reader, LAST_RECONCILE_META_KEY, now)
        except sqlite3.Error:
            # No dropped count rather than 0, which would look like a counter reset.
            depth, oldest, dropped = 0, None, None
            last_pull = cursor_changed = last_rebuild = last_reconcile = None
        yield GaugeMetricFamily(
            "identity_connector_outbox_depth",
            "Audit events waiting for upload to HQ.",
            value=depth,
        )
        yield GaugeMetricFamily(
            "identity_connector_outbox_oldest_age_seconds",
            "Age of the oldest audit event waiting for upload (0 when empty).",
            value=now - oldest if oldest else 0.0,
        )
        # An invalid stored count gives no sample: 0 would look like a counter reset.
        dropped_events = CounterMetricFamily(
            "identity_connector_outbox_dropped_events",
            "Audit events deleted unsent because the outbox reached its bound.",
        )
        if dropped is not None:
            dropped_events.add_metric([], dropped)
        yield dropped_events
        # The same two ages as `status` (lastPullAgeSeconds and cursorAgeSeconds). A pull that
        # finds no change keeps the cursor, so only the first age shows whether HQ responds.
        yield GaugeMetricFamily(
            "identity_connector_last_pull_age_seconds",
            "Seconds since the last successful pull from HQ (-1 when never or no HQ).",
            value=_age(now, last_pull),
        )
        yield GaugeMetricFamily(
            "identity_connector_cursor_age_seconds",
            "Seconds since a pull last moved the sync cursor (-1 when never or no HQ).",
            value=_age(now, cursor_changed),
        )
        # A rebuild downloads HQ's whole snapshot: one after another (this age falling back
        # to 0 again and again) means HQ's feed or digest disagrees with its snapshot.
        yield GaugeMetricFamily(
            "identity_connector_last_rebuild_age_seconds",
            "Seconds since the cache was last rebuilt from HQ's snapshot (-1 when never).",
            value=_age(now, last_rebuild),
        )
        yield GaugeMetricFamily(
            "identity_connector_last_reconcile_age_seconds",
            "Seconds since the cache was last compared with HQ's digest (-1 when never).",
            value=_age(now, last_reconcile),
        )
        # The running sync's own estimate, which flags the audit events: no sample until
        # HQ's Date headers gave one in this run.
        hq = runtime.resolver.hq
        clock_offset = hq.service.clock.offset if hq is not None else None
        offset = GaugeMetricFamily(
            "identity_connector_hq_clock_offset_seconds",
            "Estimated offset of HQ's clock from the box's (positive: HQ is ahead).",
        )
        if clock_offset is not None:
            offset.add_metric([], clock_offset)
        yield offset
        yield GaugeMetricFamily(
            "identity_connector_clock_uncertain",
            "1 when the clock offset from HQ exceeds [hq] clock_offset_threshold, so audit"
            " events are flagged clockUncertain.",
            value=1.0 if hq is not None and hq.clock_uncertain else 0.0,
        )
        yield GaugeMetricFamily(
            "identity_connector_cache_stale",
            "1 when the stale-cache rule applies (only associates are accepted).",
            value=1.0 if runtime.resolver.cache_stale(now) else 0.0,
        )

        hq = GaugeMetricFamily(
            "identity_connector_hq_state",
            "HQ connection state (1 for the current one).",
            labels=["state"],
        )
        for state in HQ_STATES:
            hq.add_metric([state], 1.0 if runtime.hq_state == state else 0.0)
        yield hq

        devices = GaugeMetricFamily(
            "identity_connector_device_up",
            "1 when a configured scanner is available.",
            labels=["device"],
        )
        for name, device in sorted(runtime.devices.items()):
            devices.add_metric([name], 1.0 if device.available else 0.0)
        yield devices

        sizes = runtime.store.file_sizes()
        files = GaugeMetricFamily(
            "identity_connector_database_bytes", "Size of the SQLite files.", labels=["file"]
        )
        for name, size in sizes.items():
            files.add_metric([name], size)
        yield files

        certificates = GaugeMetricFamily(
            "identity_connector_certificate_not_after_seconds",
            "Unix time at which a certificate the daemon presents expires.",
            labels=["certificate"],
        )
        for name, source in sorted(runtime.certificates.items()):
            pem = source()
            validity = certificate_validity(pem) if pem else None
            if validity is not None:
                certificates.add_metric([name], validity.not_after.timestamp())
        yield certificates

        yield GaugeMetricFamily(
            "identity_connector_start_time_seconds",
            "Unix time the daemon started.",
            value=runtime.started_at,
        )

    def _meta_time(self, reader: StoreReader, key: str, now: float) -> float | None:
        """Read meta ``key`` as a Unix time; None when it is missing or invalid."""
        text = reader.meta(key)
        moment = parse_meta_time(text, now)
        self._note_meta_value(key, text, valid=moment is not None)
        return moment

    def _meta_count(self, reader: StoreReader, key: str) -> int | None:
        """Read meta ``key`` as a count, 0 when it is missing; None when it is invalid."""
        text = reader.meta(key)
        count = parse_meta_count(text)
        self._note_meta_value(key, text, valid=count is not None)
        return count

    def _note_meta_value(self, key: str, text: str | None, valid: bool) -> None:
        """Log an invalid meta value once, until the key contains a valid value again."""
        if not text or valid:
            self._invalid_meta_keys.discard(key)
            return
        if key in self._invalid_meta_keys:
            return
        self._invalid_meta_keys.add(key)
        # Meta contains times and counts that the daemon writes, never a key or a secret.
        log.warning(
            "metrics.meta_value_invalid",
            key=key,
            value=text[:META_VALUE_LOGGED_CHARS],
            action="its metric reports -1 or no sample until the daemon writes the value again",
        )


def _age(now: float, moment: float | None) -> float:
    """Return the seconds since ``moment``, or -1 when there is none."""
    return now - moment if moment is not None else -1.0
