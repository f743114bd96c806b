"""Station sessions, debounce, the event hub and the scan checks, without a subprocess."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import msgspec
import pytest
import structlog
from aiohttp import web

from daemon.api import build_app
from daemon.config import parse_config
from daemon.devices import OPTIONAL_PACKAGES, device_configs
from daemon.events import EventHub, client_allowed
from daemon.identities import import_file
from daemon.local import LOCAL_KEY, LocalScanning
from daemon.metrics import Metrics
from daemon.resolver import Resolver
from daemon.runtime import Runtime
from daemon.stations import Debouncer, SessionChange, Stations
from daemon.store import Store
from drivers.base import Dropped, Scan
from drivers.serial import SerialDriver, SerialSettings
from tests.conftest import SAMPLE_RECORDS

ASSOCIATE_KEY = "KEY-ASSOCIATE-8e2d11"
TIMEOUT = 10.0

# --- Stations -------------------------------------------------------------------------------


def badge(stations: Stations, credential: str, associate: str, now: float) -> list[str]:
    events = stations.badge(
        "s1", associate, credential, now=now, wall_time=1_700_000_000.0, timeout=10.0
    )
    return [event.change.value for event in events]


def test_badge_opens_session() -> None:
    stations = Stations()

    assert badge(stations, "c1", "a1", now=0.0) == ["opened"]
    assert stations.sessions()[0].associate == "a1"


def test_same_badge_closes_session() -> None:
    stations = Stations()
    badge(stations, "c1", "a1", now=0.0)

    assert badge(stations, "c1", "a1", now=5.0) == ["closed"]
    assert stations.sessions() == []


def test_other_badge_replaces_session() -> None:
    stations = Stations()
    badge(stations, "c1", "a1", now=0.0)

    assert badge(stations, "c2", "a2", now=5.0) == ["replaced", "opened"]
    assert stations.sessions()[0].associate == "a2"


def test_second_badge_of_same_person_replaces() -> None:
    # Two credentials of one associate are two badges: the second does not close the first.
    stations = Stations()
    badge(stations, "c1", "a1", now=0.0)

    assert badge(stations, "c1-phone", "a1", now=5.0) == ["replaced", "opened"]


@dataclass(frozen=True)
class ExpiryCase:
    name: str
    touches: list[float]  # monotonic times of counted scans after the badge at 0
    check_at: float
    expired: bool


EXPIRY_CASES = [
    ExpiryCase("before-timeout", [], 9.9, False),
    ExpiryCase("at-timeout", [], 10.0, True),
    ExpiryCase("renewed", [8.0], 17.9, False),
    ExpiryCase("renewed-then-idle", [8.0], 18.0, True),
    ExpiryCase("renewed-twice", [8.0, 16.0], 25.0, False),
]


@pytest.mark.parametrize("case", EXPIRY_CASES, ids=lambda case: case.name)
def test_session_expiry(case: ExpiryCase) -> None:
    stations = Stations()
    badge(stations, "c1", "a1", now=0.0)
    for moment in case.touches:
        stations.touch("s1", now=moment, timeout=10.0)

    ended = stations.expire(case.check_at)

    assert bool(ended) is case.expired
    assert all(event.change is SessionChange.EXPIRED for event in ended)


def test_touch_without_session() -> None:
    assert Stations().touch("s1", now=0.0, timeout=10.0) is None


def test_next_expiry_is_earliest() -> None:
    stations = Stations()
    stations.badge("s1", "a1", "c1", now=0.0, wall_time=0.0, timeout=10.0)
    stations.badge("s2", "a2", "c2", now=3.0, wall_time=0.0, timeout=2.0)

    assert stations.next_expiry() == 5.0


# --- Debounce -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DebounceCase:
    name: str
    reads: list[tuple[str, bytes, float]]  # device, key hash, monotonic time
    counted: list[bool]


DEBOUNCE_CASES = [
    DebounceCase("repeat", [("d1", b"k", 0.0), ("d1", b"k", 1.0)], [True, False]),
    DebounceCase("after-window", [("d1", b"k", 0.0), ("d1", b"k", 1.5)], [True, True]),
    DebounceCase("other-value", [("d1", b"k", 0.0), ("d1", b"j", 0.1)], [True, True]),
    DebounceCase("other-device", [("d1", b"k", 0.0), ("d2", b"k", 0.1)], [True, True]),
    # Each repeat restarts the window, so a code held under the scanner counts once.
    DebounceCase(
        "held",
        [("d1", b"k", 0.0), ("d1", b"k", 1.0), ("d1", b"k", 2.0), ("d1", b"k", 3.0)],
        [True, False, False, False],
    ),
]


@pytest.mark.parametrize("case", DEBOUNCE_CASES, ids=lambda case: case.name)
def test_debounce(case: DebounceCase) -> None:
    debouncer = Debouncer()

    counted = [
        not debouncer.is_repeat(device, key, now=now, window=1.5) for device, key, now in case.reads
    ]

    assert counted == case.counted


def test_debounce_zero_window_counts_all() -> None:
    debouncer = Debouncer()

    assert not debouncer.is_repeat("d1", b"k", now=0.0, window=0.0)
    assert not debouncer.is_repeat("d1", b"k", now=0.0, window=0.0)


# --- Event hub ------------------------------------------------------------------------------


def test_slow_client_dropped() -> None:
    async def scenario() -> None:
        hub = EventHub()
        slow = hub.subscribe("127.0.0.1", queue_size=2)
        fast = hub.subscribe("::1", queue_size=8)

        for number in range(3):
            hub.publish("scan.decided", {"n": number})

        assert slow.dropped
        assert slow.queue.get_nowait() is None
        assert fast.queue.qsize() == 3
        assert hub.clients == 1
        assert hub.dropped_clients == 1

    asyncio.run(scenario())


def test_publish_frames_sse() -> None:
    async def scenario() -> bytes | None:
        hub = EventHub()
        client = hub.subscribe("127.0.0.1", queue_size=2)
        hub.publish("device.health", {"device": "d1", "available": False})
        return client.queue.get_nowait()

    frame = asyncio.run(scenario())

    assert frame == b'event: device.health\ndata: {"device":"d1","available":false}\n\n'


@pytest.mark.parametrize(
    ("remote", "allowed"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("10.1.2.3", False),
        ("::ffff:10.1.2.3", False),
        ("fe80::1%eth0", False),
        (None, False),
        ("not-an-address", False),
    ],
)
def test_client_allowed_loopback(remote: str | None, allowed: bool) -> None:
    assert client_allowed(remote, ["127.0.0.0/8", "::1/128"]) is allowed


# --- The stale-capture rule, on a real store -------------------------------------------------


CONFIG = """
[stores]
ids = ["STORE-001"]

[database]
path = "{database}"

[policy]
max_scan_age = "5m"

[local]
allow_networks = {networks}

[[devices]]
name = "dev-1"
kind = "serial"
station = "station-1"
path = "/dev/null"
"""


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[Runtime]:
    yield from make_runtime(tmp_path, '["127.0.0.0/8", "::1/128"]')


def make_runtime(tmp_path: Path, networks: str) -> Iterator[Runtime]:
    database = tmp_path / "connector.sqlite3"
    config = parse_config(CONFIG.format(database=database, networks=networks))
    records = tmp_path / "records.jsonl"
    records.write_text("".join(json.dumps(record) + "\n" for record in SAMPLE_RECORDS))
    store = Store.open(database, config.database.secret_path)
    try:
        import_file(store.reader.connection, store.hasher, records, None, progress=False)
        yield Runtime(config=config, store=store, resolver=Resolver(store, config))
    finally:
        store.close()


def local_scan(
    runtime: Runtime, captured_at: datetime, value: str = ASSOCIATE_KEY
) -> tuple[list[dict], int]:
    """Hand one read, by default an associate badge, to the station logic.

    Returns the captured log entries and the number of open sessions afterwards.
    """
    device = device_configs(runtime.config.devices)[0]
    # A driver that never ran: its feedback finds no open port and writes nothing.
    driver = SerialDriver(msgspec.convert(device.table, SerialSettings))
    scan = Scan("dev-1", "OPTICAL", value, captured_at)

    async def scenario() -> int:
        local = LocalScanning(runtime)
        await local.handle_scan(device, driver, scan)
        return len(local.stations.sessions())

    with structlog.testing.capture_logs() as logs:
        sessions = asyncio.run(scenario())
    return logs, sessions


def test_stale_capture_not_decided(runtime: Runtime) -> None:
    captured_at = datetime.now(UTC) - timedelta(minutes=5, seconds=5)

    logs, sessions = local_scan(runtime, captured_at)

    assert runtime.store.reader.count("outbox") == 0
    assert sessions == 0
    assert [entry["event"] for entry in logs if entry["log_level"] != "debug"] == ["scan.stale"]
    assert ASSOCIATE_KEY not in repr(logs)


def test_recent_capture_decided(runtime: Runtime) -> None:
    captured_at = datetime.now(UTC) - timedelta(minutes=4, seconds=55)

    logs, sessions = local_scan(runtime, captured_at)

    assert runtime.store.reader.count("outbox") == 1
    assert sessions == 1
    assert "scan.decided" in [entry["event"] for entry in logs]


def dropped_reads(metrics: Metrics, reason: str) -> float | None:
    return metrics.registry.get_sample_value(
        "identity_connector_device_dropped_reads_total", {"device": "dev-1", "reason": reason}
    )


def decisions_by_type(metrics: Metrics) -> dict[str, float]:
    """Read identity_connector_decisions_total by its ``type`` label."""
    counts: dict[str, float] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == "identity_connector_decisions_total":
                counts[sample.labels["type"]] = sample.value
    return counts


def test_unknown_key_counted_without_type(runtime: Runtime) -> None:
    metrics = runtime.resolver.metrics = Metrics()

    logs, _ = local_scan(runtime, datetime.now(UTC), "KEY-NOBODY-000000")

    decided = [entry for entry in logs if entry["event"] == "scan.decided"]
    assert [entry["reason"] for entry in decided] == ["UNKNOWN_KEY"]
    assert decided[0]["type"] is None
    # An empty label value is how Prometheus writes a missing label, the log's null.
    assert decisions_by_type(metrics) == {"": 1.0}
    assert (
        metrics.registry.get_sample_value(
            "identity_connector_decisions_total",
            {"action": "REJECT", "reason": "UNKNOWN_KEY", "type": "", "source": "device"},
        )
        == 1.0
    )


@pytest.mark.parametrize(
    "value", ["   ", "\x00", " \t\x00\r\n"], ids=["spaces", "nul", "whitespace-and-controls"]
)
def test_blank_scan_dropped(runtime: Runtime, value: str) -> None:
    metrics = runtime.resolver.metrics = Metrics()

    logs, sessions = local_scan(runtime, datetime.now(UTC), value)

    assert runtime.store.reader.count("outbox") == 0
    assert sessions == 0
    assert [entry["event"] for entry in logs] == ["scan.dropped"]
    assert logs[0]["reason"] == "blank"
    assert logs[0]["length"] == len(value)
    assert dropped_reads(metrics, "blank") == 1.0
    assert decisions_by_type(metrics) == {}


def test_driver_drop_counted(runtime: Runtime) -> None:
    metrics = runtime.resolver.metrics = Metrics()
    device = device_configs(runtime.config.devices)[0]

    async def scenario() -> None:
        local = LocalScanning(runtime)
        local.handle_drop(device, Dropped("dev-1", "malformed"))
        local.handle_drop(device, Dropped("dev-1", "malformed"))
        local.handle_drop(device, Dropped("dev-1", "too_long"))

    asyncio.run(scenario())

    assert dropped_reads(metrics, "malformed") == 2.0
    assert dropped_reads(metrics, "too_long") == 1.0


# --- The endpoints' network check, on a real loopback server ----------------------------------


async def fetch_statuses(runtime: Runtime) -> dict[str, int]:
    app = build_app(runtime, Metrics())
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    statuses = {}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as client:
            for path in ("/v1/local/events", "/v1/local/devices"):
                async with client.get(f"http://127.0.0.1:{port}{path}") as response:
                    statuses[path] = response.status
    finally:
        app[LOCAL_KEY].hub.close()
        await runner.cleanup()
    return statuses


def test_endpoints_reject_other_networks(tmp_path: Path) -> None:
    for runtime in make_runtime(tmp_path, '["10.0.0.0/8"]'):
        statuses = asyncio.run(fetch_statuses(runtime))

    assert statuses == {"/v1/local/events": 403, "/v1/local/devices": 403}


@pytest.mark.parametrize(("kind", "package"), [("pcsc", "pyscard"), ("hid", "python-evdev")])
def test_install_hint_names_this_pip_and_checkout(kind: str, package: str) -> None:
    # Run from a checkout: the hint gives the commands that work here, not /opt paths.
    pip = Path(sys.executable).with_name("pip")
    checkout = Path(__file__).resolve().parent.parent
    assert OPTIONAL_PACKAGES[kind] == (
        f"{package} (install the {kind} extra: {pip} install '{checkout}[{kind}]')"
    )
