"""Measure cold start to READY=1 with a large cache already imported.

Uses the database that bench_resolve.py leaves in its work folder (run that first), starts
`serve` with NOTIFY_SOCKET pointing at a datagram socket, and times process start to the
READY=1 notification, which the daemon sends after the port is bound.

    .venv/bin/python tests/bench/bench_startup.py --runs 5
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO))

from tests.bench.bench_resolve import stop_process  # noqa: E402

READY_TIMEOUT = 30.0


def start_once(config: Path, log_path: Path | None = None) -> float:
    """Start `serve` with ``config``, return the seconds until READY=1, and stop it.

    The daemon's output is appended to ``log_path``, or discarded without one.
    """
    with tempfile.TemporaryDirectory() as folder, contextlib.ExitStack() as stack:
        path = Path(folder) / "notify.sock"
        sock = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
        sock.bind(str(path))
        # Short waits, so a daemon that exits before READY is noticed at once.
        sock.settimeout(0.5)
        output = stack.enter_context(log_path.open("ab")) if log_path else subprocess.DEVNULL
        started = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-m", "daemon", "serve", "--config", str(config)],
            stdout=output,
            stderr=output,
            cwd=REPO,
            env={**os.environ, "NOTIFY_SOCKET": str(path)},
        )
        try:
            while True:
                try:
                    if b"READY=1" in sock.recv(4096):
                        break
                except TimeoutError:
                    if process.poll() is not None:
                        raise RuntimeError(
                            f"serve exited with status {process.returncode} before READY=1"
                        ) from None
                    if time.perf_counter() - started > READY_TIMEOUT:
                        raise RuntimeError(
                            f"no READY=1 from serve after {READY_TIMEOUT:.0f} s"
                        ) from None
            elapsed = time.perf_counter() - started
        finally:
            stop_process(process)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/identity-connector-bench"))
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    config = args.workdir / "run" / "config.toml"
    if not config.exists():
        print(f"error: {config} not found: run tests/bench/bench_resolve.py first", file=sys.stderr)
        return 2
    times = [start_once(config) for _ in range(args.runs)]
    size = (args.workdir / "run" / "connector.sqlite3").stat().st_size
    print(f"database {size / 1e6:.0f} MB; cold start to READY over {args.runs} runs:")
    print(f"median {statistics.median(times):.3f} s, max {max(times):.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
