"""Benchmark ResolveScan end to end at the socket with a large cache.

Generates N identities, imports them (reporting the import rate), starts the daemon, and drives
it with wrk: one connection in a loop, 16 connections paced to a fixed total rate, and 16
connections back to back. Every request carries a new scanEvent.id, so each one is a full
decision with its commit. The same runs against tests/bench/floor_app.py, a minimal aiohttp app,
give the framework floor measured on the same machine in the same run. Prints Markdown.

    .venv/bin/python tests/bench/bench_resolve.py --identities 1000000 --duration 20
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import free_port  # noqa: E402

# Seconds a process gets after SIGTERM before it is killed. The daemon first finishes
# in-flight requests and waits for its worker threads.
STOP_TIMEOUT = 60.0


def generate_records(path: Path, count: int) -> None:
    if path.exists():
        return
    partial = path.with_suffix(".partial")
    with partial.open("w", encoding="utf-8") as handle:
        for index in range(count):
            record = {
                "credentialId": f"bench-{index:08d}",
                "key": f"BENCH-KEY-{index:08d}",
                "id": f"person-{index // 2:08d}",
                "type": "ASSOCIATE" if index % 50 == 0 else "SHOPPER",
                "status": "ACTIVE" if index % 20 else "SUSPENDED",
                "stores": ["STORE-001"],
                "version": 1,
            }
            handle.write(json.dumps(record, separators=(",", ":")) + "\n")
    partial.rename(path)


def wait_healthy(port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        probe = subprocess.run(
            ["curl", "-sf", f"http://127.0.0.1:{port}/healthz"], capture_output=True
        )
        if probe.returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing healthy on port {port} after 30 s")


def run_wrk(
    port: int,
    threads: int,
    connections: int,
    duration: int,
    identities: int,
    rate: int = 0,
    stop_when: Callable[[], bool] | None = None,
) -> dict:
    """Run wrk with resolve.lua and return its percentiles, rates and error counts.

    ``rate`` above 0 paces all ``connections`` together to about that many requests/s.
    With ``stop_when``, wrk gets SIGINT as soon as it returns true (checked every 0.1 s);
    wrk then stops and reports like at the end of ``duration``.
    """
    command = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration}s",
        "--timeout",
        "5s",
        "-s",
        str(HERE / "resolve.lua"),
        f"http://127.0.0.1:{port}",
    ]
    env = {
        **os.environ,
        "BENCH_IDENTITIES": str(identities),
        "BENCH_RATE": str(rate),
        "BENCH_CONNECTIONS": str(connections),
    }
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    if stop_when is not None:
        while process.poll() is None and not stop_when():
            time.sleep(0.1)
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
    output, errors = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"wrk exited with {process.returncode}:\n{output}{errors}")
    match = re.search(r"BENCH (.*)", output)
    if match is None:
        raise RuntimeError(f"wrk printed no BENCH line:\n{output}")
    fields = dict(item.split("=") for item in match.group(1).split())
    # wrk counts responses with a status above 399 in errors.status, which resolve.lua's
    # errors field already includes, and prints the same counter as "Non-2xx or 3xx".
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    requests = int(fields["requests"])
    seconds = float(fields["seconds"])
    error_statuses = int(non_2xx.group(1)) if non_2xx else 0
    prefix = f"BENCH_RATE={rate} BENCH_CONNECTIONS={connections} " if rate else ""
    return {
        "command": prefix + " ".join(command),
        "p50_ms": int(fields["p50_us"]) / 1000,
        "p99_ms": int(fields["p99_us"]) / 1000,
        "p999_ms": int(fields["p999_us"]) / 1000,
        "requests": requests,
        "seconds": seconds,
        "rps": requests / seconds,
        "success_rps": (requests - error_statuses) / seconds,
        "error_statuses": error_statuses,
        "errors": int(fields["errors"]),
    }


def cpu_model() -> str:
    return next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )


def write_config(run_dir: Path, port: int) -> Path:
    """Write a daemon configuration with its database in ``run_dir`` and JSON logs."""
    config = run_dir / "config.toml"
    config.write_text(
        f'[server]\nport = {port}\n[stores]\nids = ["STORE-001"]\n'
        f'[database]\npath = "{run_dir / "connector.sqlite3"}"\n[logging]\nformat = "json"\n',
        encoding="utf-8",
    )
    return config


def import_records(config: Path, records: Path) -> tuple[float, str]:
    """Run `identity-connector import` and return its wall time in seconds and its summary."""
    started = time.monotonic()
    imported = subprocess.run(
        [sys.executable, "-m", "daemon", "import", "--config", str(config), str(records)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    seconds = time.monotonic() - started
    if imported.returncode != 0:
        raise RuntimeError(
            f"import of {records} failed with exit status {imported.returncode}:\n"
            f"{imported.stderr.strip()}"
        )
    return seconds, imported.stdout.strip()


def start_daemon(config: Path, log_path: Path) -> subprocess.Popen:
    """Start `serve` with its output appended to ``log_path``."""
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "daemon", "serve", "--config", str(config)],
            stdout=log,
            stderr=log,
            cwd=REPO,
        )


def stop_process(process: subprocess.Popen, timeout: float = STOP_TIMEOUT) -> None:
    """Send SIGTERM and wait for the exit. A process still running after ``timeout`` s is killed."""
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


CONNECTIONS = 16
WRK_THREADS = 2
WARM_UP_SECONDS = 3
WARM_UP_CONNECTIONS = 4


def measure_wrk_runs(
    port: int, identities: int, duration: int, rate: int
) -> tuple[dict, dict, dict]:
    """Warm up, then run wrk with one connection, paced to ``rate``, and at saturation.

    The warm-up fills SQLite's page cache the way a running store box has it.
    """
    run_wrk(port, 1, WARM_UP_CONNECTIONS, WARM_UP_SECONDS, identities)
    single = run_wrk(port, 1, 1, duration, identities)
    paced = run_wrk(port, WRK_THREADS, CONNECTIONS, duration, identities, rate=rate)
    saturated = run_wrk(port, WRK_THREADS, CONNECTIONS, duration, identities)
    return single, paced, saturated


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identities", type=int, default=1_000_000)
    parser.add_argument("--duration", type=int, default=20, help="seconds per wrk run")
    parser.add_argument(
        "--rate", type=int, default=500, help="requests/s of the paced 16-connection run"
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/identity-connector-bench"))
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("error: wrk not found: apt-get install wrk", file=sys.stderr)
        return 2

    args.workdir.mkdir(parents=True, exist_ok=True)
    records = args.workdir / f"identities-{args.identities}.jsonl"
    generate_records(records, args.identities)
    run_dir = args.workdir / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir()
    port = free_port()
    config = write_config(run_dir, port)
    import_seconds, summary = import_records(config, records)
    print(summary)

    daemon = start_daemon(config, run_dir / "daemon.log")
    try:
        wait_healthy(port)
        single, paced, concurrent = measure_wrk_runs(
            port, args.identities, args.duration, args.rate
        )
    finally:
        stop_process(daemon)

    floor_port = free_port()
    floor = subprocess.Popen(
        [sys.executable, str(HERE / "floor_app.py"), str(floor_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_healthy(floor_port)
        floor_single, floor_paced, floor_concurrent = measure_wrk_runs(
            floor_port, args.identities, args.duration, args.rate
        )
    finally:
        stop_process(floor)

    print()
    print(f"Machine: {os.cpu_count()} cores, {cpu_model()}, Python {platform.python_version()}")
    print(
        f"Identities: {args.identities:,}; import wall time {import_seconds:.1f} s "
        f"({args.identities / import_seconds:,.0f} records/s)"
    )
    print()
    rows = (
        ("1, back to back", single, floor_single),
        (f"16, paced to {args.rate}/s in total", paced, floor_paced),
        ("16, back to back (saturation)", concurrent, floor_concurrent),
    )
    print("| Clients | target | p50 (ms) | p99 (ms) | p99.9 (ms) | requests/s | errors |")
    print("|---|---|---|---|---|---|---|")
    for label, result, floor_result in rows:
        for target, figures in (("daemon", result), ("aiohttp floor", floor_result)):
            print(
                f"| {label} | {target} | {figures['p50_ms']:.2f} | {figures['p99_ms']:.2f} | "
                f"{figures['p999_ms']:.2f} | {figures['rps']:,.0f} | {figures['errors']} |"
            )
    print()
    print("Daemon-to-floor ratios:")
    for label, result, floor_result in rows:
        print(
            f"- {label}: p50 {result['p50_ms'] / floor_result['p50_ms']:.2f}x,"
            f" p99 {result['p99_ms'] / floor_result['p99_ms']:.2f}x"
        )
    print()
    print(f"wrk commands: `{single['command']}`; `{paced['command']}`;")
    print(f"`{concurrent['command']}`.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
