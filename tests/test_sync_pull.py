"""Pull side of the HQ sync against a real daemon and the fake HQ on loopback."""

from __future__ import annotations

import itertools
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon.store import open_reader
from tests.conftest import SAMPLE_RECORDS, Daemon, make_daemon, run_cli
from tests.fakehq import (
    FakeHq,
    RawAnswer,
    hq_config,
    local_versions,
    log_events,
    make_records,
    meta,
    query,
    states_during,
    versions_of,
    wait_until,
)


@pytest.fixture
def hq() -> Iterator[FakeHq]:
    server = FakeHq().start()
    server.put(*SAMPLE_RECORDS)
    yield server
    server.close()


def start_daemon(
    tmp_path: Path, hq: FakeHq, extra: str = "", policy: str = "", records: list | None = None
) -> Daemon:
    directory = tmp_path / "daemon"
    daemon = make_daemon(
        directory,
        hq_config(hq, directory, extra, policy),
        records=[] if records is None else records,
    )
    daemon.start()
    return daemon


def caught_up(daemon: Daemon, hq: FakeHq) -> bool:
    return meta(daemon.database, "cursor") == hq.cursor()


def decided(daemon: Daemon, key: str, **kwargs: str) -> str:
    reply = daemon.scan(key, **kwargs)
    assert reply.status == 200, reply.body
    return reply.json()["action"]


def reasons(daemon: Daemon) -> list[str]:
    return [line["reason"] for line in daemon.log_lines() if line["event"] == "scan.decided"]


@pytest.fixture
def synced(tmp_path: Path, hq: FakeHq) -> Iterator[Daemon]:
    daemon = start_daemon(tmp_path, hq)
    wait_until(lambda: caught_up(daemon, hq), what="the initial snapshot")
    yield daemon
    if daemon.process is not None:
        daemon.stop()


def test_initial_snapshot_fills_cache(synced: Daemon, hq: FakeHq) -> None:
    assert local_versions(synced.database) == versions_of(hq.records)
    assert hq.received.requests["snapshot"] == 1
    assert meta(synced.database, "last_pull_at") is not None
    assert decided(synced, "KEY-SHOPPER-5f1c2b") == "ACCEPT"


def test_snapshot_request_carries_bearer_token(synced: Daemon, hq: FakeHq) -> None:
    assert hq.received.authorization == {"Bearer fake-hq-token-3c9d"}
    logged = synced.log_path.read_text(encoding="utf-8")
    assert "fake-hq-token-3c9d" not in logged


def test_incremental_put_adds_identity(synced: Daemon, hq: FakeHq) -> None:
    hq.put(
        {
            "credentialId": "c-new",
            "key": "KEY-NEW-77e1",
            "id": "shopper-new",
            "type": "SHOPPER",
            "status": "ACTIVE",
            "stores": ["STORE-001"],
            "version": 1,
        }
    )
    wait_until(lambda: caught_up(synced, hq), what="the PUT")

    assert local_versions(synced.database)["c-new"] == 1
    assert hq.received.requests["snapshot"] == 1


def test_revocation_reaches_decision_within_one_pull(synced: Daemon, hq: FakeHq) -> None:
    assert decided(synced, "KEY-SHOPPER-5f1c2b") == "ACCEPT"
    revoked = {**SAMPLE_RECORDS[0], "status": "REVOKED", "version": 7}
    changed_at = time.monotonic()
    hq.put(revoked)

    wait_until(lambda: caught_up(synced, hq), timeout=10, what="the revocation")
    elapsed = time.monotonic() - changed_at

    assert decided(synced, "KEY-SHOPPER-5f1c2b") == "REJECT"
    assert reasons(synced)[-1] == "REVOKED"
    # pull_interval is 200 ms; a loaded machine gets generous slack.
    assert elapsed < 5.0


def test_remove_makes_key_unknown(synced: Daemon, hq: FakeHq) -> None:
    hq.remove("c-cash")
    wait_until(lambda: caught_up(synced, hq), what="the REMOVE")

    assert "c-cash" not in local_versions(synced.database)
    assert decided(synced, "KEY-CASH-33aa90") == "REJECT"
    assert reasons(synced)[-1] == "UNKNOWN_KEY"


def test_put_remove_put_in_one_page_keeps_last(synced: Daemon, hq: FakeHq) -> None:
    hq.put({**SAMPLE_RECORDS[2], "version": 2})
    hq.remove("c-cash")
    hq.put({**SAMPLE_RECORDS[2], "version": 3})
    wait_until(lambda: caught_up(synced, hq), what="the three changes")

    assert local_versions(synced.database)["c-cash"] == 3


def test_invalid_record_in_feed_is_skipped(synced: Daemon, hq: FakeHq) -> None:
    hq.put({"credentialId": "c-bad", "key": "KEY-BAD-1", "type": "NOBODY"})
    hq.put({**SAMPLE_RECORDS[3], "version": 4})
    wait_until(lambda: caught_up(synced, hq), what="the page with an invalid record")

    versions = local_versions(synced.database)
    assert "c-bad" not in versions
    assert versions["c-loyalty"] == 4
    rejected = [line for line in synced.log_lines() if line["event"] == "sync.record_rejected"]
    assert rejected[0]["credential_id"] == "c-bad"


def test_cursor_expired_logs_rejected_cursor(tmp_path: Path, hq: FakeHq) -> None:
    daemon = start_daemon(tmp_path, hq, extra="pull_batch_size = 2")
    try:
        # The initial pull ends with this comparison. Changes made before its end go to the
        # changes call that follows the snapshot, and a 410 there is reported as HQ's fault.
        wait_until(lambda: log_events(daemon, "sync.reconciled"), what="the initial pull")
        start = meta(daemon.database, "cursor")
        assert start is not None
        # The fake HQ's cursors are "<epoch>.<position>". The pull gets a page of two
        # changes, and HQ responds 410 to the cursor of that page, not to the first one.
        epoch, position = start.split(".")
        rejected = f"{epoch}.{int(position) + 2}"
        hq.control.expired_cursors = {rejected}
        hq.put(*make_records(4))
        wait_until(lambda: caught_up(daemon, hq), what="the rebuild after 410")
    finally:
        daemon.stop()

    (expired,) = log_events(daemon, "sync.cursor_expired")
    assert expired["cursor"] == rejected
    assert hq.received.requests["snapshot"] == 2


def test_cursor_expiry_mid_run_rebuilds(synced: Daemon, hq: FakeHq) -> None:
    hq.put({**SAMPLE_RECORDS[1], "version": 9})
    hq.expire_cursors()
    wait_until(lambda: caught_up(synced, hq), what="the rebuild after 410")

    events = [line["event"] for line in synced.log_lines()]
    assert "sync.cursor_expired" in events
    assert hq.received.requests["snapshot"] == 2
    assert local_versions(synced.database) == versions_of(hq.records)


def test_digest_mismatch_triggers_rebuild(tmp_path: Path, hq: FakeHq) -> None:
    daemon = start_daemon(tmp_path, hq, extra='reconcile_interval = "300ms"')
    try:
        wait_until(lambda: caught_up(daemon, hq), what="the initial snapshot")
        hq.change_silently({**SAMPLE_RECORDS[0], "status": "REVOKED", "version": 11})

        wait_until(
            lambda: local_versions(daemon.database).get("c-shopper") == 11,
            what="the rebuild after the digest mismatch",
        )
        mismatches = [
            line for line in daemon.log_lines() if line["event"] == "sync.digest_mismatch"
        ]
        assert mismatches[0]["local_count"] == len(SAMPLE_RECORDS)
        assert mismatches[0]["hq_count"] == len(SAMPLE_RECORDS)
        assert hq.received.requests["snapshot"] == 2
    finally:
        daemon.stop()


def test_mismatch_after_mismatch_rebuild_logged(tmp_path: Path, hq: FakeHq) -> None:
    # HQ's digest disagrees with its own snapshot, so each rebuild leaves a mismatch, and
    # the check after each rebuild must log it at warning level.
    daemon = start_daemon(tmp_path, hq, extra='reconcile_interval = "300ms"')

    def after_rebuild() -> list[dict]:
        return [
            line
            for line in log_events(daemon, "sync.digest_mismatch")
            if line["level"] == "warning" and line["action"] == "none until the next reconciliation"
        ]

    try:
        wait_until(lambda: caught_up(daemon, hq), what="the initial snapshot")
        hq.control.digest_salt = "disagree"
        # The first may come from the check after the initial rebuild, when the salt was set
        # before it ran. The second comes after a rebuild that a mismatch started.
        wait_until(lambda: len(after_rebuild()) >= 2, what="two checks after rebuilds")
        reasons = [line["reason"] for line in log_events(daemon, "sync.rebuilt")]
    finally:
        daemon.stop()
    assert "digest mismatch" in reasons


def test_snapshot_shared_key_goes_to_later_record(tmp_path: Path, hq: FakeHq) -> None:
    # The snapshot is sorted by credential id, so "c-takeover" follows "c-shopper".
    hq.put({**SAMPLE_RECORDS[0], "credentialId": "c-takeover", "id": "shopper-takeover"})
    daemon = start_daemon(tmp_path, hq)
    try:
        wait_until(lambda: caught_up(daemon, hq), what="the initial snapshot")

        versions = local_versions(daemon.database)
        assert "c-shopper" not in versions
        assert versions["c-takeover"] == 1
        reply = daemon.scan("KEY-SHOPPER-5f1c2b")
        assert reply.json()["id"] == "shopper-takeover"
        indexed = [line for line in daemon.log_lines() if line["event"] == "sync.staging_indexed"]
        assert indexed[0]["duplicate_keys"] == 1
    finally:
        daemon.stop()


def test_feed_put_takes_over_key(synced: Daemon, hq: FakeHq) -> None:
    hq.put({**SAMPLE_RECORDS[2], "credentialId": "c-cash-reissued", "id": "cash-2"})
    wait_until(lambda: caught_up(synced, hq), what="the PUT with a known key")

    versions = local_versions(synced.database)
    assert "c-cash" not in versions
    assert versions["c-cash-reissued"] == 1
    assert synced.scan("KEY-CASH-33aa90").json()["id"] == "cash-2"


def test_initial_snapshot_removes_imported_extras(tmp_path: Path, hq: FakeHq) -> None:
    extra_record = {
        "credentialId": "c-local-only",
        "key": "KEY-LOCAL-ONLY-55",
        "id": "local",
        "type": "SHOPPER",
        "status": "ACTIVE",
        "stores": ["STORE-001"],
        "version": 1,
    }
    daemon = start_daemon(tmp_path, hq, records=[extra_record])
    try:
        wait_until(lambda: caught_up(daemon, hq), what="the initial snapshot")
        assert local_versions(daemon.database) == versions_of(hq.records)
    finally:
        daemon.stop()


@pytest.mark.parametrize(
    ("mode", "logged"),
    [
        ("cut", "snapshot response body from /v1/stores/STORE-001/identities/snapshot ended early"),
        ("invalid", "is not valid JSON"),
    ],
)
def test_broken_snapshot_keeps_old_cache(
    tmp_path: Path, hq: FakeHq, mode: str, logged: str
) -> None:
    hq.control.snapshot_mode = mode  # type: ignore[assignment]
    daemon = start_daemon(tmp_path, hq, records=SAMPLE_RECORDS[:3])
    try:
        wait_until(lambda: hq.received.requests["snapshot"] >= 2, what="a retried snapshot")
        failures = [line for line in daemon.log_lines() if line["event"] == "sync.pull_failed"]
        assert logged in failures[0]["error"]
        assert meta(daemon.database, "cursor") is None
        assert sorted(local_versions(daemon.database)) == ["c-associate", "c-cash", "c-shopper"]
        # Each retry creates a staging table again; between two attempts there is none.
        wait_until(
            lambda: (
                not query(
                    daemon.database, "SELECT name FROM sqlite_master WHERE name LIKE '%stag%'"
                )
            ),
            what="the failed attempt's staging table to be dropped",
        )

        hq.control.snapshot_mode = "ok"
        wait_until(lambda: caught_up(daemon, hq), what="the repaired snapshot")
        assert local_versions(daemon.database) == versions_of(hq.records)
    finally:
        daemon.stop()


def test_stale_cache_policy_follows_pulls(tmp_path: Path, hq: FakeHq) -> None:
    daemon = start_daemon(tmp_path, hq, policy='max_cache_age = "2s"')
    try:
        wait_until(lambda: caught_up(daemon, hq), what="the initial snapshot")
        assert decided(daemon, "KEY-SHOPPER-5f1c2b") == "ACCEPT"

        hq.down()
        wait_until(
            lambda: decided(daemon, "KEY-SHOPPER-5f1c2b") == "REJECT",
            timeout=15,
            what="the stale-cache rule",
        )
        assert reasons(daemon)[-1] == "CACHE_STALE"
        assert decided(daemon, "KEY-ASSOCIATE-8e2d11") == "ACCEPT"

        hq.up()
        wait_until(
            lambda: decided(daemon, "KEY-SHOPPER-5f1c2b") == "ACCEPT",
            timeout=15,
            what="the next successful pull",
        )
    finally:
        daemon.stop()


def test_outage_logs_once_each_way(tmp_path: Path, hq: FakeHq) -> None:
    daemon = start_daemon(tmp_path, hq)
    try:
        wait_until(lambda: caught_up(daemon, hq), what="the initial snapshot")
        hq.down()
        wait_until(lambda: meta(daemon.database, "hq_state") == "offline", what="offline")
        time.sleep(1.0)
        hq.up()
        wait_until(lambda: meta(daemon.database, "hq_state") == "online", what="online")

        events = [line["event"] for line in daemon.log_lines()]
        assert events.count("hq.unavailable") == 1
        assert events.count("hq.available") == 2  # at start-up and after the outage
    finally:
        daemon.stop()


def test_rejecting_hq_at_start_logs_degraded_only(tmp_path: Path, hq: FakeHq) -> None:
    # HQ responds to every call with 401 from the start: its calls get a response, but no
    # attempt succeeds, so the first line about HQ is hq.degraded, not hq.available.
    hq.control.fail_status = 401
    daemon = start_daemon(tmp_path, hq)
    try:
        wait_until(lambda: log_events(daemon, "hq.degraded"), what="hq.degraded")
        hq.control.fail_status = None
        wait_until(lambda: log_events(daemon, "hq.available"), what="hq.available")

        states = ("hq.available", "hq.degraded", "hq.unavailable")
        events = [line["event"] for line in daemon.log_lines() if line["event"] in states]
        available = log_events(daemon, "hq.available")
        assert events[0] == "hq.degraded"
        assert available[0]["previous_state"] == "degraded"
    finally:
        daemon.stop()


def test_server_errors_degrade_then_recover(tmp_path: Path, hq: FakeHq) -> None:
    daemon = start_daemon(tmp_path, hq)
    try:
        wait_until(lambda: caught_up(daemon, hq), what="the initial snapshot")
        hq.control.fail_status = 500
        wait_until(lambda: meta(daemon.database, "hq_state") == "degraded", what="degraded")
        hq.control.fail_status = None
        hq.put({**SAMPLE_RECORDS[0], "version": 3})
        wait_until(lambda: caught_up(daemon, hq), what="recovery")

        events = [line["event"] for line in daemon.log_lines()]
        assert events.count("hq.degraded") == 1
        assert "hq.unavailable" not in events
    finally:
        daemon.stop()


def reconciled_count(daemon: Daemon) -> int:
    return sum(line["event"] == "sync.reconciled" for line in daemon.log_lines())


@pytest.mark.parametrize(
    "odd_record",
    [
        {"credentialId": "c-bad", "key": "KEY-BAD-0a1b", "type": "BOGUS", "version": 2},
        # Takes c-shopper's key: the snapshot is sorted by credential id, so it comes later.
        {**SAMPLE_RECORDS[0], "credentialId": "c-takeover", "id": "shopper-takeover"},
        {**SAMPLE_RECORDS[0], "credentialId": "c-nul\x00x", "key": "KEY-NUL-0c0d", "version": 2},
        {**SAMPLE_RECORDS[0], "credentialId": "c-" + "7" * 298, "key": "KEY-LONG-0e0f"},
    ],
    ids=["invalid", "key-takeover", "nul-in-credential-id", "credential-id-too-long"],
)
def test_skipped_snapshot_record_keeps_digest_matching(
    tmp_path: Path, hq: FakeHq, odd_record: dict
) -> None:
    hq.put(odd_record)
    daemon = start_daemon(tmp_path, hq, extra='reconcile_interval = "300ms"')
    try:
        wait_until(lambda: caught_up(daemon, hq), what="the initial snapshot")
        wait_until(lambda: reconciled_count(daemon) >= 3, what="three reconciliations")

        events = [line["event"] for line in daemon.log_lines()]
        assert "sync.digest_mismatch" not in events
        assert hq.received.requests["snapshot"] == 1
        status = run_cli("status", "--config", str(daemon.config), "--json")
        assert json.loads(status.stdout)["skippedRecords"] == 1
    finally:
        daemon.stop()


def test_invalid_put_removes_earlier_version(tmp_path: Path, hq: FakeHq) -> None:
    daemon = start_daemon(tmp_path, hq, extra='reconcile_interval = "300ms"')
    try:
        wait_until(lambda: caught_up(daemon, hq), what="the initial snapshot")
        hq.put({**SAMPLE_RECORDS[3], "type": "BOGUS", "version": 5})
        wait_until(lambda: caught_up(daemon, hq), what="the invalid PUT")
        after_put = reconciled_count(daemon)
        wait_until(lambda: reconciled_count(daemon) >= after_put + 2, what="reconciliations")

        assert "c-loyalty" not in local_versions(daemon.database)
        events = [line["event"] for line in daemon.log_lines()]
        assert "sync.digest_mismatch" not in events
        assert hq.received.requests["snapshot"] == 1

        hq.put({**SAMPLE_RECORDS[3], "version": 6})
        wait_until(lambda: caught_up(daemon, hq), what="the repaired record")
        assert local_versions(daemon.database)["c-loyalty"] == 6
        assert query(daemon.database, "SELECT * FROM skipped_records") == []
    finally:
        daemon.stop()


def test_metrics_tell_last_pull_from_cursor_change(synced: Daemon, hq: FakeHq) -> None:
    # A pull that finds nothing new keeps the cursor: the two ages must then differ, as
    # they do in `status`.
    synced.stop()
    connection = open_reader(synced.database, 5.0)
    with connection:
        connection.execute(
            "UPDATE cache_meta SET value = ? WHERE key = 'cursor_changed_at'",
            (repr(time.time() - 5000),),
        )
    connection.close()
    restarted_at = time.time()
    synced.start()
    wait_until(
        lambda: float(meta(synced.database, "last_pull_at") or 0) > restarted_at,
        what="a pull after the restart",
    )
    reply = synced.request("GET", "/metrics")
    families = {f.name: f for f in text_string_to_metric_families(reply.body.decode())}
    last_pull_age = families["identity_connector_last_pull_age_seconds"].samples[0].value
    cursor_age = families["identity_connector_cursor_age_seconds"].samples[0].value
    assert 0 <= last_pull_age < 60
    assert 4900 < cursor_age < 5100


def test_feed_key_takeover_keeps_digest_matching(tmp_path: Path, hq: FakeHq) -> None:
    daemon = start_daemon(tmp_path, hq, extra='reconcile_interval = "300ms"')
    try:
        wait_until(lambda: caught_up(daemon, hq), what="the initial snapshot")
        # HQ reissued the card to a new credential but kept the old one.
        hq.put({**SAMPLE_RECORDS[2], "credentialId": "c-cash-reissued", "id": "cash-2"})
        wait_until(lambda: caught_up(daemon, hq), what="the PUT with a known key")
        after_put = reconciled_count(daemon)
        wait_until(lambda: reconciled_count(daemon) >= after_put + 2, what="reconciliations")

        events = [line["event"] for line in daemon.log_lines()]
        assert "sync.digest_mismatch" not in events
        assert "sync.key_taken_over" in events
        assert hq.received.requests["snapshot"] == 1
        skipped = query(daemon.database, "SELECT credential_id, version FROM skipped_records")
        assert skipped == [("c-cash", 1)]
    finally:
        daemon.stop()


def test_reload_pulls_at_once(tmp_path: Path, hq: FakeHq) -> None:
    directory = tmp_path / "daemon"
    config = hq_config(hq, directory).replace('pull_interval = "200ms"', 'pull_interval = "1h"')
    daemon = make_daemon(directory, config, records=[])
    daemon.start()
    try:
        wait_until(lambda: caught_up(daemon, hq), what="the initial snapshot")
        hq.put({**SAMPLE_RECORDS[0], "version": 2})
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGHUP)
        wait_until(lambda: caught_up(daemon, hq), what="the pull after the reload")
    finally:
        daemon.stop()

    assert local_versions(daemon.database)["c-shopper"] == 2


def test_page_with_same_cursor_is_not_followed(synced: Daemon, hq: FakeHq) -> None:
    hq.control.stuck_cursor = True
    hq.put({**SAMPLE_RECORDS[0], "version": 2})
    wait_until(
        lambda: any(line["event"] == "sync.pull_failed" for line in synced.log_lines()),
        what="the failed pull",
    )
    before = hq.received.requests["changes"]
    time.sleep(1.0)
    requests_in_a_second = hq.received.requests["changes"] - before

    failure = next(line for line in synced.log_lines() if line["event"] == "sync.pull_failed")
    assert "returns the cursor it was asked for" in failure["error"]
    # Retried with backoff (100-400 ms in these tests), not fetched in a tight loop.
    assert requests_in_a_second <= 12
    assert decided(synced, "KEY-SHOPPER-5f1c2b") == "ACCEPT"
    assert meta(synced.database, "hq_state") == "degraded"


@pytest.mark.parametrize("taken_in", ["feed", "snapshot"])
def test_credential_comes_back_when_key_taker_goes(
    tmp_path: Path, hq: FakeHq, taken_in: str
) -> None:
    taker = {**SAMPLE_RECORDS[2], "credentialId": "c-cash-temp", "id": "cash-temp"}
    if taken_in == "snapshot":
        hq.put(taker)
    daemon = start_daemon(tmp_path, hq, extra='reconcile_interval = "300ms"')
    try:
        wait_until(lambda: caught_up(daemon, hq), what="the initial snapshot")
        if taken_in == "feed":
            hq.put(taker)
            wait_until(lambda: caught_up(daemon, hq), what="the PUT that takes the key")
        assert "c-cash" not in local_versions(daemon.database)
        hq.remove("c-cash-temp")

        # HQ has c-cash with its key again: the digests differ and a rebuild brings it back.
        wait_until(
            lambda: local_versions(daemon.database) == versions_of(hq.records),
            what="c-cash back in the cache",
        )
        assert decided(daemon, "KEY-CASH-33aa90") == "ACCEPT"
    finally:
        daemon.stop()


def test_hq_online_while_snapshot_streams(tmp_path: Path, hq: FakeHq) -> None:
    # 40 chunks of 500 lines, 0.1 s apart: the stream lasts about 4 s.
    hq.put(*make_records(20000))
    hq.control.snapshot_line_delay = 0.1
    daemon = start_daemon(tmp_path, hq)
    try:
        wait_until(lambda: meta(daemon.database, "hq_state") == "online", what="online")
        events = [line["event"] for line in daemon.log_lines()]
        wait_until(lambda: caught_up(daemon, hq), what="the end of the rebuild")
    finally:
        daemon.stop()

    assert "sync.rebuild_started" in events
    assert "sync.rebuilt" not in events


def pull_failure(daemon: Daemon, text: str) -> dict:
    """Wait for a sync.pull_failed line whose error contains ``text``, and return it."""
    return wait_until(
        lambda: next(
            (line for line in log_events(daemon, "sync.pull_failed") if text in line["error"]),
            None,
        ),
        what=f"sync.pull_failed with {text!r}",
    )


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
def test_cut_page_body_is_retried(synced: Daemon, hq: FakeHq, framing: str) -> None:
    cursor = meta(synced.database, "cursor")
    hq.control.cut_framing = framing  # type: ignore[assignment]
    hq.control.cut_calls = {"changes"}
    hq.put({**SAMPLE_RECORDS[0], "version": 2})

    failure = pull_failure(synced, "response body")
    # aiohttp's own text ("TransferEncodingError: 400, message=...") reads like an HTTP 400
    # from HQ, and the request's query is left out.
    path = "/v1/stores/STORE-001/identities/changes"
    assert failure["error"] == f"HQ changes response body from {path} ended early or was malformed"
    assert meta(synced.database, "cursor") == cursor
    wait_until(lambda: meta(synced.database, "hq_state") == "degraded", what="degraded")

    hq.control.cut_calls = set()
    wait_until(lambda: caught_up(synced, hq), what="the retried pull")
    assert local_versions(synced.database)["c-shopper"] == 2


@pytest.mark.parametrize("trigger", ["cursor-expired", "digest-mismatch"])
def test_failed_rebuild_backs_off(tmp_path: Path, hq: FakeHq, trigger: str) -> None:
    daemon = start_daemon(tmp_path, hq, extra='reconcile_interval = "300ms"')
    try:
        wait_until(lambda: caught_up(daemon, hq), what="the initial snapshot")
        hq.control.snapshot_mode = "cut"
        if trigger == "cursor-expired":
            hq.expire_cursors()
        else:
            hq.change_silently({**SAMPLE_RECORDS[0], "version": 12})
        wait_until(lambda: hq.received.requests["snapshot"] >= 3, what="two failed rebuilds")
        available_before = len(log_events(daemon, "hq.available"))
        snapshots_before = hq.received.requests["snapshot"]

        states = states_during(daemon, 1.5)

        # Backoff is 100-400 ms in these tests; a tight loop made hundreds of attempts.
        assert hq.received.requests["snapshot"] - snapshots_before <= 10
        assert states == {"degraded"}
        assert len(log_events(daemon, "hq.available")) == available_before
        assert len(log_events(daemon, "hq.degraded")) == 1
    finally:
        daemon.stop()


def test_expired_snapshot_cursor_is_hq_fault(synced: Daemon, hq: FakeHq) -> None:
    hq.control.snapshot_cursor_expired = True
    hq.expire_cursors()

    failure = pull_failure(synced, "snapshot's own cursor")
    assert "HQ must keep the cursor of a new snapshot valid" in failure["error"]
    assert states_during(synced, 1.0) == {"degraded"}
    rebuilds = len(log_events(synced, "sync.rebuild_started"))
    assert rebuilds >= 1

    hq.control.snapshot_cursor_expired = False
    wait_until(lambda: caught_up(synced, hq), what="the rebuild with a valid cursor")
    wait_until(lambda: meta(synced.database, "hq_state") == "online", what="online")


def test_expired_page_cursor_after_rebuild(tmp_path: Path, hq: FakeHq) -> None:
    # 600 records make the snapshot pause after its first 500 lines, and four changes made
    # meanwhile give two pages of the feed that follows it.
    hq.put(*make_records(600))
    snapshot_cursor = f"{hq.epoch}.{len(hq.log)}"
    second_page_cursor = f"{hq.epoch}.{len(hq.log) + 2}"
    hq.control.snapshot_line_delay = 1.0
    hq.control.expired_cursors = {second_page_cursor}
    daemon = start_daemon(tmp_path, hq, extra="pull_batch_size = 2")
    try:
        wait_until(lambda: hq.received.snapshot_lines_sent >= 500, what="the snapshot's start")
        hq.put(*make_records(4, prefix="late"))

        failure = pull_failure(daemon, "its previous page had just returned")
    finally:
        daemon.stop()

    assert repr(second_page_cursor) in failure["error"]
    assert f"the snapshot's cursor was {snapshot_cursor!r}" in failure["error"]


def test_page_over_limit_is_rejected(tmp_path: Path, hq: FakeHq) -> None:
    daemon = start_daemon(tmp_path, hq, extra="pull_batch_size = 2")
    try:
        wait_until(lambda: caught_up(daemon, hq), what="the initial snapshot")
        cursor = meta(daemon.database, "cursor")
        hq.control.ignore_limit = True
        hq.put(*make_records(5))

        failure = pull_failure(daemon, "more than the limit=2")
        assert "has 5 changes" in failure["error"]
        assert meta(daemon.database, "cursor") == cursor
        wait_until(lambda: meta(daemon.database, "hq_state") == "degraded", what="degraded")
        assert log_events(daemon, "sync.batch_applied") == []
    finally:
        daemon.stop()


def test_empty_page_cursor_is_rejected(synced: Daemon, hq: FakeHq) -> None:
    cursor = meta(synced.database, "cursor")
    hq.control.empty_cursor = True
    hq.put({**SAMPLE_RECORDS[0], "version": 2})

    pull_failure(synced, "empty cursor")
    assert meta(synced.database, "cursor") == cursor
    wait_until(lambda: meta(synced.database, "hq_state") == "degraded", what="degraded")


def test_redirect_is_not_followed(synced: Daemon, hq: FakeHq) -> None:
    elsewhere = f"http://localhost:{hq.port}/v1/stores/STORE-001/identities/elsewhere"
    hq.control.raw_answers["changes"] = RawAnswer(307, headers={"Location": elsewhere})

    failure = pull_failure(synced, "redirecting to")
    assert elsewhere in failure["error"]
    assert "set [hq] url to the final address" in failure["error"]
    assert hq.received.requests["elsewhere"] == 0
    wait_until(lambda: meta(synced.database, "hq_state") == "degraded", what="degraded")


@pytest.mark.parametrize(
    ("retry_after", "backoff_max", "min_gap", "max_gap"),
    [("1", "3s", 0.9, 2.9), ("30", "400ms", 0.0, 1.5)],
    ids=["honoured", "capped-by-backoff-max"],
)
def test_retry_after_sets_retry_delay(
    tmp_path: Path,
    hq: FakeHq,
    retry_after: str,
    backoff_max: str,
    min_gap: float,
    max_gap: float,
) -> None:
    directory = tmp_path / "daemon"
    config = hq_config(hq, directory).replace(
        'backoff_max = "400ms"', f'backoff_max = "{backoff_max}"'
    )
    daemon = make_daemon(directory, config, records=[])
    daemon.start()
    try:
        wait_until(lambda: caught_up(daemon, hq), what="the initial snapshot")
        answer = RawAnswer(429, b"{}", {"Retry-After": retry_after})
        hq.control.raw_answers["changes"] = answer
        first = hq.received.requests["changes"]
        wait_until(lambda: hq.received.requests["changes"] >= first + 4, what="four retries")

        times = hq.received.request_times["changes"][first : first + 4]
        gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
        assert min(gaps) >= min_gap, gaps
        assert max(gaps) <= max_gap, gaps
    finally:
        daemon.stop()


@pytest.mark.parametrize(
    "case",
    ["count-mismatch", "html-page", "not-found", "empty-body"],
)
def test_pull_failure_messages(synced: Daemon, hq: FakeHq, case: str) -> None:
    if case == "count-mismatch":
        hq.control.snapshot_count = 3
        hq.expire_cursors()
        expected = [f"snapshot has {len(hq.records)} records, but its Identity-Count header"]
    elif case == "html-page":
        page = b"<html><head><title>Sign in</title></head><body>" + b"x" * 200 + b"</body>"
        headers = {"Content-Type": "text/html; charset=utf-8"}
        hq.control.raw_answers["changes"] = RawAnswer(200, page, headers)
        expected = ["Content-Type 'text/html; charset=utf-8'", "'<html><head><title>Sign in"]
    elif case == "not-found":
        hq.control.fail_status = 404
        expected = [f"HTTP 404 for {hq.url}/v1/stores/STORE-001/identities/changes; check"]
    else:
        # aiohttp's server (3.14) sends an empty body without a Content-Type header.
        hq.control.raw_answers["changes"] = RawAnswer(200)
        expected = ["HQ changes response is invalid: the body is empty (no Content-Type header)"]

    failure = pull_failure(synced, expected[0])
    for text in expected:
        assert text in failure["error"]
    assert "truncated" not in failure["error"]
    assert "x" * 81 not in failure["error"]


def test_empty_snapshot_warns(tmp_path: Path, hq: FakeHq) -> None:
    daemon = start_daemon(tmp_path, hq, records=SAMPLE_RECORDS)
    try:
        wait_until(lambda: caught_up(daemon, hq), what="the initial snapshot")
        hq.remove(*(record["credentialId"] for record in SAMPLE_RECORDS))
        hq.expire_cursors()
        wait_until(lambda: log_events(daemon, "sync.cache_emptied"), what="the warning")

        assert local_versions(daemon.database) == {}
        assert len(log_events(daemon, "sync.cache_emptied")) == 1
        assert log_events(daemon, "sync.cache_emptied")[0]["level"] == "warning"
    finally:
        daemon.stop()


def test_metrics_show_last_rebuild_age(synced: Daemon, hq: FakeHq) -> None:
    reply = synced.request("GET", "/metrics")
    families = {f.name: f for f in text_string_to_metric_families(reply.body.decode())}

    age = families["identity_connector_last_rebuild_age_seconds"].samples[0].value

    # The synced daemon rebuilt its cache from the snapshot at start, seconds ago.
    assert 0 <= age < 60


def test_metrics_show_last_comparison_and_clock(synced: Daemon, hq: FakeHq) -> None:
    # The comparison after the start's rebuild is saved at the end of that pull.
    wait_until(lambda: meta(synced.database, "last_reconcile_at"), what="the saved comparison")
    reply = synced.request("GET", "/metrics")
    families = {f.name: f for f in text_string_to_metric_families(reply.body.decode())}

    age = families["identity_connector_last_reconcile_age_seconds"].samples[0].value
    offset = families["identity_connector_hq_clock_offset_seconds"].samples[0].value
    uncertain = families["identity_connector_clock_uncertain"].samples[0].value

    assert 0 <= age < 60
    # The fake HQ shares this box's clock; its Date header has whole seconds.
    assert abs(offset) < 2
    assert uncertain == 0.0


def test_failing_rebuild_logged_once(synced: Daemon, hq: FakeHq) -> None:
    hq.control.snapshot_mode = "cut"
    hq.expire_cursors()
    wait_until(lambda: hq.received.requests["snapshot"] >= 7, what="six failed rebuilds")

    # Logged at their level: the rebuild at start, and once for the failing ones (twice when
    # a pull between the expiry and the first failure still succeeded). Each retry would add
    # a line of each without the once-until-success rule.
    assert len(log_events(synced, "sync.rebuild_started")) <= 3
    assert len(log_events(synced, "sync.cursor_expired")) <= 2
