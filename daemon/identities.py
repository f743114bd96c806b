"""Identity records: their schema, parsing from JSON Lines and CSV, and bulk upserts."""

from __future__ import annotations

import codecs
import collections
import csv
import functools
import re
import shlex
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Annotated, Literal, get_args

import msgspec
import structlog

from daemon.cachefile import IDENTITY_COLUMNS
from daemon.normalize import normalize_key
from daemon.schema import Channel, IdentityType, Location
from daemon.store import KeyHasher

log = structlog.get_logger(__name__)

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
_DATETIME_EXAMPLE = "2027-01-01T00:00:00Z"
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
        elif message.startswith("Invalid RFC3339 encoded datetime"):
            # A date without a time (2027-01-01), as spreadsheets write dates, ends up here.
            message += f": write a date, a time and a UTC offset, such as {_DATETIME_EXAMPLE}"
        elif message.startswith("Expected datetime with a timezone component"):
            message += f": add a UTC offset, such as {_DATETIME_EXAMPLE} or +01:00 for Z"
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


class ImportFileError(ValueError):
    """A records file of which nothing can be imported: the wrong kind of file, or its header.

    The message names the problem and the fix, but not the file, which the caller names (a
    command the fix suggests may name it). It shows no cell values: of the header, only
    names that match a field name but for case, whitespace, '_' or '-'.
    """

    def __init__(self, problem: str, line: int | None = None) -> None:
        super().__init__(problem)
        self.line = line
        """The line at fault, or None when the problem is the whole file."""


# Bytes read from the start of a file to recognise its kind and its line ends.
_HEAD_BYTES = 65536
_SAVE_AS_UTF8 = 'save it as UTF-8 text, in Excel as "CSV UTF-8"'
# Magic bytes of the files an export is mistaken for, and the problem each one is.
_WRONG_FILE_KINDS: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "the file is gzip-compressed: decompress it (gunzip) and import the result"),
    (b"\xfd7zXZ\x00", "the file is xz-compressed: decompress it (unxz) and import the result"),
    (
        b"\x28\xb5\x2f\xfd",
        "the file is zstd-compressed: decompress it (unzstd) and import the result",
    ),
    (
        b"PK\x03\x04",
        "the file is a ZIP archive, as an Excel workbook (.xlsx) is: extract the records file"
        f" from it, or {_SAVE_AS_UTF8}",
    ),
    (
        codecs.BOM_UTF16_LE,
        "the file is UTF-16 text (it starts with the byte order mark FF FE), as Excel's"
        f' "Unicode Text" writes it: {_SAVE_AS_UTF8}',
    ),
    (
        codecs.BOM_UTF16_BE,
        f"the file is UTF-16 text (it starts with the byte order mark FE FF): {_SAVE_AS_UTF8}",
    ),
)


def _check_file_kind(head: bytes) -> None:
    """Raise ImportFileError when the first bytes of a file show it is not UTF-8 text."""
    for magic, problem in _WRONG_FILE_KINDS:
        if head.startswith(magic):
            raise ImportFileError(problem)


def _check_not_json_array(text: bytes, cr_line_ends: bool, path: Path) -> None:
    """Raise ImportFileError when a JSON Lines file starts with '[', as one JSON array does.

    Read line by line, such a file gets an error on every line and no hint at the cause.
    ``text`` is the start of the file after any byte order mark. A file whose first
    ``_HEAD_BYTES`` bytes are all whitespace is not checked.
    """
    body = text.lstrip()
    if not body.startswith(b"["):
        return
    blank = text[: len(text) - len(body)]
    line = blank.count(b"\r" if cr_line_ends else b"\n") + 1
    # jq must not write to the file it reads, which the shell empties first.
    if path.suffix.lower() == ".jsonl":
        converted = path.with_name(f"{path.stem}-lines.jsonl")
    else:
        converted = path.with_suffix(".jsonl")
    raise ImportFileError(
        "the file is one JSON array, not JSON Lines: write one JSON object per line, for"
        f" example with jq -c '.[]' {shlex.quote(str(path))} > {shlex.quote(str(converted))}",
        line,
    )


def _ends_lines_with_cr(head: bytes) -> bool:
    """Tell whether lines end with CR alone, as classic Mac OS and Excel's "CSV (Macintosh)" do.

    JSON strings cannot contain a raw CR and CSV cells cannot contain a line break, so a CR
    without any LF in the first ``_HEAD_BYTES`` bytes is a line end.
    """
    return b"\r" in head and b"\n" not in head


class _CrLineReader:
    """A binary file read line by line, where lines end with CR alone."""

    def __init__(self, handle: IO[bytes]) -> None:
        self._handle = handle
        self._lines: collections.deque[bytes] = collections.deque()
        self._rest = b""
        """The start of a line whose CR has not been read yet."""

    def readline(self) -> bytes:
        while not self._lines:
            chunk = self._handle.read(_HEAD_BYTES)
            if not chunk:
                line, self._rest = self._rest, b""
                return line
            parts = (self._rest + chunk).split(b"\r")
            self._rest = parts.pop()
            self._lines.extend(part + b"\r" for part in parts)
        return self._lines.popleft()

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.readline, b"")


# The names of the record fields, which are the CSV column names, and the required ones.
_FIELD_NAMES: tuple[str, ...] = IdentityRecord.__struct_fields__
_REQUIRED_FIELDS = tuple(f.name for f in msgspec.structs.fields(IdentityRecord) if f.required)
# Characters that a misspelt column name adds to a field name, besides other case: whitespace,
# '_', '-' and a byte order mark.
_NAME_NOISE = re.compile(r"[\s_\-\ufeff]")


def _name_form(name: str) -> str:
    return _NAME_NOISE.sub("", name).casefold()


_FIELD_OF_FORM = {_name_form(name): name for name in _FIELD_NAMES}


def _count_field_names(line: str, separator: str) -> int:
    """Count the cells of a line, split at ``separator``, that name a record field."""
    forms = (_name_form(cell.strip('"')) for cell in line.split(separator))
    return sum(form in _FIELD_OF_FORM for form in forms)


def _looks_like_csv_header(line: bytes) -> bool:
    """Tell whether a line names at least two record fields, separated as CSV cells."""
    text = line.decode("utf-8", "replace")
    return any(_count_field_names(text, separator) >= 2 for separator in (",", ";", "\t"))


def detect_format(path: Path, explicit: str | None) -> Literal["jsonl", "csv"]:
    """Return the explicit format, else CSV for a name ending in .csv and JSON Lines otherwise."""
    if explicit in ("jsonl", "csv"):
        return explicit  # type: ignore[return-value]
    if path.suffix.lower() == ".csv":
        return "csv"
    return "jsonl"


def iter_jsonl(
    handle: IO[bytes] | _CrLineReader,
) -> Iterator[tuple[int, IdentityRecord | RecordInvalid]]:
    """Yield (line number, record or error) for each non-blank line.

    Raises ImportFileError when the first non-blank line is a CSV header, so that a CSV
    file with another extension gets one message instead of an error on every line.
    """
    decoder = msgspec.json.Decoder()
    first = True
    for number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        try:
            data = decoder.decode(line)
        except msgspec.DecodeError as exc:
            if first and _looks_like_csv_header(line):
                raise ImportFileError(
                    "this line is a CSV header, not a JSON record: import the file with"
                    " --format csv (by default only a name ending in .csv is read as CSV)",
                    number,
                ) from None
            first = False
            yield number, RecordInvalid(f"invalid JSON: {exc}")
            continue
        first = False
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

    def __init__(self, handle: IO[bytes] | _CrLineReader) -> None:
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


def iter_csv(
    handle: IO[bytes] | _CrLineReader,
) -> Iterator[tuple[int, IdentityRecord | RecordInvalid]]:
    """Yield (line number, record or error) for each CSV row after the header.

    List columns (stores, channels, locations) separate items with ';'. Empty cells count
    as absent. A row whose cells are all empty or whitespace, as Excel writes a formatted
    but empty row (``,,,,,,``), is skipped as a blank line is. A row is numbered by its
    first line. A row that spans several lines is rejected, because a quote that is not
    closed makes one, and its cells can still pass as a record whose key holds the following
    lines. Its lines after the first are then read again as rows of their own, so such a
    quote costs one record, not the records after it.

    The header is the first line that is neither blank nor such an empty row. Raises
    ImportFileError, before any row is read, when the header cannot be read or
    ``_check_header`` rejects it.
    """
    lines = _CsvLines(handle)
    reader = csv.reader(lines)
    header: list[str] | None = None
    while True:
        lines.start_row()
        error: csv.Error | None = None
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            # The reader drops the rest of the line it failed on, and its next row starts
            # at the following line.
            row, error = [], exc
        first, last = lines.row[0][0], lines.row[-1][0]
        problem = None
        if error is not None:
            # A cell that ran on over several lines is an open quote, which the text added
            # below names, so the advice on long cells is given for one-line rows only.
            detail = str(error) if last > first else _describe_csv_error(error)
            problem = f"invalid CSV: {detail}"
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
                problem = problem.removeprefix("invalid CSV: ")
                raise ImportFileError(f"invalid CSV header: {problem}", first)
            if _is_blank_row(row):
                continue
            _check_header(row, first)
            header = row
        elif problem is not None:
            yield first, RecordInvalid(problem)
        elif not _is_blank_row(row):
            yield first, _record_from_row(header, row)


def _is_blank_row(row: list[str]) -> bool:
    return all(not cell.strip() for cell in row)


_CELL_TOO_LONG = re.compile(r"field larger than field limit \((\d+)\)")


def _describe_csv_error(error: csv.Error) -> str:
    """Return the csv module's message, with the fix when a cell is over its size limit."""
    message = str(error)
    too_long = _CELL_TOO_LONG.fullmatch(message)
    if too_long is None:
        return message
    # csv.field_size_limit() counts characters, and the daemon keeps Python's default.
    return (
        f"{message}, so a cell has more than {int(too_long.group(1)):,} characters, the maximum"
        " that Python's csv module reads: shorten the cell, or leave its column out of the"
        " export"
    )


def _check_header(header: list[str], line: int) -> None:
    """Raise ImportFileError naming every problem of a CSV header at once.

    Columns of other names are ignored, as the extra columns of an export are. A name that
    differs from a field name only in case, whitespace, '_' or '-' is an error, even for an
    optional field. Ignoring it would drop that field from every record, so a misspelt
    validUntil column would make every credential never expire.
    """
    if any(_NOT_UTF8.search(name) for name in header):
        raise ImportFileError(f"the header is not valid UTF-8: {_SAVE_AS_UTF8}", line)
    if header[0].lstrip().startswith("{"):
        raise ImportFileError(
            "this line is a JSON object, not a CSV header: import the file with --format"
            " jsonl (by default a name ending in .csv is read as CSV)",
            line,
        )
    if len(header) == 1:
        for separator, separator_name in ((";", "semicolons"), ("\t", "tabs")):
            if _count_field_names(header[0], separator) >= 2:
                raise ImportFileError(
                    f"the header separates its column names with {separator_name}, but import"
                    " reads comma-separated values: export the file with commas, in Excel as"
                    ' "CSV UTF-8 (Comma delimited)"',
                    line,
                )

    columns: dict[str, list[int]] = {}
    for number, name in enumerate(header, start=1):
        columns.setdefault(name, []).append(number)
    present = [name for name in _FIELD_NAMES if name in columns]
    missing = [name for name in _REQUIRED_FIELDS if name not in columns]
    # (column number, name in the file, field it stands for) of each misspelt field name
    misspelt = [
        (number, name, _FIELD_OF_FORM[_name_form(name)])
        for number, name in enumerate(header, start=1)
        if name not in _FIELD_NAMES and _name_form(name) in _FIELD_OF_FORM
    ]
    if not present and not misspelt:
        # A file without a header, or another export: its cells could be keys, so none is shown.
        raise ImportFileError(
            "this line names none of the record fields, but it must be the header: start the"
            f" file with a line of column names, such as {','.join(_REQUIRED_FIELDS)}",
            line,
        )

    problems = []
    for name in present:
        if len(columns[name]) > 1:
            numbers = _join_words([str(number) for number in columns[name]])
            problems.append(
                f"The column {name} appears {len(columns[name])} times (columns {numbers}),"
                " so it is unclear which cell holds the value: keep one of them"
            )
    if missing:
        names = _join_words(missing)
        verb = "is" if len(missing) == 1 else "are"
        plural = "" if len(missing) == 1 else "s"
        problems.append(f"The required column{plural} {names} {verb} missing")
    renames = [
        f"column {number} {name!r} to {field_name}"
        for number, name, field_name in misspelt
        if field_name not in columns
    ]
    if renames:
        problems.append(
            f"Rename {_join_words(renames)}, because column names are case-sensitive and"
            " contain no spaces, '_' or '-'"
        )
    for number, name, field_name in misspelt:
        if field_name in columns:
            problems.append(
                f"Remove column {number} {name!r}, because column {columns[field_name][0]}"
                f" is {field_name} already"
            )
    if problems:
        raise ImportFileError("invalid CSV header. " + ". ".join(problems), line)


def _join_words(words: list[str]) -> str:
    """Join words as English lists them: "a", "a and b", "a, b and c"."""
    if len(words) < 2:
        return "".join(words)
    return f"{', '.join(words[:-1])} and {words[-1]}"


def _record_from_row(header: list[str], row: list[str]) -> IdentityRecord | RecordInvalid:
    """Validate one CSV row against the header's column names."""
    if len(row) > len(header):
        return RecordInvalid("the row has more cells than the header")
    data: dict[str, object] = {}
    for name, cell in zip(header, row, strict=False):
        if cell == "":
            continue
        if _NOT_UTF8.search(cell):
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
    Raises ImportFileError, before any batch commits, when the file cannot be opened, is
    not UTF-8 text, or starts with a header that cannot be used.
    """
    summary = ImportSummary()
    started = time.monotonic()
    kind = detect_format(path, file_format)
    handle = _open_records(path)

    # A large page cache keeps the random inserts into the key-hash index in memory; the
    # default 2 MiB cache made a 1,000,000-record import disk-bound.
    connection.execute(f"PRAGMA cache_size = {-IMPORT_CACHE_KIB}")
    connection.execute(f"PRAGMA wal_autocheckpoint = {IMPORT_CHECKPOINT_PAGES}")
    with handle:
        lines = _start_reading(handle, kind, path)
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
    with _open_records(path) as handle:
        lines = _start_reading(handle, kind, path)
        records = iter_csv(lines) if kind == "csv" else iter_jsonl(lines)
        next(records, None)


def _open_records(path: Path) -> IO[bytes]:
    try:
        return path.open("rb")
    except OSError as exc:
        raise ImportFileError(f"the file cannot be opened: {exc.strerror}") from None


def _start_reading(handle: IO[bytes], kind: str, path: Path) -> IO[bytes] | _CrLineReader:
    """Check the start of a records file and return its lines, after any byte order mark."""
    head = handle.read(_HEAD_BYTES)
    _check_file_kind(head)
    # Excel's "CSV UTF-8" and some editors start the file with a UTF-8 byte order mark,
    # which would otherwise become part of the first column name or JSON line.
    start = len(codecs.BOM_UTF8) if head.startswith(codecs.BOM_UTF8) else 0
    cr_line_ends = _ends_lines_with_cr(head)
    if kind == "jsonl":
        _check_not_json_array(head[start:], cr_line_ends, path)
    handle.seek(start)
    return _CrLineReader(handle) if cr_line_ends else handle


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
