"""Measure ResolveScan latency while `identity-connector import` runs beside the daemon.

Starts `serve` on an empty database, then imports N generated records with the command line
while one client sends a scan every 50 ms, as a slow gate would. Prints the import time and
the latency percentiles of the scans sent during the import. Run it from the checkout
whose code it measures.

    .venv/bin/python tests/bench/bench_import_beside.py --records 200000 --runs 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))

from tests.bench.bench_resolve import stop_process, wait_healthy  # noqa: E402
from tests.conftest import free_port  # noqa: E402

# Seconds between two scans of the probing client.
PROBE_INTERVAL = 0.05
PROBE_KEY = "KEY-BESIDE-0000001"


def write_records(path: Path, count: int) -> None:
    if path.exists():
        return
    with path.open("w", encoding="utf-8") as handle:
        for index in range(count):
            record = {
                "credentialId": f"beside-{index}",
                "key": f"KEY-BESIDE-{index:07d}",
                "id": f"person-{index}",
                "type": "SHOPPER",
                "status": "ACTIVE",
                "stores": ["STORE-001"],
                "version": 1,
            }
            handle.write(json.dumps(record) + "\n")


def probe(port: int, stop: threading.Event, latencies: list[float]) -> None:
    """Send one scan at a time until ``stop`` is set; record each latency in ms."""
    url = f"http://127.0.0.1:{port}/v1/identity/scan"
    while not stop.is_set():
        body = {
            "requestId": str(uuid.uuid4()),
            "storeId": "STORE-001",
            "scanEvent": {
                "id": str(uuid.uuid4()),
                "timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "location": "ENTRY",
                "value": PROBE_KEY,
                "channel": "OPTICAL",
            },
        }
        request = urllib.request.Request(
            url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        started = time.perf_counter()
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()
        latencies.append((time.perf_counter() - started) * 1000)
        time.sleep(PROBE_INTERVAL)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def run_once(workdir: Path, records: Path) -> str:
    run_dir = workdir / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    port = free_port()
    config = run_dir / "config.toml"
    config.write_text(
        f'[server]\nport = {port}\n[stores]\nids = ["STORE-001"]\n'
        f'[database]\npath = "{run_dir / "connector.sqlite3"}"\n[logging]\nformat = "json"\n',
        encoding="utf-8",
    )

    command = [sys.executable, "-m", "daemon"]
    with (run_dir / "daemon.log").open("w") as log:
        daemon = subprocess.Popen(
            [*command, "serve", "--config", str(config)], cwd=REPO, stdout=log, stderr=log
        )
    try:
        wait_healthy(port)
        stop = threading.Event()
        latencies: list[float] = []
        client = threading.Thread(target=probe, args=(port, stop, latencies))
        client.start()
        started = time.monotonic()
        imported = subprocess.run(
            [*command, "import", "--config", str(config), str(records)],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        seconds = time.monotonic() - started
        stop.set()
        client.join()
    finally:
        stop_process(daemon)

    if imported.returncode != 0:
        raise RuntimeError(f"import failed:\n{imported.stderr}")
    slow = sum(latency > 100 for latency in latencies)
    return (
        f"| {seconds:.1f} | {len(latencies)} | {percentile(latencies, 0.5):.1f} |"
        f" {percentile(latencies, 0.99):.1f} | {max(latencies):.1f} | {slow} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument(
        "--workdir", type=Path, default=Path("/tmp/identity-connector-bench-import")
    )
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    records = args.workdir / f"records-{args.records}.jsonl"
    write_records(records, args.records)

    print("| import (s) | scans | p50 (ms) | p99 (ms) | max (ms) | over 100 ms |")
    print("|---|---|---|---|---|---|")
    for _ in range(args.runs):
        print(run_once(args.workdir, records), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
