"""The SQLite store: identity cache, idempotency records and the audit outbox.

The identity cache lives in a file of its own, attached to each connection (see
``daemon.cachefile``); the main database holds decisions, the outbox and ``meta``.

All writes of the daemon go through one writer thread (``StoreWriter``), so no two writers
contend and a burst of decisions shares one commit. Readers use their own connections. Scanned
values and identity keys are stored only as HMAC-SHA-256 digests under a secret kept in a file
outside the database.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import fcntl
import grp
import hashlib
import hmac
import math
import os
import pwd
import queue
import secrets
import shlex
import sqlite3
import stat
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, get_args

import msgspec
import structlog

from daemon import cachefile
from daemon.cachefile import AttachedCache, CacheFileMissing, CacheSlot

if TYPE_CHECKING:
    import sqlite_utils

log = structlog.get_logger(__name__)

SCHEMA_VERSION = 4
SECRET_BYTES = 32
# meta key: audit events deleted unsent by the outbox bound since the database was created.
OUTBOX_DROPPED_META_KEY = "outbox_dropped_total"
# meta keys: when a pull from HQ last succeeded, and when one last moved the sync cursor.
LAST_PULL_META_KEY = "last_pull_at"
CURSOR_CHANGED_META_KEY = "cursor_changed_at"
LAST_REBUILD_META_KEY = "last_rebuild_at"
# meta key: the running daemon's process id and device health as JSON, for `status` and
# `devices`. Written on each health change and deleted when the daemon stops.
DEVICE_HEALTH_META_KEY = "device_health"
# Decisions queued while a commit runs join the next one; this bounds one transaction.
MAX_GROUP_COMMIT = 256
# Short rounds keep each checkpoint small. With 1 s rounds one decision in a hundred took over
# 10 ms on the benchmark machine, against 2.6 ms with 0.25 s rounds. Commits most likely wait
# while a large checkpoint flushes the database file.
CHECKPOINT_INTERVAL = 0.25
# About 64 MiB of 4 KiB pages: past this the writer lets the WAL start over.
WAL_RESTART_FRAMES = 16384
RESTART_CATCH_UP_INTERVAL = 0.01
RESTART_CATCH_UP_ROUNDS = 20
CACHE_KIB = 64 * 1024
# Latest Unix time that datetime can format: 9999-12-31T23:59:59Z.
MAX_UNIX_TIME = 253402300799.0
# Seconds a stored time may lie ahead of the clock. The daemon stores times from its own
# clock, so a time ahead comes from the clock stepping back, and a step of more than a day
# is far less likely than a damaged value.
META_TIME_MAX_AHEAD = 86400.0
# Largest count the meta table holds: SQLite's largest integer.
MAX_META_COUNT = 2**63 - 1
# SQLite's synchronous setting of the writer's connection, in `[database] synchronous`.
SynchronousMode = Literal["normal", "full"]
SYNCHRONOUS_MODES: tuple[str, ...] = get_args(SynchronousMode)
# SQLite empties a reader's page cache whenever another connection has committed. The writer
# commits after nearly every decision, and emptying a large cache costs more than the pages
# it saved, so the reader keeps a small one.
READER_CACHE_KIB = 1024

T = TypeVar("T")


def parse_meta_time(text: str | None, now: float | None = None) -> float | None:
    """Parse a Unix time stored in meta; None when it is missing, empty, invalid or out of range.

    The range is the one datetime can format: from 1970 to the year 9999, and with ``now``,
    no later than META_TIME_MAX_AHEAD after it. A damaged or hand-edited value must not fail
    a decision, a scrape or `status`, nor keep the cache fresh forever.
    """
    if not text:
        return None
    try:
        moment = float(text)
    except ValueError:
        return None
    if not math.isfinite(moment) or not 0.0 <= moment <= MAX_UNIX_TIME:
        return None
    if now is not None and moment > now + META_TIME_MAX_AHEAD:
        return None
    return moment


def parse_meta_count(text: str | None) -> int | None:
    """Parse a count stored in meta: 0 when it is missing, None when it is invalid."""
    if not text:
        return 0
    try:
        count = int(text)
    except ValueError:
        return None
    return count if 0 <= count <= MAX_META_COUNT else None


class StoreError(Exception):
    """The database cannot be used as it is; the message gives the cause and the fix."""


@dataclass(frozen=True, slots=True)
class Identity:
    credential_id: str
    key_hash: bytes
    id: str
    type: str
    status: str
    valid_from: float | None
    valid_until: float | None
    stores: tuple[str, ...]
    channels: tuple[str, ...] | None
    locations: tuple[str, ...] | None
    version: int


@dataclass(frozen=True, slots=True)
class StoredDecision:
    request_hash: bytes
    response: bytes


class KeyHasher:
    """HMAC-SHA-256 of scanned values under the store's secret."""

    def __init__(self, secret: bytes) -> None:
        self.secret = secret
        """Kept for the snapshot worker process, which hashes with the same secret."""
        # Copying a keyed HMAC skips the key set-up and OpenSSL's digest lookup, which cost
        # more than hashing a short value.
        self._keyed = hmac.new(secret, digestmod=hashlib.sha256)

    def hash(self, value: str) -> bytes:
        mac = self._keyed.copy()
        mac.update(value.encode("utf-8"))
        return mac.digest()

    def hash_parts(self, *parts: str) -> bytes:
        """Hash several fields unambiguously (each is length-prefixed)."""
        mac = self._keyed.copy()
        for part in parts:
            data = part.encode("utf-8")
            mac.update(len(data).to_bytes(4, "big"))
            mac.update(data)
        return mac.digest()

    @staticmethod
    def fingerprint(key_hash: bytes) -> str:
        """Short, log-safe form of a key hash (the first 6 bytes in hex)."""
        return key_hash[:6].hex()


def load_or_create_secret(path: Path, database_exists: bool) -> bytes:
    """Read the HMAC secret, or create it with mode 0600 when the database is new."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        if database_exists:
            raise StoreError(
                f"secret file {path} not found, but the database already exists and its key"
                " hashes were made with that secret: restore the file from backup, or move the"
                " database aside and import the identities again"
            ) from None
        return _create_secret(path)
    except PermissionError:
        raise StoreError(
            permission_denied_message(
                path,
                "secret file",
                "The secret file belongs to the user that runs the daemon and its commands,"
                f" with mode 0600. On an installed box that is {SERVICE_USER}: as root, run"
                f" {_chown_command(f'{SERVICE_USER}:{SERVICE_USER}', path)}; chmod 0600"
                f" {shlex.quote(str(path))}",
            )
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise StoreError(f"cannot read secret file {path}: {exc}") from None

    try:
        secret = bytes.fromhex(text)
    except ValueError:
        raise StoreError(
            f"secret file {path} is invalid: it must hold {SECRET_BYTES} bytes as hex"
        ) from None
    if len(secret) < 16:
        raise StoreError(f"secret file {path} is too short: it must hold at least 16 bytes as hex")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        log.warning(
            "store.secret_permissions",
            path=str(path),
            mode=oct(mode),
            expected="0o600",
            fix=f"chmod 0600 {shlex.quote(str(path))}",
        )
    return secret


def _create_secret(path: Path, secret: bytes | None = None) -> bytes:
    """Write ``secret``, or a new one, to a new file ``path`` with mode 0600."""
    restored = secret is not None
    secret = secrets.token_bytes(SECRET_BYTES) if secret is None else secret
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except PermissionError:
        raise StoreError(
            f"cannot create secret file {path}: permission denied for user {current_user()}"
            f" in the folder {path.parent}, which has {_owner_text(path.parent)}. Run the"
            f" command as the user that owns the folder ({RUNUSER_COMMAND} on an installed"
            " box), or set [database] secret_file to a file in a folder that user can write"
        ) from None
    except OSError as exc:
        raise StoreError(_secret_creation_message(path, exc)) from None
    try:
        with os.fdopen(descriptor, "w", encoding="ascii") as handle:
            handle.write(secret.hex() + "\n")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        # A partly written file would be read as an invalid secret at the next start.
        path.unlink(missing_ok=True)
        raise StoreError(_secret_creation_message(path, exc)) from None
    if restored:
        log.warning("store.secret_restored", path=str(path))
    else:
        log.info("store.secret_created", path=str(path))
    return secret


def restore_secret(path: Path, secret: bytes) -> bool:
    """Write the secret in use back to ``path`` when that file is gone; return whether it was.

    A database saved after it was deleted is of no use without its secret, which a command
    such as ``rm connector.sqlite3*`` deletes too.
    """
    if path.exists():
        return False
    _create_secret(path, secret)
    return True


def _secret_creation_message(path: Path, exc: OSError) -> str:
    full_disk = disk_full_text(path, exc)
    if full_disk is not None:
        return f"cannot create secret file {path}: {exc}. {full_disk}"
    return f"cannot create secret file {path}: {exc}"


def connect(
    path: Path, busy_timeout: float, synchronous: SynchronousMode = "normal"
) -> sqlite3.Connection:
    """Open a connection in autocommit mode with WAL and the project's pragmas.

    ``synchronous`` is "normal" or "full". NORMAL in WAL mode loses no committed transaction
    when the process dies, but a power loss or kernel crash can roll back the commits since
    the last checkpoint, including decisions already returned to the gateway. FULL syncs the
    WAL at each commit.
    """
    if synchronous not in SYNCHRONOUS_MODES:
        raise ValueError(f"invalid synchronous mode {synchronous!r}: use normal or full")
    connection = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, timeout=busy_timeout
    )
    connection.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute(f"PRAGMA synchronous = {synchronous.upper()}")
    connection.execute("PRAGMA foreign_keys = ON")
    # Decisions and outbox rows go into indexes keyed by random UUIDs; 64 MiB of page cache
    # keeps those index pages in memory instead of rereading them from the OS.
    connection.execute(f"PRAGMA cache_size = {-CACHE_KIB}")
    return connection


# Each migration runs inside the transaction that also sets user_version.
def _migrate_1(db: sqlite_utils.Database, path: Path) -> None:
    db["identities"].create(
        {
            "credential_id": str,
            "key_hash": bytes,
            "identity_id": str,
            "type": str,
            "status": str,
            "valid_from": float,
            "valid_until": float,
            "stores": str,
            "channels": str,
            "locations": str,
            "version": int,
            "updated_at": float,
        },
        pk="credential_id",
        not_null={"key_hash", "identity_id", "type", "status", "stores", "version"},
    )
    db["identities"].create_index(["key_hash"], unique=True, index_name="identities_key_hash")
    db["decisions"].create(
        {
            "scan_event_id": str,
            "request_hash": bytes,
            "response": bytes,
            "action": str,
            "reason": str,
            "decided_at": float,
        },
        pk="scan_event_id",
        not_null={"request_hash", "response", "action", "reason", "decided_at"},
    )
    db["decisions"].create_index(["decided_at"], index_name="decisions_decided_at")
    db.execute(
        "CREATE TABLE outbox ("
        " seq INTEGER PRIMARY KEY AUTOINCREMENT,"
        " event_id TEXT NOT NULL UNIQUE,"
        " created_at REAL NOT NULL,"
        " body BLOB NOT NULL)"
    )
    db["meta"].create({"key": str, "value": str}, pk="key", not_null={"value"})


def _migrate_2(db: sqlite_utils.Database, path: Path) -> None:
    # Records HQ sent that the cache could not hold (they failed validation), by credential
    # and version: the digest comparison counts them as present, so one bad record at HQ
    # does not make every reconciliation rebuild the cache.
    db.execute(
        "CREATE TABLE skipped_records ( credential_id TEXT PRIMARY KEY, version INTEGER NOT NULL)"
    )


def _migrate_3(db: sqlite_utils.Database, path: Path) -> None:
    # The key a credential lost to another credential's record. Such an entry counts in
    # the digest only while some credential has that key. Once the other one is removed,
    # the cache lacks a record HQ has again, and the digests must differ.
    db.execute("ALTER TABLE skipped_records ADD COLUMN key_hash BLOB")


def _migrate_4(db: sqlite_utils.Database, path: Path) -> None:
    # The identity cache moves to a file of its own, so a snapshot rebuild can build a new
    # one without holding the lock that decisions commit under. The rows are copied through
    # this process: a database created in this transaction has uncommitted tables that no
    # other connection could read.
    connection = db.conn
    for stale in cachefile.cache_files(path):
        # Left by a migration that stopped before its commit, or by a database that was
        # moved aside as corrupt or deleted: no database names them.
        cachefile.remove(stale)
        log.warning(
            "store.orphan_cache_file_removed",
            path=str(stale),
            database=str(path),
            detail="the database being created or migrated does not name this cache file, so"
            " it was deleted with the identities it held. Import them again, or let HQ sync"
            " rebuild the cache. If the database was deleted by mistake, stop the service and"
            " restore both files from a backup",
        )
    target = cachefile.new_cache_path(path)
    builder = cachefile.build_connection(target)

    try:
        columns = ", ".join(cachefile.IDENTITY_COLUMNS)
        marks = ", ".join("?" for _ in cachefile.IDENTITY_COLUMNS)
        builder.execute("BEGIN")
        builder.executemany(
            f"INSERT INTO identities ({columns}) VALUES ({marks})",
            connection.execute(f"SELECT {columns} FROM identities"),
        )
        builder.executemany(
            "INSERT INTO skipped_records (credential_id, version, key_hash) VALUES (?, ?, ?)",
            connection.execute("SELECT credential_id, version, key_hash FROM skipped_records"),
        )
        keys = sorted(cachefile.CACHE_META_KEYS)
        in_keys = f"key IN ({', '.join('?' for _ in keys)})"
        builder.executemany(
            "INSERT INTO cache_meta (key, value) VALUES (?, ?)",
            connection.execute(f"SELECT key, value FROM meta WHERE {in_keys}", keys),
        )
        builder.execute(cachefile.KEY_HASH_INDEX_SQL)
        builder.execute("COMMIT")
    except BaseException:
        builder.close()
        cachefile.remove(target)
        raise
    cachefile.seal(builder, target)

    for table in ("identities", "skipped_records", "identities_staging", "identities_retired"):
        connection.execute(f"DROP TABLE IF EXISTS {table}")
    connection.execute(f"DELETE FROM meta WHERE {in_keys}", keys)
    connection.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?)",
        (cachefile.CACHE_FILE_META_KEY, target.name),
    )


def _older_schema_message(path: Path, version: int) -> str:
    if version == 0:
        return (
            f"database {path} holds no connector data yet: import identities first, or start"
            " the daemon"
        )
    return (
        f"database {path} has schema version {version}, older than the {SCHEMA_VERSION} this"
        " release uses, and this command leaves it as it is: a migration here would break a"
        " daemon of the older release that still serves it. Restart the service (systemctl"
        " restart identity-connector), which migrates it at start, then run the command again"
    )


def _newer_schema_message(path: Path, version: int) -> str:
    return (
        f"database {path} has schema version {version}, newer than the {SCHEMA_VERSION}"
        " this build of identity-connector supports: install the newer release, or"
        " restore a backup made by this one; the file was left untouched"
    )


MIGRATIONS: dict[int, Callable[[sqlite_utils.Database, Path], None]] = {
    1: _migrate_1,
    2: _migrate_2,
    3: _migrate_3,
    4: _migrate_4,
}


def migrate(connection: sqlite3.Connection, path: Path) -> int:
    """Bring the schema to SCHEMA_VERSION in one transaction; refuse a newer database."""
    version = connection.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StoreError(_newer_schema_message(path, version))
    if version == SCHEMA_VERSION:
        return version

    # Imported here: only a migration needs it, and with numpy installed beside it the import
    # costs a quarter of a second of every start.
    import sqlite_utils

    db = sqlite_utils.Database(connection)
    connection.execute("BEGIN IMMEDIATE")
    try:
        # Another process may have migrated while this one waited for the lock.
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if version >= SCHEMA_VERSION:
            connection.execute("ROLLBACK")
            return version
        for target in range(version + 1, SCHEMA_VERSION + 1):
            MIGRATIONS[target](db, path)
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    log.info("store.migrated", path=str(path), from_version=version, to_version=SCHEMA_VERSION)
    return SCHEMA_VERSION


class CheckInterrupted(Exception):
    """An integrity check stopped before it finished, so it shows nothing about the file."""


def check_integrity(
    path: Path,
    busy_timeout: float,
    quick: bool = False,
    opened: Callable[[sqlite3.Connection], None] | None = None,
) -> bool:
    """Return whether the file is a readable SQLite database that passes the check.

    ``quick`` runs quick_check, which verifies every page and record but does not compare
    indexes with their tables, and is several times faster than integrity_check. ``opened``
    receives the check's connection, so another thread can stop a long check with
    ``interrupt()``, which raises CheckInterrupted here.
    """
    pragma = "quick_check" if quick else "integrity_check"
    try:
        connection = sqlite3.connect(path, timeout=busy_timeout, check_same_thread=False)
        try:
            if opened is not None:
                opened(connection)
            rows = connection.execute(f"PRAGMA {pragma}").fetchall()
        finally:
            connection.close()
    except sqlite3.DatabaseError as exc:
        if getattr(exc, "sqlite_errorname", "") == "SQLITE_INTERRUPT":
            raise CheckInterrupted(str(path)) from None
        if not is_corruption(exc):
            raise StoreError(unopenable_message(path, exc)) from None
        log.error("store.unreadable", path=str(path), error=str(exc))
        return False
    if rows != [("ok",)]:
        log.error("store.integrity_failed", path=str(path), problems=[r[0] for r in rows[:5]])
        return False
    return True


def is_corruption(exc: sqlite3.DatabaseError) -> bool:
    """Return whether SQLite failed because the file's content is damaged or not a database.

    Other failures (a folder or a missing folder, no permission, a read-only file system, a
    full disk) tell nothing about the content, so the file must not be moved aside for them.
    """
    return getattr(exc, "sqlite_errorname", "") in ("SQLITE_CORRUPT", "SQLITE_NOTADB")


# The system user and group that systemd/sysusers.conf creates and the unit runs the daemon as.
SERVICE_USER = "identity-connector"
# The command line that docs/operations.md gives for running a command as the service user.
RUNUSER_COMMAND = (
    f"runuser -u {SERVICE_USER} -- /opt/identity-connector/venv/bin/identity-connector ..."
)
# An open that fails with less free space than this counts as stopped by a full disk, because
# SQLite 3.40 reported an open on a full tmpfs as "disk I/O error", not as a full disk. The
# limit is a judgment: an open writes the 32 KiB WAL index, WAL frames and new pages.
LOW_DISK_BYTES = 1024 * 1024


def unopenable_message(path: Path, exc: BaseException) -> str:
    """Word a failure to open or create the SQLite file ``path``, naming the likely fix."""
    full_disk = disk_full_text(path, exc)
    if full_disk is not None:
        return f"cannot open database {path}: {exc}. {full_disk}"
    return (
        f"cannot open database {path}: {exc}; check that [database] path names a database"
        f" file (not a folder) and that {current_user()}, the user this command runs as, can"
        " read and write it and its folder"
    )


def disk_full_text(path: Path, exc: BaseException | None = None) -> str | None:
    """Return the sentence that the file system of ``path`` is full, or None when it has room.

    The file system counts as full when ``exc`` reports it (ENOSPC or SQLITE_FULL), or when
    less than LOW_DISK_BYTES are free to the current user.
    """
    reported_full = (
        getattr(exc, "errno", None) == errno.ENOSPC
        or getattr(exc, "sqlite_errorname", "") == "SQLITE_FULL"
    )
    # The folder of a new database may not exist yet: its nearest existing parent is on the
    # file system where it would be created.
    folder = path.parent
    try:
        while not folder.is_dir() and folder != folder.parent:
            folder = folder.parent
        usage = os.statvfs(folder)
    except OSError:
        usage = None
    if usage is None:
        if not reported_full:
            return None
        return f"The file system of {folder} is full: free space on it and run the command again"
    # Root may also use the blocks that the file system reserves for it (5 % by default on ext4).
    blocks = usage.f_bfree if os.geteuid() == 0 else usage.f_bavail
    free = blocks * usage.f_frsize
    if free >= LOW_DISK_BYTES and not reported_full:
        return None
    total = usage.f_blocks * usage.f_frsize
    return (
        f"The file system of {folder} is full: {_format_bytes(free)} free of"
        f" {_format_bytes(total)}. Free space on it (`df -h {shlex.quote(str(folder))}` shows"
        " it), or set [database] path to a file system with room, and run the command again"
    )


def _format_bytes(count: int) -> str:
    if count < 1024:
        return f"{count} bytes"
    if count < 1024 * 1024:
        return f"{count / 1024:.0f} KiB"
    if count < 1024**3:
        return f"{count / 1024**2:.1f} MiB"
    return f"{count / 1024**3:.1f} GiB"


def current_user() -> str:
    """Name the effective user as ``name (uid N)``, for messages about file permissions."""
    uid = os.geteuid()
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _owner_text(path: Path) -> str:
    """Describe the owner, group and mode of ``path``, such as "owner root:root and mode 0600"."""
    try:
        status = path.stat()
    except OSError:
        return "owner unknown"
    try:
        owner = pwd.getpwuid(status.st_uid).pw_name
    except KeyError:
        owner = str(status.st_uid)
    try:
        group = grp.getgrgid(status.st_gid).gr_name
    except KeyError:
        group = str(status.st_gid)
    return f"owner {owner}:{group} and mode {stat.S_IMODE(status.st_mode):04o}"


def _chown_command(owner: str, path: Path) -> str:
    return f"chown {owner} {shlex.quote(str(path))}"


def permission_denied_message(path: Path, role: str, fix: str, action: str = "read") -> str:
    """Word a permission error on ``path``: the user denied access, the owner and mode, and ``fix``.

    ``role`` names the file, such as "configuration file", and ``action`` what failed on it.
    ``fix`` is the sentence that lets the user in, and is left out when a folder above the
    file blocks the user.
    """
    user = current_user()
    try:
        path.stat()
    except PermissionError:
        quoted = shlex.quote(str(path))
        return (
            f"cannot {action} {role} {path}: permission denied for user {user}, because a folder"
            f" above the file does not let that user in. `namei -l {quoted}` lists the owner"
            " and mode of each folder, and the user needs search permission (x) on each"
        )
    except OSError:
        pass
    return (
        f"cannot {action} {role} {path}: permission denied for user {user}, and the file has"
        f" {_owner_text(path)}. {fix}"
    )


def move_aside(path: Path) -> Path:
    """Rename a corrupt database and its WAL files to ``<name>.corrupt-<time>``."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        source = Path(str(path) + suffix)
        if source.exists():
            source.rename(Path(str(target) + suffix))
    return target


# Files SQLite keeps beside a database: the WAL and its index in WAL mode, and a rollback
# journal otherwise.
_JOURNAL_SUFFIXES = ("-wal", "-shm", "-journal")

DatabaseChange = Literal["deleted", "replaced"]


def file_identity(path: Path) -> tuple[int, int] | None:
    """Return the device and inode numbers of the file at ``path``, or None when it is missing."""
    try:
        status = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return status.st_dev, status.st_ino


@dataclass(frozen=True, slots=True)
class OpenedDatabase:
    """The files of an open database by device and inode, to notice when its path changes.

    SQLite keeps reading and writing a database file after the file is deleted or renamed,
    and reports no error, so only comparing the path with the open file shows the change.
    """

    path: Path
    identities: dict[str, tuple[int, int] | None]
    """Device and inode numbers by suffix: "" for the database, "-wal" and "-shm"."""

    @classmethod
    def record(cls, path: Path) -> OpenedDatabase:
        suffixes = ("", "-wal", "-shm")
        return cls(path, {suffix: file_identity(Path(f"{path}{suffix}")) for suffix in suffixes})

    def change(self) -> DatabaseChange | None:
        """Return how ``path`` changed since ``record``: None while it names the same file.

        An empty file counts as deleted: it contains no data, and SQLite creates one when a
        connection opens a path where no file is. Raises OSError when ``path`` cannot be
        examined, such as in a folder without search permission.
        """
        try:
            status = os.stat(self.path)
        except (FileNotFoundError, NotADirectoryError):
            return "deleted"
        if (status.st_dev, status.st_ino) == self.identities[""]:
            return None
        if stat.S_ISREG(status.st_mode) and status.st_size == 0:
            return "deleted"
        return "replaced"


def save_open_database(source: sqlite3.Connection, opened: OpenedDatabase) -> Path:
    """Copy the database that ``source`` has open to a new file after its path changed.

    SQLite's backup API reads through ``source``, which still has the file it opened even
    after that file was deleted. The copy takes ``opened.path`` when no file or an empty one
    is there. Otherwise it becomes ``<name>.deleted-<UTC time>`` beside the path, so the file
    now at the path is never overwritten. Returns the copy's path. Raises sqlite3.Error or
    OSError when the copy fails, and StoreError when a complete copy could not be moved.
    """
    path = opened.path
    partial = path.with_name(f"{path.name}.saving-{secrets.token_hex(4)}")
    _backup_to_new_file(source, partial)
    try:
        if opened.change() == "deleted":
            # With no database at the path, any -wal, -shm or journal file there belongs to
            # the deleted database or to none, and SQLite would read a leftover WAL file as
            # part of the copy.
            _remove_journal_files(path)
            if _take_path(partial, path):
                return path
        # The deleted database's own -wal and -shm files stay behind under the path's names.
        # Beside another database, SQLite would read that WAL file as part of it.
        _remove_journal_files(path, opened)
        return _link_aside(partial, path)
    except OSError as exc:
        raise StoreError(
            f"the open database {path} was copied completely to {partial}, but moving the copy"
            f" failed: {exc}. To serve the copy, stop the service, move any file at {path}"
            f" aside, and move {partial} to {path}"
        ) from None


def _backup_to_new_file(source: sqlite3.Connection, target: Path) -> None:
    """Copy the main database of ``source`` into the new file ``target`` and sync it to disk."""
    # Mode 0600, because the copy contains key digests and audit events.
    os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        connection = sqlite3.connect(target, isolation_level=None)
        try:
            source.backup(connection)
        except BaseException:
            connection.close()
            raise
        # Switches the copy to WAL as the daemon uses it, closes it, and syncs the file and
        # its folder to disk.
        cachefile.seal(connection, target)
    except BaseException:
        for suffix in ("", *_JOURNAL_SUFFIXES):
            Path(f"{target}{suffix}").unlink(missing_ok=True)
        raise


def _remove_journal_files(path: Path, opened: OpenedDatabase | None = None) -> None:
    """Delete the files SQLite keeps beside ``path``, or with ``opened`` only its own -wal and -shm.

    The daemon's connections keep the deleted files open, so they go on working until they
    close.
    """
    for suffix in _JOURNAL_SUFFIXES:
        sibling = Path(f"{path}{suffix}")
        if opened is not None:
            identity = file_identity(sibling)
            if identity is None or identity != opened.identities.get(suffix):
                continue
        sibling.unlink(missing_ok=True)


def _take_path(copy: Path, path: Path) -> bool:
    """Move ``copy`` to ``path`` unless a file with data is there, and return whether it moved."""
    try:
        # Unlike a rename, a hard link fails instead of replacing a file created meanwhile.
        os.link(copy, path)
    except FileExistsError:
        if not _is_empty_file(path):
            return False
        os.replace(copy, path)
    else:
        copy.unlink()
    _sync_folder(path.parent)
    return True


def _link_aside(copy: Path, path: Path) -> Path:
    """Move ``copy`` to a new ``<name>.deleted-<UTC time>`` file beside ``path`` and return it."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    attempt = 1
    while True:
        suffix = "" if attempt == 1 else f"-{attempt}"
        target = path.with_name(f"{path.name}.deleted-{stamp}{suffix}")
        try:
            os.link(copy, target)
        except FileExistsError:
            attempt += 1
            continue
        copy.unlink()
        _sync_folder(path.parent)
        return target


def _is_empty_file(path: Path) -> bool:
    try:
        status = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    return stat.S_ISREG(status.st_mode) and status.st_size == 0


def _sync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# Files up to this size are checked before the daemon reports ready. The check reads the
# whole file, which takes seconds for a cache of millions of identities.
SYNC_CHECK_MAX_BYTES = 64 * 1024 * 1024


def check_marker(path: Path) -> Path:
    """Return the marker file that makes the next start check the database before serving."""
    return Path(str(path) + ".check-required")


def prepare_database_path(path: Path) -> None:
    """Check that ``path`` can name a database file and create its folder; raise StoreError."""
    try:
        not_a_file = path.name in ("", ".", "..") or (path.exists() and not path.is_file())
    except PermissionError:
        raise StoreError(
            permission_denied_message(
                path, "database", f"Run the command as {RUNUSER_COMMAND}", action="access"
            )
        ) from None
    if not_a_file:
        raise StoreError(
            f"database path {str(path)!r} is not a file: set [database] path to a database"
            " file such as /var/lib/identity-connector/connector.sqlite3"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(unopenable_message(path, exc)) from None


class ServeLock:
    """An advisory lock on ``<database>.serve-lock``, so one daemon at a time serves a database.

    Two daemons on one database would be two writers: each would check, migrate and repair
    the files under the other, and their pruning and uploads would race.
    """

    def __init__(self, database: Path) -> None:
        self.database = database
        self.path = Path(f"{database}.serve-lock")
        self._descriptor: int | None = None

    def acquire(self) -> None:
        """Take the lock without waiting; raise StoreError when another daemon holds it."""
        try:
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StoreError(unopenable_message(self.path, exc)) from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise StoreError(
                f"another daemon is serving database {self.database} (it holds {self.path}):"
                " stop it first, or give this one its own [database] path"
            ) from None
        self._descriptor = descriptor

    def release(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None


def open_database(
    path: Path, busy_timeout: float, repair: bool = True
) -> tuple[sqlite3.Connection, CacheSlot, bool]:
    """Open the database and its cache file, checking integrity and migrating.

    With ``repair``, a corrupt database or cache file is moved aside, a missing cache file
    replaced by an empty one and an older schema migrated. Without it (the read-only
    commands) each of these raises StoreError and the files stay as they are.
    Returns the connection (without the cache attached), the cache file in use and whether
    the integrity check was deferred: a file larger than SYNC_CHECK_MAX_BYTES is checked
    after start-up by ``check_integrity`` in a thread, unless an earlier background check
    failed and left the marker file.
    """
    prepare_database_path(path)
    marker = check_marker(path)
    check_all = marker.exists()
    size = path.stat().st_size if path.exists() else 0
    deferred = size > SYNC_CHECK_MAX_BYTES and not check_all
    if size > 0 and not deferred and not check_integrity(path, busy_timeout):
        _move_corrupt_aside(path, repair)

    try:
        connection = _connect_and_migrate(path, busy_timeout, repair)
    except sqlite3.DatabaseError as exc:
        if not is_corruption(exc):
            raise StoreError(unopenable_message(path, exc)) from None
        # A file that is not a database at all fails here even when its check was deferred.
        log.error("store.unreadable", path=str(path), error=str(exc))
        _move_corrupt_aside(path, repair)
        connection = _connect_and_migrate(path, busy_timeout, repair)
        deferred = False
    try:
        slot, cache_deferred = _open_cache_file(connection, path, busy_timeout, check_all, repair)
    except BaseException:
        connection.close()
        raise
    marker.unlink(missing_ok=True)
    return connection, slot, deferred or cache_deferred


def _open_cache_file(
    connection: sqlite3.Connection, path: Path, busy_timeout: float, check_all: bool, repair: bool
) -> tuple[CacheSlot, bool]:
    """Find the cache file the database names; with ``repair``, replace a missing or corrupt one."""
    cache_path = _named_cache_file(connection, path)
    if cache_path is not None and not cache_path.is_file():
        # A daemon's rebuild may have switched files and deleted the old one since the
        # name was read. Only a name that is still missing when read again means a loss.
        cache_path = _named_cache_file(connection, path)
    if cache_path is None or not cache_path.is_file():
        if not repair:
            raise StoreError(
                f"the identity cache file {cache_path or '(none named)'} of database {path} is"
                " missing, and this command does not recreate it: restore it from a backup, or"
                " start the daemon, which replaces it with an empty cache for HQ sync or an"
                " import to fill"
            )
        log.error(
            "store.cache_file_missing",
            path=str(cache_path) if cache_path else None,
            database=str(path),
            action="starting with an empty cache; import the identities again or let HQ sync"
            " rebuild it",
        )
        return CacheSlot(_replace_cache_file(connection, path)), False
    size = cache_path.stat().st_size
    deferred = size > SYNC_CHECK_MAX_BYTES and not check_all
    healthy = deferred or check_integrity(cache_path, busy_timeout)
    if healthy:
        try:
            probe = sqlite3.connect(cache_path, timeout=busy_timeout)
            try:
                version = probe.execute("PRAGMA user_version").fetchone()[0]
            finally:
                probe.close()
        except sqlite3.DatabaseError as exc:
            if not is_corruption(exc):
                raise StoreError(unopenable_message(cache_path, exc)) from None
            log.error("store.unreadable", path=str(cache_path), error=str(exc))
            healthy = False
        else:
            if version > cachefile.CACHE_SCHEMA_VERSION:
                raise StoreError(
                    f"identity cache file {cache_path} has schema version {version}, newer"
                    f" than the {cachefile.CACHE_SCHEMA_VERSION} this build supports: install"
                    " the newer release; the file was left untouched"
                )
    if not healthy:
        _move_corrupt_aside(cache_path, repair)
        return CacheSlot(_replace_cache_file(connection, path)), False
    return CacheSlot(cache_path), deferred


def _named_cache_file(connection: sqlite3.Connection, path: Path) -> Path | None:
    """Return the cache file the database names, or None when it names no usable file name."""
    name = cachefile.pointer(connection)
    if name is None or "/" in name or name in ("", ".", ".."):
        return None
    return path.with_name(name)


def _replace_cache_file(connection: sqlite3.Connection, path: Path) -> Path:
    """Create an empty cache file and name it in the database; return its path."""
    target = cachefile.new_cache_path(path)
    cachefile.create_empty(target)
    connection.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?)"
        " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        (cachefile.CACHE_FILE_META_KEY, target.name),
    )
    return target


def open_reader(path: Path, busy_timeout: float) -> sqlite3.Connection:
    """Open the database with the cache file it names attached, for one-off reads."""
    connection = sqlite3.connect(path, timeout=busy_timeout, check_same_thread=False)
    try:
        name = cachefile.pointer(connection)
        if name is not None:
            cachefile.attach(connection, path.with_name(name))
    except BaseException:
        connection.close()
        raise
    return connection


def _connect_and_migrate(path: Path, busy_timeout: float, repair: bool) -> sqlite3.Connection:
    # Read the version before connect() switches the file to WAL, which rewrites its header:
    # a database from a newer release must be left byte for byte as it was.
    probe = sqlite3.connect(path, timeout=busy_timeout)
    try:
        version = probe.execute("PRAGMA user_version").fetchone()[0]
    finally:
        probe.close()
    if version > SCHEMA_VERSION:
        raise StoreError(_newer_schema_message(path, version))
    if version < SCHEMA_VERSION and not repair:
        raise StoreError(_older_schema_message(path, version))
    connection = connect(path, busy_timeout)
    try:
        migrate(connection, path)
    except BaseException:
        connection.close()
        raise
    return connection


def _move_corrupt_aside(path: Path, repair: bool = True) -> None:
    if not repair:
        raise StoreError(
            f"{path} is damaged: this command leaves it as it is; start the daemon, which moves"
            " it aside and starts with an empty cache, or restore it from a backup"
        )
    try:
        moved = move_aside(path)
    except OSError as exc:
        raise StoreError(f"cannot move the damaged file {path} aside: {exc}") from None
    log.error(
        "store.corrupt_moved_aside",
        path=str(path),
        moved_to=str(moved),
        action="starting with an empty cache; import the identities again or let HQ sync"
        " rebuild it",
    )


# The cache stores each list as JSON text; msgspec reads one in a tenth of json.loads's time.
_decode_names = msgspec.json.Decoder(tuple[str, ...]).decode


def _row_to_identity(row: tuple) -> Identity:
    return Identity(
        credential_id=row[0],
        key_hash=row[1],
        id=row[2],
        type=row[3],
        status=row[4],
        valid_from=row[5],
        valid_until=row[6],
        stores=_decode_names(row[7]),
        channels=_decode_names(row[8]) if row[8] is not None else None,
        locations=_decode_names(row[9]) if row[9] is not None else None,
        version=row[10],
    )


_IDENTITY_COLUMNS = (
    "credential_id, key_hash, identity_id, type, status, valid_from, valid_until,"
    " stores, channels, locations, version"
)


class StoreReader:
    """Read queries on a connection of its own; use it from one thread at a time."""

    def __init__(self, connection: sqlite3.Connection, slot: CacheSlot) -> None:
        self._connection = connection
        self.cache = AttachedCache(connection, slot, cache_kib=READER_CACHE_KIB)
        self.cache.refresh()

    @property
    def connection(self) -> sqlite3.Connection:
        """The connection, with the cache file in use attached."""
        self.cache.refresh()
        return self._connection

    def identity_by_hash(self, key_hash: bytes) -> Identity | None:
        row = self.connection.execute(
            f"SELECT {_IDENTITY_COLUMNS} FROM identities WHERE key_hash = ?", (key_hash,)
        ).fetchone()
        return _row_to_identity(row) if row else None

    def decision(self, scan_event_id: str) -> StoredDecision | None:
        row = self.connection.execute(
            "SELECT request_hash, response FROM decisions WHERE scan_event_id = ?",
            (scan_event_id,),
        ).fetchone()
        return StoredDecision(request_hash=row[0], response=row[1]) if row else None

    def meta(self, key: str) -> str | None:
        table = cachefile.meta_table(key)
        row = self.connection.execute(f"SELECT value FROM {table} WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def count(self, table: str) -> int:
        assert table in ("identities", "decisions", "outbox")
        return self.connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0]

    def oldest_outbox_time(self) -> float | None:
        row = self.connection.execute("SELECT min(created_at) FROM outbox").fetchone()
        return row[0]


@dataclass(frozen=True, slots=True)
class Rows:
    """A job that only writes rows of the database: ``statements`` are (SQL, parameters) pairs.

    The writer runs the Rows jobs of one group commit with one ``executemany`` per
    statement, which costs far less than a Python call per job. A decision is one Rows job,
    so the commit of a Rows job with statements ends the writer's ``failure``.
    NOTE: the statements of a group commit run grouped by their SQL text, in the order each
    text first appears, so a statement must not depend on another job's statements running
    before it (a delete and an insert of one row in two jobs could swap).
    """

    statements: tuple[tuple[str, tuple[Any, ...]], ...]

    def __call__(self, connection: sqlite3.Connection) -> None:
        for sql, parameters in self.statements:
            connection.execute(sql, parameters)


# Primary SQLite result codes that mean the storage took no commit, not that a job was wrong.
# They cover a write lock held past the busy timeout, a read-only file, an I/O error, a full
# disk or file size limit, and a file that cannot be opened.
_STORAGE_FAULT_CODES = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
    }
)


class CommitFailed(sqlite3.OperationalError):
    """A writer job failed because the storage took no commit, not because of the job.

    The usual causes are a full disk, a read-only file, an I/O error and a write lock held
    past the busy timeout. The message, ``sqlite_errorcode`` and ``sqlite_errorname`` are
    those of the SQLite error, which is the ``__cause__``.
    """


def _as_commit_failure(error: Exception) -> Exception:
    """Return ``error`` as CommitFailed when its SQLite result code is a storage fault."""
    if not isinstance(error, sqlite3.OperationalError) or isinstance(error, CommitFailed):
        return error
    code = getattr(error, "sqlite_errorcode", None)
    if not isinstance(code, int) or code & 0xFF not in _STORAGE_FAULT_CODES:
        return error
    failure = CommitFailed(str(error))
    failure.sqlite_errorcode = code
    failure.sqlite_errorname = error.sqlite_errorname
    failure.__cause__ = error
    return failure


# Sizes of the write probe's rows, a little over a gateway decision's: its response measured
# 53-80 bytes and its audit event 497-524 bytes with the sample identities of the tests.
# Longer identity ids make both larger.
PROBE_RESPONSE_BYTES = 96
PROBE_EVENT_BYTES = 640


def write_probe() -> Rows:
    """Return a job that inserts a decision and its outbox event as a decision does, then
    deletes both.

    The transaction writes the pages of the same tables and indexes as a decision and
    leaves no row behind, so its commit shows that a decision would commit too. A commit
    that writes fewer pages, such as one that updates a row in ``meta``, can succeed on a
    full disk where a decision fails. The outbox's AUTOINCREMENT counter keeps the probe's
    ``seq``, so the next event's ``seq`` skips one number. It is a Rows job, so like a
    decision it does not wait for an import's lock on the cache file.
    """
    scan_event_id = str(uuid.uuid4())
    event_id = str(uuid.uuid4())
    now = time.time()
    return Rows(
        (
            (
                "INSERT INTO decisions (scan_event_id, request_hash, response, action, reason,"
                " decided_at) VALUES (?, ?, ?, 'PROBE', 'PROBE', ?)",
                (scan_event_id, bytes(32), bytes(PROBE_RESPONSE_BYTES), now),
            ),
            (
                "INSERT INTO outbox (event_id, created_at, body) VALUES (?, ?, ?)",
                (event_id, now, bytes(PROBE_EVENT_BYTES)),
            ),
            ("DELETE FROM decisions WHERE scan_event_id = ?", (scan_event_id,)),
            ("DELETE FROM outbox WHERE event_id = ?", (event_id,)),
        )
    )


NO_ROWS = Rows(())
"""A job that writes nothing: its commit shows that the writer runs, and it does not wait
for an import's lock on the cache file, as a job that is not a Rows job would."""


def _proves_decisions_commit(job: Any) -> bool:
    """Tell whether a committed ``job`` shows that decisions commit: a decision or the probe."""
    return type(job) is Rows and bool(job.statements)


class StoreWriter:
    """The one writer: a thread that runs queued jobs in shared transactions.

    A job is a function of a connection. Jobs queued together commit together (group
    commit). When one of them raises, the batch is rolled back and each job runs again in a
    transaction of its own, so only the failing job's caller gets the exception.
    """

    def __init__(
        self,
        path: Path,
        slot: CacheSlot,
        busy_timeout: float,
        synchronous: SynchronousMode = "normal",
    ) -> None:
        self._connection = connect(path, busy_timeout, synchronous)
        self.cache = AttachedCache(self._connection, slot, synchronous)
        self.cache.refresh()
        # Checkpoints run in a thread of their own: an automatic checkpoint runs inside the
        # commit that crosses the threshold and fsyncs the database file, which held that
        # decision's response back by 10-20 ms on the benchmark machine.
        self._connection.execute("PRAGMA wal_autocheckpoint = 0")
        # When the WAL starts over, the file is cut back to this size.
        self._connection.execute(f"PRAGMA journal_size_limit = {WAL_RESTART_FRAMES * 4096}")
        self._checkpointer = Checkpointer(path, slot, busy_timeout)
        self.failure: str | None = None
        """The storage error that made a decision, or a whole batch, fail, such as a full
        disk or a locked database; None once a decision or the write probe commits again."""
        self.proved_at: float | None = None
        """``time.monotonic()`` when a decision or the write probe last committed."""
        # Each item is a list of (job, waiter) or _STOP.
        self._jobs: queue.SimpleQueue[list[tuple[Any, Any]]] = queue.SimpleQueue()
        self._outgoing: dict[asyncio.AbstractEventLoop, list[tuple[Any, Any]]] = {}
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._thread.start()

    async def submit(self, job: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``job`` in the writer thread and return its result once committed."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        # Jobs submitted in one pass of the event loop reach the writer together: waking the
        # thread costs more than the job itself when the machine is busy.
        outgoing = self._outgoing.get(loop)
        if outgoing is None:
            outgoing = self._outgoing[loop] = []
            loop.call_soon(self._hand_over, loop)
        outgoing.append((job, (loop, future)))
        return await future

    def _hand_over(self, loop: asyncio.AbstractEventLoop) -> None:
        self._jobs.put(self._outgoing.pop(loop))

    def submit_and_wait(self, job: Callable[[sqlite3.Connection], T]) -> T:
        """Blocking form of ``submit`` for code outside the event loop."""
        done = threading.Event()
        box: dict[str, Any] = {}
        self._jobs.put([(job, (done, box))])
        done.wait()
        if "error" in box:
            raise box["error"]
        return box["result"]

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def cache_paths(self) -> tuple[Path | None, Path | None]:
        """The cache files attached to the writer's and the checkpoint thread's connections."""
        return self.cache.path, self._checkpointer.cache.path

    def close(self) -> None:
        """Finish the queued jobs, then stop the thread and close the connection."""
        self._jobs.put(_STOP)
        self._thread.join()
        self._checkpointer.close()
        self._connection.close()

    def _run(self) -> None:
        waiting: collections.deque = collections.deque()
        stopping = False
        while True:
            if not waiting:
                if stopping:
                    return
                items = self._jobs.get()
                if items is _STOP:
                    stopping = True
                    continue
                waiting.extend(items)
            # Take whatever else is queued, so the batch includes all of it.
            while True:
                try:
                    items = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if items is _STOP:
                    stopping = True
                    break
                waiting.extend(items)
            count = min(len(waiting), MAX_GROUP_COMMIT)
            self._commit_batch([waiting.popleft() for _ in range(count)])
            if self._checkpointer.restart_due:
                self._checkpointer.restart_due = False
                self._checkpoint_between_batches()

    def _checkpoint_between_batches(self) -> None:
        # No frame can arrive while this runs, so the copy completes unless a reader still
        # reads an older snapshot. Few frames are left, because the checkpoint thread copied
        # the rest.
        try:
            self._connection.execute("PRAGMA main.wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:
            log.warning("store.checkpoint_failed", error=str(exc))

    def _commit_batch(self, batch: list) -> None:
        connection = self._connection
        try:
            # After a rebuild switched cache files, the next batch writes to the new one.
            self.cache.refresh()
            outcomes = self._run_in_one_transaction(batch)
        except _JobFailed:
            # One job raised: the shared transaction is gone, so give every job a transaction
            # of its own and let only the failing one report its error.
            outcomes = [self._run_alone(job) for job, _waiter in batch]
        except Exception as exc:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            outcomes = [(False, exc)] * len(batch)
        outcomes = [(ok, value if ok else _as_commit_failure(value)) for ok, value in outcomes]
        self._note_outcomes(batch, outcomes)
        _deliver_all(batch, outcomes)

    def _note_outcomes(self, batch: list, outcomes: list[tuple[bool, Any]]) -> None:
        """Track whether decisions commit, for /readyz and one log line per change.

        A failure starts when a decision, or every job of a batch, fails with CommitFailed.
        A job that breaks a constraint is that job's own fault. Only the commit of a
        decision or of ``write_probe`` ends the failure: an empty job writes nothing, and a
        small update can fit on a full disk where a decision's new pages do not.
        """
        proved = False
        decision_failed = False
        failures: list[CommitFailed] = []
        for (job, _waiter), (ok, value) in zip(batch, outcomes, strict=True):
            proves = _proves_decisions_commit(job)
            if ok:
                proved = proved or proves
            elif isinstance(value, CommitFailed):
                failures.append(value)
                decision_failed = decision_failed or proves
        if proved:
            self.proved_at = time.monotonic()
            if self.failure is not None:
                log.info("store.commit_recovered", previous_error=self.failure)
            self.failure = None
            return
        if not failures or (not decision_failed and len(failures) < len(outcomes)):
            return
        if self.failure is None:
            log.error("store.commit_failed", jobs=len(batch), error=str(failures[0]))
        self.failure = str(failures[0])

    def _run_in_one_transaction(self, batch: list) -> list[tuple[bool, Any]]:
        connection = self._connection
        connection.execute(_begin_statement(batch))
        results: list[tuple[bool, Any]] = []
        pending: dict[str, list[tuple[Any, ...]]] = {}
        try:
            for job, _waiter in batch:
                if type(job) is Rows:
                    for sql, parameters in job.statements:
                        pending.setdefault(sql, []).append(parameters)
                    results.append((True, None))
                    continue
                _insert_pending(connection, pending)
                results.append((True, job(connection)))
            _insert_pending(connection, pending)
        except Exception as exc:
            # SQLite has already rolled back after some errors, such as a full disk.
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise _JobFailed from exc
        connection.execute("COMMIT")
        return results

    def _run_alone(self, job: Callable[[sqlite3.Connection], Any]) -> tuple[bool, Any]:
        connection = self._connection
        try:
            connection.execute(_begin_statement([(job, None)]))
            result = job(connection)
            connection.execute("COMMIT")
        except Exception as exc:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            return False, exc
        return True, result


_STOP: Any = object()


def _begin_statement(batch: list) -> str:
    """Return how a batch's transaction starts.

    IMMEDIATE takes the write lock of the database and of the attached cache file at once,
    so a decision would wait while an `import` holds the cache file's lock. Rows jobs only
    write, and decisions write only the database, so their transaction starts DEFERRED and
    locks each file at its first write. Other jobs read before they write, so they keep
    IMMEDIATE. In WAL mode SQLite returns SQLITE_BUSY_SNAPSHOT, which no busy timeout
    retries, when a transaction that began by reading tries to write after another
    connection committed; a transaction that takes its write locks first never does.
    """
    if all(type(job) is Rows for job, _waiter in batch):
        return "BEGIN"
    return "BEGIN IMMEDIATE"


def _insert_pending(connection: sqlite3.Connection, pending: dict[str, list]) -> None:
    # Statements run in the order the jobs first used them, rows in job order.
    for sql, rows in pending.items():
        connection.executemany(sql, rows)
    pending.clear()


class _JobFailed(Exception):
    """A job of a shared transaction raised; the transaction was rolled back."""


class Checkpointer:
    """Copies the WAL back into the database file every CHECKPOINT_INTERVAL seconds.

    PASSIVE checkpoints never block the writer or readers; pages still in use by a reader
    are copied by a later round. Under steady writes the WAL never starts over on its own,
    because new frames arrive while each checkpoint runs. When it grows past
    WAL_RESTART_FRAMES, rounds follow each other quickly: once one ends with the whole WAL
    copied, the writer's next transaction writes from the start of the file again, and
    syncing the database file stays off the decision path. When the rounds do not catch up,
    the writer copies the last frames itself between two batches (``restart_due``).
    """

    def __init__(self, path: Path, slot: CacheSlot, busy_timeout: float) -> None:
        self._connection = connect(path, busy_timeout)
        self.cache = AttachedCache(self._connection, slot)
        self.cache.refresh()
        self._stop = threading.Event()
        self.restart_due = False
        """Flag set when the catch-up rounds did not copy the whole WAL: the writer does it."""
        self._rounds = 0
        self._thread = threading.Thread(target=self._run, name="store-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        failing = False
        wait = CHECKPOINT_INTERVAL
        while not self._stop.wait(wait):
            wait = CHECKPOINT_INTERVAL
            try:
                _busy, frames, _copied = self._connection.execute(
                    "PRAGMA main.wal_checkpoint(PASSIVE)"
                ).fetchone()
                wait = self._plan_restart(frames)
                # The cache file's WAL grows only with pulls and imports, which pause.
                self.cache.refresh()
                self._connection.execute(
                    f"PRAGMA {cachefile.ALIAS}.wal_checkpoint(PASSIVE)"
                ).fetchone()
            except sqlite3.Error as exc:
                if not failing:
                    log.error("store.checkpoint_failed", error=str(exc))
                failing = True
            else:
                if failing:
                    log.info("store.checkpoint_recovered")
                failing = False

    def _plan_restart(self, frames: int) -> float:
        """Schedule the writer's catch-up after a round; return the wait to the next round."""
        if frames < WAL_RESTART_FRAMES:
            self._rounds = 0
            return CHECKPOINT_INTERVAL
        self._rounds += 1
        if self._rounds < RESTART_CATCH_UP_ROUNDS:
            return RESTART_CATCH_UP_INTERVAL
        # The rounds did not catch up: writes that never pause, or a reader on an old
        # snapshot. The writer copies the rest between two batches, then rounds start again.
        self.restart_due = True
        self._rounds = 0
        return CHECKPOINT_INTERVAL

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        """Stop the thread after a last checkpoint that empties the WAL when nothing reads."""
        self._stop.set()
        self._thread.join()
        try:
            self._connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.Error as exc:
            log.warning("store.checkpoint_failed", error=str(exc))
        self._connection.close()


def _deliver_all(batch: list, outcomes: list[tuple[bool, Any]]) -> None:
    # One wake-up of the event loop for the whole batch, not one per job.
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for (_job, (first, second)), (ok, value) in zip(batch, outcomes, strict=True):
        if isinstance(first, asyncio.AbstractEventLoop):
            by_loop.setdefault(first, []).append((second, ok, value))
        else:
            second["result" if ok else "error"] = value
            first.set()
    for loop, results in by_loop.items():
        # When a loop closed while the jobs ran, no caller waits for their results.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_set_futures, results)


def _set_futures(results: list[tuple[asyncio.Future, bool, Any]]) -> None:
    for future, ok, value in results:
        if future.done():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


@dataclass
class Store:
    """The opened database: its path, the key hasher, a reader and the writer."""

    path: Path
    hasher: KeyHasher
    reader: StoreReader
    writer: StoreWriter
    cache: CacheSlot
    """The identity cache file in use; a snapshot rebuild switches it."""
    check_deferred: bool = False
    """The integrity check still has to run; see ``open_database``."""

    @classmethod
    def open(
        cls,
        path: Path,
        secret_path: Path,
        busy_timeout: float = 5.0,
        synchronous: SynchronousMode = "normal",
        repair: bool = True,
    ) -> Store:
        """Open or create the database; ``synchronous`` applies to the writer's commits.

        ``repair`` False makes a damaged database, a missing cache file or an older schema
        an error instead of moving aside, replacing or migrating it (``open_database``).
        """
        existed = path.exists() and path.stat().st_size > 0
        connection, slot, deferred = open_database(path, busy_timeout, repair)
        try:
            connection.execute(f"PRAGMA cache_size = {-READER_CACHE_KIB}")
            reader = StoreReader(connection, slot)
            # Decisions and outbox rows hold HMACs too: idempotent replays and audit
            # fingerprints depend on the secret as much as the identities do.
            database_has_rows = existed and any(
                connection.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() is not None
                for table in ("identities", "decisions", "outbox")
            )
            secret = load_or_create_secret(secret_path, database_has_rows)
        except CacheFileMissing as exc:
            connection.close()
            raise StoreError(f"identity cache file {exc} disappeared while opening it") from None
        except BaseException:
            connection.close()
            raise
        return cls(
            path=path,
            hasher=KeyHasher(secret),
            reader=reader,
            writer=StoreWriter(path, slot, busy_timeout, synchronous),
            cache=slot,
            check_deferred=deferred,
        )

    def close(self) -> None:
        self.writer.close()
        self.reader.connection.close()

    def attached_everywhere(self, path: Path) -> bool:
        """Return whether the reader, writer and checkpoint thread all use cache file ``path``."""
        return self.reader.cache.path is path and all(
            attached is path for attached in self.writer.cache_paths
        )

    def file_sizes(self) -> dict[str, int]:
        sizes = {}
        files = (
            (self.path, "", "database"),
            (self.path, "-wal", "wal"),
            (self.cache.path, "", "cache"),
            (self.cache.path, "-wal", "cacheWal"),
        )
        for base, suffix, name in files:
            try:
                sizes[name] = Path(str(base) + suffix).stat().st_size
            except FileNotFoundError:
                sizes[name] = 0
        return sizes
