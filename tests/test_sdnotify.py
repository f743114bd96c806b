"""sd_notify protocol against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from daemon import sdnotify
from tests.conftest import free_port, write_config
from tests.helpers_store import run_serve_until_exit

RECEIVE_TIMEOUT = 10.0  # seconds; generous for a loaded 2-core machine


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    # Each test starts with no failures recorded, as after a fresh start.
    monkeypatch.setattr(sdnotify, "_failed_sends", 0)
    yield


@pytest.fixture
def path_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    # A short directory keeps the path below the 108-byte sun_path limit,
    # which pytest's tmp_path can exceed with long test names.
    with tempfile.TemporaryDirectory(prefix="sdn-") as directory:
        path = os.path.join(directory, "notify.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
            receiver.bind(path)
            receiver.settimeout(RECEIVE_TIMEOUT)
            monkeypatch.setenv("NOTIFY_SOCKET", path)
            yield receiver


@pytest.fixture
def abstract_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    name = f"identity-connector-test-{uuid.uuid4()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind("\0" + name)
        receiver.settimeout(RECEIVE_TIMEOUT)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        yield receiver


def assert_no_datagram(receiver: socket.socket) -> None:
    receiver.setblocking(False)
    with pytest.raises(BlockingIOError):
        receiver.recv(8192)


HELPER_CASES: list[tuple[str, Callable[[], bool], bytes]] = [
    ("ready", lambda: sdnotify.ready(), b"READY=1"),
    (
        "ready with status",
        lambda: sdnotify.ready("serving 2 stores"),
        b"READY=1\nSTATUS=serving 2 stores",
    ),
    ("status", lambda: sdnotify.status("HQ unreachable"), b"STATUS=HQ unreachable"),
    (
        "status control characters",
        lambda: sdnotify.status("line 1\nline 2\r\tend"),
        b"STATUS=line 1 line 2  end",
    ),
    ("status utf-8", lambda: sdnotify.status("café"), "STATUS=café".encode()),
    ("status lone surrogate", lambda: sdnotify.status("bad \udc80 byte"), b"STATUS=bad ? byte"),
    ("watchdog", lambda: sdnotify.watchdog(), b"WATCHDOG=1"),
    ("stopping", lambda: sdnotify.stopping(), b"STOPPING=1"),
    (
        "notify several lines",
        lambda: sdnotify.notify("STATUS=draining", "ERRNO=0"),
        b"STATUS=draining\nERRNO=0",
    ),
]


@pytest.mark.parametrize(
    ("send", "expected"),
    [(send, expected) for _, send, expected in HELPER_CASES],
    ids=[case_id for case_id, _, _ in HELPER_CASES],
)
def test_helper_sends_exact_datagram(
    path_socket: socket.socket, send: Callable[[], bool], expected: bytes
) -> None:
    sent = send()

    assert sent is True
    assert path_socket.recv(8192) == expected


@pytest.mark.parametrize(
    ("send", "expected"),
    [(send, expected) for _, send, expected in HELPER_CASES],
    ids=[case_id for case_id, _, _ in HELPER_CASES],
)
def test_helper_abstract_socket(
    abstract_socket: socket.socket, send: Callable[[], bool], expected: bytes
) -> None:
    sent = send()

    assert sent is True
    assert abstract_socket.recv(8192) == expected


def test_reloading_sends_monotonic_time(path_socket: socket.socket) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    sent = sdnotify.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000

    assert sent is True
    datagram = path_socket.recv(8192)
    match = re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=(\d+)", datagram)
    assert match is not None, datagram
    assert before <= int(match.group(1)) <= after


def test_long_status_truncated_to_limit(path_socket: socket.socket) -> None:
    # Three-byte characters put the cut inside one, whose partial bytes must go.
    sent = sdnotify.ready("€" * 2000)

    assert sent is True
    datagram = path_socket.recv(8192)
    assert len(datagram) <= sdnotify.MAX_DATAGRAM_BYTES
    assert datagram.decode().startswith("READY=1\nSTATUS=€")
    assert datagram.decode().endswith("€")


@pytest.mark.parametrize(
    "line",
    ["READY=1\nSTOPPING=1", "STATUS=a\rb", "STATUS=a\0b", "READY"],
    ids=["newline", "carriage return", "nul", "no equals sign"],
)
def test_notify_rejects_invalid_line(path_socket: socket.socket, line: str) -> None:
    with pytest.raises(ValueError, match="invalid sd_notify line"):
        sdnotify.notify(line)

    assert_no_datagram(path_socket)


def test_notify_rejects_oversized_datagram(path_socket: socket.socket) -> None:
    with pytest.raises(ValueError, match="longer than the maximum"):
        sdnotify.notify("STATUS=" + "x" * sdnotify.MAX_DATAGRAM_BYTES)

    assert_no_datagram(path_socket)


def test_no_notify_socket_is_noop() -> None:
    with capture_logs() as logs:
        results = [sdnotify.ready(), sdnotify.watchdog(), sdnotify.stopping()]

    assert results == [False, False, False]
    assert logs == []


def test_empty_notify_socket_is_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "")

    with capture_logs() as logs:
        sent = sdnotify.ready()

    assert sent is False
    assert logs == []


@pytest.mark.parametrize(
    "address",
    ["relative/notify.sock", "@", "vsock:2:1234"],
    ids=["relative path", "empty abstract name", "unsupported scheme"],
)
def test_invalid_notify_socket_returns_false(monkeypatch: pytest.MonkeyPatch, address: str) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", address)

    with capture_logs() as logs:
        sent = sdnotify.ready()

    assert sent is False
    assert [entry["event"] for entry in logs] == ["sdnotify.send_failed"]


def test_send_failure_logged_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "missing.sock"))

    with capture_logs() as logs:
        results = [sdnotify.watchdog() for _ in range(3)]

    assert results == [False, False, False]
    warnings = [entry for entry in logs if entry["log_level"] == "warning"]
    assert len(warnings) == 1
    assert warnings[0]["event"] == "sdnotify.send_failed"
    assert "error" in warnings[0]


def test_send_recovery_logged(monkeypatch: pytest.MonkeyPatch) -> None:
    with tempfile.TemporaryDirectory(prefix="sdn-") as directory:
        path = os.path.join(directory, "notify.sock")
        monkeypatch.setenv("NOTIFY_SOCKET", path)

        with capture_logs() as logs:
            first = sdnotify.watchdog()
            second = sdnotify.watchdog()
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
                receiver.bind(path)
                receiver.settimeout(RECEIVE_TIMEOUT)
                third = sdnotify.watchdog()
                received = receiver.recv(8192)

    assert [first, second, third] == [False, False, True]
    assert received == b"WATCHDOG=1"
    recovered = [entry for entry in logs if entry["event"] == "sdnotify.send_recovered"]
    assert len(recovered) == 1
    assert recovered[0]["failed_sends"] == 2


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),
        ("20000000", None, 10.0),
        ("20000000", "own", 10.0),
        ("20000000", "other", None),
        ("500000", None, 0.25),
        ("0", None, None),
        ("-5", None, None),
        ("twenty", None, None),
        ("20000000", "not-a-pid", None),
    ],
    ids=[
        "unset",
        "no pid",
        "own pid",
        "other pid",
        "sub-second",
        "zero",
        "negative",
        "not a number",
        "invalid pid",
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid == "own":
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    elif pid == "other":
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    elif pid is not None:
        monkeypatch.setenv("WATCHDOG_PID", pid)

    assert sdnotify.watchdog_interval() == expected


def test_extending_timeout_while_body_runs(path_socket: socket.socket) -> None:
    with sdnotify.extending_timeout(30.0, 0.05, 60.0, "opening the database"):
        time.sleep(0.3)

    messages = []
    path_socket.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while True:
            messages.append(path_socket.recv(8192))
    assert messages[0] == b"STATUS=opening the database"
    assert len(messages) >= 3, messages
    assert set(messages[1:]) == {b"EXTEND_TIMEOUT_USEC=30000000"}


def test_extending_timeout_stops_at_its_limit(path_socket: socket.socket) -> None:
    with sdnotify.extending_timeout(30.0, 0.05, 0.0, "opening the database"):
        time.sleep(0.3)

    path_socket.setblocking(False)
    assert path_socket.recv(8192) == b"STATUS=opening the database"
    assert_no_datagram(path_socket)


def test_hq_settings_error_exits_before_ready(path_socket: socket.socket, tmp_path: Path) -> None:
    # Under systemd a failure after READY=1 is a restart loop of a "started" unit.
    config = write_config(
        tmp_path, free_port(), '[hq]\nurl = "http://127.0.0.1:9"\nstore_id = "STORE-999"\n'
    )

    result = run_serve_until_exit(config)

    path_socket.setblocking(False)
    messages = []
    with contextlib.suppress(BlockingIOError):
        while True:
            messages.append(path_socket.recv(4096))
    assert result.returncode == 2, result.stderr
    assert "store_id" in result.stderr
    assert not any(b"READY=1" in message for message in messages)
