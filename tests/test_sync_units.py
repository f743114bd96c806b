"""Units of the sync that need no server: backoff, HQ state, digest, clock and token file."""

from __future__ import annotations

import hashlib
import random
import time
from email.utils import formatdate
from pathlib import Path

import aiohttp
import pytest
from structlog.testing import capture_logs

from daemon.config import ConfigError
from daemon.hq import read_token
from sync.client import _retry_after_seconds, _tls_hint
from sync.clock import ClockEstimator
from sync.digest import compute_digest
from sync.errors import HqError, HqResponseInvalid, HqStatusError, HqUnreachable
from sync.settings import SyncSettings
from sync.state import PULL, UPLOAD, Backoff, HqHealth, HqState


def pull_failed(health: HqHealth, error: HqError) -> None:
    """Report a failed pull attempt as the client and the pull loop do."""
    if error.reachable:
        health.call_answered()
    else:
        health.call_unanswered(error)
    health.attempt_failed(PULL, error)


def pull_succeeded(health: HqHealth) -> None:
    health.call_answered()
    health.attempt_succeeded(PULL)


def test_backoff_doubles_within_jitter_and_caps() -> None:
    backoff = Backoff(initial=1.0, maximum=8.0, rng=random.Random(7))
    ceilings = [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    for ceiling in ceilings:
        delay = backoff.next_delay()
        assert ceiling / 2 <= delay <= ceiling


def test_backoff_reset_starts_over() -> None:
    backoff = Backoff(initial=1.0, maximum=60.0, rng=random.Random(7))
    for _ in range(5):
        backoff.next_delay()
    backoff.reset()
    assert backoff.next_delay() <= 1.0


def test_health_logs_outage_once_and_return_once() -> None:
    health = HqHealth(offline_after=2)
    with capture_logs() as logs:
        pull_succeeded(health)
        for _ in range(6):
            pull_failed(health, HqUnreachable("connection refused"))
        pull_succeeded(health)
    events = [entry["event"] for entry in logs if entry["log_level"] != "debug"]
    available = [entry for entry in logs if entry["event"] == "hq.available"]

    assert events == ["hq.available", "hq.unavailable", "hq.available"]
    # The first contact after start is not a return from an outage.
    assert available[0]["previous_state"] == "none"
    assert available[1]["previous_state"] == "offline"


@pytest.mark.parametrize(
    ("errors", "state"),
    [
        ([HqUnreachable("refused")], HqState.DEGRADED),
        ([HqUnreachable("refused")] * 3, HqState.OFFLINE),
        ([HqStatusError("changes", 500)] * 5, HqState.DEGRADED),
        ([HqResponseInvalid("broken")] * 5, HqState.DEGRADED),
        ([HqUnreachable("refused")] * 3 + [HqStatusError("changes", 500)], HqState.DEGRADED),
    ],
)
def test_health_state_after_failures(errors: list, state: HqState) -> None:
    health = HqHealth(offline_after=3)
    pull_succeeded(health)
    for error in errors:
        pull_failed(health, error)
    assert health.state is state


def test_health_logs_uploads_timing_out_while_pulls_work() -> None:
    # Events that time out while the pull's calls are answered: HQ is degraded, not away.
    health = HqHealth(offline_after=3)
    pull_succeeded(health)
    timeout = HqUnreachable("HQ events timed out after 3 s")
    with capture_logs() as logs:
        for _ in range(3):
            health.call_unanswered(timeout)
            health.attempt_failed(UPLOAD, timeout)
            pull_succeeded(health)
        health.call_answered()
        health.attempt_succeeded(UPLOAD)
    events = [
        (entry["event"], entry.get("loop")) for entry in logs if entry["log_level"] != "debug"
    ]

    assert events == [("hq.degraded", "upload"), ("hq.available", None)]


def test_health_outage_at_start_is_the_previous_state() -> None:
    # HQ away from the start: hq.unavailable was logged, so its return names that state.
    health = HqHealth(offline_after=2)
    with capture_logs() as logs:
        for _ in range(3):
            pull_failed(health, HqUnreachable("connection refused"))
        pull_succeeded(health)
    available = [entry for entry in logs if entry["event"] == "hq.available"]

    assert [entry["previous_state"] for entry in available] == ["offline"]


def test_health_outage_recovery_logs_no_degraded() -> None:
    # A pull that failed during an outage and succeeds at HQ's return is no degraded HQ.
    health = HqHealth(offline_after=2)
    pull_succeeded(health)
    with capture_logs() as logs:
        for _ in range(3):
            pull_failed(health, HqUnreachable("connection refused"))
        pull_succeeded(health)
    events = [entry["event"] for entry in logs if entry["log_level"] != "debug"]

    assert events == ["hq.unavailable", "hq.available"]


def test_gateway_unavailable_statuses_count_as_unreachable() -> None:
    health = HqHealth(offline_after=2)
    for _ in range(2):
        error = HqStatusError("changes", 503)
        error.reachable = False
        pull_failed(health, error)
    assert health.state is HqState.OFFLINE


def test_digest_matches_contract_lines() -> None:
    pairs = [("a-1", 3), ("b", 1), ("é", 2)]
    expected = hashlib.sha256(b"a-1:3\nb:1\n\xc3\xa9:2\n").hexdigest()
    assert compute_digest(pairs) == (3, expected)


def test_digest_of_nothing() -> None:
    assert compute_digest([]) == (0, hashlib.sha256(b"").hexdigest())


@pytest.mark.parametrize(
    ("hq_ahead", "uncertain"), [(0.0, False), (4.0, False), (30.0, True), (-30.0, True)]
)
def test_clock_offset_threshold(hq_ahead: float, uncertain: bool) -> None:
    clock = ClockEstimator(threshold=10.0)
    now = 1_700_000_000.0
    clock.observe(formatdate(now + hq_ahead, usegmt=True), now - 0.05, now + 0.05)
    assert clock.uncertain is uncertain


@pytest.mark.parametrize(
    "header",
    [
        "not a date",
        None,
        "",
        # The year overflows the platform's time functions.
        "Mon, 01 Jan 99999999999999999999 00:00:00 GMT",
    ],
    ids=["text", "missing", "empty", "overflowing-year"],
)
def test_clock_ignores_invalid_date(header: str | None) -> None:
    clock = ClockEstimator(threshold=10.0)
    clock.observe(header, 0.0, 1.0)
    assert clock.offset is None


def test_clock_reads_minus_zero_zone_as_gmt(monkeypatch: pytest.MonkeyPatch) -> None:
    # A box whose local time is not UTC, where a date without a zone would be misread.
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        clock = ClockEstimator(threshold=10.0)
        now = 1_700_000_000.0
        header = formatdate(now, usegmt=True).replace("GMT", "-0000")
        clock.observe(header, now - 0.05, now + 0.05)
    finally:
        monkeypatch.undo()
        time.tzset()
    assert clock.offset == pytest.approx(0.5, abs=0.1)


def test_clock_median_resists_one_outlier() -> None:
    clock = ClockEstimator(threshold=10.0)
    now = 1_700_000_000.0
    for ahead in (0.0, 0.0, 3600.0, 0.0, 0.0):
        clock.observe(formatdate(now + ahead, usegmt=True), now, now)
    assert clock.uncertain is False


def test_clock_near_threshold_logs_no_flapping() -> None:
    # Samples that fall either side of the threshold, as the Date header's rounding makes
    # them: one warning, and no "agrees" line until the offset is clearly below it.
    clock = ClockEstimator(threshold=10.0)
    now = 1_700_000_000.0
    with capture_logs() as logs:
        for ahead in (11.0, 11.0, 11.0, 9.0, 9.0, 9.0, 11.0, 11.0, 11.0, 9.0, 9.0, 9.0):
            clock.observe(formatdate(now + ahead, usegmt=True), now, now)
        for _ in range(5):
            clock.observe(formatdate(now, usegmt=True), now, now)
    events = [entry["event"] for entry in logs]

    assert events == ["hq.clock_offset", "hq.clock_agrees"]


def test_health_logs_hq_down_at_start() -> None:
    health = HqHealth(offline_after=2)
    with capture_logs() as logs:
        for _ in range(4):
            pull_failed(health, HqUnreachable("connection refused"))
    events = [entry["event"] for entry in logs if entry["log_level"] != "debug"]

    assert events == ["hq.unavailable"]
    assert health.state is HqState.OFFLINE


def test_health_blip_logs_nothing() -> None:
    health = HqHealth(offline_after=3)
    pull_succeeded(health)
    with capture_logs() as logs:
        pull_failed(health, HqUnreachable("connection reset"))
        pull_succeeded(health)
    assert [entry for entry in logs if entry["log_level"] != "debug"] == []


def test_answered_call_in_failing_pull_keeps_degraded() -> None:
    # A 410 that HQ returns before a broken snapshot must not switch the state to online.
    health = HqHealth(offline_after=3)
    pull_succeeded(health)
    with capture_logs() as logs:
        for _ in range(5):
            health.call_answered()
            pull_failed(health, HqResponseInvalid("snapshot cut"))
            assert health.state is HqState.DEGRADED
    events = [entry["event"] for entry in logs if entry["log_level"] != "debug"]

    assert events == ["hq.degraded"]


def test_failing_uploads_keep_degraded_while_pulls_work() -> None:
    health = HqHealth(offline_after=3)
    pull_succeeded(health)
    health.call_answered()
    health.attempt_failed(UPLOAD, HqStatusError("events", 500))
    for _ in range(3):
        pull_succeeded(health)
        assert health.state is HqState.DEGRADED

    health.call_answered()
    health.attempt_succeeded(UPLOAD)
    assert health.state is HqState.ONLINE


def test_answered_lookups_do_not_end_degraded() -> None:
    health = HqHealth(offline_after=3)
    pull_failed(health, HqStatusError("changes", 500))
    for _ in range(3):
        health.call_answered()
    assert health.state is HqState.DEGRADED


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("30", 30.0), (" 5 ", 5.0), ("soon", None), ("", None), (None, None), ("-3", None)],
)
def test_retry_after_seconds(header: str | None, seconds: float | None) -> None:
    assert _retry_after_seconds(header) == seconds


def test_retry_after_http_date() -> None:
    header = formatdate(time.time() + 40, usegmt=True)
    parsed = _retry_after_seconds(header)
    assert parsed is not None
    assert 38 <= parsed <= 41


# (URL, whether the call before got a response, whether the error text gets the hint)
DISCONNECT_HINT_CASES = [
    ("https://hq.example", False, True),
    ("https://hq.example", True, False),
    ("http://hq.example", False, False),
]


@pytest.mark.parametrize(("url", "responded", "hinted"), DISCONNECT_HINT_CASES)
def test_disconnect_hint_only_without_answer(url: str, responded: bool, hinted: bool) -> None:
    # Right after a response the handshake worked, so a dropped connection is no sign of a
    # rejected certificate. It may be a keep-alive connection closed under a POST.
    settings = SyncSettings(url=url, store_id="STORE-001")
    hint = _tls_hint(aiohttp.ServerDisconnectedError(), settings, responded)

    assert ("client_cert_file" in hint) is hinted


def test_clock_agrees_again_under_short_threshold() -> None:
    # With a threshold of one second, the clocks must still be able to agree again, and a
    # later drift must warn again.
    clock = ClockEstimator(threshold=1.0)
    now = 1_700_000_000.0
    with capture_logs() as logs:
        for ahead in [5.0] * 5 + [0.0] * 5 + [5.0] * 5:
            # The Date header has whole seconds, so each estimate is off by up to a second.
            clock.observe(formatdate(now + ahead - 0.5, usegmt=True), now, now)
    events = [entry["event"] for entry in logs]

    assert events == ["hq.clock_offset", "hq.clock_agrees", "hq.clock_offset"]


# (token file content, the token read from it): what surrounds the token is removed.
VALID_TOKEN_FILES = [
    pytest.param(b"s3cr3t-T0ken_a.b~c+d/e\n", "s3cr3t-T0ken_a.b~c+d/e", id="every-character"),
    pytest.param(b"s3cr3tT0ken==\r\n", "s3cr3tT0ken==", id="padding"),
    pytest.param(b"  s3cr3tT0ken\t\n\n", "s3cr3tT0ken", id="whitespace-around"),
    # Windows Notepad can save UTF-8 with a byte order mark.
    pytest.param(b"\xef\xbb\xbfs3cr3tT0ken\r\n", "s3cr3tT0ken", id="byte-order-mark"),
]


@pytest.mark.parametrize(("content", "token"), VALID_TOKEN_FILES)
def test_token_file_valid(tmp_path: Path, content: bytes, token: str) -> None:
    path = tmp_path / "hq-token"
    path.write_bytes(content)

    assert read_token(str(path), warn=False) == token


# (token file content, fragments the error must contain). Each token starts with "s3cr3t",
# which no error may quote.
INVALID_TOKEN_FILES = [
    pytest.param(
        b"s3cr3t-one\nsecond\n",
        ["contains a line break after character 10 of the token", "alone, on one line"],
        id="line-break",
    ),
    pytest.param(
        b"s3cr3t-one\r\nsecond\r\n",
        ["contains a line break after character 10 of the token"],
        id="windows-line-break",
    ),
    pytest.param(
        "s3cr3t\u2013one\n".encode(),
        ["U+2013 EN DASH at character 7 of the token", "letters, digits, -._~+/"],
        id="en-dash",
    ),
    pytest.param(
        b"s3cr3t one\n",
        ["U+0020 SPACE at character 7 of the token"],
        id="space",
    ),
    pytest.param(
        b"s3cr3t\tone\n",
        ["the control character U+0009 at character 7 of the token"],
        id="tab",
    ),
    pytest.param(
        b"Bearer s3cr3t-one\n",
        ["starts with 'Bearer'", "write the token alone"],
        id="bearer-prefix",
    ),
    pytest.param(
        b"bearer\ts3cr3t-one\n",
        ["starts with 'Bearer'"],
        id="bearer-prefix-lower-case",
    ),
    pytest.param(
        b"\xff\xfes\x003\x00c\x00r\x003\x00t\x00",
        ["is not UTF-8 text", "save it as UTF-8"],
        id="utf-16",
    ),
]


@pytest.mark.parametrize(
    ("content", "character"),
    [
        pytest.param(b"s3cr3t=one\n", "U+003D EQUALS SIGN at character 7", id="inner-equals"),
        pytest.param(b"s3cr3t:one!\n", "U+003A COLON at character 7", id="colon"),
    ],
)
def test_token_file_unusual_character_warns(tmp_path: Path, content: bytes, character: str) -> None:
    # Printable ASCII outside RFC 6750's token characters fits in the header, and an issuer
    # may use it, so such a token is read with a warning instead of stopping the daemon.
    path = tmp_path / "hq-token"
    path.write_bytes(content)

    with capture_logs() as logs:
        token = read_token(str(path))

    assert token == content.decode().strip()
    warnings = [entry for entry in logs if entry["event"] == "hq.token_unusual"]
    assert [entry["character"] for entry in warnings] == [character]
    assert "s3cr3t" not in repr(logs)


@pytest.mark.parametrize(("content", "fragments"), INVALID_TOKEN_FILES)
def test_token_file_invalid(tmp_path: Path, content: bytes, fragments: list[str]) -> None:
    path = tmp_path / "hq-token"
    path.write_bytes(content)

    with pytest.raises(ConfigError) as raised:
        read_token(str(path), warn=False)

    message = str(raised.value)
    assert f"[hq] token_file {path} " in message
    for fragment in fragments:
        assert fragment in message
    assert "s3cr3t" not in message
    assert "second" not in message
