"""Helpers for tests that open the daemon's SQLite file directly and run `serve` to its exit."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path
from typing import Any

from daemon.store import open_reader
from tests.conftest import REPO

# A `serve` that rejects its database exits within a second or two. The bound matters only
# when it starts serving instead, so that the test fails rather than hangs.
SERVE_EXIT_TIMEOUT = 15.0


def query_one(database: Path, sql: str, parameters: tuple[Any, ...] = ()) -> Any:
    """Run one query on a connection of the test's own and return the first column of row 1.

    The cache file the database names, if any, is attached, so the query can read identities.
    """
    with contextlib.closing(open_reader(database, 5.0)) as connection:
        row = connection.execute(sql, parameters).fetchone()
    return row[0] if row else None


def query_all(database: Path, sql: str) -> list[tuple[Any, ...]]:
    with contextlib.closing(open_reader(database, 5.0)) as connection:
        return connection.execute(sql).fetchall()


def count_rows(database: Path, table: str) -> int:
    return query_one(database, f"SELECT count(*) FROM {table}")


def run_serve_until_exit(config: Path) -> subprocess.CompletedProcess[str]:
    """Run `serve` and wait for it to exit. Kill it and report exit code -9 if it keeps running."""
    process = subprocess.Popen(
        [sys.executable, "-m", "daemon", "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        stdout, stderr = process.communicate(timeout=SERVE_EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
