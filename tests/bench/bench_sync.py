"""Benchmark HQ sync: snapshot apply rate, ResolveScan latency during a rebuild, outbox drain.

A fake HQ on 127.0.0.1 (tests/bench/streaming_hq.py) serves a snapshot of N generated
identities. The script starts `serve` with an empty database and [hq] pointed at it, and:

1. times the first rebuild from the daemon's `sync.rebuild_started` and `sync.rebuilt` log
   events and from the fake HQ's serve times;
2. runs wrk with resolve.lua, paced (BENCH_RATE, BENCH_CONNECTIONS), against keys already in
   the cache while idle, then expires HQ's cursors so the next pull rebuilds from a second
   snapshot, and runs the same wrk while that rebuild applies;
3. optionally records a py-spy profile of a third, unloaded rebuild;
4. stops the daemon and HQ, fills the outbox with M events through daemon.resolver's
   decision_rows, restarts the daemon, brings HQ up and times the drain until the outbox
   is empty.

Prints Markdown.

    .venv/bin/python tests/bench/bench_sync.py --identities 1000000 --events 100000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))

from daemon.policy import Reason, Verdict  # noqa: E402
from daemon.resolver import Evaluation, audit_event, decision_rows  # noqa: E402
from daemon.store import Identity, KeyHasher  # noqa: E402
from tests.bench.bench_resolve import run_wrk as run_resolve_wrk  # noqa: E402
from tests.bench.bench_resolve import wait_healthy  # noqa: E402
from tests.bench.streaming_hq import StreamingHq  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.fakehq import TOKEN  # noqa: E402

REBUILD_TIMEOUT = 900.0
DRAIN_TIMEOUT = 900.0
FILL_BATCH = 10_000


def machine_load() -> str:
    """Return the load average and other processes above 10 % CPU, for the record.

    The benchmark's own process is left out: it is busy generating data before some phases.
    """
    load = Path("/proc/loadavg").read_text().split()[:3]
    top = subprocess.run(
        ["top", "-b", "-n1", "-c", "-w", "512"], capture_output=True, text=True
    ).stdout
    busy = []
    for line in top.splitlines()[7:]:
        fields = line.split(None, 11)
        if len(fields) < 12 or fields[0] == str(os.getpid()):
            continue
        if float(fields[8].replace(",", ".")) >= 10.0:
            busy.append(f"{fields[11][:70]} ({fields[8]} %)")
    return f"load {' '.join(load)}; busy: {', '.join(busy) or 'none'}"


def log_events(log_path: Path, name: str) -> list[dict[str, Any]]:
    events = []
    for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines():
        if f'"{name}"' not in line:
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event.get("event") == name:
            events.append(event)
    return events


def event_time(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"]).timestamp()


def wait_for_events(log_path: Path, name: str, count: int, timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = log_events(log_path, name)
        if len(events) >= count:
            return events
        time.sleep(0.1)
    raise RuntimeError(f"no {count} {name} events in {log_path} after {timeout:.0f} s")


def event_logged_after(log_path: Path, name: str, offset: int) -> Callable[[], bool]:
    """Return a check that turns true once ``name`` is logged after byte ``offset``.

    Each call reads only the bytes added since the last one: the check runs ten times a
    second during a measurement, and rereading the whole log would load the machine.
    """
    marker = f'"event":"{name}"'.encode()
    position = offset
    tail = b""

    def logged() -> bool:
        nonlocal position, tail
        with log_path.open("rb") as log:
            log.seek(position)
            added = log.read()
        position += len(added)
        # Keep the end of the last read, in case the marker spans two reads.
        found = marker in tail + added
        tail = (tail + added)[-len(marker) :]
        return found

    return logged


def rebuild_figures(log_path: Path, number: int) -> dict[str, Any]:
    """Return the timing of rebuild ``number`` (1-based) from the daemon's log."""
    started = wait_for_events(log_path, "sync.rebuild_started", number, REBUILD_TIMEOUT)
    rebuilt = wait_for_events(log_path, "sync.rebuilt", number, REBUILD_TIMEOUT)
    start_event, end_event = started[number - 1], rebuilt[number - 1]
    identities = end_event["identities"]
    seconds = end_event["seconds"]
    # The key-hash index is built in one writer job at the end of staging; every decision
    # in that time waits for it.
    indexed = log_events(log_path, "sync.staging_indexed")
    return {
        "identities": identities,
        "rejected": end_event.get("rejected", 0),
        "started_at": event_time(start_event),
        "finished_at": event_time(end_event),
        "seconds": seconds,
        "rate": identities / seconds,
        "index_seconds": indexed[number - 1]["seconds"] if len(indexed) >= number else None,
    }


def run_wrk(
    port: int,
    duration: int,
    rate: int,
    connections: int,
    identities: int,
    stop_when: Callable[[], bool] | None = None,
) -> dict:
    """Run wrk with resolve.lua, paced to ``rate`` requests/s over ``connections``.

    The result is bench_resolve's, with the wall-clock start and end of the run added.
    """
    started = time.time()
    result = run_resolve_wrk(
        port, 2, connections, duration, identities, rate=rate, stop_when=stop_when
    )
    return {**result, "started_at": started, "finished_at": time.time()}


def write_config(run_dir: Path, port: int, hq: StreamingHq, snapshot_batch_size: int) -> Path:
    token = run_dir / "hq-token"
    token.write_text(TOKEN + "\n", encoding="utf-8")
    config = run_dir / "config.toml"
    # Sync settings are the defaults except a 1 s pull interval (so an expired cursor is seen
    # at once) and a short backoff (so HQ's return is noticed within 2 s).
    config.write_text(
        f'[server]\nport = {port}\n[stores]\nids = ["STORE-001"]\n'
        f'[database]\npath = "{run_dir / "connector.sqlite3"}"\n'
        f'[logging]\nformat = "json"\n'
        f'[hq]\nurl = "{hq.url}"\ntoken_file = "{token}"\npull_interval = "1s"\n'
        f'backoff_initial = "500ms"\nbackoff_max = "2s"\n'
        + (f"snapshot_batch_size = {snapshot_batch_size}\n" if snapshot_batch_size else ""),
        encoding="utf-8",
    )
    return config


def start_daemon(config: Path, log_path: Path) -> subprocess.Popen:
    log = log_path.open("ab")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "daemon", "serve", "--config", str(config)],
            stdout=log,
            stderr=log,
            cwd=REPO,
        )
    finally:
        log.close()


def stop_daemon(daemon: subprocess.Popen) -> None:
    daemon.terminate()
    daemon.wait(timeout=60)


def outbox_count(database: Path) -> int:
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10)
    try:
        return connection.execute("SELECT count(*) FROM outbox").fetchone()[0]
    finally:
        connection.close()


def fill_outbox(database: Path, count: int) -> None:
    """Queue ``count`` decisions as the daemon's writer does, with the daemon stopped."""
    hasher = KeyHasher(os.urandom(32))
    verdict = Verdict("ACCEPT", Reason.ACCEPTED)
    connection = sqlite3.connect(database, isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("PRAGMA synchronous = NORMAL")
        for first in range(0, count, FILL_BATCH):
            connection.execute("BEGIN")
            for index in range(first, min(first + FILL_BATCH, count)):
                key_hash = hasher.hash(f"BENCH-KEY-{index:08d}")
                identity = Identity(
                    credential_id=f"bench-{index:08d}",
                    key_hash=key_hash,
                    id=f"person-{index // 2:08d}",
                    type="SHOPPER",
                    status="ACTIVE",
                    valid_from=None,
                    valid_until=None,
                    stores=("STORE-001",),
                    channels=None,
                    locations=None,
                    version=1,
                )
                now = time.time()
                scan_id = str(uuid.uuid4())
                event = audit_event(
                    source="gateway",
                    store_id="STORE-001",
                    request_id=str(uuid.uuid4()),
                    scan_event_id=scan_id,
                    scanned_at=datetime.fromtimestamp(now, UTC),
                    location="ENTRY",
                    channel="OPTICAL",
                    evaluation=Evaluation(identity, key_hash, verdict),
                    latency_ms=0.8,
                    now=now,
                )
                response = json.dumps(
                    {"id": identity.id, "type": identity.type, "action": "ACCEPT"}
                ).encode()
                decision_rows(scan_id, hasher.hash(scan_id), response, verdict, event, now)(
                    connection
                )
            connection.execute("COMMIT")
    finally:
        connection.close()


def profile_rebuild(hq: StreamingHq, daemon: subprocess.Popen, log_path: Path, out: Path) -> str:
    """Expire cursors once more and record 8 s of py-spy samples of the rebuild."""
    hq.expire_cursors()
    before = len(log_events(log_path, "sync.rebuild_started"))
    wait_for_events(log_path, "sync.rebuild_started", before + 1, 60)
    time.sleep(1.0)
    command = [
        str(REPO / ".venv" / "bin" / "py-spy"),
        "record",
        "--threads",
        "--nonblocking",
        "-p",
        str(daemon.pid),
        "-d",
        "8",
        "-f",
        "raw",
        "-o",
        str(out),
    ]
    subprocess.run(command, capture_output=True, check=True)
    wait_for_events(log_path, "sync.rebuilt", before + 1, REBUILD_TIMEOUT)
    return " ".join(command)


def summarise_profile(path: Path, top: int = 12) -> list[str]:
    """Return the functions with the most samples (self time, innermost frame) and threads."""
    own: dict[str, int] = {}
    threads: dict[str, int] = {}
    total = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        threads[frames[0]] = threads.get(frames[0], 0) + count
        own[frames[-1]] = own.get(frames[-1], 0) + count
    lines = [f"total samples: {total}"]
    for name, count in sorted(threads.items(), key=lambda item: -item[1]):
        lines.append(f"thread {name}: {100 * count / total:.1f} %")
    for name, count in sorted(own.items(), key=lambda item: -item[1])[:top]:
        lines.append(f"self {100 * count / total:5.1f} %  {name}")
    return lines


def measure_drain(
    hq: StreamingHq, config: Path, port: int, events: int, loads: dict[str, str]
) -> dict[str, Any]:
    """Fill the outbox with HQ down, restart the daemon, bring HQ up and time the drain."""
    run_dir = config.parent
    database = run_dir / "connector.sqlite3"
    log_path = run_dir / "daemon.log"
    hq.down()
    uploads_before = len(log_events(log_path, "sync.events_uploaded"))
    fill_started = time.monotonic()
    fill_outbox(database, events)
    fill_seconds = time.monotonic() - fill_started
    queued = outbox_count(database)
    hq.received.events.clear()

    loads["drain"] = machine_load()
    daemon = start_daemon(config, log_path)
    try:
        wait_healthy(port)
        time.sleep(3.0)
        queued_after_start = outbox_count(database)
        hq_up_at = time.time()
        hq.up()
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while outbox_count(database) > 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"outbox not empty after {DRAIN_TIMEOUT:.0f} s")
            time.sleep(0.05)
        empty_at = time.time()
    finally:
        stop_daemon(daemon)

    uploads = log_events(log_path, "sync.events_uploaded")[uploads_before:]
    available = [e for e in log_events(log_path, "hq.available") if event_time(e) >= hq_up_at]
    first_upload_at = event_time(uploads[0])
    last_upload_at = event_time(uploads[-1])
    return {
        "filled": events,
        "queued": queued,
        "queued_after_start": queued_after_start,
        "fill_seconds": fill_seconds,
        "received": len(hq.received.events),
        "batches": len(uploads),
        "hq_up_to_empty": empty_at - hq_up_at,
        "available_after": (event_time(available[0]) - hq_up_at) if available else None,
        "upload_span": last_upload_at - first_upload_at,
        "first_upload_after": first_upload_at - hq_up_at,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identities", type=int, default=1_000_000)
    parser.add_argument(
        "--events", type=int, default=100_000, help="outbox events to drain; 0 skips the drain"
    )
    parser.add_argument("--rate", type=int, default=200, help="requests/s of the paced wrk runs")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--idle-duration", type=int, default=20, help="seconds of the idle run")
    parser.add_argument(
        "--snapshot-batch-size",
        type=int,
        default=0,
        help="[hq] snapshot_batch_size for the daemon; 0 keeps its default (2000)",
    )
    parser.add_argument("--gzip", action="store_true", help="gzip the snapshot stream")
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy rebuild")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/identity-connector-bench"))
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("error: wrk not found: apt-get install wrk", file=sys.stderr)
        return 2

    run_dir = args.workdir / "sync-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    log_path = run_dir / "daemon.log"
    port = free_port()
    hq = StreamingHq(args.identities, run_dir, gzip=args.gzip).start()
    config = write_config(run_dir, port, hq, args.snapshot_batch_size)
    loads: dict[str, str] = {}

    loads["first rebuild"] = machine_load()
    daemon = start_daemon(config, log_path)
    try:
        wait_healthy(port)
        first = rebuild_figures(log_path, 1)
        wait_for_events(log_path, "sync.reconciled", 1, 120)
        served_first = hq.streaming.served[0]

        # Warm-up, then the idle reference with the same pacing as the loaded run.
        run_wrk(port, 3, args.rate, args.connections, args.identities)
        loads["idle wrk"] = machine_load()
        idle = run_wrk(port, args.idle_duration, args.rate, args.connections, args.identities)

        loads["second rebuild"] = machine_load()
        hq.expire_cursors()
        wait_for_events(log_path, "sync.rebuild_started", 2, 60)
        # Cover the whole rebuild, key index and swap included: wrk stops when the daemon
        # logs the second sync.rebuilt (the limit is only a guard against a stuck rebuild).
        loaded = run_wrk(
            port,
            max(60, int(first["seconds"]) * 5),
            args.rate,
            args.connections,
            args.identities,
            stop_when=event_logged_after(log_path, "sync.rebuilt", log_path.stat().st_size),
        )
        second = rebuild_figures(log_path, 2)
        wait_for_events(log_path, "sync.reconciled", 2, 120)

        profile_command = ""
        profile_lines: list[str] = []
        if not args.no_profile:
            profile_path = run_dir / "rebuild-profile.txt"
            profile_command = profile_rebuild(hq, daemon, log_path, profile_path)
            profile_lines = summarise_profile(profile_path)
    finally:
        stop_daemon(daemon)

    drain = None
    try:
        if args.events:
            drain = measure_drain(hq, config, port, args.events, loads)
    finally:
        hq.close()

    print_report(
        args,
        loads,
        first,
        second,
        served_first,
        idle,
        loaded,
        profile_command,
        profile_lines,
        drain,
    )
    return 0


def print_report(
    args: argparse.Namespace,
    loads: dict[str, str],
    first: dict[str, Any],
    second: dict[str, Any],
    served_first: Any,
    idle: dict[str, Any],
    loaded: dict[str, Any],
    profile_command: str,
    profile_lines: list[str],
    drain: dict[str, Any] | None,
) -> None:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    print(f"Machine: {os.cpu_count()} cores, {cpu}, Python {platform.python_version()}")
    for phase, load in loads.items():
        print(f"- load before {phase}: {load}")
    print()
    print("## Snapshot apply")
    served_seconds = served_first.finished_at - served_first.started_at
    print(
        "| Rebuild | identities | seconds (daemon log) | records/s | key index seconds"
        " | HQ serve seconds |"
    )
    print("|---|---|---|---|---|---|")
    print(
        f"| first, empty database, no ResolveScan load | {first['identities']:,} "
        f"| {first['seconds']:.1f} | {first['rate']:,.0f} | {first['index_seconds']} "
        f"| {served_seconds:.1f} |"
    )
    print(
        f"| second (cursor expired), under paced wrk | {second['identities']:,} "
        f"| {second['seconds']:.1f} | {second['rate']:,.0f} | {second['index_seconds']} | |"
    )
    print(f"Goal 50,000 records/s: {'met' if first['rate'] >= 50_000 else 'missed'}.")
    print()
    print("## ResolveScan during the apply")
    print("| Run | p50 (ms) | p99 (ms) | p99.9 (ms) | requests/s | errors |")
    print("|---|---|---|---|---|---|")
    for label, figures in (("idle", idle), ("during second rebuild", loaded)):
        print(
            f"| {label} | {figures['p50_ms']:.2f} | {figures['p99_ms']:.2f} "
            f"| {figures['p999_ms']:.2f} | {figures['rps']:,.0f} | {figures['errors']} |"
        )
    # wrk starts once the daemon has logged the rebuild's start, a fraction of a second
    # after it, and stops within 0.1 s after the rebuild's end.
    covered = (
        loaded["started_at"] - second["started_at"] <= 1.0
        and loaded["finished_at"] >= second["finished_at"]
    )
    ratio = loaded["p99_ms"] / idle["p99_ms"]
    print(
        f"wrk window {loaded['started_at'] - second['started_at']:+.1f} s to "
        f"{loaded['finished_at'] - second['started_at']:+.1f} s after rebuild start; "
        f"rebuild ended at {second['finished_at'] - second['started_at']:.1f} s "
        f"({'window covers the whole rebuild' if covered else 'window missed part of it'})."
    )
    print(f"p99 ratio {ratio:.2f}x; goal 2x: {'met' if ratio <= 2 else 'missed'}.")
    print(
        f"wrk command: `{loaded['command']}`, stopped with SIGINT once the daemon logged"
        f" sync.rebuilt (idle run: -d{args.idle_duration}s)"
    )
    if profile_lines:
        print()
        print(f"Profile of a third, unloaded rebuild: `{profile_command}`")
        for line in profile_lines:
            print(f"    {line}")
    if drain is None:
        return
    print()
    print("## Outbox drain")
    print(
        f"Filled {drain['filled']:,} events in {drain['fill_seconds']:.1f} s with HQ down, "
        f"{drain['queued']:,} in the outbox with those left from the wrk runs; "
        f"{drain['queued_after_start']:,} still queued 3 s after the daemon started."
    )
    available = drain["available_after"]
    print(
        f"HQ up to outbox empty: {drain['hq_up_to_empty']:.2f} s "
        f"({drain['queued'] / drain['hq_up_to_empty']:,.0f} events/s); "
        f"hq.available logged after {available if available is None else round(available, 2)} s; "
        f"first upload after {drain['first_upload_after']:.2f} s; first to last upload "
        f"{drain['upload_span']:.2f} s ({drain['queued'] / max(drain['upload_span'], 1e-9):,.0f}"
        f" events/s) in {drain['batches']} batches; HQ stored {drain['received']:,} events."
    )


if __name__ == "__main__":
    sys.exit(main())
