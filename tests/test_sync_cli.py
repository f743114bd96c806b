"""`sync --now`, the HQ lines of `status`, and clock offset detection."""

from __future__ import annotations

import codecs
import fcntl
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from daemon import cachefile
from tests.conftest import (
    REPO,
    SAMPLE_RECORDS,
    Daemon,
    busy_timeout,
    edit_config,
    make_daemon,
    run_cli,
    unlabelled_samples,
)
from tests.fakehq import (
    TOKEN,
    FakeHq,
    hq_config,
    local_versions,
    log_events,
    make_records,
    meta,
    outbox_ids,
    set_meta,
    versions_of,
    wait_until,
)


@pytest.fixture
def hq() -> Iterator[FakeHq]:
    server = FakeHq().start()
    server.put(*SAMPLE_RECORDS)
    yield server
    server.close()


def start_synced(tmp_path: Path, hq: FakeHq) -> Daemon:
    """Start a daemon with an empty cache and wait until it has HQ's snapshot."""
    directory = tmp_path / "daemon"
    daemon = make_daemon(directory, hq_config(hq, directory), records=[])
    daemon.start()
    wait_until(lambda: meta(daemon.database, "cursor") == hq.cursor(), what="snapshot")
    return daemon


def stopped_with_queued_event(tmp_path: Path, hq: FakeHq) -> Daemon:
    """Sync a daemon, decide one scan while HQ is down, and stop it: one event is queued."""
    daemon = start_synced(tmp_path, hq)
    hq.down()
    assert daemon.scan("KEY-ASSOCIATE-8e2d11").status == 200
    daemon.stop()
    return daemon


def test_sync_now_pulls_and_uploads(tmp_path: Path, hq: FakeHq) -> None:
    daemon = start_synced(tmp_path, hq)
    hq.down()
    for _ in range(3):
        assert daemon.scan("KEY-ASSOCIATE-8e2d11").status == 200
    daemon.stop()
    hq.up()
    hq.remove("c-cash")

    result = run_cli("sync", "--now", "--config", str(daemon.config))

    assert result.returncode == 0, result.stderr
    assert "pulled 1 changes" in result.stdout
    assert "; 3 events delivered to HQ, 0 events waiting in the outbox" in result.stdout
    assert outbox_ids(daemon.database) == []
    assert "c-cash" not in local_versions(daemon.database)


def test_sync_now_reports_rebuilt_cache_size(tmp_path: Path, hq: FakeHq) -> None:
    directory = tmp_path / "daemon"
    daemon = make_daemon(directory, hq_config(hq, directory), records=[])
    first = run_cli("sync", "--now", "--config", str(daemon.config))
    hq.remove("c-cash")
    hq.expire_cursors()

    second = run_cli("sync", "--now", "--config", str(daemon.config))

    count = len(SAMPLE_RECORDS)
    assert f"cache rebuilt from the snapshot with {count} identities" in first.stdout
    # The record HQ removed is gone with the rebuild, and the line gives the new size.
    assert f"cache rebuilt from the snapshot with {count - 1} identities" in second.stdout
    assert "c-cash" not in local_versions(daemon.database)


def test_sync_now_reports_unreachable_hq(tmp_path: Path, hq: FakeHq) -> None:
    directory = tmp_path / "daemon"
    daemon = make_daemon(directory, hq_config(hq, directory), records=[])
    hq.down()

    result = run_cli("sync", "--now", "--config", str(daemon.config))

    assert result.returncode == 1
    assert "error: pull failed: HQ snapshot failed: Cannot connect" in result.stderr
    # An http:// URL uses no TLS, so aiohttp's "ssl:default" would only mislead.
    assert "ssl:" not in result.stderr


def test_status_shows_hq_state(tmp_path: Path, hq: FakeHq) -> None:
    directory = tmp_path / "daemon"
    daemon = make_daemon(directory, hq_config(hq, directory), records=[])
    assert run_cli("sync", "--now", "--config", str(daemon.config)).returncode == 0

    result = run_cli("status", "--json", "--config", str(daemon.config))
    state = json.loads(result.stdout)

    assert state["hqState"] == "online"
    assert datetime.fromisoformat(state["hqStateSince"]).tzinfo is not None
    assert state["syncCursor"] == hq.cursor()
    assert state["cursorAgeSeconds"] is not None
    assert state["clockUncertain"] is False
    assert state["outboxDropped"] == 0
    text = run_cli("status", "--config", str(daemon.config)).stdout
    # The first sync rebuilt the cache from HQ's snapshot.
    assert re.search(r"^last rebuild: +\d+ s ago$", text, re.MULTILINE), text


@pytest.mark.parametrize(
    ("key", "value", "field", "expected"),
    [
        ("last_pull_at", "200000000000", "lastPullAgeSeconds", None),
        ("last_pull_at", "200000000000", "cacheStale", True),
        ("last_pull_at", "-100", "lastPullAgeSeconds", None),
        ("hq_state_since", "1e300", "hqStateSince", None),
        ("last_upload_at", "nan", "lastUploadAgeSeconds", None),
        ("outbox_dropped_total", "many", "outboxDropped", None),
        ("outbox_dropped_total", "1e30", "outboxDropped", None),
        ("hq_clock_offset", "inf", "clockOffsetSeconds", None),
    ],
)
def test_status_with_invalid_sync_meta(
    tmp_path: Path, hq: FakeHq, key: str, value: str, field: str, expected: object
) -> None:
    directory = tmp_path / "daemon"
    daemon = make_daemon(directory, hq_config(hq, directory), records=[])
    assert run_cli("sync", "--now", "--config", str(daemon.config)).returncode == 0
    set_meta(daemon.database, {key: value})

    result = run_cli("status", "--json", "--config", str(daemon.config))
    text = run_cli("status", "--config", str(daemon.config))

    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)[field] == expected
    assert text.returncode == 0, text.stderr


def test_clock_offset_flags_events(tmp_path: Path, hq: FakeHq) -> None:
    hq.control.clock_offset = 120.0
    directory = tmp_path / "daemon"
    daemon = make_daemon(
        directory, hq_config(hq, directory, 'clock_offset_threshold = "5s"'), records=[]
    )
    daemon.start()
    try:
        wait_until(lambda: meta(daemon.database, "cursor") == hq.cursor(), what="snapshot")
        assert daemon.scan("KEY-SHOPPER-5f1c2b").status == 200
        wait_until(lambda: hq.received.events, what="the event at HQ")
        (event,) = hq.received.events.values()
        assert event["clockUncertain"] is True

        wait_until(lambda: meta(daemon.database, "hq_clock_offset"), what="stored offset")
        text = run_cli("status", "--config", str(daemon.config)).stdout
        assert "WARNING: clock differs from HQ's" in text
        warnings = [line for line in daemon.log_lines() if line["event"] == "hq.clock_offset"]
        assert len(warnings) == 1
        assert warnings[0]["threshold_seconds"] == 5.0
        samples = unlabelled_samples(daemon)
        assert 115 < samples["identity_connector_hq_clock_offset_seconds"] < 125
        assert samples["identity_connector_clock_uncertain"] == 1.0
    finally:
        daemon.stop()


def test_sync_now_counts_records_rejected_by_a_rebuild(tmp_path: Path, hq: FakeHq) -> None:
    directory = tmp_path / "daemon"
    daemon = make_daemon(directory, hq_config(hq, directory), records=[])
    assert run_cli("sync", "--now", "--config", str(daemon.config)).returncode == 0
    # Only the digest shows this record, so the reconciliation rebuilds, and the rebuild
    # rejects it.
    hq.change_silently({"credentialId": "c-bad", "key": "KEY-BAD-0a1b", "type": "BOGUS"})

    result = run_cli("sync", "--now", "--config", str(daemon.config))

    assert "digest mismatch" in result.stdout
    assert ", 1 rejected;" in result.stdout
    assert result.returncode == 1


def test_sync_now_refused_while_daemon_syncs(tmp_path: Path, hq: FakeHq) -> None:
    directory = tmp_path / "daemon"
    daemon = make_daemon(directory, hq_config(hq, directory), records=[])
    daemon.start()
    try:
        wait_until(lambda: meta(daemon.database, "cursor") == hq.cursor(), what="snapshot")
        result = run_cli("sync", "--now", "--config", str(daemon.config))
        versions = local_versions(daemon.database)
    finally:
        daemon.stop()

    assert result.returncode == 1
    assert "another process is syncing with HQ" in result.stderr
    assert "systemctl reload identity-connector" in result.stderr
    assert versions == versions_of(hq.records)


def test_daemon_waits_for_sync_lock(tmp_path: Path, hq: FakeHq) -> None:
    directory = tmp_path / "daemon"
    daemon = make_daemon(directory, hq_config(hq, directory), records=[])
    # This test process plays a `sync --now` that holds the lock while the daemon starts.
    holder = os.open(f"{daemon.database}.sync-lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        daemon.start()
        wait_until(
            lambda: any(line["event"] == "sync.waiting_for_lock" for line in daemon.log_lines()),
            what="the daemon waiting for the lock",
        )
        waiting_reply = daemon.scan("KEY-SHOPPER-5f1c2b")
        cursor_while_locked = meta(daemon.database, "cursor")
    finally:
        os.close(holder)
    try:
        wait_until(lambda: meta(daemon.database, "cursor") == hq.cursor(), what="the sync")
    finally:
        daemon.stop()

    assert waiting_reply.status == 200
    assert cursor_while_locked is None
    assert hq.received.requests["snapshot"] == 1


def test_sync_now_uploads_when_pull_fails(tmp_path: Path, hq: FakeHq) -> None:
    daemon = stopped_with_queued_event(tmp_path, hq)
    hq.up()
    hq.expire_cursors()
    hq.control.snapshot_mode = "cut"

    result = run_cli("sync", "--now", "--config", str(daemon.config))

    assert result.returncode == 1
    assert "error: pull failed:" in result.stderr
    assert "the failed rebuild was discarded: the cache in use is unchanged" in result.stdout
    assert "; 1 event delivered to HQ, 0 events waiting in the outbox" in result.stdout
    assert outbox_ids(daemon.database) == []


def test_sync_now_reports_pull_and_upload_failures(tmp_path: Path, hq: FakeHq) -> None:
    daemon = stopped_with_queued_event(tmp_path, hq)

    result = run_cli("sync", "--now", "--config", str(daemon.config))

    assert result.returncode == 1
    assert "error: pull failed: " in result.stderr
    assert "error: upload failed: " in result.stderr
    assert (
        "upload stopped by the error above: 0 events delivered to HQ, 1 event waiting in the outbox"
    ) in result.stdout
    assert len(outbox_ids(daemon.database)) == 1


def test_sync_now_reports_locked_database(tmp_path: Path, hq: FakeHq) -> None:
    daemon = stopped_with_queued_event(tmp_path, hq)
    hq.up()
    hq.put(*make_records(3))
    edit_config(daemon.config, busy_timeout("0.2s"))
    holder = sqlite3.connect(daemon.database, isolation_level=None, timeout=5)
    try:
        holder.execute("BEGIN IMMEDIATE")
        result = run_cli("sync", "--now", "--config", str(daemon.config))
    finally:
        holder.close()

    assert result.returncode == 2, result.stderr
    assert "error: pull failed on the database" in result.stderr
    assert "error: upload failed on the database" in result.stderr
    assert "Another process holds the database's write lock" in result.stderr
    assert "Free disk space" not in result.stderr
    assert len(outbox_ids(daemon.database)) == 1


def run_cli_on_small_disk(max_file_bytes: int, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the command line with no file it writes allowed past ``max_file_bytes``.

    ``ulimit -f`` (in 512-byte blocks) makes a write past the size fail with EFBIG, which
    SQLite reports as "disk I/O error", as a full disk fails a write (with ENOSPC).
    """
    limited = f'ulimit -f {max_file_bytes // 512} && exec "$0" "$@"'
    return subprocess.run(
        ["sh", "-c", limited, sys.executable, "-m", "daemon", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


def test_sync_now_reports_store_failure_and_uploads(tmp_path: Path, hq: FakeHq) -> None:
    daemon = stopped_with_queued_event(tmp_path, hq)
    hq.up()
    # The rebuild's new cache file outgrows 256 KiB with these records.
    hq.put(*make_records(5000))
    hq.expire_cursors()

    result = run_cli_on_small_disk(256 * 1024, "sync", "--now", "--config", str(daemon.config))

    assert result.returncode == 1, result.stderr
    assert "error: pull failed on the database" in result.stderr
    assert "the snapshot worker could not write a new cache file" in result.stderr
    assert f"Free disk space in {daemon.directory} " in result.stderr
    assert "the failed rebuild was discarded: the cache in use is unchanged" in result.stdout
    assert "; 1 event delivered to HQ, 0 events waiting in the outbox" in result.stdout
    assert outbox_ids(daemon.database) == []
    assert len(cachefile.cache_files(daemon.database)) == 1
    assert "c-cash" in local_versions(daemon.database)


def test_sync_now_fails_on_mismatch_after_rebuild(tmp_path: Path, hq: FakeHq) -> None:
    # HQ's digest disagrees with its own snapshot, so the rebuild cannot make them agree.
    hq.control.digest_salt = "disagree"
    directory = tmp_path / "daemon"
    daemon = make_daemon(directory, hq_config(hq, directory), records=[])

    result = run_cli("sync", "--now", "--config", str(daemon.config))

    assert result.returncode == 1, result.stdout
    assert "cache rebuilt from the snapshot" in result.stdout
    assert "after the rebuild the cache still differs from HQ's digest" in result.stderr


def test_sync_now_reports_rebuild_before_failure(tmp_path: Path, hq: FakeHq) -> None:
    # HQ expires the snapshot's own cursor: the rebuild is in place when the pull fails.
    hq.control.snapshot_cursor_expired = True
    directory = tmp_path / "daemon"
    daemon = make_daemon(directory, hq_config(hq, directory), records=[])

    result = run_cli("sync", "--now", "--config", str(daemon.config))

    assert result.returncode == 1
    assert (
        f"done: pull stopped by the error above after cache rebuilt from the snapshot with"
        f" {len(hq.records)} identities"
    ) in result.stdout


def test_clock_offset_forgotten_at_restart(tmp_path: Path, hq: FakeHq) -> None:
    """A restarted daemon flags events by its own estimate, so the stored one must not
    make status or the metrics warn before HQ responds."""
    hq.control.clock_offset = 120.0
    directory = tmp_path / "daemon"
    daemon = make_daemon(
        directory, hq_config(hq, directory, 'clock_offset_threshold = "5s"'), records=[]
    )
    daemon.start()
    wait_until(lambda: meta(daemon.database, "hq_clock_offset"), what="stored offset")
    daemon.stop()
    hq.down()

    daemon.start()
    try:
        wait_until(lambda: meta(daemon.database, "hq_clock_offset") == "", what="offset cleared")
        samples = unlabelled_samples(daemon)
        state = json.loads(run_cli("status", "--json", "--config", str(daemon.config)).stdout)
    finally:
        daemon.stop()
    assert "identity_connector_hq_clock_offset_seconds" not in samples
    assert samples["identity_connector_clock_uncertain"] == 0.0
    assert state["clockOffsetSeconds"] is None


HQ_AGE_GAUGES = (
    "identity_connector_last_pull_age_seconds",
    "identity_connector_cursor_age_seconds",
    "identity_connector_last_rebuild_age_seconds",
    "identity_connector_last_reconcile_age_seconds",
)


def test_metrics_without_hq_ignore_stored_sync_state(tmp_path: Path, hq: FakeHq) -> None:
    daemon = start_synced(tmp_path, hq)
    wait_until(lambda: meta(daemon.database, "last_reconcile_at"), what="a saved comparison")
    daemon.stop()
    text = daemon.config.read_text(encoding="utf-8")
    daemon.config.write_text(text[: text.index("\n[hq]\n")] + "\n", encoding="utf-8")

    daemon.start()
    try:
        samples = unlabelled_samples(daemon)
    finally:
        daemon.stop()
    assert {name: samples[name] for name in HQ_AGE_GAUGES} == dict.fromkeys(HQ_AGE_GAUGES, -1.0)
    assert "identity_connector_hq_clock_offset_seconds" not in samples


def test_missing_token_warned_once_at_start(tmp_path: Path, hq: FakeHq) -> None:
    directory = tmp_path / "daemon"
    table = hq_config(hq, directory).replace(f'token_file = "{directory / "hq-token"}"\n', "")
    daemon = make_daemon(directory, table, records=[])
    daemon.start()
    try:
        # The fake HQ rejects calls without its token, which shows the sync has started.
        wait_until(lambda: log_events(daemon, "hq.degraded"), what="the rejected sync")
        warnings = log_events(daemon, "hq.no_token")
    finally:
        daemon.stop()
    assert len(warnings) == 1


def test_sync_now_counts_waiting_events(tmp_path: Path, hq: FakeHq) -> None:
    daemon = start_synced(tmp_path, hq)
    hq.down()
    for _ in range(4):
        assert daemon.scan("KEY-ASSOCIATE-8e2d11").status == 200
    daemon.stop()

    offline = run_cli("sync", "--now", "--config", str(daemon.config))
    hq.up()
    # HQ acknowledges two events per request, so four events take two batches, and six
    # are sent in all.
    hq.control.ack_mode = "partial"
    online = run_cli("sync", "--now", "--config", str(daemon.config))

    assert offline.returncode == 1
    assert (
        "upload stopped by the error above: 0 events delivered to HQ, 4 events waiting in"
        " the outbox"
    ) in offline.stdout
    assert online.returncode == 0, online.stderr
    assert online.stdout.endswith("; 4 events delivered to HQ, 0 events waiting in the outbox\n")
    assert len(hq.received.events) == 4
    assert outbox_ids(daemon.database) == []


@pytest.mark.parametrize(
    ("call", "message"),
    [
        pytest.param(
            "snapshot",
            r"error: pull failed: HQ snapshot stream timed out: no data for 1 s \(\[hq\]"
            r" request_timeout\) after \d+ complete lines\n",
            id="snapshot",
        ),
        pytest.param(
            "changes",
            r"error: pull failed: HQ changes response timed out: no data for 1 s \(\[hq\]"
            r" request_timeout\)\n",
            id="changes",
        ),
    ],
)
def test_sync_now_names_read_timeout(tmp_path: Path, hq: FakeHq, call: str, message: str) -> None:
    directory = tmp_path / "daemon"
    table = hq_config(hq, directory).replace('request_timeout = "2s"', 'request_timeout = "1s"')
    daemon = make_daemon(directory, table, records=[])
    if call == "snapshot":
        # The fake HQ pauses after each 500 lines of the snapshot.
        hq.put(*make_records(600))
        hq.control.snapshot_line_delay = 3.0
    else:
        # The first sync follows the changes feed from the snapshot's cursor.
        hq.control.stalled_calls = {call}

    result = run_cli("sync", "--now", "--config", str(daemon.config))

    assert result.returncode == 1
    assert re.search(message, result.stderr), result.stderr


def token_config(tmp_path: Path, hq: FakeHq, content: bytes) -> tuple[Daemon, Path]:
    """Make a daemon whose [hq] token_file contains ``content``; return it and the file."""
    directory = tmp_path / "daemon"
    daemon = make_daemon(directory, hq_config(hq, directory), records=[])
    token_file = directory / "hq-token"
    token_file.write_bytes(content)
    return daemon, token_file


def test_token_line_break_rejected(tmp_path: Path, hq: FakeHq) -> None:
    daemon, token_file = token_config(tmp_path, hq, f"{TOKEN}\nsecond\n".encode())
    problem = (
        f"[hq] token_file {token_file} contains a line break after character {len(TOKEN)}"
        " of the token"
    )

    checked = run_cli("check-config", str(daemon.config))
    try:
        with pytest.raises(RuntimeError) as start:
            daemon.start()
    finally:
        if daemon.process is not None:
            daemon.stop()

    assert checked.returncode == 2, checked.stdout
    assert problem in checked.stderr
    assert problem in str(start.value)
    assert hq.received.requests["snapshot"] == 0
    for output in (checked.stderr, str(start.value)):
        assert TOKEN not in output
        assert "second" not in output


def test_token_byte_order_mark_accepted(tmp_path: Path, hq: FakeHq) -> None:
    # Windows Notepad can save UTF-8 with a byte order mark.
    daemon, _ = token_config(tmp_path, hq, codecs.BOM_UTF8 + f"{TOKEN}\r\n".encode())

    result = run_cli("sync", "--now", "--config", str(daemon.config))

    assert result.returncode == 0, result.stderr
    assert hq.received.authorization == {f"Bearer {TOKEN}"}


# Root reads every file whatever its mode, unless it drops the capabilities that allow it.
DROP_FILE_ACCESS_OVERRIDE = ["--bounding-set", "-dac_override,-dac_read_search"]


def run_cli_bound_by_file_modes(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the command line so that file modes apply to it, even in a test run as root."""
    command = [sys.executable, "-m", "daemon", *args]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("setpriv (util-linux) is not installed")
        probe = subprocess.run([setpriv, *DROP_FILE_ACCESS_OVERRIDE, "true"], capture_output=True)
        if probe.returncode != 0:
            pytest.skip(f"setpriv cannot drop root's file access: {probe.stderr.decode().strip()}")
        command = [setpriv, *DROP_FILE_ACCESS_OVERRIDE, *command]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)


def test_unreadable_token_names_access_fix(tmp_path: Path, hq: FakeHq) -> None:
    daemon, token_file = token_config(tmp_path, hq, f"{TOKEN}\n".encode())
    token_file.chmod(0)

    result = run_cli_bound_by_file_modes("check-config", str(daemon.config))

    assert result.returncode == 2, result.stdout
    assert f"cannot read [hq] token_file {token_file}: Permission denied." in result.stderr
    assert "The service user needs read access" in result.stderr
    assert "owner root, group identity-connector and mode 0640" in result.stderr
