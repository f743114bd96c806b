"""Decisions through the real HTTP endpoint: types, reason codes, the EXIT rule, idempotency."""

from __future__ import annotations

import base64
import json
import sqlite3
import threading
import uuid
from pathlib import Path

import pytest

from tests.conftest import Daemon, make_daemon, now_rfc3339, scan_body


def _reason_of(daemon: Daemon, scan_event_id: str) -> str:
    connection = sqlite3.connect(daemon.database)
    try:
        row = connection.execute(
            "SELECT reason FROM decisions WHERE scan_event_id = ?", (scan_event_id.lower(),)
        ).fetchone()
    finally:
        connection.close()
    assert row is not None, f"no decision stored for {scan_event_id}"
    return row[0]


def test_contract_example_request(shared_daemon: Daemon) -> None:
    body = {
        "requestId": "3f2b1a60-7c1e-4d4b-9a61-0c8f5b2d9e11",
        "storeId": "STORE-001",
        "scanEvent": {
            "id": str(uuid.uuid4()),
            "timestamp": now_rfc3339(),
            "location": "ENTRY",
            "value": "string",
            "channel": "OPTICAL",
        },
    }
    reply = shared_daemon.post_json(body)
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("application/json")
    assert reply.json() == {"id": body["scanEvent"]["id"], "type": "SHOPPER", "action": "REJECT"}


@pytest.mark.parametrize(
    ("value", "expected_id", "expected_type"),
    [
        ("KEY-SHOPPER-5f1c2b", "shopper-1", "SHOPPER"),
        ("KEY-ASSOCIATE-8e2d11", "associate-1", "ASSOCIATE"),
        ("KEY-CASH-33aa90", "cash-1", "CASH"),
        ("KEY-LOYALTY-71bc04", "loyalty-1", "LOYALTY"),
    ],
)
def test_accept_each_type(
    shared_daemon: Daemon, value: str, expected_id: str, expected_type: str
) -> None:
    reply = shared_daemon.scan(value)
    assert reply.status == 200
    assert reply.json() == {"id": expected_id, "type": expected_type, "action": "ACCEPT"}


REJECT_CASES = [
    # (case, value, location, channel, timestamp offset in s, reason, id in response)
    ("unknown", "NO-SUCH-KEY-000", "ENTRY", "OPTICAL", 0, "UNKNOWN_KEY", None),
    ("revoked", "KEY-REVOKED-0d9e77", "ENTRY", "OPTICAL", 0, "REVOKED", "shopper-revoked"),
    ("suspended", "KEY-SUSPENDED-4c4c12", "ENTRY", "OPTICAL", 0, "SUSPENDED", "shopper-suspended"),
    (
        "not yet valid",
        "KEY-FUTURE-a1b2c3",
        "ENTRY",
        "OPTICAL",
        0,
        "NOT_YET_VALID",
        "shopper-future",
    ),
    ("expired", "KEY-EXPIRED-e5e5e5", "ENTRY", "OPTICAL", 0, "EXPIRED", "shopper-expired"),
    (
        "other store",
        "KEY-OTHERSTORE-909090",
        "ENTRY",
        "OPTICAL",
        0,
        "STORE_NOT_ALLOWED",
        "shopper-other",
    ),
    (
        "location",
        "KEY-ENTRYONLY-123abc",
        "MANUAL_IN_STORE",
        "OPTICAL",
        0,
        "LOCATION_NOT_ALLOWED",
        "shopper-entry",
    ),
    (
        "channel",
        "KEY-OPTICAL-456def",
        "ENTRY",
        "RADIO",
        0,
        "CHANNEL_NOT_ALLOWED",
        "shopper-optical",
    ),
    ("stale scan", "KEY-SHOPPER-5f1c2b", "ENTRY", "OPTICAL", -301, "SCAN_STALE", "shopper-1"),
    ("future scan", "KEY-SHOPPER-5f1c2b", "ENTRY", "OPTICAL", 120, "SCAN_FROM_FUTURE", "shopper-1"),
    ("exit revoked", "KEY-REVOKED-0d9e77", "EXIT", "OPTICAL", 0, "REVOKED", "shopper-revoked"),
    ("exit unknown", "NO-SUCH-KEY-001", "EXIT", "OPTICAL", 0, "UNKNOWN_KEY", None),
    (
        "exit suspended in other store",
        "KEY-SUSPOTHER-777aaa",
        "EXIT",
        "OPTICAL",
        0,
        "SUSPENDED",
        "shopper-susp-other",
    ),
]


@pytest.mark.parametrize(
    ("value", "location", "channel", "offset", "reason", "expected_id"),
    [case[1:] for case in REJECT_CASES],
    ids=[case[0] for case in REJECT_CASES],
)
def test_reject_reasons(
    shared_daemon: Daemon,
    value: str,
    location: str,
    channel: str,
    offset: int,
    reason: str,
    expected_id: str | None,
) -> None:
    body = scan_body(value, location=location, channel=channel, timestamp=now_rfc3339(offset))
    reply = shared_daemon.post_json(body)
    scan_id = body["scanEvent"]["id"]
    assert reply.status == 200
    assert reply.json()["action"] == "REJECT"
    assert reply.json()["id"] == (expected_id or scan_id)
    assert _reason_of(shared_daemon, scan_id) == reason
    assert reason not in reply.body.decode()


@pytest.mark.parametrize(
    ("value", "overridden"),
    [("KEY-SUSPENDED-4c4c12", "SUSPENDED"), ("KEY-EXPIRED-e5e5e5", "EXPIRED")],
)
def test_exit_lets_known_identity_out(shared_daemon: Daemon, value: str, overridden: str) -> None:
    body = scan_body(value, location="EXIT")
    reply = shared_daemon.post_json(body)
    assert reply.json()["action"] == "ACCEPT"
    assert _reason_of(shared_daemon, body["scanEvent"]["id"]) == "EXIT_OVERRIDE"
    event = _outbox_event(shared_daemon, body["scanEvent"]["id"])
    assert event["overriddenReasons"] == [overridden]


def _outbox_event(daemon: Daemon, scan_event_id: str) -> dict:
    connection = sqlite3.connect(daemon.database)
    try:
        for (body,) in connection.execute("SELECT body FROM outbox ORDER BY seq"):
            event = json.loads(body)
            if event["scanEventId"] == scan_event_id:
                return event
    finally:
        connection.close()
    raise AssertionError(f"no outbox event for {scan_event_id}")


def test_outbox_event_fields(shared_daemon: Daemon) -> None:
    body = scan_body("KEY-CASH-33aa90", location="MANUAL_IN_STORE")
    shared_daemon.post_json(body)
    event = _outbox_event(shared_daemon, body["scanEvent"]["id"])
    assert event["requestId"] == body["requestId"]
    assert event["storeId"] == "STORE-001"
    assert event["identityId"] == "cash-1"
    assert event["reason"] == "ACCEPTED"
    assert event["source"] == "gateway"
    assert len(event["keyFingerprint"]) == 12
    assert "KEY-CASH-33aa90" not in json.dumps(event)


@pytest.mark.parametrize(
    ("value", "channel"),
    [
        ("04A23B1C5D6E80", "RADIO"),
        ("04:a2:3b:1c:5d:6e:80", "CONTACT"),
        ("04 A2 3B 1C 5D 6E 80\r\n", "RADIO"),
    ],
)
def test_card_uid_forms_match(shared_daemon: Daemon, value: str, channel: str) -> None:
    reply = shared_daemon.scan(value, channel=channel)
    assert reply.json() == {"id": "associate-1", "type": "ASSOCIATE", "action": "ACCEPT"}


def test_scanner_suffix_stripped(shared_daemon: Daemon) -> None:
    reply = shared_daemon.scan("  KEY-SHOPPER-5f1c2b\r\n")
    assert reply.json()["action"] == "ACCEPT"


def test_base64_value_auto(shared_daemon: Daemon) -> None:
    encoded = base64.b64encode(b"KEY-LOYALTY-71bc04").decode()
    reply = shared_daemon.scan(encoded)
    assert reply.json() == {"id": "loyalty-1", "type": "LOYALTY", "action": "ACCEPT"}


@pytest.mark.parametrize(
    ("encoding", "value", "action"),
    [
        ("raw", base64.b64encode(b"KEY-LOYALTY-71bc04").decode(), "REJECT"),
        ("raw", "KEY-LOYALTY-71bc04", "ACCEPT"),
        ("base64", base64.b64encode(b"KEY-LOYALTY-71bc04").decode(), "ACCEPT"),
        ("base64", "KEY-LOYALTY-71bc04", "REJECT"),
    ],
)
def test_value_encoding_setting(tmp_path: Path, encoding: str, value: str, action: str) -> None:
    instance = make_daemon(tmp_path, f'[policy]\nvalue_encoding = "{encoding}"\n')
    instance.start()
    try:
        assert instance.scan(value).json()["action"] == action
    finally:
        instance.stop()


def test_stale_cache_accepts_only_associates(tmp_path: Path) -> None:
    # HQ is configured but was never pulled, so the cache counts as stale.
    instance = make_daemon(tmp_path, '[hq]\nurl = "http://127.0.0.1:9"\npull_interval = "1h"\n')
    instance.start()
    try:
        shopper = scan_body("KEY-SHOPPER-5f1c2b")
        assert instance.post_json(shopper).json()["action"] == "REJECT"
        assert _reason_of(instance, shopper["scanEvent"]["id"]) == "CACHE_STALE"
        assert instance.scan("KEY-ASSOCIATE-8e2d11").json()["action"] == "ACCEPT"
        assert instance.scan("KEY-SHOPPER-5f1c2b", location="EXIT").json()["action"] == "ACCEPT"
        assert instance.request("GET", "/readyz").json()["cache"] == "stale"
    finally:
        instance.stop()


def test_exit_override_configurable(tmp_path: Path) -> None:
    instance = make_daemon(tmp_path, "[policy]\nexit_override = []\n")
    instance.start()
    try:
        reply = instance.scan("KEY-SUSPENDED-4c4c12", location="EXIT")
        assert reply.json()["action"] == "REJECT"
    finally:
        instance.stop()


# Idempotency


def test_repeat_returns_identical_bytes(shared_daemon: Daemon) -> None:
    body = scan_body("KEY-SHOPPER-5f1c2b")
    first = shared_daemon.post_json(body)
    body["requestId"] = str(uuid.uuid4())
    second = shared_daemon.post_json(body)
    assert second.status == 200
    assert second.body == first.body


def test_repeat_of_stale_scan_replays_decision(shared_daemon: Daemon) -> None:
    body = scan_body("KEY-ASSOCIATE-8e2d11")
    first = shared_daemon.post_json(body)
    body["scanEvent"]["timestamp"] = now_rfc3339(-3600)
    second = shared_daemon.post_json(body)
    assert first.json()["action"] == "ACCEPT"
    assert second.body == first.body


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("storeId", "STORE-002"),
        ("location", "EXIT"),
        ("channel", "RADIO"),
        ("value", "KEY-CASH-33aa90"),
    ],
)
def test_reused_id_with_other_payload_is_422(shared_daemon: Daemon, field: str, value: str) -> None:
    body = scan_body("KEY-SHOPPER-5f1c2b")
    assert shared_daemon.post_json(body).status == 200
    if field == "storeId":
        body["storeId"] = value
    else:
        body["scanEvent"][field] = value
    reply = shared_daemon.post_json(body)
    assert reply.status == 422
    assert reply.headers["Content-Type"] == "application/problem+json"
    assert reply.json()["type"].endswith("idempotency-conflict")


def test_repeat_after_restart(daemon: Daemon) -> None:
    body = scan_body("KEY-LOYALTY-71bc04")
    first = daemon.post_json(body)
    daemon.restart()
    second = daemon.post_json(body)
    assert second.body == first.body


def test_concurrent_duplicates_decided_once(daemon: Daemon) -> None:
    body = scan_body("KEY-SHOPPER-5f1c2b")
    replies = []
    barrier = threading.Barrier(8)

    def send() -> None:
        barrier.wait()
        replies.append(daemon.post_json(body))

    threads = [threading.Thread(target=send) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert {reply.status for reply in replies} == {200}
    assert len({reply.body for reply in replies}) == 1
    connection = sqlite3.connect(daemon.database)
    try:
        outbox = connection.execute("SELECT count(*) FROM outbox").fetchone()[0]
    finally:
        connection.close()
    assert outbox == 1
    decided = [line for line in daemon.log_lines() if line.get("event") == "scan.decided"]
    assert len(decided) == 1


def test_decided_log_line_fields(daemon: Daemon) -> None:
    body = scan_body("KEY-ASSOCIATE-8e2d11", location="MANUAL_IN_STORE")
    daemon.post_json(body)
    line = next(x for x in daemon.log_lines() if x.get("event") == "scan.decided")
    expected = {
        "request_id": body["requestId"],
        "scan_event_id": body["scanEvent"]["id"],
        "store_id": "STORE-001",
        "location": "MANUAL_IN_STORE",
        "channel": "OPTICAL",
        "identity_id": "associate-1",
        "type": "ASSOCIATE",
        "action": "ACCEPT",
        "reason": "ACCEPTED",
    }
    for key, value in expected.items():
        assert line[key] == value, key
    assert isinstance(line["latency_ms"], float)
    assert len(line["key_fingerprint"]) == 12


@pytest.mark.parametrize(
    ("offset_seconds", "reason"), [(-3600, "SCAN_STALE"), (600, "SCAN_FROM_FUTURE")]
)
def test_exit_override_of_scan_time(tmp_path: Path, offset_seconds: int, reason: str) -> None:
    instance = make_daemon(tmp_path, f'[policy]\nexit_override = ["{reason}"]\n')
    instance.start()
    try:
        timestamp = now_rfc3339(offset_seconds)
        at_exit = scan_body("KEY-SHOPPER-5f1c2b", location="EXIT", timestamp=timestamp)
        at_entry = scan_body("KEY-SHOPPER-5f1c2b", timestamp=timestamp)
        exit_action = instance.post_json(at_exit).json()["action"]
        entry_action = instance.post_json(at_entry).json()["action"]
        entry_reason = _reason_of(instance, at_entry["scanEvent"]["id"])
    finally:
        instance.stop()

    assert exit_action == "ACCEPT"
    assert entry_action == "REJECT"
    assert entry_reason == reason
