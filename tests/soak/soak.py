"""Soak the daemon under mixed load while HQ flaps and the daemon is killed, then check for loss.

Everything runs on 127.0.0.1. The script starts the fake HQ of tests/fakehq.py with a few
thousand identities, and `python -m daemon serve` as a subprocess with [hq] pointed at it and
serial scanners on pseudo-terminals that the script plays. For ``--duration`` seconds it then:

- sends ResolveScan requests at a steady rate, each with a fresh scanEvent.id, for keys HQ
  has and for unknown keys. A request without a response or with a 5xx is sent again with
  the same body once the daemon is ready again, as a gateway would retry;
- writes scans into the pty scanners and waits for each one's feedback byte;
- changes and removes identities at HQ every few seconds;
- takes HQ down for the second half of every ``--hq-flap-period``;
- kills the daemon with SIGKILL every ``--kill-period`` and starts it again.

Then it brings HQ up, stops the load, waits until the outbox is empty and the cache has pulled
HQ's latest cursor, stops the daemon, and checks that:

(a) every scanEvent.id that got a 200 has exactly one audit event at HQ;
(b) every local scan whose feedback byte came back has its audit event at HQ;
(c) the cache's reconciliation digest equals HQ's;
(d) the outbox is empty;
(e) no request failed with a 5xx or without a response outside the restart windows.

It prints a summary table and exits 1 when a check fails, 0 otherwise.

    .venv/bin/python tests/soak/soak.py --duration 300
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import structlog

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))

from daemon.store import LAST_PULL_META_KEY, KeyHasher  # noqa: E402
from sync.digest import compute_digest  # noqa: E402
from tests.conftest import free_port, scan_body  # noqa: E402
from tests.fakehq import TOKEN, FakeHq, meta, query  # noqa: E402
from tests.test_local_daemon import GOOD_READ, PtyScanner, device_table  # noqa: E402

log = structlog.get_logger(__name__)

STORE_ID = "STORE-001"

# The daemon takes about a second from exec to a ready /readyz on an idle 2-core machine.
# These bounds leave room for a loaded one.
READY_TIMEOUT = 60.0
INITIAL_SYNC_TIMEOUT = 60.0
# Seconds after /readyz returns 200 that still count as the restart window, because the
# daemon's scanners reopen their ports and its HQ client reconnects in that time.
RESTART_GRACE = 2.0
STOP_TIMEOUT = 20.0

# Gateway client: total time per request, and the cap on requests in flight. A request the
# cap holds back is counted as skipped, because the rate stays steady instead of bursting.
REQUEST_TIMEOUT = 10.0
MAX_IN_FLIGHT = 200
MAX_ATTEMPTS = 3
RETRY_DELAY = 0.5
# Share of gateway and scanner values that HQ never held (UNKNOWN_KEY after an online lookup),
# and share of gateway requests at EXIT rather than ENTRY.
UNKNOWN_SHARE = 0.1
EXIT_SHARE = 0.3

# A feedback byte later than this counts as late, and is not attributed to a scan.
FEEDBACK_TIMEOUT = 5.0

# HQ changes: every CHURN_INTERVAL seconds, this many new records, updates and removals.
CHURN_INTERVAL = 2.0
CHURN_NEW = 3
CHURN_UPDATED = 3
CHURN_REMOVED = 2

# Seconds by which each kill trails its scan slot, in turn. A serial scan takes about 2-3 ms
# from its write to its commit on an idle 2-core machine, measured from the soak's records.
KILL_OFFSETS = (0.001, 0.0015, 0.002, 0.0025, 0.003)

PROGRESS_INTERVAL = 30.0
# Failures of each kind that are logged one by one. The table has the totals.
LISTED_FAILURES = 20
SETTLE_TIMEOUT = 120.0
# Waits are cut so that a run ends within about --duration plus this many seconds, start,
# final drain and checks included.
RUN_MARGIN = 175.0

TYPES = ["SHOPPER", "ASSOCIATE", "LOYALTY", "CASH"]
TYPE_WEIGHTS = [90, 4, 4, 2]
STATUSES = ["ACTIVE", "SUSPENDED", "REVOKED"]
STATUS_WEIGHTS = [95, 3, 2]


class SoakAborted(Exception):
    """The rig cannot go on: the daemon did not start or restart, or did not sync, in time."""


# -- identities at HQ ------------------------------------------------------------------------


class RecordCatalog:
    """Identity records for HQ, and the keys the load draws from.

    ``keys`` is replaced as a whole on every change, so the scanner threads can read it
    without a lock.
    """

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.records: dict[str, dict[str, Any]] = {}
        self.keys: list[str] = []
        self.next_number = 0
        self.changes = Counter[str]()

    def new_record(self) -> dict[str, Any]:
        number = self.next_number
        self.next_number += 1
        kind = self.rng.choices(TYPES, TYPE_WEIGHTS)[0]
        return {
            "credentialId": f"soak-{number:06d}",
            "key": f"KEY-SOAK-{number:06d}-{self.rng.getrandbits(32):08x}",
            "id": f"{kind.lower()}-{number:06d}",
            "type": kind,
            "status": self.rng.choices(STATUSES, STATUS_WEIGHTS)[0],
            "stores": ["*"] if kind == "ASSOCIATE" else [STORE_ID],
            "version": 1,
        }

    def fill(self, hq: FakeHq, count: int) -> None:
        records = [self.new_record() for _ in range(count)]
        hq.put(*records)
        self.records.update((record["credentialId"], record) for record in records)
        self._refresh_keys()

    def churn(self, hq: FakeHq) -> None:
        """Add, update and remove a few records at HQ, so every pull has changes to apply."""
        added = [self.new_record() for _ in range(CHURN_NEW)]
        updated = []
        for credential_id in self.rng.sample(sorted(self.records), CHURN_UPDATED):
            record = dict(self.records[credential_id])
            record["version"] += 1
            record["status"] = self.rng.choices(STATUSES, STATUS_WEIGHTS)[0]
            updated.append(record)
        hq.put(*added, *updated)
        self.records.update((record["credentialId"], record) for record in added + updated)

        removed = self.rng.sample(sorted(self.records), CHURN_REMOVED)
        hq.remove(*removed)
        for credential_id in removed:
            del self.records[credential_id]

        self.changes["added"] += len(added)
        self.changes["updated"] += len(updated)
        self.changes["removed"] += len(removed)
        self._refresh_keys()

    def pick_value(self, rng: random.Random) -> str:
        """Return a key HQ has or had, or at UNKNOWN_SHARE a key that was never issued."""
        if rng.random() < UNKNOWN_SHARE:
            return f"UNKNOWN-SOAK-{rng.getrandbits(48):012x}"
        return rng.choice(self.keys)

    def _refresh_keys(self) -> None:
        self.keys = [record["key"] for record in self.records.values()]


# -- the daemon process ----------------------------------------------------------------------


@dataclass
class Window:
    """A time span (monotonic seconds) in which the daemon was down or starting."""

    start: float
    end: float
    reason: str
    """"kill" for a SIGKILL of the soak, "crash" for an exit the soak did not cause."""
    wall_start: float
    """Wall-clock seconds of ``start``, to line it up with the daemon's log."""


class DaemonProcess:
    """The daemon subprocess, its kills and restarts, and the restart windows they open."""

    def __init__(self, config: Path, port: int, log_path: Path) -> None:
        self.config = config
        self.port = port
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.windows: list[Window] = []
        self.restart_seconds: list[float] = []
        self.kills = 0
        self.crashes: list[int] = []
        """Exit codes of the exits the soak did not cause."""
        self.ready = asyncio.Event()
        self._lock = asyncio.Lock()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log_path.open("ab") as log_file:
            # A session of its own keeps a Ctrl-C at the terminal from reaching the daemon:
            # the soak stops it in its own time.
            self.process = subprocess.Popen(
                [sys.executable, "-m", "daemon", "serve", "--config", str(self.config)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env={**os.environ, "NO_PROXY": "127.0.0.1,localhost,::1"},
                start_new_session=True,
            )

    def stop(self) -> int | None:
        """Stop the daemon with SIGTERM, or SIGKILL after STOP_TIMEOUT; return its exit code."""
        process = self.process
        if process is None:
            return None
        self.process = None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.error("soak.daemon_stop_timed_out", pid=process.pid, timeout=STOP_TIMEOUT)
            process.kill()
            return process.wait(timeout=STOP_TIMEOUT)

    async def wait_ready(self, session: aiohttp.ClientSession, timeout: float) -> bool:
        """Poll GET /readyz until it returns 200; False when the process exits or time is up."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                return False
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(
                    self.base_url + "/readyz", timeout=aiohttp.ClientTimeout(total=1.0)
                ) as response:
                    if response.status == 200:
                        return True
            await asyncio.sleep(0.1)
        return False

    async def kill_and_restart(self, session: aiohttp.ClientSession) -> None:
        async with self._lock:
            self.ready.clear()
            started = time.monotonic()
            wall = time.time()
            process = self.process
            assert process is not None
            process.send_signal(signal.SIGKILL)
            await asyncio.to_thread(process.wait, STOP_TIMEOUT)
            self.kills += 1
            log.info("soak.daemon_killed", pid=process.pid, kills=self.kills)
            await self._restart(session, started, wall, "kill")

    async def watch(self, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        """Restart the daemon when it exits without a SIGKILL of the soak, and count the exit."""
        while not stop.is_set():
            await pause(stop, 0.5)
            async with self._lock:
                process = self.process
                if process is None or process.poll() is None:
                    continue
                self.ready.clear()
                self.crashes.append(process.returncode)
                log.error("soak.daemon_exited", pid=process.pid, code=process.returncode)
                await self._restart(session, time.monotonic(), time.time(), "crash")

    async def _restart(
        self, session: aiohttp.ClientSession, started: float, wall: float, reason: str
    ) -> None:
        self.start()
        if not await self.wait_ready(session, READY_TIMEOUT):
            raise SoakAborted(
                f"the daemon was not ready {READY_TIMEOUT:.0f} s after a restart;"
                f" see {self.log_path}"
            )
        ready_at = time.monotonic()
        self.restart_seconds.append(ready_at - started)
        self.windows.append(Window(started, ready_at + RESTART_GRACE, reason, wall))
        self.ready.set()
        log.info(
            "soak.daemon_ready",
            pid=self.process.pid if self.process else None,
            seconds=round(ready_at - started, 2),
            reason=reason,
        )


async def pause(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds`` or until ``stop`` is set; return True when it was set."""
    if seconds <= 0:
        return stop.is_set()
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True


# -- gateway load ----------------------------------------------------------------------------


@dataclass
class Attempt:
    sent: float
    done: float
    status: int | None
    """HTTP status, or None when no response arrived (refused, reset, timed out)."""


@dataclass
class GatewayScan:
    scan_id: str
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def answered_ok(self) -> bool:
        return any(attempt.status == 200 for attempt in self.attempts)


class GatewayLoad:
    """ResolveScan requests at a steady rate; every attempt is recorded with its times."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        daemon: DaemonProcess,
        catalog: RecordCatalog,
        rate: float,
        rng: random.Random,
    ) -> None:
        self.session = session
        self.daemon = daemon
        self.catalog = catalog
        self.rate = rate
        self.rng = rng
        self.scans: dict[str, GatewayScan] = {}
        self.skipped = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False

    async def run(self, stop: asyncio.Event) -> None:
        interval = 1.0 / self.rate
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while not stop.is_set():
            if len(self._tasks) >= MAX_IN_FLIGHT:
                self.skipped += 1
            else:
                self._spawn()
            next_at += interval
            # After a stall (a busy machine), start again from now instead of sending a burst.
            next_at = max(next_at, loop.time() - 1.0)
            await pause(stop, next_at - loop.time())

    async def finish(self, timeout: float) -> None:
        """Stop retries and wait up to ``timeout`` for the requests in flight."""
        self._stopping = True
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def _spawn(self) -> None:
        location = "EXIT" if self.rng.random() < EXIT_SHARE else "ENTRY"
        body = scan_body(self.catalog.pick_value(self.rng), location=location, store=STORE_ID)
        scan = GatewayScan(body["scanEvent"]["id"])
        self.scans[scan.scan_id] = scan
        task = asyncio.create_task(self._send(json.dumps(body).encode(), scan))
        # The set holds a strong reference: the loop keeps only weak ones to its tasks.
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, body: bytes, scan: GatewayScan) -> None:
        for number in range(MAX_ATTEMPTS):
            if number:
                # Retry as a gateway would, with the same body, once the daemon is ready.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.daemon.ready.wait(), READY_TIMEOUT)
                await asyncio.sleep(RETRY_DELAY)
            status = await self._attempt(body, scan)
            if status is not None and status < 500:
                return
            if self._stopping:
                return

    async def _attempt(self, body: bytes, scan: GatewayScan) -> int | None:
        sent = time.monotonic()
        status: int | None = None
        try:
            async with self.session.post(
                self.daemon.base_url + "/v1/identity/scan",
                data=body,
                headers={"Content-Type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
            ) as response:
                await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError):
            status = None
        scan.attempts.append(Attempt(sent, time.monotonic(), status))
        return status


# -- pty scanners ----------------------------------------------------------------------------


@dataclass
class LocalScan:
    value: str
    written_at: float
    """Wall-clock seconds, as in the daemon's log."""
    feedback: bytes
    """The feedback byte that came back within FEEDBACK_TIMEOUT, or b"" when none did."""
    feedback_at: float | None


class ScannerPlayer(threading.Thread):
    """Plays one serial scanner: writes a scan, waits for its feedback byte, records both.

    One scan at a time, so a feedback byte belongs to the scan just written. Bytes that arrive
    after FEEDBACK_TIMEOUT are counted as late, without a scan.
    """

    def __init__(
        self, name: str, link: Path, catalog: RecordCatalog, interval: float, seed: int
    ) -> None:
        super().__init__(name=f"scanner-{name}", daemon=True)
        self.device = f"dev-{name}"
        self.scanner = PtyScanner(link)
        self.catalog = catalog
        self.interval = interval
        self.origin = 0.0
        self.rng = random.Random(seed)
        self.stop_event = threading.Event()
        self.scans: list[LocalScan] = []
        self.late: list[tuple[float, bytes]] = []
        """Feedback bytes read after their scan's FEEDBACK_TIMEOUT, with the wall-clock time."""

    def start_at(self, origin: float) -> None:
        """Start writing scans at ``origin`` (monotonic seconds) and every interval after it."""
        self.origin = origin
        self.start()

    def run(self) -> None:
        next_at = self.origin
        while not self.stop_event.wait(max(0.0, next_at - time.monotonic())):
            self.collect_late()
            value = self.catalog.pick_value(self.rng)
            written_at = time.time()
            self.scanner.scan(value)
            feedback = self.scanner.read_feedback(1, timeout=FEEDBACK_TIMEOUT)
            feedback_at = time.time() if feedback else None
            self.scans.append(LocalScan(value, written_at, feedback, feedback_at))
            # Skip the slots that passed while the feedback was awaited: the scans stay on
            # the grid that the kills share, and a slow daemon gets no burst.
            behind = time.monotonic() - next_at
            next_at += self.interval * max(1, math.ceil(behind / self.interval))

    @property
    def late_feedback(self) -> int:
        return sum(len(data) for _, data in self.late)

    def collect_late(self) -> None:
        data = self.drain()
        if data:
            self.late.append((time.time(), data))

    def drain(self) -> bytes:
        """Read the feedback bytes already waiting on the master side, without blocking."""
        received = b""
        while self.scanner.master >= 0:
            readable, _, _ = select.select([self.scanner.master], [], [], 0)
            if not readable:
                break
            received += os.read(self.scanner.master, 256)
        return received

    def close(self) -> None:
        self.stop_event.set()
        if self.is_alive():
            self.join(timeout=FEEDBACK_TIMEOUT * 2)
        self.scanner.unplug()


# -- the rig ---------------------------------------------------------------------------------


@dataclass
class Options:
    duration: float
    rate: float
    hq_flap_period: float
    kill_period: float
    scanners: int
    scan_rate: float
    records: int
    seed: int
    workdir: Path | None
    keep_workdir: bool


class Rig:
    """The fake HQ, the daemon and the scanners of one soak run, and their work directory."""

    def __init__(self, options: Options) -> None:
        self.options = options
        if options.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="identity-connector-soak-"))
        else:
            self.workdir = options.workdir
            self.workdir.mkdir(parents=True, exist_ok=True)
        self.rng = random.Random(options.seed)
        self.catalog = RecordCatalog(self.rng)
        self.hq = FakeHq(STORE_ID)
        self.players: list[ScannerPlayer] = []
        self.daemon: DaemonProcess | None = None
        self.database = self.workdir / "connector.sqlite3"
        self.hq_downs = 0
        self.final_exit_code: int | None = None
        self._hq_started = False

    def start_hq(self) -> None:
        self.hq.start()
        self._hq_started = True
        self.catalog.fill(self.hq, self.options.records)

    def write_config(self) -> Path:
        token = self.workdir / "hq-token"
        token.write_text(TOKEN + "\n", encoding="utf-8")
        interval = self.options.scanners / self.options.scan_rate
        devices = ""
        for number in range(self.options.scanners):
            name = f"soak-{number + 1}"
            link = self.workdir / f"tty-{name}"
            self.players.append(
                ScannerPlayer(name, link, self.catalog, interval, self.options.seed + number + 1)
            )
            devices += device_table(name, link)
        port = free_port()
        # Short intervals, so the cache and the outbox catch up within seconds of every outage.
        # The debounce is off, because a value drawn twice within it would then count once.
        config = f"""
[server]
host = "127.0.0.1"
port = {port}

[stores]
ids = ["{STORE_ID}"]

[database]
path = "{self.database}"

[logging]
format = "json"
level = "info"

[hq]
url = "{self.hq.url}"
token_file = "{token}"
pull_interval = "1s"
reconcile_interval = "20s"
lookup_timeout = "300ms"
request_timeout = "2s"
backoff_initial = "200ms"
backoff_max = "2s"
offline_after = 2
upload_interval = "200ms"
upload_max_delay = "500ms"

[local]
debounce = "0ms"
{devices}"""
        path = self.workdir / "config.toml"
        path.write_text(config, encoding="utf-8")
        self.daemon = DaemonProcess(path, port, self.workdir / "daemon.log")
        return path

    def hasher(self) -> KeyHasher:
        """Return the daemon's key hasher, from the secret it created at its first start."""
        secret = Path(str(self.database) + ".key").read_text(encoding="ascii").strip()
        return KeyHasher(bytes.fromhex(secret))

    def close(self, remove_workdir: bool) -> bool:
        """Stop everything; return True when the work directory was removed."""
        for player in self.players:
            player.close()
        if self.daemon is not None:
            self.daemon.stop()
        if self._hq_started:
            self.hq.close()
        if remove_workdir and not self.options.keep_workdir and self.options.workdir is None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            return True
        return False


async def start_daemon(rig: Rig, session: aiohttp.ClientSession, deadline: float) -> None:
    """Start the daemon and wait for its first sync and for every scanner to be open."""
    daemon = rig.daemon
    assert daemon is not None
    daemon.start()
    if not await daemon.wait_ready(session, min(READY_TIMEOUT, deadline - time.monotonic())):
        raise SoakAborted(f"the daemon did not become ready; see {daemon.log_path}")
    daemon.ready.set()

    limit = time.monotonic() + INITIAL_SYNC_TIMEOUT
    while read_meta(rig, "cursor") != rig.hq.cursor():
        if time.monotonic() > min(limit, deadline):
            raise SoakAborted(f"the first sync did not finish; see {daemon.log_path}")
        await asyncio.sleep(0.2)

    names = {player.device for player in rig.players}
    while True:
        async with session.get(daemon.base_url + "/v1/local/devices") as response:
            devices = (await response.json())["devices"]
        available = {device["device"] for device in devices if device["available"]}
        if names <= available:
            return
        if time.monotonic() > min(limit, deadline):
            raise SoakAborted(f"scanners {sorted(names - available)} did not open")
        await asyncio.sleep(0.2)


# -- faults ----------------------------------------------------------------------------------


async def flap_hq(rig: Rig, period: float, origin: float, stop: asyncio.Event) -> None:
    """Keep HQ up for the first half of every period and down for the second half."""
    cycle = 0
    while True:
        down_at = origin + cycle * period + period / 2
        if await pause(stop, down_at - time.monotonic()):
            return
        await asyncio.to_thread(rig.hq.down)
        rig.hq_downs += 1
        log.info("soak.hq_down", downs=rig.hq_downs)
        cycle += 1
        up_at = origin + cycle * period
        stopped = await pause(stop, up_at - time.monotonic())
        await asyncio.to_thread(rig.hq.up)
        log.info("soak.hq_up")
        if stopped:
            return


async def kill_periodically(
    daemon: DaemonProcess,
    session: aiohttp.ClientSession,
    period: float,
    origin: float,
    stop: asyncio.Event,
) -> None:
    """SIGKILL the daemon every ``period`` seconds after ``origin``, a few ms late.

    The scanners write on a grid from the same origin, so when ``period`` is a multiple of
    the scan interval, each kill lands that offset after a scan was written, while the
    daemon is deciding it.
    """
    number = 1
    while True:
        offset = KILL_OFFSETS[(number - 1) % len(KILL_OFFSETS)]
        if await pause(stop, origin + number * period + offset - time.monotonic()):
            return
        await daemon.kill_and_restart(session)
        number += 1


async def churn_periodically(rig: Rig, stop: asyncio.Event) -> None:
    while not await pause(stop, CHURN_INTERVAL):
        rig.catalog.churn(rig.hq)


async def report_progress(rig: Rig, load: GatewayLoad, origin: float, stop: asyncio.Event) -> None:
    while not await pause(stop, PROGRESS_INTERVAL):
        daemon = rig.daemon
        assert daemon is not None
        outbox = await asyncio.to_thread(count_rows, rig, "outbox")
        log.info(
            "soak.progress",
            elapsed=round(time.monotonic() - origin),
            requests=len(load.scans),
            answered_ok=sum(scan.answered_ok for scan in load.scans.values()),
            local_scans=sum(len(player.scans) for player in rig.players),
            kills=daemon.kills,
            hq_downs=rig.hq_downs,
            outbox=outbox,
        )


def count_rows(rig: Rig, table: str) -> int | None:
    try:
        return query(rig.database, f"SELECT count(*) FROM {table}")[0][0]
    except sqlite3.Error as error:  # a read during a restart may find the file locked
        log.warning("soak.read_failed", table=table, error=str(error))
        return None


def read_meta(rig: Rig, key: str) -> str | None:
    try:
        return meta(rig.database, key)
    except sqlite3.Error as error:
        log.warning("soak.read_failed", key=key, error=str(error))
        return None


# -- the run ---------------------------------------------------------------------------------


@dataclass
class Settled:
    """What the final wait saw."""

    seconds: float
    outbox_depth: int | None
    cursor_caught_up: bool
    pulled_after_up: bool
    status: dict[str, Any]


async def settle(rig: Rig, hq_up_at: float, deadline: float) -> Settled:
    """Wait until the outbox is empty and a pull after ``hq_up_at`` reached HQ's cursor."""
    started = time.monotonic()
    limit = min(started + SETTLE_TIMEOUT, deadline)
    while True:
        depth = await asyncio.to_thread(count_rows, rig, "outbox")
        cursor = await asyncio.to_thread(read_meta, rig, "cursor")
        last_pull = await asyncio.to_thread(read_meta, rig, LAST_PULL_META_KEY)
        caught_up = cursor == rig.hq.cursor()
        pulled = last_pull is not None and float(last_pull) > hq_up_at
        if (depth == 0 and caught_up and pulled) or time.monotonic() > limit:
            break
        await asyncio.sleep(0.5)
    seconds = time.monotonic() - started
    status = await asyncio.to_thread(read_status, rig)
    return Settled(seconds, depth, caught_up, pulled, status)


def read_status(rig: Rig) -> dict[str, Any]:
    """Return the output of `identity-connector status --json`, or {} when it fails."""
    assert rig.daemon is not None
    result = subprocess.run(
        [sys.executable, "-m", "daemon", "status", "--config", str(rig.daemon.config), "--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    if result.returncode != 0:
        log.error("soak.status_failed", code=result.returncode, stderr=result.stderr[-500:])
        return {}
    try:
        state, end = json.JSONDecoder().raw_decode(result.stdout)
    except json.JSONDecodeError as error:
        log.error("soak.status_invalid", error=str(error), stdout=result.stdout[:500])
        return {}
    if result.stdout[end:].strip():
        log.warning("soak.status_extra_output", extra=result.stdout[end:][:200])
    return state


async def run_load(
    rig: Rig, session: aiohttp.ClientSession, deadline: float
) -> tuple[GatewayLoad, float]:
    """Run the load and the faults for --duration; return the load and when HQ was last up."""
    options = rig.options
    daemon = rig.daemon
    assert daemon is not None
    load = GatewayLoad(session, daemon, rig.catalog, options.rate, rig.rng)
    stop = asyncio.Event()

    origin = time.monotonic()
    for player in rig.players:
        player.start_at(origin)
    tasks = [
        asyncio.create_task(load.run(stop), name="gateway-load"),
        asyncio.create_task(flap_hq(rig, options.hq_flap_period, origin, stop), name="hq-flaps"),
        asyncio.create_task(
            kill_periodically(daemon, session, options.kill_period, origin, stop), name="kills"
        ),
        asyncio.create_task(daemon.watch(session, stop), name="watch"),
        asyncio.create_task(churn_periodically(rig, stop), name="churn"),
        asyncio.create_task(report_progress(rig, load, origin, stop), name="progress"),
    ]

    try:
        done, _ = await asyncio.wait(
            tasks, timeout=options.duration, return_when=asyncio.FIRST_EXCEPTION
        )
        for task in done:
            task.result()  # raises SoakAborted from a failed restart
    finally:
        stop.set()
        for player in rig.players:
            player.stop_event.set()
        # A restart in progress finishes first, so the daemon is never left down.
        await asyncio.wait(tasks, timeout=max(1.0, deadline - time.monotonic()))
        await load.finish(REQUEST_TIMEOUT + 5.0)
        for player in rig.players:
            await asyncio.to_thread(player.join, FEEDBACK_TIMEOUT * 2)

    if rig.hq.is_down:
        await asyncio.to_thread(rig.hq.up)
    for task in tasks:
        if not task.done():
            raise SoakAborted(f"task {task.get_name()} did not stop in time")
        task.result()
    return load, time.time()


# -- checks ----------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    value: str
    verdict: str
    """"ok", "FAIL", or "info" for a number no check applies to."""


def check(name: str, value: Any, passed: bool) -> Row:
    return Row(name, str(value), "ok" if passed else "FAIL")


def info(name: str, value: Any) -> Row:
    return Row(name, str(value), "info")


def in_window(attempt: Attempt, windows: list[Window]) -> bool:
    return any(
        window.reason == "kill" and attempt.sent <= window.end and attempt.done >= window.start
        for window in windows
    )


def split(failures: Counter[str]) -> str:
    return f"{failures['5xx']} / {failures['no answer']}"


def gateway_rows(load: GatewayLoad, windows: list[Window], events: list[dict]) -> list[Row]:
    """Check (a) and (e): each 200 has one event at HQ; failures only inside restart windows."""
    scans = list(load.scans.values())
    attempts = [attempt for scan in scans for attempt in scan.attempts]
    failed = [attempt for attempt in attempts if attempt.status is None or attempt.status >= 500]
    inside = Counter(
        "no answer" if a.status is None else "5xx" for a in failed if in_window(a, windows)
    )
    outside = Counter(
        "no answer" if a.status is None else "5xx" for a in failed if not in_window(a, windows)
    )
    other = Counter(
        attempt.status
        for attempt in attempts
        if attempt.status is not None and attempt.status != 200 and attempt.status < 500
    )

    event_ids: dict[str, set[str]] = {}
    for event in events:
        if event.get("source") == "gateway":
            event_ids.setdefault(event["scanEventId"], set()).add(event["eventId"])
    answered = [scan for scan in scans if scan.answered_ok]
    missing = [scan.scan_id for scan in answered if scan.scan_id not in event_ids]
    several = [scan_id for scan_id, ids in event_ids.items() if len(ids) > 1]
    for scan_id in missing[:LISTED_FAILURES]:
        log.error("soak.gateway_event_missing", scan_event_id=scan_id)
    for scan_id in several[:LISTED_FAILURES]:
        log.error(
            "soak.gateway_events_several", scan_event_id=scan_id, ids=sorted(event_ids[scan_id])
        )
    on_retry = sum(1 for scan in answered if scan.attempts[0].status != 200)
    unanswered_at_hq = sum(
        1 for scan in scans if not scan.answered_ok and scan.scan_id in event_ids
    )
    return [
        info("gateway requests (scanEvent.ids)", len(scans)),
        info("  attempts, retries included", len(attempts)),
        info("  not sent: in-flight cap reached", load.skipped),
        info("  answered 200", len(answered)),
        info("  answered 200 on a retry", on_retry),
        info("  5xx / no answer, inside restart windows", split(inside)),
        check("  5xx / no answer, outside restart windows", split(outside), not outside),
        check("  4xx answers", dict(sorted(other.items())) or 0, not other),
        check("  answered 200, no event at HQ", len(missing), not missing),
        check("  scanEvent.ids with several eventIds at HQ", len(several), not several),
        info("  never answered 200, event at HQ anyway", unanswered_at_hq),
    ]


def local_rows(players: list[ScannerPlayer], hasher: KeyHasher, events: list[dict]) -> list[Row]:
    """Check (b): every scan whose feedback came back has an event at HQ with the same action.

    Scans are matched by device, key fingerprint and action, counted as multisets, because
    a key may be scanned more than once. Late feedback bytes belong to no known scan, so they
    are checked by count per device only.
    """
    at_hq: Counter[tuple[str, str, str]] = Counter()
    per_device: Counter[str] = Counter()
    for event in events:
        if event.get("source") == "device":
            at_hq[(event["device"], event["keyFingerprint"], event["action"])] += 1
            per_device[event["device"]] += 1

    # NOTE: a scan written while the daemon reopens its port, between pyserial's open() and
    # its input flush, could be decided after the next scan was written. Its feedback byte
    # would then be matched to that next scan and show up as a missing event.
    decided: Counter[tuple[str, str, str]] = Counter()
    written = timely = late = short = extra = 0
    for player in players:
        device_decided = 0
        for scan in player.scans:
            if not scan.feedback:
                continue
            action = "ACCEPT" if scan.feedback == GOOD_READ else "REJECT"
            fingerprint = KeyHasher.fingerprint(hasher.hash(scan.value))
            decided[(player.device, fingerprint, action)] += 1
            device_decided += 1
        written += len(player.scans)
        timely += device_decided
        late += player.late_feedback
        short += max(0, device_decided + player.late_feedback - per_device[player.device])
        extra += max(0, per_device[player.device] - len(player.scans))
    unmatched = decided - at_hq
    for (device, fingerprint, action), count in list(unmatched.items())[:LISTED_FAILURES]:
        log.error(
            "soak.local_event_missing",
            device=device,
            key_fingerprint=fingerprint,
            action=action,
            count=count,
        )
    missing = sum(unmatched.values())
    return [
        info("local scans written to the ptys", written),
        info(f"  feedback within {FEEDBACK_TIMEOUT:g} s", timely),
        info("  feedback later (not matched to a scan)", late),
        info("  no feedback (daemon down or starting)", written - timely),
        check("  decided, no matching event at HQ", missing, missing == 0),
        check("  feedback bytes beyond device events at HQ", short, short == 0),
        check("  device events at HQ beyond scans written", extra, extra == 0),
    ]


def write_local_record(rig: Rig, hasher: KeyHasher, path: Path) -> None:
    """Write every local scan, late feedback byte and restart window as JSON lines.

    Scans carry the key fingerprint the daemon logs, never the value, so the file lines up
    with the daemon's `scan.decided` events when a check fails.
    """
    assert rig.daemon is not None
    with path.open("w", encoding="utf-8") as output:
        for window in rig.daemon.windows:
            record = {
                "window": window.reason,
                "at": window.wall_start,
                "seconds": round(window.end - window.start, 3),
            }
            output.write(json.dumps(record) + "\n")
        for player in rig.players:
            for scan in player.scans:
                record = {
                    "device": player.device,
                    "fingerprint": KeyHasher.fingerprint(hasher.hash(scan.value)),
                    "at": scan.written_at,
                    "feedback": scan.feedback.hex(),
                    "feedbackAt": scan.feedback_at,
                }
                output.write(json.dumps(record) + "\n")
            for at, data in player.late:
                output.write(json.dumps({"device": player.device, "late": data.hex(), "at": at}))
                output.write("\n")


def cache_rows(rig: Rig, settled: Settled) -> list[Row]:
    """Check (c) and (d): the cache digest equals HQ's, and the outbox is empty."""
    pairs = query(rig.database, "SELECT credential_id, version FROM identities ORDER BY 1")
    count, digest = compute_digest((credential_id, version) for credential_id, version in pairs)
    with rig.hq.lock:
        records = dict(rig.hq.records)
    hq_digest = FakeHq.digest_of(records)
    depth = count_rows(rig, "outbox")
    changes = rig.catalog.changes
    return [
        info(
            "HQ record changes (added/updated/removed)",
            "/".join(str(changes[kind]) for kind in ("added", "updated", "removed")),
        ),
        check("cache cursor equals HQ's", settled.cursor_caught_up, settled.cursor_caught_up),
        check("pull after HQ's last return", settled.pulled_after_up, settled.pulled_after_up),
        check(
            "cache digest equals HQ's (records)",
            f"{digest == hq_digest} ({count} / {len(records)})",
            digest == hq_digest,
        ),
        check("outbox depth at the end", depth, depth == 0),
        info("  outboxDepth from `status --json`", settled.status.get("outboxDepth", "n/a")),
        info("  outbox events dropped by the bound", settled.status.get("outboxDropped", "n/a")),
        info("seconds to drain and catch up after the load", f"{settled.seconds:.1f}"),
    ]


def daemon_rows(rig: Rig, events: list[dict]) -> list[Row]:
    daemon = rig.daemon
    assert daemon is not None
    restarts = daemon.restart_seconds
    restart_text = (
        f"{max(restarts):.1f} / {sum(restarts) / len(restarts):.1f}" if restarts else "n/a"
    )
    logged: Counter[str] = Counter()
    rebuilds: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    not_json = 0
    for raw in daemon.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            line = json.loads(raw)
        except json.JSONDecodeError:
            not_json += 1
            continue
        logged[line.get("event", "")] += 1
        if line.get("event") == "sync.rebuild_started":
            rebuilds[str(line.get("reason"))] += 1
        if line.get("level") in ("error", "critical"):
            errors[line.get("event", "")] += 1
    sources = Counter(event.get("source") for event in events)
    return [
        info("daemon SIGKILLs", daemon.kills),
        info("  seconds from SIGKILL to ready (max / mean)", restart_text),
        check("  exits the soak did not cause", daemon.crashes or 0, not daemon.crashes),
        check("  exit code of the final SIGTERM", rig.final_exit_code, rig.final_exit_code == 0),
        info("  error-level log events", dict(errors) or 0),
        info("  log lines that are not JSON", not_json),
        info("  digest mismatches it logged", logged["sync.digest_mismatch"]),
        info("  rebuilds it logged, by reason", dict(rebuilds) or 0),
        info("HQ outages", rig.hq_downs),
        info("events at HQ (gateway / device)", f"{sources['gateway']} / {sources['device']}"),
        info("  repeats HQ deduplicated by eventId", rig.hq.received.repeats),
    ]


def print_table(rows: list[Row], options: Options, wall: float) -> None:
    width = max(len(row.name) for row in rows)
    value_width = max(len(row.value) for row in rows)
    print()
    print(
        f"Soak: {options.duration:g} s, {options.rate:g} requests/s, HQ flap every"
        f" {options.hq_flap_period:g} s, SIGKILL every {options.kill_period:g} s,"
        f" {options.scanners} pty scanners at {options.scan_rate:g} scans/s,"
        f" {options.records} records, seed {options.seed}"
    )
    machine = f"{os.cpu_count()} CPUs, {platform.platform()}"
    print(f"Machine: {machine}, Python {platform.python_version()}")
    print()
    print(f"| {'measure':<{width}} | {'value':>{value_width}} | result |")
    print(f"|{'-' * (width + 2)}|{'-' * (value_width + 1)}:|--------|")
    for row in [*rows, info("wall time, seconds", f"{wall:.0f}")]:
        print(f"| {row.name:<{width}} | {row.value:>{value_width}} | {row.verdict:<6} |")
    print()
    failed = [row.name.strip() for row in rows if row.verdict == "FAIL"]
    print(f"Result: {'FAIL: ' + '; '.join(failed) if failed else 'no loss'}")


# -- entry point -----------------------------------------------------------------------------


async def soak(rig: Rig) -> list[Row]:
    options = rig.options
    deadline = time.monotonic() + options.duration + RUN_MARGIN
    rig.start_hq()
    rig.write_config()
    daemon = rig.daemon
    assert daemon is not None

    connector = aiohttp.TCPConnector(limit=MAX_IN_FLIGHT)
    async with aiohttp.ClientSession(connector=connector) as session:
        await start_daemon(rig, session, deadline)
        hasher = rig.hasher()
        log.info(
            "soak.started",
            workdir=str(rig.workdir),
            pid=daemon.process.pid if daemon.process else None,
            port=daemon.port,
            hq=rig.hq.url,
        )
        load, hq_up_at = await run_load(rig, session, deadline)
        log.info("soak.load_stopped", requests=len(load.scans))
        # Leave time for the checks and for stopping the daemon.
        settled = await settle(rig, hq_up_at, deadline - STOP_TIMEOUT - 15.0)

    for player in rig.players:
        player.collect_late()
    write_local_record(rig, hasher, rig.workdir / "local-scans.jsonl")
    rig.final_exit_code = daemon.stop()
    # The daemon is stopped, so nothing uploads while HQ's events are read.
    events = list(rig.hq.received.events.values())
    return [
        *gateway_rows(load, daemon.windows, events),
        *local_rows(rig.players, hasher, events),
        *cache_rows(rig, settled),
        *daemon_rows(rig, events),
    ]


def parse_args(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        description="Soak the daemon on loopback: gateway load, pty scans, HQ outages and"
        " SIGKILLs, then check that no decision was lost."
    )
    parser.add_argument("--duration", type=float, default=300.0, help="load seconds (default 300)")
    parser.add_argument(
        "--rate", type=float, default=50.0, help="gateway requests per second (default 50)"
    )
    parser.add_argument(
        "--hq-flap-period",
        type=float,
        default=30.0,
        help="seconds per HQ cycle: up for the first half, down for the second (default 30)",
    )
    parser.add_argument(
        "--kill-period",
        type=float,
        default=120.0,
        help="seconds between SIGKILLs of the daemon (default 120)",
    )
    parser.add_argument("--scanners", type=int, default=2, help="pty scanners (default 2)")
    parser.add_argument(
        "--scan-rate",
        type=float,
        default=4.0,
        help="local scans per second over all scanners (default 4)",
    )
    parser.add_argument(
        "--records", type=int, default=3000, help="identity records at HQ at start (default 3000)"
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the load's choices")
    parser.add_argument(
        "--workdir", type=Path, help="work directory (default: a new temporary directory)"
    )
    parser.add_argument(
        "--keep-workdir",
        action="store_true",
        help="keep the temporary work directory after a run that passes",
    )
    args = parser.parse_args(argv)

    for name in ("duration", "rate", "hq_flap_period", "kill_period", "scan_rate"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be above 0")
    if args.scanners < 0:
        parser.error("--scanners must be 0 or more")
    if args.workdir is not None and args.workdir.is_dir() and any(args.workdir.iterdir()):
        parser.error(f"--workdir {args.workdir} is not empty: the soak needs a new database")
    if args.records < CHURN_UPDATED + CHURN_REMOVED:
        parser.error(f"--records must be at least {CHURN_UPDATED + CHURN_REMOVED}")

    return Options(
        duration=args.duration,
        rate=args.rate,
        hq_flap_period=args.hq_flap_period,
        kill_period=args.kill_period,
        scanners=args.scanners,
        scan_rate=args.scan_rate,
        records=args.records,
        seed=args.seed,
        workdir=args.workdir,
        keep_workdir=args.keep_workdir,
    )


def configure_logging() -> None:
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="%H:%M:%S"),
            structlog.dev.ConsoleRenderer(colors=False),
        ],
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    configure_logging()
    started = time.monotonic()
    rig = Rig(options)
    passed = False
    try:
        rows = asyncio.run(soak(rig))
        print_table(rows, options, time.monotonic() - started)
        passed = all(row.verdict != "FAIL" for row in rows)
        return 0 if passed else 1
    except SoakAborted as error:
        log.error("soak.aborted", error=str(error), workdir=str(rig.workdir))
        return 1
    except KeyboardInterrupt:
        log.warning("soak.interrupted", workdir=str(rig.workdir))
        return 130
    finally:
        removed = rig.close(remove_workdir=passed)
        if not removed:
            print(f"Work directory (daemon.log, local-scans.jsonl): {rig.workdir}")


if __name__ == "__main__":
    sys.exit(main())
