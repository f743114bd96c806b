"""The /metrics scrape of a real daemon whose database contains invalid meta values."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import (
    Daemon,
    exchange,
    labelled_samples,
    make_daemon,
    unlabelled_samples,
)
from tests.fakehq import FakeHq, hq_config, log_events, set_meta

# The meta keys of the sync ages and the outbox drop count, each with a valid value.
VALID_META = {
    "last_pull_at": repr(time.time() - 100.0),
    "cursor_changed_at": repr(time.time() - 200.0),
    "last_rebuild_at": repr(time.time() - 300.0),
    "last_reconcile_at": repr(time.time() - 400.0),
    "outbox_dropped_total": "3",
}

# (case, meta key, invalid value, metric, sample expected: -1.0, or None for no sample)
INVALID_META_CASES: list[tuple[str, str, str, str, float | None]] = [
    (
        "last pull not a number",
        "last_pull_at",
        "yesterday",
        "identity_connector_last_pull_age_seconds",
        -1.0,
    ),
    (
        "cursor change not a number",
        "cursor_changed_at",
        "yesterday",
        "identity_connector_cursor_age_seconds",
        -1.0,
    ),
    (
        "rebuild infinite",
        "last_rebuild_at",
        "1e400",
        "identity_connector_last_rebuild_age_seconds",
        -1.0,
    ),
    (
        "reconcile not a number",
        "last_reconcile_at",
        "nan",
        "identity_connector_last_reconcile_age_seconds",
        -1.0,
    ),
    (
        "drop count not a number",
        "outbox_dropped_total",
        "many",
        "identity_connector_outbox_dropped_events_total",
        None,
    ),
]


@pytest.fixture
def hq_down() -> Iterator[FakeHq]:
    """A fake HQ that does not listen, so that no pull replaces the meta values."""
    server = FakeHq().start()
    server.down()
    yield server
    server.close()


def case_params() -> Iterator[object]:
    for case, key, value, metric, expected in INVALID_META_CASES:
        yield pytest.param(key, value, metric, expected, id=case)


@pytest.mark.parametrize(("key", "value", "metric", "expected"), list(case_params()))
def test_invalid_meta_value_keeps_scrape(
    tmp_path: Path, hq_down: FakeHq, key: str, value: str, metric: str, expected: float | None
) -> None:
    directory = tmp_path / "daemon"
    daemon = make_daemon(directory, hq_config(hq_down, directory), records=[])
    set_meta(daemon.database, {**VALID_META, key: value})

    daemon.start()
    try:
        first = unlabelled_samples(daemon)
        second = unlabelled_samples(daemon)
    finally:
        daemon.stop()

    assert first.get(metric) == expected
    assert second.get(metric) == expected
    assert first["identity_connector_outbox_depth"] == 0.0
    warnings = log_events(daemon, "metrics.meta_value_invalid")
    assert [line["key"] for line in warnings] == [key]


SCAN_HEAD = b"POST /v1/identity/scan HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"

# (case, request bytes) that aiohttp's HTTP parser rejects with a 400 before any handler runs.
# aiohttp logs the second case, a TLS handshake on the plain-HTTP port, at DEBUG level.
UNPARSABLE_REQUESTS: list[tuple[str, bytes]] = [
    ("header over limit", SCAN_HEAD + b"X-Pad: " + b"x" * 9000 + b"\r\nContent-Length: 0\r\n\r\n"),
    ("tls handshake", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64 + b"\r\n\r\n"),
]


@pytest.mark.parametrize(
    "request_bytes",
    [case[1] for case in UNPARSABLE_REQUESTS],
    ids=[case[0] for case in UNPARSABLE_REQUESTS],
)
def test_unparsable_request_counted(daemon: Daemon, request_bytes: bytes) -> None:
    received = exchange(daemon, request_bytes)

    assert b" 400 " in received.split(b"\r\n", 1)[0]
    assert labelled_samples(daemon, "identity_connector_http_errors", "status") == {"400": 1.0}
    assert [line["problem"] for line in log_events(daemon, "request.invalid")] == [
        "unparsable-request"
    ]
