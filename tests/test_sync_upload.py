"""Upload side of the HQ sync: outbox order, outages, acknowledgements and the bound."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import SAMPLE_RECORDS, Daemon, make_daemon
from tests.fakehq import (
    FakeHq,
    RawAnswer,
    hq_config,
    log_events,
    meta,
    outbox_ids,
    states_during,
    wait_until,
)


@pytest.fixture
def hq() -> Iterator[FakeHq]:
    server = FakeHq().start()
    server.put(*SAMPLE_RECORDS)
    yield server
    server.close()


def synced_daemon(tmp_path: Path, hq: FakeHq, extra: str = "") -> Daemon:
    directory = tmp_path / "daemon"
    daemon = make_daemon(directory, hq_config(hq, directory, extra), records=[])
    daemon.start()
    wait_until(lambda: meta(daemon.database, "cursor") == hq.cursor(), what="initial snapshot")
    return daemon


def scan_many(daemon: Daemon, count: int) -> None:
    keys = ["KEY-SHOPPER-5f1c2b", "KEY-ASSOCIATE-8e2d11", "KEY-REVOKED-0d9e77"]
    for number in range(count):
        reply = daemon.scan(keys[number % len(keys)])
        assert reply.status == 200, reply.body


def test_outage_queues_then_drains_in_order(tmp_path: Path, hq: FakeHq) -> None:
    daemon = synced_daemon(tmp_path, hq)
    try:
        hq.down()
        wait_until(lambda: meta(daemon.database, "hq_state") == "offline", what="offline")
        scan_many(daemon, 20)
        queued = outbox_ids(daemon.database)
        assert len(queued) == 20
        assert hq.received.events == {}

        hq.up()
        wait_until(lambda: not outbox_ids(daemon.database), what="the outbox to drain")

        assert list(hq.received.events) == queued
        assert hq.received.repeats == 0
    finally:
        daemon.stop()


def test_events_carry_audit_fields(tmp_path: Path, hq: FakeHq) -> None:
    daemon = synced_daemon(tmp_path, hq)
    try:
        scan_many(daemon, 1)
        wait_until(lambda: hq.received.events, what="the event at HQ")
        (event,) = hq.received.events.values()
        for name in (
            "eventId",
            "time",
            "storeId",
            "requestId",
            "scanEventId",
            "location",
            "channel",
            "keyFingerprint",
            "identityId",
            "type",
            "action",
            "reason",
            "latencyMs",
            "clockUncertain",
        ):
            assert name in event, name
        assert "KEY-SHOPPER-5f1c2b" not in str(event)
    finally:
        daemon.stop()


@pytest.mark.parametrize("ack_mode", ["partial", "duplicate"])
def test_acknowledgements_drain_without_loss(tmp_path: Path, hq: FakeHq, ack_mode: str) -> None:
    hq.control.ack_mode = ack_mode  # type: ignore[assignment]
    daemon = synced_daemon(tmp_path, hq)
    try:
        hq.down()
        scan_many(daemon, 7)
        queued = outbox_ids(daemon.database)
        hq.up()
        wait_until(lambda: not outbox_ids(daemon.database), what="the outbox to drain")

        assert sorted(hq.received.events) == sorted(queued)
        assert hq.received.repeats == 0
    finally:
        daemon.stop()


def test_partial_acknowledgements_take_several_posts(tmp_path: Path, hq: FakeHq) -> None:
    hq.control.ack_mode = "partial"
    hq.control.ack_limit = 2
    daemon = synced_daemon(tmp_path, hq, extra="upload_batch_size = 50")
    try:
        hq.down()
        scan_many(daemon, 7)
        queued = outbox_ids(daemon.database)
        hq.up()
        wait_until(lambda: not outbox_ids(daemon.database), what="the outbox to drain")

        assert list(hq.received.events) == queued
        assert hq.received.event_posts >= 4
    finally:
        daemon.stop()


def test_unacknowledged_events_stay_queued(tmp_path: Path, hq: FakeHq) -> None:
    hq.control.ack_mode = "none"
    daemon = synced_daemon(tmp_path, hq)
    try:
        scan_many(daemon, 3)
        wait_until(lambda: hq.received.event_posts >= 3, what="three upload attempts")
        assert len(outbox_ids(daemon.database)) == 3

        hq.control.ack_mode = "all"
        wait_until(lambda: not outbox_ids(daemon.database), what="the outbox to drain")
        assert len(hq.received.events) == 3
    finally:
        daemon.stop()


@pytest.mark.parametrize(
    ("overflow", "kept"), [("drop_oldest", slice(3, 8)), ("drop_newest", slice(0, 5))]
)
def test_outbox_bound_drops_and_counts(
    tmp_path: Path, hq: FakeHq, overflow: str, kept: slice
) -> None:
    extra = f'outbox_max_events = 5\noutbox_overflow = "{overflow}"'
    daemon = synced_daemon(tmp_path, hq, extra)
    try:
        hq.down()
        scan_many(daemon, 8)
        queued = outbox_ids(daemon.database)
        wait_until(lambda: meta(daemon.database, "outbox_dropped_total") == "3", what="trim")

        assert outbox_ids(daemon.database) == queued[kept]
        dropped = [line for line in daemon.log_lines() if line["event"] == "outbox.events_dropped"]
        assert dropped[0]["policy"] == overflow
        metrics = daemon.request("GET", "/metrics").body.decode()
        assert "identity_connector_outbox_dropped_events_total 3.0" in metrics.splitlines()
    finally:
        daemon.stop()


def test_outbox_bound_with_invalid_dropped_count(tmp_path: Path, hq: FakeHq) -> None:
    daemon = synced_daemon(tmp_path, hq, "outbox_max_events = 5")
    try:
        hq.down()
        with sqlite3.connect(daemon.database) as connection:
            connection.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('outbox_dropped_total', 'x')"
            )
        scan_many(daemon, 8)
        wait_until(lambda: meta(daemon.database, "outbox_dropped_total") == "3", what="trim")

        assert len(outbox_ids(daemon.database)) == 5
        assert len(log_events(daemon, "outbox.dropped_count_invalid")) == 1
    finally:
        daemon.stop()


def test_gzip_uploads_reach_hq(tmp_path: Path, hq: FakeHq) -> None:
    daemon = synced_daemon(tmp_path, hq, extra="gzip_uploads = true")
    try:
        scan_many(daemon, 2)
        wait_until(lambda: len(hq.received.events) == 2, what="two gzip-compressed events")
    finally:
        daemon.stop()


def test_failing_uploads_keep_state_degraded(tmp_path: Path, hq: FakeHq) -> None:
    daemon = synced_daemon(tmp_path, hq)
    try:
        hq.control.raw_answers["events"] = RawAnswer(500, b"{}")
        scan_many(daemon, 2)
        wait_until(lambda: meta(daemon.database, "hq_state") == "degraded", what="degraded")
        pulls_before = hq.received.requests["changes"]

        # Pulls succeed every 200 ms meanwhile; the state must not go back to online.
        assert states_during(daemon, 1.5) == {"degraded"}
        assert hq.received.requests["changes"] > pulls_before
        assert len(log_events(daemon, "hq.degraded")) == 1

        del hq.control.raw_answers["events"]
        wait_until(lambda: not outbox_ids(daemon.database), what="the outbox to drain")
        wait_until(lambda: meta(daemon.database, "hq_state") == "online", what="online")
    finally:
        daemon.stop()


def test_upload_accepted_none_is_not_an_upload(tmp_path: Path, hq: FakeHq) -> None:
    hq.control.ack_mode = "none"
    daemon = synced_daemon(tmp_path, hq)
    try:
        scan_many(daemon, 2)
        wait_until(lambda: hq.received.event_posts >= 3, what="three upload attempts")

        assert meta(daemon.database, "last_upload_at") is None
        assert log_events(daemon, "sync.events_uploaded") == []
        failures = log_events(daemon, "sync.upload_failed")
        assert "HQ accepted none of the 2 events" in failures[0]["error"]
        assert meta(daemon.database, "hq_state") == "degraded"
    finally:
        daemon.stop()


def test_events_redirect_is_not_followed(tmp_path: Path, hq: FakeHq) -> None:
    daemon = synced_daemon(tmp_path, hq)
    try:
        moved = f"{hq.url}/v1/stores/STORE-001/moved-events"
        hq.control.raw_answers["events"] = RawAnswer(301, headers={"Location": moved})
        scan_many(daemon, 1)
        failure = wait_until(
            lambda: next(iter(log_events(daemon, "sync.upload_failed")), None),
            what="the failed upload",
        )

        assert f"HTTP 301 redirecting to {moved!r}" in failure["error"]
        assert "set [hq] url to the final address" in failure["error"]
        assert len(outbox_ids(daemon.database)) == 1
        assert hq.received.requests["moved-events"] == 0
    finally:
        daemon.stop()
