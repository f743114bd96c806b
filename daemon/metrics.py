"""Prometheus metrics: decisions, latency, cache, outbox, devices, HQ state, database size."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from daemon.certs import certificate_validity
from daemon.store import (
    CURSOR_CHANGED_META_KEY,
    LAST_PULL_META_KEY,
    LAST_REBUILD_META_KEY,
    OUTBOX_DROPPED_META_KEY,
)
from sync.service import LAST_RECONCILE_META_KEY

if TYPE_CHECKING:
    from daemon.runtime import Runtime

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
HQ_STATES = ("not configured", "online", "degraded", "offline")

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Metrics:
    """The daemon's metrics in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.decisions = Counter(
            "identity_connector_decisions",
            "Decisions made, by action, internal reason and identity type.",
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

    def count_decision(self, action: str, reason: str, type_: str, source: str = "gateway") -> None:
        """Count one decision under its labels."""
        key = (action, reason, type_, source)
        child = self._decision_children.get(key)
        if child is None:
            child = self._decision_children[key] = self.decisions.labels(*key)
        child.inc()

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

        try:
            depth = reader.count("outbox")
            oldest = reader.oldest_outbox_time()
            last_pull = reader.meta(LAST_PULL_META_KEY)
            cursor_changed = reader.meta(CURSOR_CHANGED_META_KEY)
            last_rebuild = reader.meta(LAST_REBUILD_META_KEY)
            dropped = int(reader.meta(OUTBOX_DROPPED_META_KEY) or 0)
            last_reconcile = _number(reader.meta(LAST_RECONCILE_META_KEY))
        except sqlite3.Error:
            depth, oldest, last_pull, cursor_changed, dropped = 0, None, None, None, 0
            last_rebuild = last_reconcile = None
        if runtime.config.hq is None:
            # A database that synced before keeps these in meta, but without [hq] nothing
            # pulls or compares any more.
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
        yield CounterMetricFamily(
            "identity_connector_outbox_dropped_events",
            "Audit events deleted unsent because the outbox reached its bound.",
            value=dropped,
        )
        # The same two ages as `status` (lastPullAgeSeconds and cursorAgeSeconds). A pull that
        # finds no change keeps the cursor, so only the first age shows whether HQ responds.
        yield GaugeMetricFamily(
            "identity_connector_last_pull_age_seconds",
            "Seconds since the last successful pull from HQ (-1 when never or no HQ).",
            value=now - float(last_pull) if last_pull else -1.0,
        )
        yield GaugeMetricFamily(
            "identity_connector_cursor_age_seconds",
            "Seconds since a pull last moved the sync cursor (-1 when never or no HQ).",
            value=now - float(cursor_changed) if cursor_changed else -1.0,
        )
        # A rebuild downloads HQ's whole snapshot: one after another (this age falling back
        # to 0 again and again) means HQ's feed or digest disagrees with its snapshot.
        yield GaugeMetricFamily(
            "identity_connector_last_rebuild_age_seconds",
            "Seconds since the cache was last rebuilt from HQ's snapshot (-1 when never).",
            value=now - float(last_rebuild) if last_rebuild else -1.0,
        )
        yield GaugeMetricFamily(
            "identity_connector_last_reconcile_age_seconds",
            "Seconds since the cache was last compared with HQ's digest (-1 when never).",
            value=now - last_reconcile if last_reconcile is not None else -1.0,
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


def _number(text: str | None) -> float | None:
    """Convert a meta value to a number; return None when it is missing or not a number."""
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return None
