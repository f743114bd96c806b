"""Identity records: their schema, parsing from JSON Lines and CSV, and bulk upserts."""

from __future__ import annotations

import csv
import re
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Annotated, Literal

import msgspec

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
    version: Annotated[int, msgspec.Meta(ge=0)] = 0

    def __post_init__(self) -> None:
        if self.validFrom and self.validUntil and self.validFrom > self.validUntil:
            raise ValueError("validFrom is later than validUntil")


class RecordInvalid(ValueError):
    """A record that cannot be imported; the message never contains the key."""


def record_from_builtins(data: object) -> IdentityRecord:
    """Validate a decoded record, raising RecordInvalid with the field at fault."""
    if not isinstance(data, dict):
        raise RecordInvalid("the line is not a JSON object")
    try:
        record = msgspec.convert(data, IdentityRecord, strict=False)
    except msgspec.ValidationError as exc:
        message = str(exc).replace(" - at `$.", " at field ").replace("`$`", "").replace("`", "")
        # msgspec quotes the offending enum value, which may be a misplaced key.
        message = re.sub(r"Invalid enum value '.*'", "Invalid enum value", message, flags=re.S)
        raise RecordInvalid(message) from None
    if not normalize_key(record.key, record.channels):
        raise RecordInvalid("key is empty after stripping whitespace and control characters")
    return record


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


_ROW_COLUMNS = (
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
_UPSERT_SQL = (
    f"INSERT INTO identities ({', '.join(_ROW_COLUMNS)})"
    f" VALUES ({', '.join('?' * len(_ROW_COLUMNS))})"
    " ON CONFLICT(credential_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _ROW_COLUMNS[1:])
)


def _encode_list(items: list[str] | None) -> str | None:
    return None if items is None else _JSON_ENCODER.encode(items).decode()


_JSON_ENCODER = msgspec.json.Encoder()


@dataclass
class UpsertCounts:
    inserted: int = 0
    updated: int = 0
    replaced_keys: int = 0
    """Other credentials removed because a record took over their key."""


def upsert_rows(connection: sqlite3.Connection, rows: list[dict]) -> UpsertCounts:
    """Insert or update rows by credential id, inside the caller's transaction.

    A key moves with its newest record: another credential holding the same key hash is
    deleted first, because one scanned key must resolve to one identity.
    """
    counts = UpsertCounts()
    if not rows:
        return counts
    # Within one batch the last record of a credential wins, as it would line by line.
    by_credential = {row["credential_id"]: row for row in rows}
    unique_rows = list(by_credential.values())
    ids = list(by_credential)
    placeholders = ",".join("?" * len(ids))
    existing = {
        row[0]
        for row in connection.execute(
            f"SELECT credential_id FROM identities WHERE credential_id IN ({placeholders})", ids
        )
    }
    counts.updated = len(existing)
    counts.inserted = len(ids) - len(existing)

    before = connection.total_changes
    connection.executemany(
        "DELETE FROM identities WHERE key_hash = ? AND credential_id != ?",
        [(row["key_hash"], row["credential_id"]) for row in unique_rows],
    )
    counts.replaced_keys = connection.total_changes - before

    # A plain executemany upsert: sqlite-utils' upsert_all rebuilds each statement in Python
    # and took most of the import time for 1,000,000 records.
    connection.executemany(
        _UPSERT_SQL, [tuple(row[c] for c in _ROW_COLUMNS) for row in unique_rows]
    )
    return counts


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


def iter_csv(handle: IO[bytes]) -> Iterator[tuple[int, IdentityRecord | RecordInvalid]]:
    """Yield (line number, record or error) for each CSV row after the header.

    List columns (stores, channels, locations) separate items with ';'. Empty cells count
    as absent.
    """
    # Decode line by line, so one line that is not UTF-8 is rejected alone; surrogateescape
    # keeps the bad bytes visible as lone surrogates for the check below.
    lines = (line.decode("utf-8", "surrogateescape") for line in handle)
    reader = csv.DictReader(lines)
    try:
        for row in reader:
            number = reader.line_num
            data: dict[str, object] = {}
            for name, cell in row.items():
                if name is None:
                    yield number, RecordInvalid("the row has more cells than the header")
                    break
                if cell is None or cell == "":
                    continue
                if _NOT_UTF8.search(cell) or _NOT_UTF8.search(name):
                    yield number, RecordInvalid("the line is not valid UTF-8")
                    break
                if name in LIST_FIELDS:
                    data[name] = [item.strip() for item in cell.split(";") if item.strip()]
                else:
                    data[name] = cell
            else:
                try:
                    yield number, record_from_builtins(data)
                except RecordInvalid as exc:
                    yield number, exc
    except csv.Error as exc:
        yield reader.line_num, RecordInvalid(f"invalid CSV: {exc}")


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
        counts = upsert_rows(connection, batch)
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
