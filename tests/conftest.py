"""Fixtures that run the real daemon as a subprocess on a loopback port with real SQLite files."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 20.0

# Records every HTTP test can rely on; each key is a distinct, searchable secret string.
SAMPLE_RECORDS: list[dict[str, Any]] = [
    {
        "credentialId": "c-shopper",
        "key": "KEY-SHOPPER-5f1c2b",
        "id": "shopper-1",
        "type": "SHOPPER",
        "status": "ACTIVE",
        "stores": ["STORE-001"],
        "version": 1,
    },
    {
        "credentialId": "c-associate",
        "key": "KEY-ASSOCIATE-8e2d11",
        "id": "associate-1",
        "type": "ASSOCIATE",
        "status": "ACTIVE",
        "stores": ["*"],
        "version": 1,
    },
    {
        "credentialId": "c-cash",
        "key": "KEY-CASH-33aa90",
        "id": "cash-1",
        "type": "CASH",
        "status": "ACTIVE",
        "stores": ["STORE-001"],
        "version": 1,
    },
    {
        "credentialId": "c-loyalty",
        "key": "KEY-LOYALTY-71bc04",
        "id": "loyalty-1",
        "type": "LOYALTY",
        "status": "ACTIVE",
        "stores": ["STORE-001"],
        "version": 1,
    },
    {
        "credentialId": "c-revoked",
        "key": "KEY-REVOKED-0d9e77",
        "id": "shopper-revoked",
        "type": "SHOPPER",
        "status": "REVOKED",
        "stores": ["STORE-001"],
        "version": 2,
    },
    {
        "credentialId": "c-suspended",
        "key": "KEY-SUSPENDED-4c4c12",
        "id": "shopper-suspended",
        "type": "SHOPPER",
        "status": "SUSPENDED",
        "stores": ["STORE-001"],
        "version": 2,
    },
    {
        "credentialId": "c-future",
        "key": "KEY-FUTURE-a1b2c3",
        "id": "shopper-future",
        "type": "SHOPPER",
        "status": "ACTIVE",
        "stores": ["STORE-001"],
        "validFrom": "2999-01-01T00:00:00Z",
        "version": 1,
    },
    {
        "credentialId": "c-expired",
        "key": "KEY-EXPIRED-e5e5e5",
        "id": "shopper-expired",
        "type": "SHOPPER",
        "status": "ACTIVE",
        "stores": ["STORE-001"],
        "validUntil": "2001-01-01T00:00:00Z",
        "version": 1,
    },
    {
        "credentialId": "c-otherstore",
        "key": "KEY-OTHERSTORE-909090",
        "id": "shopper-other",
        "type": "SHOPPER",
        "status": "ACTIVE",
        "stores": ["STORE-999"],
        "version": 1,
    },
    {
        "credentialId": "c-entryonly",
        "key": "KEY-ENTRYONLY-123abc",
        "id": "shopper-entry",
        "type": "SHOPPER",
        "status": "ACTIVE",
        "stores": ["STORE-001"],
        "locations": ["ENTRY"],
        "version": 1,
    },
    {
        "credentialId": "c-optical",
        "key": "KEY-OPTICAL-456def",
        "id": "shopper-optical",
        "type": "SHOPPER",
        "status": "ACTIVE",
        "stores": ["STORE-001"],
        "channels": ["OPTICAL"],
        "version": 1,
    },
    {
        "credentialId": "c-badge",
        "key": "04:a2:3b:1c:5d:6e:80",
        "id": "associate-1",
        "type": "ASSOCIATE",
        "status": "ACTIVE",
        "stores": ["*"],
        "channels": ["RADIO", "CONTACT"],
        "version": 1,
    },
    {
        "credentialId": "c-susp-other",
        "key": "KEY-SUSPOTHER-777aaa",
        "id": "shopper-susp-other",
        "type": "SHOPPER",
        "status": "SUSPENDED",
        "stores": ["STORE-999"],
        "version": 1,
    },
]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def now_rfc3339(offset_seconds: float = 0.0) -> str:
    moment = datetime.now(UTC) + timedelta(seconds=offset_seconds)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def scan_body(
    value: str,
    location: str = "ENTRY",
    channel: str = "OPTICAL",
    store: str = "STORE-001",
    scan_id: str | None = None,
    timestamp: str | None = None,
) -> dict[str, Any]:
    return {
        "requestId": str(uuid.uuid4()),
        "storeId": store,
        "scanEvent": {
            "id": scan_id or str(uuid.uuid4()),
            "timestamp": timestamp or now_rfc3339(),
            "location": location,
            "value": value,
            "channel": channel,
        },
    }


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def write_config(directory: Path, port: int, extra: str = "") -> Path:
    config = directory / "config.toml"
    config.write_text(
        f"""
[server]
host = "127.0.0.1"
port = {port}

[stores]
ids = ["STORE-001", "STORE-002"]

[database]
path = "{directory / "connector.sqlite3"}"

[logging]
format = "json"
level = "info"
{extra}
""",
        encoding="utf-8",
    )
    return config


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemon", *args],
        capture_output=True,
        text=True,
        input=stdin,
        cwd=REPO,
        timeout=120,
    )


@dataclass
class Daemon:
    """A daemon subprocess; its stdout (JSON log lines) goes to ``log_path``."""

    directory: Path
    port: int
    config: Path
    log_path: Path
    process: subprocess.Popen | None = None
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment variables for the daemon process, e.g. NOTIFY_SOCKET."""

    @property
    def database(self) -> Path:
        return self.directory / "connector.sqlite3"

    def start(self, wait: bool = True) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "daemon", "serve", "--config", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, **self.env},
        )
        log.close()
        if not wait:
            return
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"daemon exited at start:\n{self.log_path.read_text()}")
            try:
                if self.request("GET", "/healthz").status == 200:
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"daemon did not become healthy:\n{self.log_path.read_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(timeout=30)
        self.process = None
        return code

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return Reply(response.status, dict(response.getheaders()), response.read())
        finally:
            connection.close()

    def post_json(self, payload: Any, content_type: str = "application/json") -> Reply:
        return self.request(
            "POST",
            "/v1/identity/scan",
            json.dumps(payload).encode(),
            {"Content-Type": content_type},
        )

    def scan(self, value: str, **kwargs: Any) -> Reply:
        return self.post_json(scan_body(value, **kwargs))

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for raw in self.log_path.read_text(encoding="utf-8").splitlines():
            try:
                lines.append(json.loads(raw))
            except json.JSONDecodeError:
                lines.append({"event": "(not json)", "raw": raw})
        return lines


def import_records(config: Path, records: list[dict[str, Any]], directory: Path) -> None:
    source = directory / "records.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    result = run_cli("import", "--config", str(config), str(source))
    # An empty file still creates the database, and import exits 1 with a warning for it.
    expected = 0 if records else 1
    assert result.returncode == expected, result.stderr


def exchange(daemon: Daemon, request: bytes) -> bytes:
    """Send raw request bytes to the daemon and return all it sends until it closes."""
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def unlabelled_samples(daemon: Daemon) -> dict[str, float]:
    """Return one scrape's samples that have no labels, by name; a failed scrape fails the test."""
    reply = daemon.request("GET", "/metrics")
    assert reply.status == 200, reply.body
    return {
        sample.name: sample.value
        for metric in text_string_to_metric_families(reply.body.decode())
        for sample in metric.samples
        if not sample.labels
    }


def labelled_samples(daemon: Daemon, family: str, label: str, **where: str) -> dict[str, float]:
    """Return one scrape's samples of a metric family by the value of ``label``.

    ``where`` keeps only the samples with those label values. For a counter, only the
    ``_total`` samples count. A failed scrape fails the test.
    """
    reply = daemon.request("GET", "/metrics")
    assert reply.status == 200, reply.body
    return {
        sample.labels[label]: sample.value
        for metric in text_string_to_metric_families(reply.body.decode())
        if metric.name == family
        for sample in metric.samples
        if sample.name in (family, f"{family}_total")
        and all(sample.labels.get(name) == value for name, value in where.items())
    }


def edit_config(config: Path, *replacements: tuple[str, str]) -> None:
    """Replace text in a configuration file, each (old, new) pair in turn."""
    text = config.read_text(encoding="utf-8")
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new)
    config.write_text(text, encoding="utf-8")


def busy_timeout(value: str) -> tuple[str, str]:
    """Return the ``edit_config`` pair that sets database.busy_timeout to ``value``.

    A short timeout makes a commit that waits for another connection's write lock fail
    within a test.
    """
    return ("[database]\n", f'[database]\nbusy_timeout = "{value}"\n')


def make_daemon(directory: Path, extra_config: str = "", records: list | None = None) -> Daemon:
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = write_config(directory, port, extra_config)
    import_records(config, SAMPLE_RECORDS if records is None else records, directory)
    return Daemon(directory, port, config, directory / "daemon.log")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A fresh daemon with the sample records, for tests that change its state."""
    instance = make_daemon(tmp_path / "daemon")
    instance.start()
    yield instance
    if instance.process is not None:
        instance.stop()


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon per test module, for read-mostly tests such as validation tables."""
    instance = make_daemon(tmp_path_factory.mktemp("shared"))
    instance.start()
    yield instance
    if instance.process is not None:
        instance.stop()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost,::1")
