"""Decisions survive `kill -9`: a response the gateway got is on disk and replays after restart.

The daemon sends a response only after the writer thread has committed the decision and its outbox
event, so killing the process right after the last response must lose neither.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.conftest import SAMPLE_RECORDS, Daemon, Reply, scan_body
from tests.helpers_store import count_rows, query_all

SCANS = 24
# Threads sending at once, so that several decisions share one group commit.
CONCURRENT_CLIENTS = 8


def scan_bodies() -> list[dict[str, Any]]:
    """Distinct scans that cover ACCEPT and REJECT, known and unknown keys."""
    bodies = []
    for number in range(SCANS):
        if number % 3 == 0:
            value = f"UNKNOWN-DURABLE-{number}"
        else:
            value = SAMPLE_RECORDS[number % len(SAMPLE_RECORDS)]["key"]
        location = "EXIT" if number % 4 == 0 else "ENTRY"
        bodies.append(scan_body(value, location=location))
    return bodies


def send_all(daemon: Daemon, bodies: list[dict[str, Any]], clients: int) -> list[Reply]:
    if clients == 1:
        return [daemon.post_json(body) for body in bodies]
    with ThreadPoolExecutor(max_workers=clients) as pool:
        return list(pool.map(daemon.post_json, bodies))


@pytest.mark.parametrize("clients", [1, CONCURRENT_CLIENTS], ids=["sequential", "concurrent"])
def test_decisions_survive_kill_9(daemon: Daemon, clients: int) -> None:
    bodies = scan_bodies()

    replies = send_all(daemon, bodies, clients)
    daemon.kill()

    assert [reply.status for reply in replies] == [200] * SCANS
    assert count_rows(daemon.database, "decisions") == SCANS
    assert count_rows(daemon.database, "outbox") == SCANS
    decisions = query_all(daemon.database, "SELECT scan_event_id FROM decisions")
    stored_ids = {row[0] for row in decisions}
    assert stored_ids == {body["scanEvent"]["id"] for body in bodies}
    outbox_ids = {
        json.loads(row[0])["scanEventId"]
        for row in query_all(daemon.database, "SELECT body FROM outbox")
    }
    assert outbox_ids == stored_ids


@pytest.mark.parametrize("clients", [1, CONCURRENT_CLIENTS], ids=["sequential", "concurrent"])
def test_replay_after_kill_9(daemon: Daemon, clients: int) -> None:
    bodies = scan_bodies()
    replies = send_all(daemon, bodies, clients)
    daemon.kill()

    daemon.start()
    # The gateway retries with the same scanEvent and a new requestId.
    retries = [dict(body, requestId=scan_body("x")["requestId"]) for body in bodies]
    replayed = send_all(daemon, retries, clients)

    for body, first, again in zip(bodies, replies, replayed, strict=True):
        scan_id = body["scanEvent"]["id"]
        assert again.status == 200, f"retry of {scan_id}: {again.body!r}"
        assert again.body == first.body, f"retry of {scan_id} got another response"
    daemon.stop()
    assert count_rows(daemon.database, "decisions") == SCANS
    assert count_rows(daemon.database, "outbox") == SCANS


def test_killed_database_passes_integrity_check(daemon: Daemon) -> None:
    send_all(daemon, scan_bodies(), CONCURRENT_CLIENTS)
    daemon.kill()

    assert query_all(daemon.database, "PRAGMA integrity_check") == [("ok",)]
