"""API keys, network allow-list, X-Forwarded-For, rate limits and listener safety over HTTP."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Daemon, run_cli, write_config
from tests.tls_helpers import (
    SecureDaemon,
    make_secure_daemon,
    replace_in_config,
    write_api_key,
)

KEY = "auth-suite-key-3c9e1b7d55a0f28e"
OLD_KEY = "rotation-old-key-91f0c3aa7e2d64b5"
NEW_KEY = "rotation-new-key-0d4e8b61c7f3a259"
NEWER_KEY = "rotation-newer-key-5a1b9c3e7f0d2468"
WRONG_KEY = "not-the-key-7777777777777777"
PROBLEM = "application/problem+json"


def short_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def reload_and_wait(daemon: SecureDaemon, event: str = "config.reloaded") -> dict:
    lines = len(daemon.log_lines())
    daemon.sighup()
    return daemon.wait_for_log(event, after=lines)


@pytest.fixture(scope="module")
def key_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureDaemon]:
    directory = tmp_path_factory.mktemp("keys")
    key_file = write_api_key(directory / "keys" / "gateway", KEY)
    instance = make_secure_daemon(
        directory,
        f'[auth]\napi_key_files = ["{key_file}"]\nlog_interval = "1s"\n',
        api_key=KEY,
    )
    instance.start()
    yield instance
    if instance.process is not None:
        instance.stop()


def test_right_key_accepted(key_daemon: SecureDaemon) -> None:
    reply = key_daemon.scan("KEY-SHOPPER-5f1c2b")

    assert reply.status == 200
    assert reply.json()["action"] == "ACCEPT"


def send_with_headers(
    daemon: Daemon, path: str, headers: list[tuple[str, str]], source: str = "127.0.0.1"
) -> tuple:
    """Send a GET from `source` with headers in order, repeats included.

    Returns the status, the headers and the body. Other addresses of 127.0.0.0/8 act as
    distinct clients of the daemon on 127.0.0.1.
    """
    connection = http.client.HTTPConnection(
        "127.0.0.1", daemon.port, timeout=30, source_address=(source, 0)
    )
    try:
        connection.putrequest("GET", path)
        for name, value in headers:
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def test_expect_continue_admits_before_header_checks(key_daemon: SecureDaemon) -> None:
    # Without a key, a body over the limit must not earn a 413 before admission: the client
    # gets 100 Continue, then the 401 that every unadmitted request gets.
    body = b"x" * 20_000
    head = (
        "POST /v1/identity/scan HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Expect: 100-continue\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", key_daemon.port), timeout=10) as sock:
        sock.sendall(head.encode())
        received = _read_head(sock, b"")
        interim, _, rest = received.partition(b"\r\n\r\n")
        # The 401 may follow the 100 at once: admission needs no body.
        with contextlib.suppress(ConnectionError):
            sock.sendall(body)
        final = _read_head(sock, rest)

    assert interim.startswith(b"HTTP/1.1 100 ")
    assert final.startswith(b"HTTP/1.1 401 ")


def _read_head(sock: socket.socket, received: bytes) -> bytes:
    """Read from ``sock`` until ``received`` contains a whole status line and headers."""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(4096)
        if not chunk:
            break
        received += chunk
    return received


UNAUTHORIZED_CASES = [
    # (case, path, headers sent)
    ("missing key", "/openapi.json", []),
    ("wrong key", "/openapi.json", [("x-api-key", WRONG_KEY)]),
    ("key sent twice", "/openapi.json", [("x-api-key", KEY), ("x-api-key", KEY)]),
    ("empty key", "/openapi.json", [("x-api-key", "")]),
    ("metrics without key", "/metrics", []),
    ("unknown path without key", "/no/such/path", []),
]


@pytest.mark.parametrize(
    ("case", "path", "headers"), UNAUTHORIZED_CASES, ids=[c for c, _, _ in UNAUTHORIZED_CASES]
)
def test_bad_key_gets_401_problem(
    key_daemon: SecureDaemon, case: str, path: str, headers: list[tuple[str, str]]
) -> None:
    status, reply_headers, body = send_with_headers(key_daemon, path, headers)
    problem = json.loads(body)

    assert status == 401
    assert reply_headers["Content-Type"] == PROBLEM
    assert problem["status"] == 401
    assert problem["title"] == "Unauthorized"
    assert problem["type"].endswith(":unauthorized")
    assert "x-api-key" in problem["detail"]
    assert reply_headers["WWW-Authenticate"] == 'ApiKey header="x-api-key"'
    assert KEY.encode() not in body


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_health_needs_no_key(key_daemon: SecureDaemon, path: str) -> None:
    status, _headers, body = send_with_headers(key_daemon, path, [])

    assert status == 200
    assert b"status" in body
    assert b"identit" not in body


def test_logs_hold_no_key(key_daemon: SecureDaemon) -> None:
    send_with_headers(key_daemon, "/metrics", [("x-api-key", WRONG_KEY)])
    key_daemon.scan("KEY-SHOPPER-5f1c2b")
    log = key_daemon.log_bytes()

    assert KEY.encode() not in log
    assert WRONG_KEY.encode() not in log
    assert b"KEY-SHOPPER-5f1c2b" not in log


def test_rejection_log_rate_limited(key_daemon: SecureDaemon) -> None:
    client = "127.0.0.3"

    def rejections() -> list[dict]:
        return [
            line
            for line in key_daemon.log_lines()
            if line.get("event") == "auth.rejected" and line.get("client") == client
        ]

    for _ in range(5):
        send_with_headers(key_daemon, "/metrics", [("x-api-key", WRONG_KEY)], source=client)
    burst = rejections()
    time.sleep(1.2)
    send_with_headers(key_daemon, "/metrics", [("x-api-key", WRONG_KEY)], source=client)
    after = rejections()

    assert len(burst) == 1
    assert burst[0]["reason"] == "invalid"
    assert burst[0]["key_fingerprint"] == short_hash(WRONG_KEY)
    assert burst[0]["suppressed"] == 0
    assert len(after) == 2
    assert after[1]["key_fingerprint"] == short_hash(WRONG_KEY)
    assert after[1]["suppressed"] == 4


def test_rejection_log_per_key_sent(key_daemon: SecureDaemon) -> None:
    # Rotation: an address that sends two old keys, or an old key and none, shows each.
    client = "127.0.0.4"
    sent = [[("x-api-key", WRONG_KEY)], [("x-api-key", OLD_KEY)], []] * 2
    for headers in sent:
        send_with_headers(key_daemon, "/metrics", headers, source=client)

    lines = [
        (line["reason"], line["key_fingerprint"])
        for line in key_daemon.log_lines()
        if line.get("event") == "auth.rejected" and line.get("client") == client
    ]

    assert lines == [
        ("invalid", short_hash(WRONG_KEY)),
        ("invalid", short_hash(OLD_KEY)),
        ("missing", None),
    ]


def test_api_key_rotation(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    old_file = write_api_key(keys / "gateway-old", OLD_KEY)
    new_file = write_api_key(keys / "gateway-new", NEW_KEY)
    daemon = make_secure_daemon(tmp_path / "daemon", f'[auth]\napi_key_files = ["{old_file}"]\n')
    daemon.start()

    def status_with(key: str) -> int:
        return daemon.request("GET", "/openapi.json", headers={"x-api-key": key}).status

    try:
        before = (status_with(OLD_KEY), status_with(NEW_KEY))

        replace_in_config(daemon.config, f'["{old_file}"]', f'["{old_file}", "{new_file}"]')
        reload_and_wait(daemon)
        overlap = (status_with(OLD_KEY), status_with(NEW_KEY))

        replace_in_config(daemon.config, f'["{old_file}", "{new_file}"]', f'["{new_file}"]')
        reload_and_wait(daemon)
        retired = (status_with(OLD_KEY), status_with(NEW_KEY))

        write_api_key(new_file, NEWER_KEY)
        reload_and_wait(daemon)
        rewritten = (status_with(NEW_KEY), status_with(NEWER_KEY))

        missing = keys / "not-there"
        replace_in_config(daemon.config, f'["{new_file}"]', f'["{missing}"]')
        failed = reload_and_wait(daemon, "auth.reload_failed")
        after_failure = status_with(NEWER_KEY)
        log = daemon.log_bytes()
    finally:
        daemon.stop()

    assert before == (200, 401)
    assert overlap == (200, 200)
    assert retired == (401, 200)
    assert rewritten == (401, 200)
    assert str(missing) in failed["error"]
    assert after_failure == 200
    for secret in (OLD_KEY, NEW_KEY, NEWER_KEY):
        assert secret.encode() not in log


# Networks and proxies ---------------------------------------------------------------------


def test_ipv6_allow_list(tmp_path: Path) -> None:
    if not socket.has_ipv6:
        pytest.skip("this machine has no IPv6 loopback")
    key_file = write_api_key(tmp_path / "keys" / "gateway", KEY)
    daemon = make_secure_daemon(
        tmp_path / "daemon",
        f'[auth]\napi_key_files = ["{key_file}"]\nallow_networks = ["::1/128"]\n',
        host="::1",
        api_key=KEY,
    )
    daemon.start()
    try:
        allowed = daemon.scan("KEY-SHOPPER-5f1c2b")
        replace_in_config(daemon.config, '["::1/128"]', '["2001:db8::/32", "127.0.0.0/8"]')
        reload_and_wait(daemon)
        denied = daemon.scan("KEY-SHOPPER-5f1c2b")
        denied_health = daemon.request("GET", "/healthz")
        denials = [
            line for line in daemon.log_lines() if line.get("event") == "auth.network_denied"
        ]
    finally:
        daemon.stop()

    assert allowed.status == 200
    assert denied.status == 403
    assert denied.headers["Content-Type"] == PROBLEM
    assert denied.json()["status"] == 403
    assert "::1" in denied.json()["detail"]
    assert denied_health.status == 403
    assert denials[0]["client"] == "::1"


@pytest.fixture(scope="module")
def proxied_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureDaemon]:
    """A daemon behind a trusted proxy on 127.0.0.1 that admits clients of 192.0.2.0/24.

    127.0.0.2 is an allowed client but no proxy, so its X-Forwarded-For must be ignored.
    """
    directory = tmp_path_factory.mktemp("proxied")
    key_file = write_api_key(directory / "keys" / "gateway", KEY)
    instance = make_secure_daemon(
        directory,
        f'[auth]\napi_key_files = ["{key_file}"]\n'
        'allow_networks = ["127.0.0.0/8", "192.0.2.0/24"]\n'
        'trusted_proxies = ["127.0.0.1/32"]\n',
        api_key=KEY,
    )
    instance.start()
    yield instance
    if instance.process is not None:
        instance.stop()


FORWARDED_CASES = [
    # (case, X-Forwarded-For from a trusted proxy, expected status)
    ("no header", None, 200),
    ("allowed client", "192.0.2.5", 200),
    ("denied client", "198.51.100.7", 403),
    ("spoofed allowed entry left of the real client", "192.0.2.5, 198.51.100.7", 403),
    ("client behind a second trusted hop", "192.0.2.9, 127.0.0.1", 200),
    ("IPv6 client", "2001:db8::7", 403),
    ("not an address", "gateway.example", 400),
]


@pytest.mark.parametrize(
    ("case", "forwarded", "expected"), FORWARDED_CASES, ids=[c for c, _, _ in FORWARDED_CASES]
)
def test_forwarded_for_from_trusted_proxy(
    proxied_daemon: SecureDaemon, case: str, forwarded: str | None, expected: int
) -> None:
    headers = {"X-Forwarded-For": forwarded} if forwarded else {}

    reply = proxied_daemon.request("GET", "/openapi.json", headers=headers)

    assert reply.status == expected
    if expected != 200:
        assert reply.headers["Content-Type"] == PROBLEM


def test_denied_forwarded_client_is_logged(proxied_daemon: SecureDaemon) -> None:
    proxied_daemon.request("GET", "/openapi.json", headers={"X-Forwarded-For": "198.51.100.99"})

    denials = [
        line for line in proxied_daemon.log_lines() if line.get("event") == "auth.network_denied"
    ]
    assert "198.51.100.99" in {line["client"] for line in denials}


@pytest.mark.parametrize("forwarded", ["198.51.100.7", "192.0.2.5", "gateway.example"])
def test_forwarded_for_from_untrusted_peer_ignored(
    proxied_daemon: SecureDaemon, forwarded: str
) -> None:
    status, _headers, _body = send_with_headers(
        proxied_daemon,
        "/openapi.json",
        [("x-api-key", KEY), ("X-Forwarded-For", forwarded)],
        source="127.0.0.2",
    )

    assert status == 200


# Rate limits ------------------------------------------------------------------------------


def test_rate_limit_gives_429_with_retry_after(tmp_path: Path) -> None:
    key_file = write_api_key(tmp_path / "keys" / "gateway", KEY)
    daemon = make_secure_daemon(
        tmp_path / "daemon",
        f'[auth]\napi_key_files = ["{key_file}"]\nrate_limit = 0.2\nrate_burst = 3\n',
        api_key=KEY,
    )
    daemon.start()
    try:
        admitted = [daemon.request("GET", "/openapi.json").status for _ in range(3)]
        limited = daemon.request("GET", "/openapi.json")
        unauthenticated = daemon.request("GET", "/openapi.json", headers={"x-api-key": ""})
        health = [daemon.request("GET", "/healthz").status for _ in range(10)]
        logged = [line for line in daemon.log_lines() if line.get("event") == "auth.rate_limited"]
    finally:
        daemon.stop()

    assert admitted == [200, 200, 200]
    assert limited.status == 429
    assert limited.headers["Content-Type"] == PROBLEM
    assert limited.json()["status"] == 429
    assert 1 <= int(limited.headers["Retry-After"]) <= 5
    # The limit applies before the key check, so guessing keys is limited too.
    assert unauthenticated.status == 429
    assert health == [200] * 10
    assert logged[0]["client"] == "127.0.0.1"


# Listener safety and [server] limits ------------------------------------------------------


REFUSED_CONFIGS = [
    # (case, extra configuration on host 0.0.0.0)
    ("no tls and no auth", ""),
    ("auth without keys", '[auth]\nallow_networks = ["10.0.0.0/8"]\n'),
    ("tls without client CA", '[tls]\ncert_file = "/nonexistent.crt"\nkey_file = "/nx.key"\n'),
]


@pytest.mark.parametrize(("case", "extra"), REFUSED_CONFIGS, ids=[c for c, _ in REFUSED_CONFIGS])
def test_unauthenticated_public_bind_refused(tmp_path: Path, case: str, extra: str) -> None:
    config = write_config(tmp_path, 8080, extra)
    replace_in_config(config, 'host = "127.0.0.1"', 'host = "0.0.0.0"')

    result = run_cli("serve", "--config", str(config))

    assert result.returncode == 2
    assert "api_key_files" in result.stderr
    assert "client_ca_file" in result.stderr
    assert "0.0.0.0" in result.stderr


def test_reload_to_public_bind_refused(tmp_path: Path) -> None:
    daemon = make_secure_daemon(tmp_path / "daemon")
    daemon.start()
    try:
        replace_in_config(daemon.config, 'host = "127.0.0.1"', 'host = "0.0.0.0"')
        failed = reload_and_wait(daemon, "config.reload_failed")
        status = daemon.request("GET", "/healthz").status
    finally:
        daemon.stop()

    assert "0.0.0.0" in failed["error"]
    assert "api_key_files" in failed["error"]
    assert status == 200


@pytest.fixture(scope="module")
def limited_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureDaemon]:
    instance = make_secure_daemon(
        tmp_path_factory.mktemp("limits"),
        server_options='client_timeout = "1s"\nkeepalive_timeout = "1s"\nmax_field_size = 1024\n',
    )
    instance.start()
    yield instance
    if instance.process is not None:
        instance.stop()


def read_until_closed(sock: socket.socket, limit: float) -> tuple[bytes, float]:
    """Read until the server closes the connection; return the bytes and the seconds taken."""
    started = time.monotonic()
    sock.settimeout(limit)
    received = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return received, time.monotonic() - started
        received += chunk


def test_slow_body_gets_408(limited_daemon: SecureDaemon) -> None:
    with socket.create_connection(("127.0.0.1", limited_daemon.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/identity/scan HTTP/1.1\r\nHost: connector\r\n"
            b'Content-Type: application/json\r\nContent-Length: 200\r\n\r\n{"requestId":'
        )
        received, elapsed = read_until_closed(sock, 15)

    assert received.startswith(b"HTTP/1.1 408")
    assert PROBLEM.encode() in received
    assert elapsed < 10


def test_idle_connection_closed_after_keepalive_timeout(limited_daemon: SecureDaemon) -> None:
    with socket.create_connection(("127.0.0.1", limited_daemon.port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: connector\r\n")
        received, elapsed = read_until_closed(sock, 15)

    assert received == b""
    assert elapsed < 10


@pytest.mark.parametrize(("size", "expected"), [(900, 200), (2000, 400)])
def test_header_size_limit(limited_daemon: SecureDaemon, size: int, expected: int) -> None:
    reply = limited_daemon.request("GET", "/healthz", headers={"X-Padding": "p" * size})

    assert reply.status == expected


def test_loopback_without_auth_warns(limited_daemon: SecureDaemon) -> None:
    warnings = [
        line for line in limited_daemon.log_lines() if line.get("event") == "server.unauthenticated"
    ]

    assert len(warnings) == 1
    assert warnings[0]["level"] == "warning"
