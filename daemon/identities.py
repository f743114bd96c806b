"""Identity rows in the SQLite cache: packing, bulk upserts with their counts, and imports."""

from __future__ import annotations

import functools
import re
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import structlog

from daemon.cachefile import IDENTITY_COLUMNS
from daemon.normalize import normalize_key
from daemon.recordfile import (
    IdentityRecord,
    RecordInvalid,
    detect_format,
    iter_csv,
    iter_jsonl,
    open_records,
    start_reading,
)
from daemon.store import KeyHasher

log = structlog.get_logger(__name__)

# Rows per import transaction: large enough that commits and WAL checkpoints do not
# dominate, small enough to hold the write lock for well under a second.
BATCH_SIZE = 20000
IMPORT_CACHE_KIB = 256 * 1024
# Checkpoint the WAL every 64 MiB of 4 KiB pages instead of every 4 MiB, so an import
# pays for fewer checkpoints and their fsyncs.
IMPORT_CHECKPOINT_PAGES = 16384


def loggable_reason(error: RecordInvalid) -> str:
    """Return a validation message with quoted values masked.

    msgspec quotes an invalid value, which could be a key sent in the wrong field.
    """
    return re.sub(r"'[^']*'", "'…'", str(error))


def credential_id_of(data: object) -> str | None:
    """Return a record's credentialId, whole, if it is a string.

    The digest compares whole ids, so a skipped record keeps its whole id; log lines
    shorten it with ``loggable_id``.
    """
    value = data.get("credentialId") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None


def loggable_id(value: str | None) -> str | None:
    """Return an id cut to 255 characters for a log line."""
    return value if value is None or len(value) <= 255 else value[:255] + "…"


def version_of(data: object) -> int | None:
    """Return the version HQ gave a record, as its digest counts it, or None if unusable."""
    value = data.get("version", 0) if isinstance(data, dict) else None
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 2**63 - 1:
        return value
    return None


def identity_row(record: IdentityRecord, hasher: KeyHasher, now: float) -> dict:
    """Turn a record into an `identities` row; the key is kept only as its HMAC."""
    return {
        "credential_id": record.credentialId,
        "key_hash": hasher.hash(normalize_key(record.key, record.channels)),
        "identity_id": record.id,
        "type": record.type,
        "status": record.status,
        "valid_from": record.validFrom.timestamp() if record.validFrom else None,
        "valid_until": record.validUntil.timestamp() if record.validUntil else None,
        "stores": _encode_list(record.stores),
        "channels": _encode_list(record.channels),
        "locations": _encode_list(record.locations),
        "version": record.version,
        "updated_at": now,
    }


_ROW_COLUMNS = IDENTITY_COLUMNS


def _encode_list(items: list[str] | None) -> str | None:
    return None if items is None else _JSON_ENCODER.encode(items).decode()


_JSON_ENCODER = msgspec.json.Encoder()


# Rows go to SQLite as one JSON text and one blob of key hashes, unpacked by a single
# INSERT ... SELECT FROM json_each, so a batch binds three parameters. Python's sqlite3
# module binds under the GIL and looks up an adapter for every None and bytes value. With
# a parameter per column, a py-spy profile of the rebuild put about 5 us of the writer
# thread's GIL time per row there. The statement itself runs without the GIL.
_PACKED_COLUMNS = tuple(c for c in _ROW_COLUMNS if c not in ("key_hash", "updated_at"))
KEY_HASH_BYTES = 32


@functools.cache
def _insert_sql(table: str) -> str:
    values = [f"json_extract(value, '$[{index}]')" for index in range(len(_PACKED_COLUMNS))]
    values.insert(1, f"substr(:key_hashes, key * {KEY_HASH_BYTES} + 1, {KEY_HASH_BYTES})")
    return (
        f"INSERT OR REPLACE INTO {table} ({', '.join(_ROW_COLUMNS)})"
        f" SELECT {', '.join(values)}, :updated_at FROM json_each(:rows)"
    )


@dataclass(frozen=True, slots=True)
class RowBatch:
    """Identity rows packed for ``write_rows``, in the order they are to be written."""

    rows: str
    """JSON array with one array per row: the ``_PACKED_COLUMNS`` values."""
    key_hashes: bytes
    """The rows' key hashes, KEY_HASH_BYTES each, in row order."""
    updated_at: float
    size: int


def pack_records(
    records: list[tuple[IdentityRecord, str]], hasher: KeyHasher, now: float
) -> RowBatch:
    """Pack records and their normalised keys into rows, hashing the keys in this thread."""
    rows = []
    key_hashes = []
    for record, key in records:
        key_hashes.append(hasher.hash(key))
        rows.append(
            (
                record.credentialId,
                record.id,
                record.type,
                record.status,
                record.validFrom.timestamp() if record.validFrom else None,
                record.validUntil.timestamp() if record.validUntil else None,
                _encode_list(record.stores),
                _encode_list(record.channels),
                _encode_list(record.locations),
                record.version,
            )
        )
    return RowBatch(_JSON_ENCODER.encode(rows).decode(), b"".join(key_hashes), now, len(rows))


def pack_rows(rows: list[dict]) -> RowBatch:
    """Pack rows made by ``identity_row``; ``updated_at`` is taken from the first row."""
    packed = [tuple(row[c] for c in _PACKED_COLUMNS) for row in rows]
    key_hashes = b"".join(row["key_hash"] for row in rows)
    updated_at = rows[0]["updated_at"] if rows else 0.0
    return RowBatch(_JSON_ENCODER.encode(packed).decode(), key_hashes, updated_at, len(rows))


def join_batches(batches: list[RowBatch]) -> RowBatch:
    """Join packed batches into one, in order, so one statement writes them all."""
    rows = [batch.rows[1:-1] for batch in batches if batch.size]
    return RowBatch(
        rows=f"[{','.join(rows)}]",
        key_hashes=b"".join(batch.key_hashes for batch in batches),
        updated_at=batches[0].updated_at if batches else 0.0,
        size=sum(batch.size for batch in batches),
    )


def write_rows(connection: sqlite3.Connection, batch: RowBatch, table: str = "identities") -> None:
    """Insert rows in order inside the caller's transaction; a later row replaces an earlier.

    ``INSERT OR REPLACE`` deletes whatever row has the same credential id or, where the
    table has its unique key-hash index, the same key hash. So a key moves to its newest
    record, and a batch applies as its rows would one by one, in ``json_each`` order.
    """
    if batch.size == 0:
        return
    connection.execute(
        _insert_sql(table),
        {"rows": batch.rows, "key_hashes": batch.key_hashes, "updated_at": batch.updated_at},
    )


def stage_rows(connection: sqlite3.Connection, batch: RowBatch) -> None:
    """Append packed records to a cache file being built; a later record of a credential wins."""
    connection.execute("BEGIN")
    try:
        write_rows(connection, batch)
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")


def upsert_rows(connection: sqlite3.Connection, rows: list[dict]) -> None:
    """Insert or replace rows by credential id and by key, inside the caller's transaction.

    Another credential holding the same key hash is deleted, because one scanned key must
    resolve to one identity.
    """
    write_rows(connection, pack_rows(rows))


@dataclass
class UpsertCounts:
    inserted: int = 0
    updated: int = 0
    """Credentials stored before, not by an earlier batch with the same ``updated_at``."""
    replaced_keys: int = 0
    """Other credentials removed because a record took over their key."""
    repeated: list[int] = field(default_factory=list)
    """Indexes of the rows whose credential id an earlier row of the batch has, or an earlier
    batch with the same ``updated_at`` wrote."""


# SQLite 3.40 binds at most 32,766 parameters per statement.
_QUERY_CHUNK = 10000


def count_upsert(connection: sqlite3.Connection, rows: list[dict]) -> UpsertCounts:
    """Count what ``upsert_rows(connection, rows)`` will insert, update and take over.

    Call it before the upsert, in the same transaction. It reads only the rows whose
    credential id or key hash the batch contains, and replays the batch in memory. A
    credential counts as replaced when a record takes its key and no later record of the
    batch brings it back. So the table afterwards has as many rows as before, plus
    ``inserted``, minus ``replaced_keys``.

    A row counts as repeated, and not as inserted or updated, when an earlier row of the
    batch has its credential id, or when the stored row has the ``updated_at`` that this
    batch writes. An import gives all its rows one ``updated_at``, so such a stored row
    comes from an earlier batch of the same import. Every row is thus counted once, as
    inserted, updated or repeated.
    """
    counts = UpsertCounts()
    credential_ids = list(dict.fromkeys(row["credential_id"] for row in rows))
    key_hashes = list(dict.fromkeys(row["key_hash"] for row in rows))
    stored = _select_in(
        connection, "credential_id", "credential_id, key_hash, updated_at", credential_ids
    )
    # Credential id to key hash, and key hash to credential id, as stored now.
    key_of = {credential_id: key_hash for credential_id, key_hash, _ in stored}
    holder_of = dict(_select_in(connection, "key_hash", "key_hash, credential_id", key_hashes))
    # pack_rows writes every row with the first row's updated_at.
    # NOTE: a credential that an earlier batch wrote and that lost its key to another
    # credential before this batch is no longer stored, so its row here counts as inserted.
    batch_time = rows[0]["updated_at"] if rows else None
    written_before = {credential_id for credential_id, _, at in stored if at == batch_time}
    counts.updated = len(key_of) - len(written_before)
    counts.inserted = len(credential_ids) - len(key_of)

    seen: set[str] = set()
    removed: set[str] = set()
    for index, row in enumerate(rows):
        credential_id, key_hash = row["credential_id"], row["key_hash"]
        if credential_id in seen or credential_id in written_before:
            counts.repeated.append(index)
        seen.add(credential_id)
        old_key = key_of.get(credential_id)
        if old_key is not None and holder_of.get(old_key) == credential_id:
            del holder_of[old_key]
        holder = holder_of.get(key_hash)
        if holder is not None and holder != credential_id:
            removed.add(holder)
            key_of.pop(holder, None)
        holder_of[key_hash] = credential_id
        key_of[credential_id] = key_hash
        removed.discard(credential_id)
    counts.replaced_keys = len(removed)
    return counts


def _select_in(
    connection: sqlite3.Connection, column: str, selected: str, values: list
) -> list[tuple]:
    """Return the ``selected`` columns of the identities whose ``column`` is one of ``values``."""
    found: list[tuple] = []
    for start in range(0, len(values), _QUERY_CHUNK):
        chunk = values[start : start + _QUERY_CHUNK]
        placeholders = ",".join("?" * len(chunk))
        found.extend(
            connection.execute(
                f"SELECT {selected} FROM identities WHERE {column} IN ({placeholders})",
                chunk,
            )
        )
    return found


def key_holders(
    connection: sqlite3.Connection, key_hashes: list[bytes]
) -> dict[str, tuple[int, bytes]]:
    """Return the cached credentials whose key is one of ``key_hashes``: id to (version, key)."""
    rows = _select_in(connection, "key_hash", "credential_id, version, key_hash", key_hashes)
    return {credential: (version, key_hash) for credential, version, key_hash in rows}


def cached_credentials(connection: sqlite3.Connection, credential_ids: list[str]) -> set[str]:
    """Return the credential ids of ``credential_ids`` that are in the cache."""
    rows = _select_in(connection, "credential_id", "credential_id", credential_ids)
    return {row[0] for row in rows}


def remove_credentials(connection: sqlite3.Connection, credential_ids: list[str]) -> int:
    """Delete credentials by id inside the caller's transaction; return how many existed."""
    before = connection.total_changes
    connection.executemany(
        "DELETE FROM identities WHERE credential_id = ?", [(c,) for c in credential_ids]
    )
    return connection.total_changes - before


@dataclass
class LineError:
    line: int
    reason: str


@dataclass
class ImportSummary:
    inserted: int = 0
    updated: int = 0
    rejected: int = 0
    replaced_keys: int = 0
    duplicates: int = 0
    """Records that repeat the credentialId of an earlier line. The last line is imported."""
    first_duplicate_line: int | None = None
    errors: list[LineError] = field(default_factory=list)
    seconds: float = 0.0


def import_file(
    connection: sqlite3.Connection,
    hasher: KeyHasher,
    path: Path,
    file_format: str | None = None,
    progress: bool = False,
) -> ImportSummary:
    """Upsert every valid record of a file, collecting line errors and carrying on.

    Each batch commits on its own, so a long import never holds the write lock for long.
    Raises ImportFileError, before any batch commits, when the file cannot be opened, is
    not UTF-8 text, or starts with a header that cannot be used.
    """
    summary = ImportSummary()
    started = time.monotonic()
    kind = detect_format(path, file_format)
    handle = open_records(path)

    # A large page cache keeps the random inserts into the key-hash index in memory; the
    # default 2 MiB cache made a 1,000,000-record import disk-bound.
    connection.execute(f"PRAGMA cache_size = {-IMPORT_CACHE_KIB}")
    connection.execute(f"PRAGMA wal_autocheckpoint = {IMPORT_CHECKPOINT_PAGES}")
    with handle:
        lines = start_reading(handle, kind, path)
        size = path.stat().st_size
        bar = _progress_bar(size, progress)
        try:
            records = iter_csv(lines) if kind == "csv" else iter_jsonl(lines)
            batch: list[dict] = []
            batch_lines: list[int] = []
            # Every row of the import gets this updated_at, which count_upsert relies on.
            now = time.time()
            last_position = 0
            for number, item in records:
                if isinstance(item, RecordInvalid):
                    summary.rejected += 1
                    summary.errors.append(LineError(number, str(item)))
                    continue
                batch.append(identity_row(item, hasher, now))
                batch_lines.append(number)
                if len(batch) >= BATCH_SIZE:
                    _commit(connection, batch, batch_lines, summary)
                    batch, batch_lines = [], []
                    if bar is not None:
                        position = handle.tell()
                        bar.update(position - last_position)
                        last_position = position
            _commit(connection, batch, batch_lines, summary)
            if bar is not None:
                bar.update(size - last_position)
        finally:
            if bar is not None:
                bar.close()
    summary.seconds = time.monotonic() - started
    if summary.duplicates:
        # The credential ids stay out of the log, as keys do: the line number finds them.
        log.warning(
            "import.duplicate_credentials",
            path=str(path),
            duplicates=summary.duplicates,
            first_line=summary.first_duplicate_line,
            detail="these records repeat the credentialId of an earlier line of the file,"
            " and the last line of each credential was imported",
        )
    return summary


def check_records_file(path: Path, file_format: str | None = None) -> None:
    """Run the checks that stop an import of ``path`` before it reads any record.

    Raises ImportFileError as import_file would: a file that cannot be opened, the wrong
    kind of file, a JSON array, or a CSV header that cannot be used. The command calls it
    before it opens the database, so a wrong file creates no database. Errors of single
    lines are left to the import.
    """
    kind = detect_format(path, file_format)
    with open_records(path) as handle:
        lines = start_reading(handle, kind, path)
        records = iter_csv(lines) if kind == "csv" else iter_jsonl(lines)
        next(records, None)


def _commit(
    connection: sqlite3.Connection, batch: list[dict], lines: list[int], summary: ImportSummary
) -> None:
    """Upsert a batch of rows, read from ``lines`` of the file, and add its counts."""
    if not batch:
        return
    # The write lock of the cache file alone: BEGIN IMMEDIATE would also lock the database,
    # where the running daemon commits its decisions. The no-op UPDATE takes the lock before
    # the batch reads, so no other write can make the batch's snapshot stale.
    connection.execute("BEGIN")
    try:
        connection.execute("UPDATE identities SET version = version WHERE 0")
        counts = count_upsert(connection, batch)
        upsert_rows(connection, batch)
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    summary.inserted += counts.inserted
    summary.updated += counts.updated
    summary.replaced_keys += counts.replaced_keys
    if counts.repeated and summary.first_duplicate_line is None:
        summary.first_duplicate_line = min(lines[index] for index in counts.repeated)
    summary.duplicates += len(counts.repeated)


def _progress_bar(total: int, enabled: bool):  # type: ignore[no-untyped-def]
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="import", leave=False)
