"""Online lookup of cache misses: inside and past its time budget, and while HQ is away."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.hq import StoreAdapter
from daemon.store import Store
from sync.store import Change
from tests.conftest import SAMPLE_RECORDS, Daemon, make_daemon
from tests.fakehq import FakeHq, hq_config, local_versions, meta, wait_until

LATE_RECORD = {
    "credentialId": "c-late",
    "key": "KEY-LATE-0a0b0c",
    "id": "shopper-late",
    "type": "SHOPPER",
    "status": "ACTIVE",
    "stores": ["STORE-001"],
    "version": 1,
}
# lookup_timeout is 300 ms; the bound leaves room for a loaded machine, and stays far
# below the slow HQ's 5 s delay.
REPLY_BOUND = 2.0


@pytest.fixture
def hq() -> Iterator[FakeHq]:
    server = FakeHq().start()
    server.put(*SAMPLE_RECORDS)
    yield server
    server.close()


@pytest.fixture
def daemon(tmp_path: Path, hq: FakeHq) -> Iterator[Daemon]:
    directory = tmp_path / "daemon"
    instance = make_daemon(
        directory, hq_config(hq, directory, 'reconcile_interval = "1h"'), records=[]
    )
    instance.start()
    wait_until(lambda: meta(instance.database, "cursor") == hq.cursor(), what="snapshot")
    wait_until(lambda: meta(instance.database, "hq_state") == "online", what="online")
    # Known to HQ's lookup but not yet in its feed, so only a lookup can find it.
    hq.change_silently(LATE_RECORD)
    yield instance
    instance.stop()


def timed_scan(daemon: Daemon, key: str) -> tuple[str, float]:
    started = time.monotonic()
    reply = daemon.scan(key)
    elapsed = time.monotonic() - started
    assert reply.status == 200, reply.body
    return reply.json()["action"], elapsed


def test_lookup_inside_budget_accepts_and_caches(daemon: Daemon, hq: FakeHq) -> None:
    action, elapsed = timed_scan(daemon, "KEY-LATE-0a0b0c")

    assert action == "ACCEPT"
    assert elapsed < REPLY_BOUND
    assert hq.received.lookups == ["KEY-LATE-0a0b0c"]
    wait_until(lambda: "c-late" in local_versions(daemon.database), what="the cached record")


def test_lookup_finds_base64_decoded_form(daemon: Daemon, hq: FakeHq) -> None:
    # The QR code carries the key in base64, and HQ stores only the decoded key.
    action, elapsed = timed_scan(daemon, "S0VZLUxBVEUtMGEwYjBj")

    assert action == "ACCEPT"
    assert elapsed < REPLY_BOUND
    assert sorted(hq.received.lookups) == ["KEY-LATE-0a0b0c", "S0VZLUxBVEUtMGEwYjBj"]


def test_lookup_past_budget_follows_offline_policy(daemon: Daemon, hq: FakeHq) -> None:
    hq.control.lookup_delay = 5.0
    action, elapsed = timed_scan(daemon, "KEY-LATE-0a0b0c")

    assert action == "REJECT"
    assert elapsed < REPLY_BOUND
    decided = [line for line in daemon.log_lines() if line["event"] == "scan.decided"]
    assert decided[-1]["reason"] == "UNKNOWN_KEY"


def test_lookup_of_unknown_key_rejects(daemon: Daemon, hq: FakeHq) -> None:
    action, _elapsed = timed_scan(daemon, "KEY-NOBODY-123")

    assert action == "REJECT"
    assert hq.received.lookups == ["KEY-NOBODY-123"]


def test_lookup_skipped_while_hq_offline(daemon: Daemon, hq: FakeHq) -> None:
    hq.down()
    wait_until(lambda: meta(daemon.database, "hq_state") == "offline", what="offline")
    action, elapsed = timed_scan(daemon, "KEY-LATE-0a0b0c")

    assert action == "REJECT"
    assert elapsed < REPLY_BOUND
    assert hq.received.lookups == []


def test_cached_key_needs_no_lookup(daemon: Daemon, hq: FakeHq) -> None:
    action, _elapsed = timed_scan(daemon, "KEY-SHOPPER-5f1c2b")

    assert action == "ACCEPT"
    assert hq.received.lookups == []


def test_older_lookup_reply_keeps_the_newer_cached_version(daemon: Daemon, hq: FakeHq) -> None:
    hq.put({**LATE_RECORD, "key": "KEY-LATE-NEW-0d0e0f", "version": 3})
    wait_until(lambda: local_versions(daemon.database).get("c-late") == 3, what="version 3")
    # HQ's lookup still returns an older version for the credential's old key, as a
    # reply sent before the newer version was pulled would.
    hq.change_silently({**LATE_RECORD, "version": 2})

    timed_scan(daemon, LATE_RECORD["key"])

    wait_until(
        lambda: any(line["event"] == "hq.lookup_record_outdated" for line in daemon.log_lines()),
        what="the outdated reply to be logged",
    )
    assert local_versions(daemon.database)["c-late"] == 3


def test_lookup_record_of_other_key_not_cached(daemon: Daemon, hq: FakeHq) -> None:
    hq.control.lookup_answer = {**LATE_RECORD, "credentialId": "c-other", "key": "KEY-OTHER-77"}
    action, _elapsed = timed_scan(daemon, "KEY-ASKED-FOR-42")
    wait_until(
        lambda: any(line["event"] == "hq.lookup_key_mismatch" for line in daemon.log_lines()),
        what="the mismatch to be logged",
    )
    # A cached record would arrive in the background: give it time to.
    time.sleep(0.5)

    assert action == "REJECT"
    assert "c-other" not in local_versions(daemon.database)


def test_lookup_reply_after_a_pull_is_not_cached(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "cache.sqlite3", tmp_path / "cache.key")
    adapter = StoreAdapter(store)

    async def scenario() -> bool:
        await adapter.apply_changes([Change(op="PUT", record=LATE_RECORD)], "1.1", 1.0)
        cursor_at_lookup = adapter.cursor()
        # HQ returned the record to the lookup, then removed the credential, and the pull
        # of that REMOVE committed before the lookup's reply was stored.
        await adapter.apply_changes([Change(op="REMOVE", credential_id="c-late")], "1.2", 2.0)
        return await adapter.cache_record(LATE_RECORD, cursor_at_lookup)

    try:
        stored = asyncio.run(scenario())
        versions = dict(
            store.reader.connection.execute("SELECT credential_id, version FROM identities")
        )
    finally:
        adapter.close()
        store.close()

    assert stored is False
    assert "c-late" not in versions


def test_slow_lookups_keep_hq_online(daemon: Daemon, hq: FakeHq) -> None:
    hq.control.lookup_delay = 0.6
    keys = [f"KEY-SLOW-{number}" for number in range(4)]
    for key in keys:
        action, elapsed = timed_scan(daemon, key)
        assert action == "REJECT"
        assert elapsed < REPLY_BOUND

    # offline_after is 2 in these tests: every lookup is still sent.
    assert hq.received.lookups == keys
    events = [line["event"] for line in daemon.log_lines()]
    assert "hq.unavailable" not in events
    assert meta(daemon.database, "hq_state") == "online"
    timeouts = [line for line in daemon.log_lines() if line["event"] == "hq.lookup_timed_out"]
    assert len(timeouts) == 1
    assert timeouts[0]["timeout_seconds"] == 0.3
