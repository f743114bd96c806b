"""The admission parts on their own: addresses, buckets, log throttling, key files, reload."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from daemon.api import problem_response
from daemon.config import ConfigError, parse_config
from daemon.security import (
    Admission,
    ApiKeys,
    ForwardedForInvalid,
    LogThrottle,
    RateLimiter,
    check_listener_safety,
    client_address,
    load_api_key,
    parse_address,
    parse_networks,
)
from tests.tls_helpers import write_api_key


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


ADDRESS_CASES = [
    # (text as a peer or proxy writes it, expected address)
    ("192.0.2.1", "192.0.2.1"),
    ("192.0.2.1:443", "192.0.2.1"),
    ("::ffff:192.0.2.1", "192.0.2.1"),
    ("[2001:db8::1]:8443", "2001:db8::1"),
    ("[2001:db8::1]", "2001:db8::1"),
    ("fe80::1%eth0", "fe80::1"),
    (" 2001:db8::2 ", "2001:db8::2"),
]


@pytest.mark.parametrize(("text", "expected"), ADDRESS_CASES)
def test_parse_address(text: str, expected: str) -> None:
    assert parse_address(text) == ipaddress.ip_address(expected)


TRUSTED = parse_networks(["127.0.0.1/32", "10.0.0.0/8"])
FORWARDED_CASES = [
    # (case, peer, X-Forwarded-For values, expected client)
    ("untrusted peer ignores header", "192.0.2.9", ["198.51.100.1"], "192.0.2.9"),
    ("trusted peer without header", "127.0.0.1", [], "127.0.0.1"),
    ("trusted peer names client", "127.0.0.1", ["198.51.100.1"], "198.51.100.1"),
    ("rightmost untrusted hop wins", "127.0.0.1", ["203.0.113.5, 198.51.100.1"], "198.51.100.1"),
    ("walk through trusted hops", "127.0.0.1", ["198.51.100.1, 10.1.2.3"], "198.51.100.1"),
    ("repeated headers joined", "127.0.0.1", ["198.51.100.1", "10.1.2.3"], "198.51.100.1"),
    ("all hops trusted", "127.0.0.1", ["10.9.9.9"], "10.9.9.9"),
    ("garbage left of the client unread", "127.0.0.1", ["junk, 198.51.100.1"], "198.51.100.1"),
]


@pytest.mark.parametrize(
    ("case", "peer", "forwarded", "expected"),
    FORWARDED_CASES,
    ids=[case for case, *_ in FORWARDED_CASES],
)
def test_client_address(case: str, peer: str, forwarded: list[str], expected: str) -> None:
    found = client_address(ipaddress.ip_address(peer), forwarded, TRUSTED)

    assert found == ipaddress.ip_address(expected)


def test_client_address_invalid_hop() -> None:
    with pytest.raises(ForwardedForInvalid):
        client_address(ipaddress.ip_address("127.0.0.1"), ["198.51.100.1, unknown"], TRUSTED)


def test_rate_limiter_burst_then_refill() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=2.0, burst=3, max_clients=10, clock=clock)

    burst = [limiter.acquire("a") for _ in range(3)]
    limited = limiter.acquire("a")
    other = limiter.acquire("b")
    clock.now += 0.5
    refilled = limiter.acquire("a")

    assert burst == [0.0, 0.0, 0.0]
    assert limited == pytest.approx(0.5)
    assert other == 0.0
    assert refilled == 0.0


def test_rate_limiter_bounds_table() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=1.0, burst=5, max_clients=100, clock=clock)

    for number in range(1000):
        limiter.acquire(f"client-{number}")

    assert len(limiter) == 100


def test_rate_limiter_drops_idle_buckets() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=1.0, burst=5, max_clients=100, clock=clock)
    for number in range(4):
        limiter.acquire(f"client-{number}")

    clock.now += 5.0
    limiter.acquire("late")

    assert len(limiter) == 1


def test_rate_limiter_off_at_zero() -> None:
    limiter = RateLimiter(rate=0.0, burst=1, max_clients=1)

    assert [limiter.acquire("a") for _ in range(50)] == [0.0] * 50
    assert len(limiter) == 0


def test_log_throttle_counts_suppressed() -> None:
    clock = FakeClock()
    throttle = LogThrottle(interval=10.0, clock=clock)

    first = throttle.admit("a")
    suppressed = [throttle.admit("a") for _ in range(3)]
    other = throttle.admit("b")
    clock.now += 10.0
    later = throttle.admit("a")

    assert first == 0
    assert suppressed == [None, None, None]
    assert other == 0
    assert later == 3


def test_api_keys_match_only_loaded(tmp_path: Path) -> None:
    keys = ApiKeys.load(
        [
            str(write_api_key(tmp_path / "one", "first-key-0123456789ab")),
            str(write_api_key(tmp_path / "two", "second-key-0123456789ab")),
        ]
    )

    assert keys.matches(b"first-key-0123456789ab")
    assert keys.matches(b"second-key-0123456789ab")
    assert not keys.matches(b"first-key-0123456789a")
    assert not keys.matches(b"")


KEY_FILE_ERRORS = [
    # (case, file content or None for no file, word expected in the message)
    ("missing", None, "not found"),
    ("empty", "\n  \n", "empty"),
    ("two keys", "first-key-0123456789ab\nsecond-key-0123456789ab\n", "more than one"),
    ("short", "short-key\n", "shorter than 16"),
    ("not ascii", "schlüssel-0123456789abcdef\n", "printable ASCII"),
]


@pytest.mark.parametrize(
    ("case", "content", "message"), KEY_FILE_ERRORS, ids=[c for c, _, _ in KEY_FILE_ERRORS]
)
def test_key_file_errors(tmp_path: Path, case: str, content: str | None, message: str) -> None:
    path = tmp_path / "key"
    if content is not None:
        path.write_text(content, encoding="utf-8")

    with pytest.raises(ConfigError) as failure:
        load_api_key(str(path))

    assert message in str(failure.value)
    assert str(path) in str(failure.value)


def test_key_file_from_credentials_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_api_key(tmp_path / "gateway-key", "credential-key-0123456789ab")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))

    key = load_api_key("gateway-key")

    assert ApiKeys((key,)).matches(b"credential-key-0123456789ab")


def test_relative_key_file_without_credentials_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)

    with pytest.raises(ConfigError, match="LoadCredential"):
        load_api_key("gateway-key")


BASE = '[stores]\nids = ["STORE-001"]\n'
SAFETY_CASES = [
    # (case, configuration, accepted)
    ("loopback without auth", '[server]\nhost = "127.0.0.1"\n', True),
    ("ipv6 loopback without auth", '[server]\nhost = "::1"\n', True),
    ("localhost without auth", '[server]\nhost = "localhost"\n', True),
    ("any address without auth", '[server]\nhost = "0.0.0.0"\n', False),
    ("empty host without auth", '[server]\nhost = ""\n', False),
    ("public with keys", '[server]\nhost = "::"\n[auth]\napi_key_files = ["/k"]\n', True),
    (
        "public with client CA",
        '[server]\nhost = "0.0.0.0"\n[tls]\ncert_file = "/c"\nkey_file = "/k"\n'
        'client_ca_file = "/ca"\n',
        True,
    ),
    (
        "public with TLS only",
        '[server]\nhost = "0.0.0.0"\n[tls]\ncert_file = "/c"\nkey_file = "/k"\n',
        False,
    ),
]


@pytest.mark.parametrize(
    ("case", "text", "accepted"), SAFETY_CASES, ids=[c for c, _, _ in SAFETY_CASES]
)
def test_listener_safety(case: str, text: str, accepted: bool) -> None:
    config = parse_config(BASE + text)

    if accepted:
        check_listener_safety(config)
    else:
        with pytest.raises(ConfigError, match="api_key_files"):
            check_listener_safety(config)


def auth_config(*key_files: Path) -> str:
    listed = ", ".join(f'"{path}"' for path in key_files)
    return BASE + f"[auth]\napi_key_files = [{listed}]\n"


def test_apply_restores_previous_keys(tmp_path: Path) -> None:
    first = write_api_key(tmp_path / "first", "first-key-0123456789ab")
    second = write_api_key(tmp_path / "second", "second-key-0123456789ab")
    old = parse_config(auth_config(first))
    admission = Admission(old, problem_response)

    admission.apply(parse_config(auth_config(second)))
    switched = admission.state.api_keys.matches(b"second-key-0123456789ab")
    # Runtime calls every hook with the old configuration when a later hook fails.
    admission.apply(old)
    restored = admission.state.api_keys.matches(b"first-key-0123456789ab")

    assert switched
    assert restored


def test_apply_failure_changes_nothing(tmp_path: Path) -> None:
    first = write_api_key(tmp_path / "first", "first-key-0123456789ab")
    old = parse_config(auth_config(first))
    admission = Admission(old, problem_response)

    with pytest.raises(ConfigError, match="not found"):
        admission.apply(parse_config(auth_config(tmp_path / "missing")))
    admission.apply(old)

    assert admission.state.config is old
    assert admission.state.api_keys.matches(b"first-key-0123456789ab")


def test_apply_rejects_unsafe_listener(tmp_path: Path) -> None:
    first = write_api_key(tmp_path / "first", "first-key-0123456789ab")
    old = parse_config(auth_config(first).replace(BASE, BASE + '[server]\nhost = "0.0.0.0"\n'))
    admission = Admission(old, problem_response)
    without_keys = parse_config(BASE + '[server]\nhost = "0.0.0.0"\n[auth]\n')

    with pytest.raises(ConfigError, match="api_key_files"):
        admission.apply(without_keys)

    assert admission.state.config is old
