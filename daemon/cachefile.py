"""The identity cache's own SQLite file, apart from decisions and the audit outbox.

The identities, the records the cache skipped and the sync cursor live in a cache file
beside the database, attached to every connection as the schema ``cache``. The main
database names the file in use in its ``meta`` table. A snapshot rebuild writes a whole new
cache file on a connection of its own, then switches the name in one short transaction. So
building the new file's indexes never holds the lock that decisions commit under, and the
old cache goes with an unlink instead of a ``DROP TABLE``.

Statements name the tables without a schema: SQLite looks them up in ``main`` first, and
``main`` has no table of the cache.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import threading
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

ALIAS = "cache"
# meta key of the main database: the name of the cache file in use, in the same folder.
CACHE_FILE_META_KEY = "cache_file"
CACHE_SCHEMA_VERSION = 1
# Keys that describe the cache's contents: they live in the cache file's own table, so a
# pull's changes and its cursor commit in one file, and a new cache brings its own cursor.
CACHE_META_KEYS = frozenset({"cursor", "cursor_changed_at", "last_pull_at", "last_rebuild_at"})
# Page cache of a connection that builds a cache file, which also bounds the memory of the
# key-hash index's sort. With 256 MiB, allocating it stalled decisions for 50-80 ms on the
# benchmark machine. With 32 MiB the sort spills to a temporary file, and the index of
# 1,000,000 identities took the same 1.1 s.
BUILD_CACHE_KIB = 32 * 1024

IDENTITY_COLUMNS = (
    "credential_id",
    "key_hash",
    "identity_id",
    "type",
    "status",
    "valid_from",
    "valid_until",
    "stores",
    "channels",
    "locations",
    "version",
    "updated_at",
)
IDENTITIES_TABLE_SQL = (
    "CREATE TABLE identities ("
    " credential_id TEXT PRIMARY KEY,"
    " key_hash BLOB NOT NULL,"
    " identity_id TEXT NOT NULL,"
    " type TEXT NOT NULL,"
    " status TEXT NOT NULL,"
    " valid_from REAL,"
    " valid_until REAL,"
    " stores TEXT NOT NULL,"
    " channels TEXT,"
    " locations TEXT,"
    " version INTEGER NOT NULL,"
    " updated_at REAL)"
)
KEY_HASH_INDEX_SQL = "CREATE UNIQUE INDEX identities_key_hash ON identities (key_hash)"
SKIPPED_TABLE_SQL = (
    "CREATE TABLE skipped_records ("
    " credential_id TEXT PRIMARY KEY, version INTEGER NOT NULL, key_hash BLOB)"
)
CACHE_META_TABLE_SQL = "CREATE TABLE cache_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"


class CacheFileMissing(Exception):
    """The main database names a cache file that is not there."""


def meta_table(key: str) -> str:
    """Return the table of meta ``key``: ``cache_meta`` for the cache's keys, else ``meta``."""
    return "cache_meta" if key in CACHE_META_KEYS else "meta"


def new_cache_path(database: Path) -> Path:
    """Return a new cache file path beside ``database``: ``<name>.cache-<12 hex digits>``."""
    return database.with_name(f"{database.name}.cache-{secrets.token_hex(6)}")


def cache_files(database: Path) -> list[Path]:
    """List every cache file beside ``database``, in use or not (without -wal and -shm files)."""
    prefix = f"{database.name}.cache-"
    return sorted(
        path
        for path in database.parent.glob(f"{prefix}*")
        if not path.name.endswith(("-wal", "-shm", "-journal")) and ".corrupt-" not in path.name
    )


def pointer(connection: sqlite3.Connection) -> str | None:
    """The name of the cache file the main database uses, or None before it has one."""
    try:
        row = connection.execute(
            "SELECT value FROM main.meta WHERE key = ?", (CACHE_FILE_META_KEY,)
        ).fetchone()
    except sqlite3.OperationalError:  # no meta table: a database not yet migrated
        return None
    return row[0] if row else None


def build_connection(path: Path) -> sqlite3.Connection:
    """Create a cache file at ``path`` with its tables but no key-hash index; return the connection.

    While it is built, the file keeps its rollback journal in memory and is never synced:
    nothing reads it yet, and a build that stops halfway leaves a file that no database
    names, which the next sync start deletes. ``seal`` makes it durable and switches it to
    WAL.
    """
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        _tune_for_build(connection)
        connection.execute("BEGIN")
        for sql in (IDENTITIES_TABLE_SQL, SKIPPED_TABLE_SQL, CACHE_META_TABLE_SQL):
            connection.execute(sql)
        connection.execute(f"PRAGMA user_version = {CACHE_SCHEMA_VERSION}")
        connection.execute("COMMIT")
    except BaseException:
        connection.close()
        raise
    return connection


def stage_connection(path: Path) -> sqlite3.Connection:
    """Open a cache file that ``build_connection`` created, to add records to it.

    The snapshot worker stages through such a connection in its own process, while the
    daemon's builder connection stays open and idle until the worker has stopped.
    """
    if not path.is_file():
        raise CacheFileMissing(str(path))
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        _tune_for_build(connection)
    except BaseException:
        connection.close()
        raise
    return connection


def _tune_for_build(connection: sqlite3.Connection) -> None:
    connection.execute("PRAGMA journal_mode = MEMORY")
    connection.execute("PRAGMA synchronous = OFF")
    connection.execute(f"PRAGMA cache_size = {-BUILD_CACHE_KIB}")


def seal(connection: sqlite3.Connection, path: Path) -> None:
    """Switch a built cache file to WAL, close it, and sync it and its folder to disk."""
    try:
        connection.execute("PRAGMA journal_mode = WAL")
    finally:
        connection.close()
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def create_empty(path: Path) -> None:
    """Create an empty cache file, with its key-hash index, ready to attach."""
    connection = build_connection(path)
    try:
        connection.execute(KEY_HASH_INDEX_SQL)
    except BaseException:
        connection.close()
        raise
    seal(connection, path)


def remove(path: Path) -> None:
    """Delete a cache file with its WAL and shared-memory files."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def attach(
    connection: sqlite3.Connection,
    path: Path,
    synchronous: str = "normal",
    cache_kib: int | None = None,
) -> None:
    """Attach the cache file at ``path`` as ``cache``; raise CacheFileMissing when it is gone.

    ATTACH would create an empty file where none is, and every decision would then fail on
    a missing table, so a missing file is an error here.
    """
    if not path.is_file():
        raise CacheFileMissing(str(path))
    connection.execute(f"ATTACH DATABASE ? AS {ALIAS}", (str(path),))
    connection.execute(f"PRAGMA {ALIAS}.journal_mode = WAL")
    connection.execute(f"PRAGMA {ALIAS}.synchronous = {synchronous.upper()}")
    if cache_kib is not None:
        connection.execute(f"PRAGMA {ALIAS}.cache_size = {-cache_kib}")


class CacheSlot:
    """The cache file in use, shared by the store's connections.

    A rebuild sets ``path`` once its new file is named in the database; each connection's
    ``AttachedCache`` then attaches the new file before its next statement.
    """

    def __init__(self, path: Path) -> None:
        self.path = path


class AttachedCache:
    """Keeps one connection attached to the slot's cache file; use it from one thread."""

    def __init__(
        self,
        connection: sqlite3.Connection,
        slot: CacheSlot,
        synchronous: str = "normal",
        cache_kib: int | None = None,
    ) -> None:
        self.connection = connection
        self.slot = slot
        self.path: Path | None = None
        self._synchronous = synchronous
        self._cache_kib = cache_kib
        self._lock = threading.Lock()

    def refresh(self) -> None:
        """Attach the slot's file if this connection has another one (or none) attached."""
        target = self.slot.path
        if target is self.path:
            return
        with self._lock:
            if self.path is not None:
                self.connection.execute(f"DETACH DATABASE {ALIAS}")
                self.path = None
            attach(self.connection, target, self._synchronous, self._cache_kib)
            self.path = target
