"""Measure a serial scan's round trip: bytes in on the scanner's pty to feedback bytes back.

Runs a daemon subprocess with one serial device on a pseudo-terminal, writes
scans one at a time on the master side and times each until the good-read or
bad-read byte arrives. Debounce is off, so every scan is decided.

    .venv/bin/python tests/bench/bench_local_feedback.py [--scans 1000]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.conftest import make_daemon  # noqa: E402
from tests.test_local_daemon import (  # noqa: E402
    BAD_READ,
    GOOD_READ,
    RECORDS,
    PtyScanner,
    device_table,
)

WARMUP_SCANS = 50
# A mix of accepted and rejected values, so both feedback bytes are measured.
VALUES = ["KEY-SHOPPER-5f1c2b", "KEY-LOYALTY-71bc04", "KEY-CASH-33aa90", "KEY-NOBODY-000000"]


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))
    return ordered[index]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=1000, help="timed scans (default 1000)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-local-") as folder:
        directory = Path(folder)
        scanner = PtyScanner(directory / "tty-bench")
        extra = '\n[local]\ndebounce = "0ms"\n' + device_table("bench", scanner.link)
        daemon = make_daemon(directory / "daemon", extra, RECORDS)
        daemon.start()
        try:
            samples = run(scanner, args.scans)
        finally:
            daemon.stop()
            scanner.unplug()

    milliseconds = [sample * 1000 for sample in samples]
    print(f"python {platform.python_version()}, {platform.machine()}, {args.scans} scans")
    print(
        f"scan to feedback (ms): p50 {percentile(milliseconds, 0.50):.2f}"
        f"  p90 {percentile(milliseconds, 0.90):.2f}"
        f"  p99 {percentile(milliseconds, 0.99):.2f}"
        f"  max {max(milliseconds):.2f}"
        f"  mean {statistics.fmean(milliseconds):.2f}"
    )
    return 0


def run(scanner: PtyScanner, scans: int) -> list[float]:
    # The first scans open the port and warm the SQLite page cache; they are not timed.
    deadline = time.monotonic() + 20.0
    while not scanner.read_feedback(1, timeout=0.2) and time.monotonic() < deadline:
        scanner.scan(VALUES[0])
    # Feedback of the probing scans above that arrived late must not count as a later one's.
    while scanner.read_feedback(64, timeout=0.5):
        pass
    for number in range(WARMUP_SCANS):
        round_trip(scanner, VALUES[number % len(VALUES)])
    return [round_trip(scanner, VALUES[number % len(VALUES)]) for number in range(scans)]


def round_trip(scanner: PtyScanner, value: str) -> float:
    sent = scanner.scan(value)
    feedback = scanner.read_feedback(1, timeout=10.0)
    received = time.monotonic()
    if feedback not in (GOOD_READ, BAD_READ):
        raise SystemExit(f"error: no feedback byte within 10 s (got {feedback!r})")
    return received - sent


if __name__ == "__main__":
    sys.exit(main())
