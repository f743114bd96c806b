"""Events reach journald as structured fields over its native datagram socket."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest

from daemon.store import open_reader
from tests.conftest import Daemon, make_daemon

WAIT = 15.0


def parse_datagram(data: bytes) -> dict[str, str]:
    """Decode the native journal protocol: NAME=value lines, or NAME, length, value."""
    fields: dict[str, str] = {}
    position = 0
    while position < len(data):
        newline = data.index(b"\n", position)
        line = data[position:newline]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            position = newline + 1
        else:
            name = line
            (length,) = struct.unpack("<Q", data[newline + 1 : newline + 9])
            value = data[newline + 9 : newline + 9 + length]
            position = newline + 9 + length + 1
        fields[name.decode()] = value.decode()
    return fields


class JournalSocket:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.entries: list[dict[str, str]] = []

    def wait_for(self, event: str) -> dict[str, str]:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            for entry in self.entries:
                if entry.get("EVENT") == event:
                    return entry
            try:
                self.entries.append(parse_datagram(self.sock.recv(65536)))
            except TimeoutError:
                continue
        raise AssertionError(f"no {event} entry; got {[e.get('EVENT') for e in self.entries]}")


@pytest.fixture
def journal(tmp_path: Path):  # type: ignore[no-untyped-def]
    sock = JournalSocket(tmp_path / "journal.sock")
    yield sock
    sock.sock.close()


def _journal_daemon(tmp_path: Path, journal: JournalSocket, fmt: str) -> Daemon:
    instance = make_daemon(tmp_path / "d")
    text = instance.config.read_text().replace(
        'format = "json"', f'format = "{fmt}"\njournal_socket = "{journal.path}"'
    )
    instance.config.write_text(text)
    return instance


def test_decision_fields_and_priority(tmp_path: Path, journal: JournalSocket) -> None:
    instance = _journal_daemon(tmp_path, journal, "journal")
    instance.start()
    try:
        instance.scan("KEY-SHOPPER-5f1c2b", location="MANUAL_IN_STORE")
        decided = journal.wait_for("scan.decided")
        warning = journal.wait_for("server.unauthenticated")
    finally:
        instance.stop()

    assert decided["PRIORITY"] == "6"
    assert decided["SYSLOG_IDENTIFIER"] == "identity-connector"
    assert decided["ACTION"] == "ACCEPT"
    assert decided["LOCATION"] == "MANUAL_IN_STORE"
    assert decided["MESSAGE"].startswith("scan.decided ")
    assert "KEY-SHOPPER-5f1c2b" not in str(journal.entries)
    assert warning["PRIORITY"] == "4"


def test_traceback_sent_as_binary_field(tmp_path: Path, journal: JournalSocket) -> None:
    instance = _journal_daemon(tmp_path, journal, "journal")
    instance.start()
    try:
        connection = open_reader(instance.database, 5.0)
        connection.execute("DROP TABLE identities")
        connection.commit()
        connection.close()
        assert instance.scan("KEY-SHOPPER-5f1c2b").status == 500
        failure = journal.wait_for("request.failed")
    finally:
        instance.stop()

    assert failure["PRIORITY"] == "3"
    assert "Traceback" in failure["EXCEPTION"]
    assert "\n" in failure["EXCEPTION"]


def test_auto_detects_journal_stream(tmp_path: Path, journal: JournalSocket) -> None:
    instance = _journal_daemon(tmp_path, journal, "auto")
    # systemd sets JOURNAL_STREAM to the device and inode of the stream stdout is connected to;
    # the daemon's stdout is this log file.
    instance.log_path.touch()
    status = os.stat(instance.log_path)
    instance.env = {"JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"}
    instance.start()
    try:
        entry = journal.wait_for("server.started")
    finally:
        instance.stop()
    assert entry["PORT"] == str(instance.port)
    assert entry["VERSION"] == metadata.version("identity-connector")


@pytest.mark.parametrize("under_systemd", [True, False], ids=["journal", "terminal"])
def test_start_up_error_priority(tmp_path: Path, under_systemd: bool) -> None:
    # journald files a stream line at priority info unless it starts with "<N>".
    config = tmp_path / "config.toml"
    config.write_text('[server]\nhost = "0.0.0.0"\n[stores]\nids = ["S-1"]\n', "utf-8")
    stderr_path = tmp_path / "stderr.txt"
    with stderr_path.open("wb") as stderr:
        status = os.fstat(stderr.fileno())
        env = dict(os.environ)
        env.pop("JOURNAL_STREAM", None)
        if under_systemd:
            env["JOURNAL_STREAM"] = f"{status.st_dev}:{status.st_ino}"
        code = subprocess.run(
            [sys.executable, "-m", "daemon", "serve", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=env,
            timeout=60,
        ).returncode
    line = stderr_path.read_text(encoding="utf-8").splitlines()[-1]
    assert code == 2
    assert line.startswith("<3>error: ") == under_systemd
