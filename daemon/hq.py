"""The daemon's side of the HQ sync: the store adapter, start-up, `sync --now` and status.

The ``sync`` package never imports the daemon. This module gives it a ``StoreAdapter``
built on ``daemon.identities`` and the store's single writer, and hooks online lookups of
cache misses into the resolver.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import errno
import fcntl
import functools
import json
import math
import os
import sqlite3
import ssl
import string
import sys
import time
import unicodedata
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import structlog

from daemon import cachefile
from daemon.cachefile import AttachedCache
from daemon.certs import certificate_validity
from daemon.config import Config, ConfigError, HqConfig
from daemon.identities import (
    cached_credentials,
    credential_id_of,
    identity_row,
    join_batches,
    key_holders,
    loggable_id,
    loggable_reason,
    remove_credentials,
    stage_rows,
    upsert_rows,
    version_of,
)
from daemon.normalize import candidate_keys
from daemon.policy import Reason, decide
from daemon.recordfile import IdentityRecord, RecordInvalid, record_from_builtins
from daemon.resolver import Evaluation, Resolver
from daemon.snapshot_worker import (
    Block,
    PreparedBlock,
    Rejected,
    SnapshotWorker,
    WorkerFailed,
    merge_prepared,
    prepare_block,
    yield_cpu,
)
from daemon.store import (
    CURSOR_CHANGED_META_KEY,
    LAST_PULL_META_KEY,
    LAST_REBUILD_META_KEY,
    NO_ROWS,
    OUTBOX_DROPPED_META_KEY,
    Identity,
    KeyHasher,
    Store,
    StoreError,
    StoreReader,
    connect,
    parse_meta_count,
    parse_meta_time,
)
from sync.client import KeyEncrypted, load_client_certificate
from sync.digest import compute_digest
from sync.errors import HqError, HqResponseInvalid
from sync.service import (
    CLOCK_OFFSET_META_KEY,
    HQ_STATE_META_KEY,
    HQ_STATE_SINCE_META_KEY,
    LAST_RECONCILE_META_KEY,
    SyncService,
)
from sync.settings import OutboxOverflow, SyncSettings
from sync.store import (
    ApplyCounts,
    Change,
    OutboxEvent,
    OutboxStats,
    PreparedRecords,
    RebuildRestart,
)
from sync.upload import LAST_UPLOAD_META_KEY

log = structlog.get_logger(__name__)

T = TypeVar("T")

CURSOR_META_KEY = "cursor"
# meta key: the rebuild that began last, as "<process id>-<random hex>".
REBUILD_OWNER_META_KEY = "rebuild_owner"
# Seconds to wait for the checkpoint thread to leave an old cache file after a switch; it
# moves over at its next round, CHECKPOINT_INTERVAL apart.
CACHE_SWITCH_WAIT_SECONDS = 2.0
# Without a worker process, snapshot records validated and hashed on the event loop before
# it serves other tasks: about 0.6 ms of work on the benchmark machine.
PREPARE_SLICE_RECORDS = 50
# Snapshot records per packed batch (without a worker, rounded up to whole
# PREPARE_SLICE_RECORDS slices). The batches of one block are staged in one transaction.
STAGE_SLICE_RECORDS = 200
# While a rebuild runs, a thread waiting for the GIL gets it after at most 0.5 ms instead
# of Python's default 5 ms. The event loop reads the stream while the builder thread stages
# the previous block. With the default, the writer took up to 5 ms to pick up a queued
# decision while the loop was busy.
REBUILD_SWITCH_INTERVAL = 0.0005
# Seconds between two tries of a daemon that waits for the sync lock.
SYNC_LOCK_POLL_SECONDS = 1.0
# Invalid snapshot records remembered for the digest comparison, at most; past this the
# digests differ and each reconciliation rebuilds, as before the table existed.
MAX_SKIPPED_RECORDS = 100_000


def settings_from_config(config: Config, hq: HqConfig, warn: bool = True) -> SyncSettings:
    """Build the sync settings, reading the bearer token; raise ConfigError when unusable.

    ``warn`` False leaves out the warnings about plain HTTP and a missing token, for a
    second build of the same settings (`serve` checks them before READY and builds them
    again for the sync).
    """
    # parse_config has checked that hq.store_id, when set, is one of [stores] ids.
    store_id = hq.store_id or config.stores.ids[0]
    for name in ("client_cert_file", "client_key_file", "ca_file"):
        path = getattr(hq, name)
        if path and not Path(path).is_file():
            raise ConfigError(f"[hq] {name} {path} not found: fix the path or remove the setting")
    if hq.url.startswith("https://"):
        _check_tls_files(hq)
        if warn and hq.client_cert_file:
            _warn_client_cert_dates(hq.client_cert_file, datetime.now(UTC))
    elif warn:
        _warn_plain_http(hq)
    return SyncSettings(
        url=hq.url,
        store_id=store_id,
        token=read_token(hq.token_file, warn),
        client_cert_file=hq.client_cert_file or None,
        client_key_file=hq.client_key_file or None,
        ca_file=hq.ca_file or None,
        pull_interval=hq.pull_interval,
        pull_batch_size=hq.pull_batch_size,
        snapshot_batch_size=hq.snapshot_batch_size,
        reconcile_interval=hq.reconcile_interval,
        request_timeout=hq.request_timeout,
        lookup_timeout=hq.lookup_timeout,
        upload_interval=hq.upload_interval,
        upload_batch_size=hq.upload_batch_size,
        upload_max_bytes=hq.upload_max_bytes,
        upload_max_delay=hq.upload_max_delay,
        gzip_uploads=hq.gzip_uploads,
        outbox_max_events=hq.outbox_max_events,
        outbox_max_age=hq.outbox_max_age,
        outbox_overflow=hq.outbox_overflow,
        outbox_trim_interval=hq.outbox_trim_interval,
        backoff_initial=hq.backoff_initial,
        backoff_max=hq.backoff_max,
        offline_after=hq.offline_after,
        clock_offset_threshold=hq.clock_offset_threshold,
    )


def _warn_plain_http(hq: HqConfig) -> None:
    """Warn about settings that plain HTTP ignores or exposes; none of them is an error."""
    if hq.token_file:
        log.warning(
            "hq.token_over_plain_http",
            url=hq.url,
            detail="the bearer token travels unencrypted; use an https:// url for HQ",
        )
    ignored = [
        name for name in ("ca_file", "client_cert_file", "client_key_file") if getattr(hq, name)
    ]
    if ignored:
        log.warning(
            "hq.tls_settings_ignored",
            url=hq.url,
            keys=ignored,
            detail="an http:// url uses no TLS, so these keys have no effect",
        )


def _warn_client_cert_dates(cert_file: str, now: datetime) -> None:
    """Warn when the HQ client certificate is outside its validity period at ``now``.

    HQ then rejects every call, but the gates keep working from the cache, so this is a
    warning, and the daemon still starts.
    """
    try:
        validity = certificate_validity(Path(cert_file).read_bytes())
    except OSError:
        return
    if validity is None:
        return
    problem = validity.problem(now)
    if problem is None:
        return
    log.warning(
        f"hq.client_cert_{problem}",
        file=cert_file,
        not_before=validity.not_before.isoformat(),
        not_after=validity.not_after.isoformat(),
        detail="HQ rejects a client certificate outside these dates, so every HQ call fails:"
        " install the certificate HQ issued to replace it, or check the box's clock",
    )


def _check_tls_files(hq: HqConfig) -> None:
    """Load the CA bundle and the client certificate as the HQ client will; raise ConfigError.

    Without this, a certificate that does not match its key or a CA file that is not PEM
    surfaced only when the sync client was built, as a traceback after start-up.
    """
    try:
        context = ssl.create_default_context(cafile=hq.ca_file or None)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"[hq] ca_file {hq.ca_file} could not be loaded ({exc}): it must hold PEM"
            " certificates of the CA that signs HQ's certificate"
        ) from None
    if not hq.client_cert_file:
        return
    key = hq.client_key_file or "(the certificate file)"
    try:
        load_client_certificate(context, hq.client_cert_file, hq.client_key_file or None)
    except KeyEncrypted:
        raise ConfigError(
            f"[hq] client_key_file {key} is encrypted, and the daemon cannot ask for its"
            f" passphrase: store the key without one, readable by the service user only, for"
            f" example with `openssl pkey -in ENCRYPTED-KEY -out PLAIN-KEY`, and set"
            f" client_key_file to the new file"
        ) from None
    except (ssl.SSLError, OSError) as exc:
        if not hq.client_key_file:
            raise ConfigError(
                f"[hq] client_key_file is not set, so the key must be in client_cert_file"
                f" {hq.client_cert_file}, and none loaded from it ({exc}): set client_key_file"
                f" to the file of the certificate's key"
            ) from None
        raise ConfigError(
            f"[hq] client_cert_file {hq.client_cert_file} and client_key_file {key} could not"
            f" be loaded together ({exc}): both must be PEM, and the key must belong to the"
            " certificate"
        ) from None


def read_token(token_file: str, warn: bool = True) -> str | None:
    """Read the HQ bearer token; None when no token file is configured.

    A leading UTF-8 byte order mark and the whitespace around the token are removed. Raises
    ConfigError, naming the file, the problem and the fix, when the file cannot be read or
    does not contain one valid bearer token. The error never quotes the token.
    """
    if not token_file:
        if warn:
            log.warning("hq.no_token", detail="[hq] token_file is not set; HQ calls carry no token")
        return None
    path = Path(token_file)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"[hq] token_file {path} not found: create it with the token HQ issued"
        ) from None
    except PermissionError as exc:
        raise ConfigError(
            f"cannot read [hq] token_file {path}: {exc.strerror}. The service user needs read"
            f" access: give the file owner root, group identity-connector and mode 0640"
            f" (chown root:identity-connector {path} && chmod 0640 {path})"
        ) from None
    except IsADirectoryError:
        raise ConfigError(
            f"[hq] token_file {path} is a directory: set token_file to the file that contains"
            " the token"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read [hq] token_file {path}: {exc.strerror}") from None

    # Windows Notepad can save UTF-8 with a byte order mark. The record import accepts one too.
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        token = data.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"[hq] token_file {path} is not UTF-8 text (byte {exc.start + 1} is not valid"
            f" UTF-8, as in a file saved as UTF-16): save it as UTF-8 or ASCII"
        ) from None
    if not token:
        raise ConfigError(f"[hq] token_file {path} is empty: write the token HQ issued into it")
    problem = _bearer_token_problem(token)
    if problem is not None:
        raise ConfigError(f"[hq] token_file {path} {problem}")
    unusual = _unusual_character(token)
    if unusual is not None and warn:
        log.warning(
            "hq.token_unusual",
            path=str(path),
            character=unusual,
            detail="a bearer token has only ASCII letters, digits, -._~+/ and '=' at its end;"
            " if HQ answers 401, copy the token again exactly as HQ issued it",
        )
    return token


# Characters of a bearer token before its optional "=" padding: the b64token of RFC 6750,
# section 2.1. Other printable ASCII still fits in the Authorization header and gets a
# warning only. Whitespace, control characters and non-ASCII do not fit: aiohttp (3.14)
# rejects a line break in a header before the request leaves.
BEARER_TOKEN_CHARACTERS = frozenset(string.ascii_letters + string.digits + "-._~+/")
TOKEN_FIX = "write the token alone, on one line, exactly as HQ issued it"


def _bearer_token_problem(token: str) -> str | None:
    """Describe why ``token`` is not one bearer token, without quoting it; None when valid.

    Positions count the token's characters from 1, after the byte order mark and leading
    whitespace that ``read_token`` removed.
    """
    words = token.split(maxsplit=1)
    if len(words) == 2 and words[0].lower() == "bearer":
        return (
            "starts with 'Bearer': write the token alone, because the daemon adds 'Bearer' to"
            " the Authorization header itself"
        )
    line_end = next((i for i, character in enumerate(token) if character in "\r\n"), None)
    if line_end is not None:
        return (
            f"contains a line break after character {line_end} of the token, but a bearer"
            f" token is a single line: {TOKEN_FIX}"
        )
    if not token.rstrip("="):
        return f"contains only '=' characters, which is not a bearer token: {TOKEN_FIX}"
    for index, character in enumerate(token):
        # Printable ASCII other than a space fits in the header; _unusual_character warns
        # about what is outside RFC 6750's token characters.
        if "!" <= character <= "~":
            continue
        where = f"at character {index + 1} of the token"
        fix = TOKEN_FIX
        if not character.isascii():
            fix = (
                "copy the token again exactly as HQ issued it, from plain text, because an"
                " editor may have replaced a character (such as '-' with a dash)"
            )
        return (
            f"contains {_describe_character(character)} {where}, but a bearer token contains"
            f" only ASCII letters, digits, -._~+/ and '=' at its end: {fix}"
        )
    return None


def _unusual_character(token: str) -> str | None:
    """Describe the first character of ``token`` outside RFC 6750's token characters, or None.

    Such a token still fits in the Authorization header, and some issuers use one, so it is
    only warned about. ``token`` has passed ``_bearer_token_problem``.
    """
    unpadded = token.rstrip("=")
    for index, character in enumerate(unpadded):
        if character not in BEARER_TOKEN_CHARACTERS:
            return f"{_describe_character(character)} at character {index + 1}"
    return None


def _describe_character(character: str) -> str:
    """Name a character by its code point and Unicode name, as in "U+2013 EN DASH"."""
    code = f"U+{ord(character):04X}"
    name = unicodedata.name(character, "")
    return f"{code} {name}" if name else f"the control character {code}"


def _set_meta(connection: sqlite3.Connection, values: dict[str, str]) -> None:
    # The cache's keys (the cursor and its times) go to the cache file, the rest to main.
    for key, value in values.items():
        connection.execute(
            f"INSERT INTO {cachefile.meta_table(key)} (key, value) VALUES (?, ?)"
            " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )


def _meta(connection: sqlite3.Connection, key: str) -> str | None:
    row = connection.execute(
        f"SELECT value FROM {cachefile.meta_table(key)} WHERE key = ?", (key,)
    ).fetchone()
    return row[0] if row else None


def _valid_record(data: dict[str, Any] | None, counts: ApplyCounts) -> IdentityRecord | None:
    try:
        return record_from_builtins(data)
    except RecordInvalid as exc:
        counts.rejected += 1
        log.warning(
            "sync.record_rejected",
            credential_id=loggable_id(credential_id_of(data)),
            reason=loggable_reason(exc),
        )
        return None


def apply_changes(
    connection: sqlite3.Connection,
    hasher: KeyHasher,
    changes: list[Change],
    cursor: str,
    pulled_at: float,
) -> ApplyCounts:
    """Apply a page of changes in order with its cursor, inside the writer's transaction."""
    counts = ApplyCounts()
    now = time.time()
    rows: list[dict] = []
    removals: list[str] = []

    # Consecutive PUTs go in one upsert and consecutive REMOVEs in one delete; the order
    # between the two kinds is kept, so PUT, REMOVE, PUT of one credential ends with a PUT.
    # A PUT whose record is invalid removes the credential's earlier record, which HQ has
    # replaced (it may have revoked it), and is remembered for the digest comparison.
    skipped: dict[str, int | None] = {}
    # A PUT may take the key of another credential, and the upsert then deletes that
    # credential although HQ still has it. It is remembered as skipped, with the key it lost.
    holders: dict[str, tuple[int, bytes]] = {}
    for change in changes:
        if change.op == "PUT":
            record = _valid_record(change.record, counts)
            if record is not None:
                if removals:
                    counts.removed += remove_credentials(connection, removals)
                    removals = []
                rows.append(identity_row(record, hasher, now))
                skipped.pop(record.credentialId, None)
                continue
            credential_id = credential_id_of(change.record)
            if credential_id is None:
                continue
            skipped[credential_id] = version_of(change.record)
        else:
            credential_id = change.credential_id
            if not credential_id:
                continue
            skipped.pop(credential_id, None)
        if rows:
            counts.put += _put_rows(connection, rows, holders)
            rows = []
        removals.append(credential_id)
    if removals:
        counts.removed += remove_credentials(connection, removals)
    if rows:
        counts.put += _put_rows(connection, rows, holders)
    touched = {c.credential_id or credential_id_of(c.record) for c in changes} - {None}
    untouched = [credential for credential in holders if credential not in touched]
    still_cached = cached_credentials(connection, untouched)
    displaced: dict[str, tuple[int, bytes]] = {}
    for credential in untouched:
        if credential not in still_cached:
            log.warning(
                "sync.key_taken_over",
                credential_id=credential,
                action="removed from the cache: a newer record of another credential has its key",
            )
            displaced[credential] = holders[credential]
    connection.executemany(
        "DELETE FROM skipped_records WHERE credential_id = ?", [(c,) for c in touched]
    )
    remember_skipped(connection, skipped, displaced)

    values = {CURSOR_META_KEY: cursor, LAST_PULL_META_KEY: repr(pulled_at)}
    if _meta(connection, CURSOR_META_KEY) != cursor:
        values[CURSOR_CHANGED_META_KEY] = repr(pulled_at)
    _set_meta(connection, values)
    return counts


def _put_rows(
    connection: sqlite3.Connection, rows: list[dict], holders: dict[str, tuple[int, bytes]]
) -> int:
    # The holders are read before the upsert, which deletes those that lose their key.
    holders.update(key_holders(connection, [row["key_hash"] for row in rows]))
    upsert_rows(connection, rows)
    return len(rows)


def remember_skipped(
    connection: sqlite3.Connection,
    skipped: dict[str, int | None],
    displaced: dict[str, tuple[int, bytes]] | None = None,
) -> None:
    """Record the records the cache cannot hold, for the digest comparison.

    ``skipped`` maps invalid records' credential ids to their versions. A record without a
    usable version is left out: the digests then differ until HQ fixes it, as they would
    without this table. ``displaced`` maps the credentials whose key a later record took to
    (version, key hash).
    """
    connection.executemany(
        "INSERT OR REPLACE INTO skipped_records (credential_id, version, key_hash)"
        " VALUES (?, ?, NULL)",
        [(credential, version) for credential, version in skipped.items() if version is not None],
    )
    connection.executemany(
        "INSERT OR REPLACE INTO skipped_records (credential_id, version, key_hash)"
        " VALUES (?, ?, ?)",
        [(credential, version, key) for credential, (version, key) in (displaced or {}).items()],
    )


class RebuildTakenOver(StoreError):
    """Another rebuild of the same database began after this one, which must stop."""


def _check_owner(connection: sqlite3.Connection, owner: str) -> None:
    # A rebuild switches the cache only while the rebuild that began last is this one. Two
    # processes that both rebuilt would otherwise each put their own file in place.
    if _meta(connection, REBUILD_OWNER_META_KEY) != owner:
        raise RebuildTakenOver(
            "another process began rebuilding this database's cache from HQ's snapshot, so"
            " this rebuild stops; run sync --now only while the daemon is stopped"
        )


def index_cache(connection: sqlite3.Connection) -> tuple[int, list[tuple[str, int, bytes]]]:
    """Add the unique key-hash index to a cache file being built.

    Returns the file's row count and the rows dropped for a key a later row holds.
    A dropped row comes back as (credential id, version, key hash).

    Where two records share a key, the one staged last keeps it and the other is deleted
    first, as ``write_rows`` does on the live table. Staging order is rowid order, because
    ``INSERT OR REPLACE`` gives a replaced credential a new, larger rowid.

    The index is built once every record is in. Kept up to date row by row, that index of
    random HMACs dirtied about one page per staged record: the rebuild ran at a third of
    the speed.
    """
    dropped: list[tuple[str, int, bytes]] = []
    try:
        connection.execute(cachefile.KEY_HASH_INDEX_SQL)
    except sqlite3.IntegrityError:
        # Rare (HQ sent one key under two credentials), so it costs a second pass only then.
        superseded = (
            "FROM identities WHERE rowid NOT IN"
            " (SELECT max(rowid) FROM identities GROUP BY key_hash)"
        )
        dropped = connection.execute(
            f"SELECT credential_id, version, key_hash {superseded}"
        ).fetchall()
        connection.execute(f"DELETE {superseded}")
        connection.execute(cachefile.KEY_HASH_INDEX_SQL)
    count = connection.execute("SELECT count(*) FROM identities").fetchone()[0]
    return count, dropped


def seal_cache(
    connection: sqlite3.Connection,
    path: Path,
    cursor: str,
    pulled_at: float,
    skipped: dict[str, int | None] | None = None,
    displaced: dict[str, tuple[int, bytes]] | None = None,
) -> None:
    """Store the new cache's cursor and skipped records, then make the file durable."""
    connection.execute("BEGIN")
    remember_skipped(connection, skipped or {}, displaced)
    _set_meta(
        connection,
        {
            CURSOR_META_KEY: cursor,
            CURSOR_CHANGED_META_KEY: repr(pulled_at),
            LAST_PULL_META_KEY: repr(pulled_at),
            LAST_REBUILD_META_KEY: repr(pulled_at),
        },
    )
    connection.execute("COMMIT")
    cachefile.seal(connection, path)


def switch_cache_file(connection: sqlite3.Connection, name: str, owner: str) -> None:
    """Name a sealed cache file as the one in use: the swap of a rebuild, in one short commit.

    Readers keep the old file until they attach the new one; the cursor is the new file's.
    """
    _check_owner(connection, owner)
    _set_meta(connection, {cachefile.CACHE_FILE_META_KEY: name})


def delete_events(connection: sqlite3.Connection, event_ids: list[str]) -> int:
    before = connection.total_changes
    connection.executemany("DELETE FROM outbox WHERE event_id = ?", [(e,) for e in event_ids])
    return connection.total_changes - before


def trim_outbox(
    connection: sqlite3.Connection,
    max_events: int,
    max_age: float,
    overflow: OutboxOverflow,
    now: float,
) -> int:
    """Drop events older than ``max_age`` and beyond ``max_events``; count them in meta."""
    before = connection.total_changes
    connection.execute("DELETE FROM outbox WHERE created_at < ?", (now - max_age,))
    depth = connection.execute("SELECT count(*) FROM outbox").fetchone()[0]
    excess = depth - max_events
    if excess > 0:
        order = "ASC" if overflow == "drop_oldest" else "DESC"
        connection.execute(
            f"DELETE FROM outbox WHERE seq IN"
            f" (SELECT seq FROM outbox ORDER BY seq {order} LIMIT ?)",
            (excess,),
        )
    dropped = connection.total_changes - before
    if dropped:
        stored = _meta(connection, OUTBOX_DROPPED_META_KEY)
        previous = parse_meta_count(stored)
        if previous is None:
            # A damaged count must not fail the trim, which keeps the outbox bounded.
            log.warning(
                "outbox.dropped_count_invalid",
                value=(stored or "")[:40],
                action="counting dropped events again from 0",
            )
            previous = 0
        _set_meta(connection, {OUTBOX_DROPPED_META_KEY: str(previous + dropped)})
    return dropped


def cache_record(
    connection: sqlite3.Connection,
    hasher: KeyHasher,
    data: dict[str, Any],
    cursor: str | None = None,
) -> bool:
    """Store a record from an online lookup; return whether it was stored.

    ``cursor`` is the sync cursor when the lookup was sent. A pull that committed while
    the lookup was on its way may have removed the credential or stored a newer version,
    so the record is stored only while the cursor is the same, and never over a newer
    version.
    """
    counts = ApplyCounts()
    record = _valid_record(data, counts)
    if record is None:
        return False
    if _meta(connection, CURSOR_META_KEY) != cursor:
        log.info(
            "hq.lookup_record_not_cached",
            credential_id=record.credentialId,
            reason="a pull moved the sync cursor while the lookup was on its way; the pull"
            " brings the credential's current state",
        )
        return False
    stored = connection.execute(
        "SELECT version FROM identities WHERE credential_id = ?", (record.credentialId,)
    ).fetchone()
    if stored is not None and stored[0] > record.version:
        log.info(
            "hq.lookup_record_outdated",
            credential_id=record.credentialId,
            version=record.version,
            stored_version=stored[0],
        )
        return False
    upsert_rows(connection, [identity_row(record, hasher, time.time())])
    connection.execute(
        "DELETE FROM skipped_records WHERE credential_id = ?", (record.credentialId,)
    )
    return True


class StoreAdapter:
    """Implements ``sync.store.SyncStore`` on the daemon's store.

    Writes go through the store's one writer. Reads that may scan many rows (digest,
    outbox) run on a connection of their own in one worker thread, off the event loop. A
    snapshot rebuild writes a new cache file on a connection of its own in a builder
    thread, so neither its inserts nor its index hold the lock that decisions commit under.
    The builder thread runs under SCHED_IDLE, like the snapshot worker.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hq-reader")
        self._connection: sqlite3.Connection | None = None
        self._connection_cache: AttachedCache | None = None
        self._builder = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="cache-builder", initializer=yield_cpu
        )
        self._building: tuple[sqlite3.Connection, Path] | None = None
        self._saved_switch_interval: float | None = None
        self._worker: SnapshotWorker | None = None
        self._worker_started = False
        # Set when a worker died during a rebuild: the rebuild it restarts, and any after
        # it until one succeeds, validate and stage in this process.
        self._without_worker = False
        # Invalid snapshot records of the running rebuild, by credential, for the digest.
        self._skipped: dict[str, int | None] = {}
        # Credentials of the running rebuild whose key a later record took.
        self._displaced: dict[str, tuple[int, bytes]] = {}
        # Snapshot records of the running rebuild logged as rejected, so that an attempt
        # restarted after the worker died does not log them again.
        self._logged_rejections: set[tuple[str | None, int, str]] = set()
        self._rebuild_owner = ""

    def close(self) -> None:
        def close_connection() -> None:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

        self._executor.submit(close_connection).result()
        self._executor.shutdown(wait=True)
        building = self._building
        if building is not None:
            # A key index of millions of rows takes seconds; a stop must not wait for it.
            building[0].interrupt()
        self._builder.submit(self._drop_build).result()
        self._builder.shutdown(wait=True)
        if self._worker is not None:
            self._worker.kill()

    def cursor(self) -> str | None:
        return self.store.reader.meta(CURSOR_META_KEY)

    async def _read(self, query: Any) -> Any:
        def run() -> Any:
            if self._connection is None:
                self._connection = connect(self.store.path, 5.0)
                self._connection_cache = AttachedCache(self._connection, self.store.cache)
            assert self._connection_cache is not None
            self._connection_cache.refresh()
            return query(self._connection)

        return await asyncio.get_running_loop().run_in_executor(self._executor, run)

    async def _build(self, job: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._builder, job, *args)

    def _drop_build(self) -> None:
        """Close and delete the cache file being built, if any (in the builder thread)."""
        building, self._building = self._building, None
        if building is not None:
            connection, path = building
            connection.close()
            cachefile.remove(path)

    async def adopt_cache_file(self) -> None:
        """Use the cache file the database names, and delete every other one beside it.

        Called with the sync lock held: another process that synced before may have switched
        files, and files of an interrupted rebuild or an older cache are left over.
        """
        # The reader's connection: a new one would first attach the file in use, which the
        # other process may have deleted after its switch.
        name = cachefile.pointer(self.store.reader.connection)
        if name is not None and name != self.store.cache.path.name:
            await self._use_cache_file(self.store.path.with_name(name))
        for path in cachefile.cache_files(self.store.path):
            if path != self.store.cache.path:
                log.info("store.stale_cache_file_removed", path=str(path))
                await self._build(cachefile.remove, path)

    async def _use_cache_file(self, path: Path) -> None:
        """Move every connection of the store to cache file ``path``."""
        self.store.cache.path = path
        self.store.reader.cache.refresh()
        # The writer attaches the new file before its next batch, this reader before its
        # next query, the checkpoint thread at its next round.
        await self.store.writer.submit(NO_ROWS)
        await self._read(lambda connection: None)
        deadline = time.monotonic() + CACHE_SWITCH_WAIT_SECONDS
        while not self.store.attached_everywhere(path) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def apply_changes(
        self, changes: list[Change], cursor: str, pulled_at: float
    ) -> ApplyCounts:
        return await self.store.writer.submit(
            functools.partial(
                apply_changes,
                hasher=self.store.hasher,
                changes=changes,
                cursor=cursor,
                pulled_at=pulled_at,
            )
        )

    async def begin_rebuild(self, restart: bool = False) -> None:
        await self._build(self._drop_build)
        self._rebuild_owner = f"{os.getpid()}-{uuid.uuid4().hex}"
        await self.store.writer.submit(
            functools.partial(_set_meta, values={REBUILD_OWNER_META_KEY: self._rebuild_owner})
        )
        path = cachefile.new_cache_path(self.store.path)
        self._building = (await self._build(cachefile.build_connection, path), path)
        if self._saved_switch_interval is None:
            self._saved_switch_interval = sys.getswitchinterval()
            sys.setswitchinterval(REBUILD_SWITCH_INTERVAL)
        await self._close_worker()
        self._worker_started = False
        self._skipped = {}
        self._displaced = {}
        if not restart:
            self._logged_rejections = set()

    async def prepare_lines(self, first_line: int, lines: bytes) -> PreparedRecords:
        block = Block(first_line=first_line, data=lines, updated_at=time.time())
        if not self._worker_started and not self._without_worker:
            # Started with the first block, not with the rebuild: while HQ is unreachable,
            # every retried rebuild would start a process for nothing.
            self._worker_started = True
            building = self._building
            if building is None:
                raise RuntimeError("no cache file is being built; the rebuild must start again")
            try:
                self._worker = await SnapshotWorker.start(
                    self.store.hasher.secret, STAGE_SLICE_RECORDS, building[1]
                )
            except OSError as exc:
                log.warning(
                    "sync.worker_unavailable",
                    error=str(exc),
                    action="validating snapshot records in the daemon process, which slows"
                    " decisions during the rebuild",
                )
        prepared = None
        if self._worker is not None:
            try:
                prepared = await self._worker.prepare(block)
            except WorkerFailed as exc:
                # The worker may have died halfway through writing a block, and the new
                # file keeps its rollback journal in memory: what it holds is unknown.
                log.warning(
                    "sync.worker_failed",
                    error=str(exc),
                    action="downloading HQ's snapshot again and rebuilding in the daemon"
                    " process, which slows decisions until the rebuild ends; the rebuild"
                    " after a successful one starts a new worker",
                )
                await self._close_worker()
                self._without_worker = True
                raise RebuildRestart(str(exc)) from None
            if prepared.write_error is not None:
                # The directory, not the new file, which the rebuild deletes: the text is
                # then the same at each retry, and the pull loop logs repeats in one line.
                raise StoreError(
                    f"the snapshot worker could not write a new cache file in"
                    f" {self.store.path.parent}: {prepared.write_error}"
                )
        if prepared is None:
            prepared = await self._prepare_here(block)
        for rejected in prepared.rejected:
            self._log_rejected(rejected)
            if rejected.credential_id is not None and len(self._skipped) < MAX_SKIPPED_RECORDS:
                self._skipped[rejected.credential_id] = rejected.version
        if prepared.error is not None:
            raise HqResponseInvalid(prepared.error)
        counts = ApplyCounts(
            put=prepared.staged + sum(size for _rows, _hashes, size in prepared.batches),
            rejected=len(prepared.rejected),
        )
        return PreparedRecords(
            counts=counts,
            rows=prepared.row_batches(block.updated_at),
            received=prepared.received,
        )

    def _log_rejected(self, rejected: Rejected) -> None:
        # A record without a credential id is known by its line instead. HQ may have
        # changed the snapshot before a restarted attempt, which then logs what is new.
        line = rejected.line if rejected.credential_id is None else 0
        key = (rejected.credential_id, line, rejected.reason)
        if key in self._logged_rejections:
            return
        # NOTE: past this bound, a restarted attempt logs the records again.
        if len(self._logged_rejections) < MAX_SKIPPED_RECORDS:
            self._logged_rejections.add(key)
        log.warning(
            "sync.record_rejected",
            line=rejected.line,
            credential_id=loggable_id(rejected.credential_id),
            reason=rejected.reason,
        )

    async def _prepare_here(self, block: Block) -> PreparedBlock:
        # Without a worker, validation and hashing hold the GIL here. In a thread, they
        # would keep the event loop waiting for up to a switch interval at a time, so they
        # run on the loop in short slices.
        lines = block.data.split(b"\n")[:-1]
        parts = []
        for start in range(0, len(lines), PREPARE_SLICE_RECORDS):
            await asyncio.sleep(0)
            chunk = lines[start : start + PREPARE_SLICE_RECORDS]
            parts.append(
                prepare_block(
                    Block(block.first_line + start, b"\n".join(chunk) + b"\n", block.updated_at),
                    self.store.hasher,
                    STAGE_SLICE_RECORDS,
                )
            )
            if parts[-1].error is not None:
                break
        return merge_prepared(parts, STAGE_SLICE_RECORDS)

    async def stage_records(self, prepared: PreparedRecords) -> None:
        # One transaction per block in the builder thread; no decision waits for it. A
        # worker that wrote its block itself leaves no rows here.
        if self._building is None:
            raise RuntimeError("no cache file is being built; the rebuild must start again")
        if not prepared.rows:
            return
        connection, _path = self._building
        await self._build(stage_rows, connection, join_batches(prepared.rows))

    async def finish_rebuild(self, cursor: str, pulled_at: float) -> int:
        # Stops the worker, which has written every block it replied to: the builder
        # connection then has the file to itself.
        await self._end_rebuild()
        if self._building is None:
            raise RuntimeError("no cache file is being built; the rebuild must start again")
        connection, path = self._building
        started = time.monotonic()
        count, dropped = await self._build(index_cache, connection)
        # Credentials that lost their key to a later record are missing from the cache but
        # not from HQ, like invalid records.
        room = max(0, MAX_SKIPPED_RECORDS - len(self._skipped))
        for credential_id, version, key_hash in dropped[:room]:
            self._displaced[credential_id] = (version, key_hash)
        log.info(
            "sync.staging_indexed",
            identities=count,
            duplicate_keys=len(dropped),
            seconds=round(time.monotonic() - started, 2),
        )
        await self._build(
            seal_cache, connection, path, cursor, pulled_at, self._skipped, self._displaced
        )
        self._building = None
        try:
            await self.store.writer.submit(
                functools.partial(switch_cache_file, name=path.name, owner=self._rebuild_owner)
            )
        except BaseException:
            await self._build(cachefile.remove, path)
            raise
        old = self.store.cache.path
        await self._use_cache_file(path)
        # A connection that still has the old file open keeps reading it until it closes.
        # Unlinking a large file takes the file system tens of milliseconds: not on the loop.
        await self._build(cachefile.remove, old)
        log.info("sync.cache_file_switched", path=str(path), previous=str(old))
        self._without_worker = False
        return count

    async def abandon_rebuild(self) -> None:
        await self._end_rebuild()
        await self._build(self._drop_build)

    async def _end_rebuild(self) -> None:
        if self._saved_switch_interval is not None:
            sys.setswitchinterval(self._saved_switch_interval)
            self._saved_switch_interval = None
        await self._close_worker()

    async def _close_worker(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            await worker.stop()

    async def local_digest(self) -> tuple[int, str]:
        def query(connection: sqlite3.Connection) -> tuple[int, str]:
            # Records the cache skipped count as present, at HQ's version: the digests then
            # differ only where the cache missed a change. A credential that lost its key
            # counts only while another one has that key. After that one is removed, HQ
            # has the credential with its key again, and the cache must be rebuilt.
            counted = (
                "FROM skipped_records WHERE key_hash IS NULL"
                " OR key_hash IN (SELECT key_hash FROM identities)"
            )
            rows = connection.execute(
                "SELECT credential_id, version FROM identities"
                f" UNION ALL SELECT credential_id, version {counted}"
                " ORDER BY credential_id"
            )
            count, digest = compute_digest(rows)
            (skipped,) = connection.execute(f"SELECT count(*) {counted}").fetchone()
            return count - skipped, digest

        return await self._read(query)

    async def cache_record(self, record: dict[str, Any], cursor: str | None) -> bool:
        return await self.store.writer.submit(
            functools.partial(cache_record, hasher=self.store.hasher, data=record, cursor=cursor)
        )

    async def outbox_batch(self, limit: int) -> list[OutboxEvent]:
        def query(connection: sqlite3.Connection) -> list[OutboxEvent]:
            rows = connection.execute(
                "SELECT seq, event_id, created_at, body FROM outbox ORDER BY seq LIMIT ?",
                (limit,),
            )
            return [OutboxEvent(seq=r[0], event_id=r[1], created_at=r[2], body=r[3]) for r in rows]

        return await self._read(query)

    async def delete_events(self, event_ids: list[str]) -> int:
        return await self.store.writer.submit(functools.partial(delete_events, event_ids=event_ids))

    async def trim_outbox(
        self, max_events: int, max_age: float, overflow: OutboxOverflow, now: float
    ) -> int:
        return await self.store.writer.submit(
            functools.partial(
                trim_outbox, max_events=max_events, max_age=max_age, overflow=overflow, now=now
            )
        )

    async def outbox_stats(self) -> OutboxStats:
        def query(connection: sqlite3.Connection) -> OutboxStats:
            depth, oldest = connection.execute(
                "SELECT count(*), min(created_at) FROM outbox"
            ).fetchone()
            return OutboxStats(depth=depth, oldest_created_at=oldest)

        return await self._read(query)

    async def set_meta(self, values: dict[str, str]) -> None:
        await self.store.writer.submit(functools.partial(_set_meta, values=values))


class SyncLock:
    """An advisory lock on a file beside the database, so one process syncs with HQ at a time.

    Two syncing processes would each delete the other's cache files as left over, and
    switch the cache under the other. ``serve`` holds the lock while it runs, and
    ``sync --now`` while it syncs.
    """

    def __init__(self, database: Path) -> None:
        self.path = Path(f"{database}.sync-lock")
        self._descriptor: int | None = None

    def acquire(self) -> bool:
        """Take the lock without waiting; return False when another process holds it.

        Raises OSError when the lock file can be neither created nor opened.
        """
        if self._descriptor is not None:
            return True
        try:
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except PermissionError:
            # Created by another user (root running sync --now, say): a descriptor opened
            # for reading takes the lock too.
            descriptor = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            return False
        self._descriptor = descriptor
        return True

    def release(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None


class HqSync:
    """The running sync of a daemon: what `serve` stops and the resolver asks on a miss."""

    def __init__(self, config: Config, store: Store, service: SyncService, adapter: StoreAdapter):
        self.config = config
        self.store = store
        self.service = service
        self.adapter = adapter
        self.lock = SyncLock(store.path)
        self.started = False
        self._starting: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start syncing now, or in the background once another process releases the lock."""
        try:
            acquired = self.lock.acquire()
        except OSError as exc:
            # Syncing matters more than the guard against a concurrent `sync --now`.
            log.error(
                "sync.lock_unavailable",
                path=str(self.lock.path),
                error=str(exc),
                action="syncing without the lock; do not run sync --now while the daemon runs",
            )
            acquired = True
        if acquired:
            await self._start_service()
            return
        log.warning(
            "sync.waiting_for_lock",
            path=str(self.lock.path),
            detail="another process (sync --now) is syncing with HQ; this daemon decides from"
            " its cache and starts syncing when that process ends",
        )
        self._starting = asyncio.create_task(self._start_when_unlocked(), name="hq-sync-lock")

    async def _start_when_unlocked(self) -> None:
        while not self.lock.acquire():
            await asyncio.sleep(SYNC_LOCK_POLL_SECONDS)
        log.info("sync.lock_acquired", path=str(self.lock.path))
        await self._start_service()

    async def _start_service(self) -> None:
        # A rebuild cut short by a crash left a file behind, and a sync --now that ran while
        # this daemon waited for the lock may have switched files.
        await self.adapter.adopt_cache_file()
        await self.service.start()
        self.started = True

    def pull_now(self) -> None:
        """Wake the pull loop, as a reload does, instead of waiting out its interval."""
        log.info("sync.pull_requested", reason="reload")
        self.service.wake()

    @property
    def clock_uncertain(self) -> bool:
        return self.service.clock_uncertain

    async def stop(self) -> None:
        if self._starting is not None:
            self._starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._starting
        if self.started:
            await self.service.stop()
        self.adapter.close()
        self.lock.release()

    async def lookup_miss(
        self,
        resolver: Resolver,
        evaluation: Evaluation,
        value: str,
        store_id: str,
        location: str,
        channel: str,
        scanned_at: float,
        now: float,
    ) -> Evaluation:
        """Ask HQ about a key the cache does not hold, within ``lookup_timeout``.

        Returns the evaluation of HQ's record, or ``evaluation`` unchanged when HQ does not
        know the key or cannot answer in time, so the offline policy decides.
        """
        if not self.started:
            return evaluation
        if evaluation.identity is not None or evaluation.verdict.reason is not Reason.UNKNOWN_KEY:
            return evaluation
        policy = self.config.policy
        candidates = candidate_keys(value, channel, policy.value_encoding)
        if not candidates:
            return evaluation
        cursor = self.adapter.cursor()
        # Every form of the value (as sent, base64-decoded, as a card UID) goes to HQ at
        # once, so the lookup still ends within one lookup_timeout. As in the cache, the
        # most specific form that HQ has a record for wins.
        answers = await asyncio.gather(*(self.service.lookup(key) for key in candidates))
        data = next((answer for answer in answers if answer is not None), None)
        if data is None:
            return evaluation

        try:
            record = record_from_builtins(data)
        except RecordInvalid as exc:
            log.warning("hq.lookup_record_invalid", reason=loggable_reason(exc))
            return evaluation
        row = identity_row(record, self.store.hasher, now)
        if row["key_hash"] not in {self.store.hasher.hash(c) for c in candidates}:
            log.warning(
                "hq.lookup_key_mismatch",
                credential_id=record.credentialId,
                detail="HQ returned a record whose key does not match the scanned value",
            )
            return evaluation

        self.service.cache_looked_up(data, cursor)
        identity = _identity_from_row(row)
        context = resolver.scan_context(store_id, location, channel, scanned_at, now)
        log.info(
            "hq.lookup_found",
            credential_id=identity.credential_id,
            key_fingerprint=KeyHasher.fingerprint(row["key_hash"]),
        )
        return Evaluation(identity, row["key_hash"], decide(identity, context, policy))


def _add_counts(total: ApplyCounts, part: ApplyCounts) -> None:
    total.put += part.put
    total.removed += part.removed
    total.rejected += part.rejected


def _identity_from_row(row: dict[str, Any]) -> Identity:
    def as_tuple(text: str | None) -> tuple[str, ...] | None:
        return tuple(json.loads(text)) if text is not None else None

    return Identity(
        credential_id=row["credential_id"],
        key_hash=row["key_hash"],
        id=row["identity_id"],
        type=row["type"],
        status=row["status"],
        valid_from=row["valid_from"],
        valid_until=row["valid_until"],
        stores=as_tuple(row["stores"]) or (),
        channels=as_tuple(row["channels"]),
        locations=as_tuple(row["locations"]),
        version=row["version"],
    )


async def start_sync(
    config: Config, store: Store, on_state: Callable[[str], None] | None = None
) -> HqSync | None:
    """Start the HQ sync when [hq] is configured; return its handle, or None without [hq].

    ``on_state`` is called with the new state name ("online", "degraded", "offline") at
    each change, for health reports.
    """
    if config.hq is None:
        return None
    # `serve` built these settings before READY, with the warnings; this build is silent.
    settings = settings_from_config(config, config.hq, warn=False)
    adapter = StoreAdapter(store)
    service = SyncService(settings, adapter)
    if on_state is not None:
        on_state(service.state.value)
        service.state_listeners.append(on_state)
    sync = HqSync(config, store, service, adapter)
    await sync.start()
    return sync


def sync_now(config: Config, store: Store) -> int:
    """Run `identity-connector sync --now`: pull and upload once, printing progress.

    Returns the exit status. It is 0 on success, and 2 on a configuration error or a
    database error outside the pull. It is 1 when another process syncs, an HQ call failed,
    the pull failed (on HQ or on the database, such as a full disk), records were rejected,
    or the cache still differs from HQ after a rebuild.
    """
    if config.hq is None:
        print(
            "error: no [hq] table in the configuration; there is nothing to sync with",
            file=sys.stderr,
        )
        return 2
    settings = settings_from_config(config, config.hq)

    def progress(message: str) -> None:
        print(message, flush=True)

    lock = SyncLock(store.path)
    try:
        acquired = lock.acquire()
    except OSError as exc:
        print(
            f"error: cannot open the lock file {lock.path}: {exc}; run sync --now as the user"
            " that owns the database",
            file=sys.stderr,
        )
        return 2
    if not acquired:
        print(
            "error: another process is syncing with HQ: the running daemon, or another sync"
            " --now. While the daemon runs it syncs by itself; `systemctl reload"
            " identity-connector` (SIGHUP) makes it pull at once.",
            file=sys.stderr,
        )
        return 1

    async def run() -> int:
        adapter = StoreAdapter(store)
        service = SyncService(settings, adapter, progress=progress)
        try:
            await adapter.adopt_cache_file()
            progress(f"syncing store {settings.store_id} with {settings.base_url}")
            report = await service.run_once()
            waiting = await _outbox_depth(adapter, store.path)
        except HqError as exc:
            print(f"error: sync failed: {exc}", file=sys.stderr)
            return 1
        except sqlite3.Error as exc:
            print(f"error: sync failed: database {store.path}: {exc}", file=sys.stderr)
            return 2
        finally:
            adapter.close()
            lock.release()
        if report.pull_error is not None:
            print(_failure_message("pull", report.pull_error, store.path), file=sys.stderr)
        if report.upload_error is not None:
            print(_failure_message("upload", report.upload_error, store.path), file=sys.stderr)
        pull = report.pull
        if pull.rebuilt:
            # The records the old cache lost in a rebuild are not counted as removed, so
            # the line gives the new size instead. "put" counts the snapshot's records and
            # the changes after it, "removed" only the changes after it.
            pulled = (
                f"cache rebuilt from the snapshot with {pull.identities} identities;"
                f" {pull.put} put in all (changes before the rebuild, the snapshot's records"
                f" and changes after it), {pull.removed} removed"
            )
        else:
            pulled = f"{pull.put} put, {pull.removed} removed"
        if report.pull_error is not None:
            pulled = f"pull stopped by the error above after {pulled}"
            if pull.rebuild_abandoned:
                pulled += " (the failed rebuild was discarded: the cache in use is unchanged)"
        # HQ may acknowledge part of a batch, and the rest is sent again, so a count of sent
        # events would count re-sends. Store IT needs what arrived and what is still queued.
        uploaded = f"{events_text(report.upload.accepted)} delivered to HQ, " + (
            f"{events_text(waiting)} waiting in the outbox"
            if waiting is not None
            else "the events waiting in the outbox could not be counted"
        )
        if report.upload_error is not None:
            uploaded = f"upload stopped by the error above: {uploaded}"
        progress(f"done: {pulled}, {pull.rejected} rejected; {uploaded}")
        if pull.mismatch_after_rebuild:
            print(
                "error: after the rebuild the cache still differs from HQ's digest (the"
                " digest mismatch line above has both counts): HQ's snapshot and its digest"
                " disagree, which HQ must fix",
                file=sys.stderr,
            )
        if waiting is None or (
            report.upload_error is not None and _is_store_error(report.upload_error)
        ):
            # The outbox could not be read, emptied or counted: a database error outside
            # the pull.
            return 2
        failed = (
            pull.rejected
            or pull.mismatch_after_rebuild
            or report.pull_error is not None
            or report.upload_error is not None
        )
        return 1 if failed else 0

    return asyncio.run(run())


async def _outbox_depth(adapter: StoreAdapter, database: Path) -> int | None:
    """Count the events in the outbox for `sync --now`; print the error and return None
    when the outbox cannot be read."""
    try:
        return (await adapter.outbox_stats()).depth
    except (sqlite3.Error, StoreError, OSError) as exc:
        print(
            f"error: cannot count the events in the outbox of {database}: {exc}."
            f" {_store_failure_advice(exc, database)}",
            file=sys.stderr,
        )
        return None


def events_text(count: int) -> str:
    """Return "1 event" or "N events"."""
    return f"{count} event" if count == 1 else f"{count} events"


def _failure_message(step: str, error: Exception, database: Path) -> str:
    """Return the line `sync --now` prints when ``step`` ("pull" or "upload") failed."""
    if isinstance(error, HqError):
        return f"error: {step} failed: {error}"
    if _is_store_error(error):
        return (
            f"error: {step} failed on the database {database} or its identity cache file:"
            f" {error}. {_store_failure_advice(error, database)}, and run sync --now again"
        )
    # Not a fault of HQ or of the disk: the traceback goes to the log for a bug report.
    log.error(f"sync.{step}_crashed", error=str(error), exc_info=error)
    return (
        f"error: {step} failed: {type(error).__name__}: {error} (the sync.{step}_crashed log"
        f" line has the traceback)"
    )


def _is_store_error(error: Exception) -> bool:
    return isinstance(error, (sqlite3.Error, StoreError, OSError))


def _store_failure_advice(error: Exception, database: Path) -> str:
    """Name what to do about a store error, from its SQLite result code, errno or text.

    The snapshot worker's errors reach this process as text only (in a StoreError).
    """
    text = str(error)
    code = getattr(error, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    number = getattr(error, "errno", None)
    if primary == sqlite3.SQLITE_BUSY or "database is locked" in text:
        return (
            "Another process holds the database's write lock, such as an import: wait until it ends"
        )
    if (
        primary in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_PERM, sqlite3.SQLITE_CANTOPEN)
        or number in (errno.EACCES, errno.EPERM, errno.EROFS)
        or "readonly database" in text
    ):
        return (
            f"Check that this user can write to {database.parent} and its files (run"
            f" sync --now as the service's user)"
        )
    if (
        primary in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR)
        or number in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
        or any(sign in text for sign in ("disk is full", "disk I/O error", "No space left"))
    ):
        return (
            f"Free disk space in {database.parent} (a rebuild needs room for a second copy"
            f" of the cache)"
        )
    return "Check the files with `identity-connector status`"


def hq_status(reader: StoreReader, config: Config, now: float) -> dict[str, Any]:
    """Return the HQ fields of `status`: state, cursor age, uploads, drops and the clock."""
    if config.hq is None:
        return {}

    def age(key: str) -> float | None:
        moment = parse_meta_time(reader.meta(key), now)
        return round(now - moment, 1) if moment is not None else None

    offset_text = reader.meta(CLOCK_OFFSET_META_KEY)
    try:
        offset = float(offset_text) if offset_text else None
    except ValueError:
        offset = None
    # "nan" and "inf" parse, but no clock differs from HQ's by them.
    if offset is not None and not math.isfinite(offset):
        offset = None
    return {
        "hqState": reader.meta(HQ_STATE_META_KEY),
        "hqStateSince": _local_time(parse_meta_time(reader.meta(HQ_STATE_SINCE_META_KEY), now)),
        "cursorAgeSeconds": age(CURSOR_CHANGED_META_KEY),
        "lastPullAgeSeconds": age(LAST_PULL_META_KEY),
        "lastUploadAgeSeconds": age(LAST_UPLOAD_META_KEY),
        "lastReconcileAgeSeconds": age(LAST_RECONCILE_META_KEY),
        "lastRebuildAgeSeconds": age(LAST_REBUILD_META_KEY),
        # None when the stored count is invalid; the next dropped event starts it again.
        "outboxDropped": parse_meta_count(reader.meta(OUTBOX_DROPPED_META_KEY)),
        "outboxMaxEvents": config.hq.outbox_max_events,
        "skippedRecords": reader.connection.execute(
            "SELECT count(*) FROM skipped_records"
        ).fetchone()[0],
        "clockOffsetSeconds": offset,
        "clockUncertain": offset is not None and abs(offset) > config.hq.clock_offset_threshold,
    }


def _local_time(moment: float | None) -> str | None:
    """Format a Unix time as `status` shows times: RFC 3339 in the box's time zone."""
    if moment is None:
        return None
    return datetime.fromtimestamp(moment).astimezone().isoformat(timespec="seconds")


def print_hq_status(state: dict[str, Any]) -> None:
    """Print the HQ lines of `status` from the fields ``hq_status`` returned."""

    def ago(seconds: float | None) -> str:
        return "never" if seconds is None else f"{seconds:.0f} s ago"

    since = f" since {state['hqStateSince']}" if state.get("hqStateSince") else ""
    print(
        f"hq state:       {state.get('hqState') or 'unknown (the daemon has not synced yet)'}"
        f"{since}"
    )
    print(f"cursor changed: {ago(state.get('cursorAgeSeconds'))}")
    print(f"last upload:    {ago(state.get('lastUploadAgeSeconds'))}")
    print(f"last reconcile: {ago(state.get('lastReconcileAgeSeconds'))}")
    print(f"last rebuild:   {ago(state.get('lastRebuildAgeSeconds'))}")
    if state.get("outboxDropped"):
        print(
            f"outbox dropped: {state['outboxDropped']} events (bound:"
            f" {state['outboxMaxEvents']} events)"
        )
    if state.get("skippedRecords"):
        print(
            f"skipped:        {state['skippedRecords']} HQ records the cache cannot hold"
            " (invalid, or their key taken; see sync.record_rejected in the log)"
        )
    offset = state.get("clockOffsetSeconds")
    if offset is not None:
        warning = "  WARNING: clock differs from HQ's; events are flagged clockUncertain"
        print(f"clock offset:   {offset:+.1f} s{warning if state['clockUncertain'] else ''}")
