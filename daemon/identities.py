"""Identity records: their schema, parsing from JSON Lines and CSV, and bulk upserts."""

from __future__ import annotations

import codecs
import csv
import functools
import re
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Annotated, Literal, get_args

import msgspec

from daemon.cachefile import IDENTITY_COLUMNS
from daemon.normalize import normalize_key
from daemon.schema import Channel, IdentityType, Location
from daemon.store import KeyHasher

Status = Literal["ACTIVE", "SUSPENDED", "REVOKED"]
NonEmpty255 = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
LIST_FIELDS = ("stores", "channels", "locations")
_NOT_UTF8 = re.compile("[\udc80-\udcff]")
# Rows per import transaction: large enough that commits and WAL checkpoints do not
# dominate, small enough to hold the write lock for well under a second.
BATCH_SIZE = 20000
IMPORT_CACHE_KIB = 256 * 1024
# Checkpoint the WAL every 64 MiB of 4 KiB pages instead of every 4 MiB, so an import
# pays for fewer checkpoints and their fsyncs.
IMPORT_CHECKPOINT_PAGES = 16384


class IdentityRecord(msgspec.Struct, kw_only=True):
    """One credential as HQ sends it and `import` reads it (camelCase, like Amazon's API)."""

    credentialId: NonEmpty255
    key: Annotated[str, msgspec.Meta(min_length=1, max_length=1000)]
    id: NonEmpty255
    type: IdentityType
    status: Status
    stores: Annotated[list[NonEmpty255], msgspec.Meta(min_length=1)]
    validFrom: Annotated[datetime, msgspec.Meta(tz=True)] | None = None
    validUntil: Annotated[datetime, msgspec.Meta(tz=True)] | None = None
    channels: list[Channel] | None = None
    locations: list[Location] | None = None
    # SQLite stores integers as signed 64-bit values.
    version: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] = 0

    def __post_init__(self) -> None:
        if self.validFrom and self.validUntil and self.validFrom > self.validUntil:
            raise ValueError("validFrom is later than validUntil")
        # SQLite's JSON functions, which write the rows, end a string at U+0000: the id would
        # be stored cut short, and two credentials could become one.
        for name, value in (("credentialId", self.credentialId), ("id", self.id)):
            if "\x00" in value:
                raise ValueError(f"{name} contains the character U+0000, which ids must not")
        if any("\x00" in store for store in self.stores):
            raise ValueError("stores contains the character U+0000, which store ids must not")


EMPTY_KEY_REASON = "key is empty after stripping whitespace and control characters"
# The values each enum field of a record accepts, named in its validation message.
_ENUM_VALUES: dict[str, tuple[str, ...]] = {
    "type": get_args(IdentityType),
    "status": get_args(Status),
    "channels": get_args(Channel),
    "locations": get_args(Location),
}


# A rejected enum value that an error message shows, once leading and trailing whitespace is
# stripped: one or more words of letters, as a misspelt status or a type from another system
# is. A value with digits, other characters or more than 20 characters could be a key in the
# wrong field (a CSV column mix-up), so the message leaves it out.
# NOTE: a key of at most 20 letters, without digits, in an enum field is shown.
_SHOWN_ENUM_VALUE = re.compile(r"[A-Za-z]+(?:[ _-][A-Za-z]+)*")
_SHOWN_ENUM_VALUE_MAX_CHARS = 20
# msgspec quotes the value as Python's repr does: in double quotes when it contains a single one.
_ENUM_ERROR = re.compile(r"Invalid enum value (?:'.*'|\".*\") at field (\w+)(?:\[(\d+)\])?", re.S)


class RecordInvalid(ValueError):
    """A record that cannot be imported; the message never contains the key."""


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


def record_from_builtins(data: object) -> IdentityRecord:
    """Validate a decoded record, raising RecordInvalid with the field at fault."""
    return keyed_record_from_builtins(data)[0]


def keyed_record_from_builtins(data: object) -> tuple[IdentityRecord, str]:
    """Validate a decoded record; return it with its key as ``normalize_key`` makes it."""
    if not isinstance(data, dict):
        raise RecordInvalid("the line is not a JSON object")
    try:
        # Strict conversion takes half the time of lax. It accepts every record whose values
        # already have their JSON types, and lax conversion also parses numbers in strings.
        record = msgspec.convert(data, IdentityRecord)
    except msgspec.ValidationError:
        record = None
    try:
        if record is None:
            record = msgspec.convert(data, IdentityRecord, strict=False)
    except msgspec.ValidationError as exc:
        message = str(exc).replace(" - at `$.", " at field ").replace("`$`", "").replace("`", "")
        enum_error = _ENUM_ERROR.fullmatch(message)
        if enum_error is not None:
            message = _describe_enum_error(data, enum_error.group(1), enum_error.group(2))
        elif message.startswith("Invalid enum value"):
            # A form this code does not parse may quote the value anywhere: keep none of it.
            message = "Invalid enum value"
        raise RecordInvalid(message) from None
    key = normalize_key(record.key, record.channels)
    if not key:
        raise RecordInvalid(EMPTY_KEY_REASON)
    return record, key


def _describe_enum_error(data: dict, field: str, index: str | None) -> str:
    """Describe an invalid enum value with the values its field accepts.

    msgspec quotes the value, which may be a misplaced key, so the message is rebuilt from
    the record. It shows the value only when the value, without leading and trailing
    whitespace, matches ``_SHOWN_ENUM_VALUE``.
    """
    value = data.get(field)
    if index is not None:
        value = value[int(index)] if isinstance(value, list) else None
    place = field if index is None else f"{field}[{index}]"
    allowed = _ENUM_VALUES.get(field, ())
    use_one_of = f"; use one of {', '.join(allowed)}" if allowed else ""

    stripped = value.strip() if isinstance(value, str) else None
    if value == "":
        return f"Invalid enum value at field {place}, which is empty{use_one_of}"
    if stripped == "":
        return f"Invalid enum value at field {place}, which contains only whitespace{use_one_of}"
    value_shown = (
        stripped is not None
        and len(stripped) <= _SHOWN_ENUM_VALUE_MAX_CHARS
        and _SHOWN_ENUM_VALUE.fullmatch(stripped) is not None
    )
    if not value_shown:
        return (
            f"Invalid enum value at field {place}{use_one_of} (the value is not shown,"
            " because it could be a key in the wrong field)"
        )
    # repr makes visible the whitespace that a CSV cell or a padded export leaves around it.
    if stripped != value and stripped in allowed:
        return (
            f"Invalid enum value {value!r} at field {place}; remove the whitespace around"
            f" {stripped}"
        )
    return f"Invalid enum value {value!r} at field {place}{use_one_of}"


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
    replaced_keys: int = 0
    """Other credentials removed because a record took over their key."""


# SQLite 3.40 binds at most 32,766 parameters per statement.
_QUERY_CHUNK = 10000


def count_upsert(connection: sqlite3.Connection, rows: list[dict]) -> UpsertCounts:
    """Count what ``upsert_rows(connection, rows)`` will insert, update and take over.

    Call it before the upsert, in the same transaction. It reads only the rows whose
    credential id or key hash the batch contains, and replays the batch in memory. A
    credential counts as replaced when a record takes its key and no later record of the
    batch brings it back. So the table afterwards has as many rows as before, plus
    ``inserted``, minus ``replaced_keys``.
    """
    counts = UpsertCounts()
    credential_ids = list(dict.fromkeys(row["credential_id"] for row in rows))
    key_hashes = list(dict.fromkeys(row["key_hash"] for row in rows))
    # Credential id to key hash, and key hash to credential id, as stored now.
    key_of = dict(
        _select_in(connection, "credential_id", "credential_id, key_hash", credential_ids)
    )
    holder_of = dict(_select_in(connection, "key_hash", "key_hash, credential_id", key_hashes))
    counts.updated = len(key_of)
    counts.inserted = len(credential_ids) - len(key_of)

    removed: set[str] = set()
    for row in rows:
        credential_id, key_hash = row["credential_id"], row["key_hash"]
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
    errors: list[LineError] = field(default_factory=list)
    seconds: float = 0.0


def detect_format(path: Path, explicit: str | None) -> Literal["jsonl", "csv"]:
    if explicit in ("jsonl", "csv"):
        return explicit  # type: ignore[return-value]
    if path.suffix.lower() == ".csv":
        return "csv"
    return "jsonl"


def iter_jsonl(handle: IO[bytes]) -> Iterator[tuple[int, IdentityRecord | RecordInvalid]]:
    """Yield (line number, record or error) for each non-blank line."""
    decoder = msgspec.json.Decoder()
    for number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        try:
            data = decoder.decode(line)
        except msgspec.DecodeError as exc:
            yield number, RecordInvalid(f"invalid JSON: {exc}")
            continue
        try:
            yield number, record_from_builtins(data)
        except RecordInvalid as exc:
            yield number, exc


class _CsvLines:
    """The lines of a CSV file as ``csv.reader`` reads them, numbered from 1.

    ``csv.reader`` requests another line within one row only while a quoted cell is open at
    the end of a line. So the lines fetched since ``start_row`` are the current row's lines,
    and a request for more lines at the end of the file means a quote is never closed.
    """

    def __init__(self, handle: IO[bytes]) -> None:
        self._handle = handle
        self._number = 0
        self._pending: list[tuple[int, str]] = []
        """Lines to read again, last line first."""
        self.row: list[tuple[int, str]] = []
        """(line number, text) of each line of the current row."""
        self.quote_open_at_end = False

    def start_row(self) -> None:
        self.row = []
        self.quote_open_at_end = False

    def read_again(self, lines: list[tuple[int, str]]) -> None:
        """Return lines to the front of the input, in order."""
        self._pending.extend(reversed(lines))

    def __iter__(self) -> _CsvLines:
        return self

    def __next__(self) -> str:
        if self._pending:
            line = self._pending.pop()
        else:
            raw = self._handle.readline()
            if not raw:
                self.quote_open_at_end = bool(self.row)
                raise StopIteration
            self._number += 1
            # Decode line by line, so that a line that is not UTF-8 is rejected alone. The
            # surrogateescape handler keeps its bad bytes as lone surrogates for _NOT_UTF8.
            line = (self._number, raw.decode("utf-8", "surrogateescape"))
        self.row.append(line)
        return line[1]


_QUOTE_FIX = "close the quote, or write a quote inside a cell as two quotes"


def iter_csv(handle: IO[bytes]) -> Iterator[tuple[int, IdentityRecord | RecordInvalid]]:
    """Yield (line number, record or error) for each CSV row after the header.

    List columns (stores, channels, locations) separate items with ';'. Empty cells count
    as absent. A row is numbered by its first line. A row that spans several lines is
    rejected, because a quote that is not closed makes one, and its cells can still pass as
    a record whose key holds the following lines. Its lines after the first are then read
    again as rows of their own, so such a quote costs one record, not the records after it.
    """
    lines = _CsvLines(handle)
    reader = csv.reader(lines)
    header: list[str] | None = None
    while True:
        lines.start_row()
        try:
            row = next(reader)
            problem = None
        except StopIteration:
            return
        except csv.Error as exc:
            # The reader drops the rest of the line it failed on, and its next row starts
            # at the following line.
            row, problem = [], f"invalid CSV: {exc}"
        first, last = lines.row[0][0], lines.row[-1][0]
        if lines.quote_open_at_end:
            problem = f"invalid CSV: a quote opened in this record is never closed: {_QUOTE_FIX}"
        elif last > first:
            spans = (
                f"a quoted cell in this record runs on to line {last}, and line breaks inside"
                f" a cell are not accepted: {_QUOTE_FIX}"
            )
            problem = f"{problem}; {spans}" if problem else f"invalid CSV: {spans}"
        if last > first:
            lines.read_again(lines.row[1:])

        if header is None:
            if problem is not None:
                yield first, RecordInvalid(f"header: {problem}")
                return
            header = row
        elif problem is not None:
            yield first, RecordInvalid(problem)
        elif row:
            yield first, _record_from_row(header, row)


def _record_from_row(header: list[str], row: list[str]) -> IdentityRecord | RecordInvalid:
    """Validate one CSV row against the header's column names."""
    if len(row) > len(header):
        return RecordInvalid("the row has more cells than the header")
    data: dict[str, object] = {}
    for name, cell in zip(header, row, strict=False):
        if cell == "":
            continue
        if _NOT_UTF8.search(cell) or _NOT_UTF8.search(name):
            return RecordInvalid("the line is not valid UTF-8")
        if name in LIST_FIELDS:
            data[name] = [item.strip() for item in cell.split(";") if item.strip()]
        else:
            data[name] = cell
    try:
        return record_from_builtins(data)
    except RecordInvalid as exc:
        return exc


def import_file(
    connection: sqlite3.Connection,
    hasher: KeyHasher,
    path: Path,
    file_format: str | None = None,
    progress: bool = False,
) -> ImportSummary:
    """Upsert every valid record of a file, collecting line errors and carrying on.

    Each batch commits on its own, so a long import never holds the write lock for long.
    """
    summary = ImportSummary()
    started = time.monotonic()
    kind = detect_format(path, file_format)
    size = path.stat().st_size
    bar = _progress_bar(size, progress)

    # A large page cache keeps the random inserts into the key-hash index in memory; the
    # default 2 MiB cache made a 1,000,000-record import disk-bound.
    connection.execute(f"PRAGMA cache_size = {-IMPORT_CACHE_KIB}")
    connection.execute(f"PRAGMA wal_autocheckpoint = {IMPORT_CHECKPOINT_PAGES}")
    with path.open("rb") as handle:
        # Excel's "CSV UTF-8" and some editors start the file with a UTF-8 byte order mark,
        # which would otherwise become part of the first column name or JSON line.
        if handle.read(len(codecs.BOM_UTF8)) != codecs.BOM_UTF8:
            handle.seek(0)
        records = iter_csv(handle) if kind == "csv" else iter_jsonl(handle)
        batch: list[dict] = []
        now = time.time()
        last_position = 0
        for number, item in records:
            if isinstance(item, RecordInvalid):
                summary.rejected += 1
                summary.errors.append(LineError(number, str(item)))
                continue
            batch.append(identity_row(item, hasher, now))
            if len(batch) >= BATCH_SIZE:
                _commit(connection, batch, summary)
                batch = []
                if bar is not None:
                    position = handle.tell()
                    bar.update(position - last_position)
                    last_position = position
        _commit(connection, batch, summary)
    if bar is not None:
        bar.update(size - last_position)
        bar.close()
    summary.seconds = time.monotonic() - started
    return summary


def _commit(connection: sqlite3.Connection, batch: list[dict], summary: ImportSummary) -> None:
    if not batch:
        return
    connection.execute("BEGIN IMMEDIATE")
    try:
        counts = count_upsert(connection, batch)
        upsert_rows(connection, batch)
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    summary.inserted += counts.inserted
    summary.updated += counts.updated
    summary.replaced_keys += counts.replaced_keys


def _progress_bar(total: int, enabled: bool):  # type: ignore[no-untyped-def]
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="import", leave=False)
