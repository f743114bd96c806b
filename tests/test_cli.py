"""The `identity-connector` commands as an operator runs them: import, lookup, status, check-config.

Each command runs as a real subprocess against real SQLite files in a temporary folder.
"""

from __future__ import annotations

import codecs
import csv
import errno
import io
import json
import os
import pwd
import re
import shutil
import signal
import sqlite3
import ssl
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from importlib import metadata
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from daemon import cachefile
from tests.conftest import (
    REPO,
    SAMPLE_RECORDS,
    START_TIMEOUT,
    Daemon,
    free_port,
    make_daemon,
    run_cli,
    write_config,
)
from tests.helpers_store import count_rows, query_all
from tests.tls_helpers import CertificateAuthority, write_api_key

CSV_COLUMNS = [
    "credentialId", "key", "id", "type", "status", "stores",
    "channels", "locations", "validFrom", "validUntil", "version",
]  # fmt: skip


def good_record(number: int, **changes: Any) -> dict[str, Any]:
    record = {
        "credentialId": f"c-good-{number}",
        "key": f"KEY-CLI-GOOD-{number}",
        "id": f"person-{number}",
        "type": "SHOPPER",
        "status": "ACTIVE",
        "stores": ["STORE-001"],
        "version": 1,
    }
    record.update(changes)
    return record


def jsonl_line(record: dict[str, Any]) -> bytes:
    return json.dumps(record, ensure_ascii=False).encode() + b"\n"


def csv_line(record: dict[str, Any]) -> bytes:
    cells = []
    for column in CSV_COLUMNS:
        value = record.get(column, "")
        cells.append(";".join(value) if isinstance(value, list) else str(value))
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(cells)
    return buffer.getvalue().encode()


CSV_HEADER = ",".join(CSV_COLUMNS).encode() + b"\n"


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path, free_port())


def database_of(config: Path) -> Path:
    return config.parent / "connector.sqlite3"


def import_file(config: Path, path: Path) -> Any:
    return run_cli("import", "--config", str(config), str(path))


# --- import: rejected lines ----------------------------------------------------------------

# (case, bad line, fragment of the reason, key that must not be printed)
JSONL_BAD_LINES: list[tuple[str, bytes, str, str | None]] = [
    (
        "invalid JSON",
        b'{"credentialId": "c-bad", "key": "KEY-CLI-REJECT-json", "id": \n',
        "invalid JSON",
        "KEY-CLI-REJECT-json",
    ),
    (
        "not an object",
        b'["c-bad", "KEY-CLI-REJECT-array"]\n',
        "not a JSON object",
        "KEY-CLI-REJECT-array",
    ),
    (
        "wrong type of version",
        jsonl_line(good_record(9, key="KEY-CLI-REJECT-version", version="seven")),
        "version",
        "KEY-CLI-REJECT-version",
    ),
    (
        "wrong type of stores",
        jsonl_line(good_record(9, key="KEY-CLI-REJECT-stores", stores="STORE-001")),
        "stores",
        "KEY-CLI-REJECT-stores",
    ),
    (
        "wrong type of key",
        jsonl_line(good_record(9, key=["KEY-CLI-REJECT-keylist"])),
        "key",
        "KEY-CLI-REJECT-keylist",
    ),
    (
        "missing id",
        jsonl_line(
            {k: v for k, v in good_record(9, key="KEY-CLI-REJECT-noid").items() if k != "id"}
        ),
        "id",
        "KEY-CLI-REJECT-noid",
    ),
    (
        "bad status enum",
        jsonl_line(good_record(9, key="KEY-CLI-REJECT-status", status="PAUSED")),
        "field status; use one of ACTIVE, SUSPENDED, REVOKED",
        "KEY-CLI-REJECT-status",
    ),
    (
        "bad type enum",
        jsonl_line(good_record(9, key="KEY-CLI-REJECT-type", type="VISITOR")),
        "field type; use one of SHOPPER, ASSOCIATE, CASH, LOYALTY",
        "KEY-CLI-REJECT-type",
    ),
    (
        "bad channel enum",
        jsonl_line(good_record(9, key="KEY-CLI-REJECT-channel", channels=["LASER"])),
        "field channels[0]; use one of OPTICAL, RADIO, CONTACT",
        "KEY-CLI-REJECT-channel",
    ),
    (
        "validFrom after validUntil",
        jsonl_line(
            good_record(
                9,
                key="KEY-CLI-REJECT-window",
                validFrom="2030-01-01T00:00:00Z",
                validUntil="2020-01-01T00:00:00Z",
            )
        ),
        "validFrom is later than validUntil",
        "KEY-CLI-REJECT-window",
    ),
    (
        "timestamp without offset",
        jsonl_line(good_record(9, key="KEY-CLI-REJECT-offset", validUntil="2030-01-01T00:00:00")),
        "validUntil",
        "KEY-CLI-REJECT-offset",
    ),
    (
        "key only whitespace",
        jsonl_line(good_record(9, key=" \t \r\n ")),
        "key is empty",
        None,
    ),
    (
        "not UTF-8",
        jsonl_line(good_record(9, key="KEY-CLI-REJECT-latin1", id="personne-é")).replace(
            "é".encode(), "é".encode("latin-1")
        ),
        "UTF-8",
        "KEY-CLI-REJECT-latin1",
    ),
]

CSV_BAD_LINES: list[tuple[str, bytes, str, str | None]] = [
    (
        "extra cells",
        csv_line(good_record(9, key="KEY-CLI-REJECT-extra")).rstrip(b"\n") + b",surplus\n",
        "more cells than the header",
        "KEY-CLI-REJECT-extra",
    ),
    (
        "wrong type of version",
        csv_line(good_record(9, key="KEY-CLI-REJECT-version", version="seven")),
        "version",
        "KEY-CLI-REJECT-version",
    ),
    (
        "missing id",
        csv_line(good_record(9, key="KEY-CLI-REJECT-noid", id="")),
        "id",
        "KEY-CLI-REJECT-noid",
    ),
    (
        "bad status enum",
        csv_line(good_record(9, key="KEY-CLI-REJECT-status", status="PAUSED")),
        "status",
        "KEY-CLI-REJECT-status",
    ),
    (
        "bad item in a list field",
        csv_line(good_record(9, key="KEY-CLI-REJECT-channel", channels=["OPTICAL", "LASER"])),
        "channels",
        "KEY-CLI-REJECT-channel",
    ),
    (
        "validFrom after validUntil",
        csv_line(
            good_record(
                9,
                key="KEY-CLI-REJECT-window",
                validFrom="2030-01-01T00:00:00Z",
                validUntil="2020-01-01T00:00:00Z",
            )
        ),
        "validFrom is later than validUntil",
        "KEY-CLI-REJECT-window",
    ),
    (
        "key only whitespace",
        csv_line(good_record(9, key="   ")),
        "key is empty",
        None,
    ),
    (
        # An operator's column mix-up puts the credential where the type belongs.
        "key and type cells swapped",
        csv_line(good_record(9, key="SHOPPER", type="KEY-CLI-REJECT-swapped")),
        "type",
        "KEY-CLI-REJECT-swapped",
    ),
    (
        "not UTF-8",
        csv_line(good_record(9, key="KEY-CLI-REJECT-latin1", id="personne-é")).replace(
            "é".encode(), "é".encode("latin-1")
        ),
        "UTF-8",
        "KEY-CLI-REJECT-latin1",
    ),
    (
        # Python's csv module rejects a cell of more than 131,072 characters.
        "cell over the size limit",
        csv_line(good_record(9, key="KEY-CLI-REJECT-big-" + "0" * 200_000)),
        "invalid CSV: field larger than field limit (131072)",
        "KEY-CLI-REJECT-big",
    ),
]


def bad_line_cases() -> Iterator[Any]:
    for case, line, reason, key in JSONL_BAD_LINES:
        yield pytest.param("jsonl", line, reason, key, id=f"jsonl-{case}")
    for case, line, reason, key in CSV_BAD_LINES:
        yield pytest.param("csv", line, reason, key, id=f"csv-{case}")


@pytest.mark.parametrize(("file_format", "bad_line", "reason", "key"), list(bad_line_cases()))
def test_import_rejects_bad_line(
    config: Path, file_format: str, bad_line: bytes, reason: str, key: str | None
) -> None:
    encode = csv_line if file_format == "csv" else jsonl_line
    header = CSV_HEADER if file_format == "csv" else b""
    source = config.parent / f"records.{file_format}"
    source.write_bytes(header + encode(good_record(1)) + bad_line + encode(good_record(2)))
    bad_line_number = 3 if file_format == "csv" else 2

    result = import_file(config, source)

    assert result.returncode == 1
    rejections = [line for line in result.stderr.splitlines() if ": rejected: " in line]
    assert len(rejections) == 1, result.stderr
    assert rejections[0].startswith(f"{source}:{bad_line_number}: rejected: "), rejections[0]
    assert reason in rejections[0]
    assert "2 inserted, 0 updated, 1 rejected" in result.stdout
    assert count_rows(database_of(config), "identities") == 2
    if key is not None:
        assert key not in result.stdout + result.stderr, "the rejected line's key was printed"


def test_import_reports_every_bad_line(config: Path) -> None:
    source = config.parent / "records.jsonl"
    lines = [jsonl_line(good_record(1))]
    lines += [line for _case, line, _reason, _key in JSONL_BAD_LINES]
    lines.append(jsonl_line(good_record(2)))
    source.write_bytes(b"".join(lines))

    result = import_file(config, source)

    pattern = re.compile(rf"^{re.escape(str(source))}:(\d+): rejected: ", re.MULTILINE)
    numbers = [int(match.group(1)) for match in pattern.finditer(result.stderr)]
    assert numbers == list(range(2, 2 + len(JSONL_BAD_LINES)))
    assert f"2 inserted, 0 updated, {len(JSONL_BAD_LINES)} rejected" in result.stdout


# A record whose key cell opens a quote that the rest of its line does not close.
OPEN_QUOTE_LINE = b'c-bad,"KEY-CLI-REJECT-quote,person-9,SHOPPER,ACTIVE,STORE-001,,,,,1\n'

# (case, records after the open quote, fragment of the reason)
OPEN_QUOTE_CASES = [
    (
        # The quote around "person,3" closes the open quote, so lines 3 to 5 parse as one row.
        "closed on a later line",
        [good_record(2), good_record(3, id="person,3")],
        "a quoted cell in this record runs on to line 5",
    ),
    ("never closed", [good_record(2), good_record(3)], "is never closed"),
    (
        "open past the cell size limit",
        [good_record(n) for n in range(2, 2502)],
        "field larger than field limit (131072); a quoted cell in this record runs on to line",
    ),
]


@pytest.mark.parametrize(
    ("following", "reason"),
    [pytest.param(*case[1:], id=case[0]) for case in OPEN_QUOTE_CASES],
)
def test_import_reads_on_after_open_quote(
    config: Path, following: list[dict[str, Any]], reason: str
) -> None:
    source = config.parent / "records.csv"
    body = csv_line(good_record(1)) + OPEN_QUOTE_LINE + b"".join(map(csv_line, following))
    source.write_bytes(CSV_HEADER + body)

    result = import_file(config, source)

    assert result.returncode == 1
    rejections = [line for line in result.stderr.splitlines() if ": rejected: " in line]
    assert len(rejections) == 1, result.stderr
    assert rejections[0].startswith(f"{source}:3: rejected: "), rejections[0]
    assert reason in rejections[0]
    assert "write a quote inside a cell as two quotes" in rejections[0]
    assert "KEY-CLI-REJECT-quote" not in result.stdout + result.stderr
    assert f"{1 + len(following)} inserted, 0 updated, 1 rejected" in result.stdout
    assert count_rows(database_of(config), "identities") == 1 + len(following)


@pytest.mark.parametrize("file_format", ["jsonl", "csv"])
def test_import_accepts_bom_and_crlf(config: Path, file_format: str) -> None:
    # Excel's "CSV UTF-8" starts the file with a byte order mark and ends lines with CRLF.
    encode = csv_line if file_format == "csv" else jsonl_line
    header = CSV_HEADER if file_format == "csv" else b""
    body = header + encode(good_record(1)) + encode(good_record(2))
    source = config.parent / f"records.{file_format}"
    source.write_bytes(codecs.BOM_UTF8 + body.replace(b"\n", b"\r\n"))

    result = import_file(config, source)

    assert result.returncode == 0, result.stderr
    assert "2 inserted, 0 updated, 0 rejected" in result.stdout
    assert count_rows(database_of(config), "identities") == 2


# --- import: counts and list fields ----------------------------------------------------------


@pytest.mark.parametrize("file_format", ["jsonl", "csv"])
def test_second_import_counts_updates(config: Path, file_format: str) -> None:
    encode = csv_line if file_format == "csv" else jsonl_line
    header = CSV_HEADER if file_format == "csv" else b""
    first = config.parent / f"first.{file_format}"
    first.write_bytes(header + b"".join(encode(good_record(n)) for n in (1, 2, 3)))
    second = config.parent / f"second.{file_format}"
    changed = [good_record(2, status="SUSPENDED", version=2), good_record(3, version=2)]
    second.write_bytes(header + b"".join(encode(r) for r in [*changed, good_record(4)]))

    initial = import_file(config, first)
    again = import_file(config, second)

    assert initial.returncode == 0, initial.stderr
    assert "3 inserted, 0 updated, 0 rejected" in initial.stdout
    assert again.returncode == 0, again.stderr
    assert "1 inserted, 2 updated, 0 rejected" in again.stdout
    versions = dict(query_all(database_of(config), "SELECT credential_id, version FROM identities"))
    assert versions == {"c-good-1": 1, "c-good-2": 2, "c-good-3": 2, "c-good-4": 1}


@pytest.mark.parametrize(
    ("hq_table", "warned"), [("", False), ('[hq]\nurl = "http://127.0.0.1:9"', True)]
)
def test_import_warns_when_hq_owns_cache(tmp_path: Path, hq_table: str, warned: bool) -> None:
    config = write_config(tmp_path, free_port(), extra=hq_table)
    records = tmp_path / "records.jsonl"
    records.write_bytes(jsonl_line(good_record(1)))

    result = import_file(config, records)

    assert result.returncode == 0, result.stderr
    assert "1 inserted, 0 updated, 0 rejected" in result.stdout
    assert ("removed at the next reconciliation" in result.stderr) is warned


# (second import, expected counts, credentials that gave up their key, rows afterwards),
# each after a first import of records 1 and 2
KEY_TAKEOVER_CASES = [
    ([good_record(3, key="KEY-CLI-GOOD-1")], "1 inserted, 0 updated, 0 rejected", 1, 2),
    ([good_record(2, key="KEY-CLI-GOOD-1")], "0 inserted, 1 updated, 0 rejected", 1, 1),
    (
        [good_record(1, key="KEY-CLI-GOOD-2"), good_record(2, key="KEY-CLI-GOOD-1")],
        "0 inserted, 2 updated, 0 rejected",
        0,
        2,
    ),
    (
        [good_record(3, key="KEY-CLI-GOOD-1"), good_record(4, key="KEY-CLI-GOOD-1")],
        "2 inserted, 0 updated, 0 rejected",
        2,
        2,
    ),
]


@pytest.mark.parametrize(("records", "counts", "replaced", "rows"), KEY_TAKEOVER_CASES)
def test_import_counts_key_takeovers(
    config: Path, records: list[dict[str, Any]], counts: str, replaced: int, rows: int
) -> None:
    first = config.parent / "first.jsonl"
    first.write_bytes(b"".join(jsonl_line(good_record(n)) for n in (1, 2)))
    second = config.parent / "second.jsonl"
    second.write_bytes(b"".join(jsonl_line(r) for r in records))
    import_file(config, first)

    result = import_file(config, second)

    assert result.returncode == 0, result.stderr
    assert counts in result.stdout
    if replaced == 0:
        assert "gave up" not in result.stdout
    elif replaced == 1:
        assert "; 1 older credential gave up its key" in result.stdout
    else:
        assert f"; {replaced} older credentials gave up their key" in result.stdout
    assert count_rows(database_of(config), "identities") == rows


def lookup(config: Path, value: str, *options: str, stdin: str | None = None) -> dict[str, str]:
    """Run `lookup` and parse its `name: value` lines."""
    result = run_cli("lookup", "--config", str(config), value, *options, stdin=stdin)
    assert result.returncode == 0, result.stderr
    fields = {}
    for line in result.stdout.splitlines():
        name, _, text = line.partition(":")
        fields[name.strip()] = text.strip()
    return fields


# (store, location, channel, expected action, expected reason)
CSV_LIST_CASES = [
    ("STORE-002", "ENTRY", "OPTICAL", "ACCEPT", "ACCEPTED"),
    ("STORE-001", "EXIT", "RADIO", "ACCEPT", "ACCEPTED"),
    ("STORE-003", "ENTRY", "OPTICAL", "REJECT", "STORE_NOT_ALLOWED"),
    ("STORE-001", "ENTRY", "CONTACT", "REJECT", "CHANNEL_NOT_ALLOWED"),
    ("STORE-001", "MANUAL_IN_STORE", "OPTICAL", "REJECT", "LOCATION_NOT_ALLOWED"),
]


@pytest.fixture(scope="module")
def csv_lists_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A database with one CSV record whose list fields contain several ';'-separated items."""
    directory = tmp_path_factory.mktemp("csv-lists")
    config = write_config(directory, free_port())
    # STORE-003 is served but not in the record's list.
    served = 'ids = ["STORE-001", "STORE-002"]'
    text = config.read_text(encoding="utf-8")
    assert served in text
    config.write_text(
        text.replace(served, 'ids = ["STORE-001", "STORE-002", "STORE-003"]'), encoding="utf-8"
    )
    source = directory / "lists.csv"
    record = good_record(
        1,
        key="KEY-CSV-LISTS",
        stores=["STORE-001", " STORE-002"],
        channels=["OPTICAL", "RADIO"],
        locations=["ENTRY", "EXIT"],
    )
    source.write_bytes(CSV_HEADER + csv_line(record))
    result = import_file(config, source)
    assert result.returncode == 0, result.stderr
    return config


@pytest.mark.parametrize(("store", "location", "channel", "action", "reason"), CSV_LIST_CASES)
def test_csv_list_fields_split(
    csv_lists_config: Path, store: str, location: str, channel: str, action: str, reason: str
) -> None:
    options = ["--store", store, "--location", location, "--channel", channel]

    fields = lookup(csv_lists_config, "KEY-CSV-LISTS", *options)

    assert (fields["action"], fields["reason"]) == (action, reason)


def test_lookup_rejects_store_not_served(csv_lists_config: Path) -> None:
    result = run_cli(
        "lookup", "--config", str(csv_lists_config), "KEY-CSV-LISTS", "--store", "STORE-404"
    )

    assert result.returncode == 2
    assert "store 'STORE-404' is not served by this connector" in result.stderr
    assert "STORE-001, STORE-002, STORE-003" in result.stderr
    assert result.stdout == ""


# --- lookup and status -----------------------------------------------------------------------

DECIDED_BEFORE = 2


@pytest.fixture(scope="module")
def used_daemon(tmp_path_factory: pytest.TempPathFactory) -> Daemon:
    """A stopped daemon's folder: the sample records and a few recorded decisions."""
    daemon = make_daemon(tmp_path_factory.mktemp("used"))
    try:
        daemon.start()
        for number in range(DECIDED_BEFORE):
            assert daemon.scan(f"UNKNOWN-BEFORE-LOOKUP-{number}").status == 200
    finally:
        if daemon.process is not None:
            daemon.stop()
    return daemon


def key_of(credential_id: str) -> str:
    return next(r["key"] for r in SAMPLE_RECORDS if r["credentialId"] == credential_id)


# (case, value, location, expected action, expected reason, expected id)
LOOKUP_CASES = [
    ("known", key_of("c-shopper"), "ENTRY", "ACCEPT", "ACCEPTED", "shopper-1"),
    ("unknown", "KEY-NEVER-IMPORTED-9f9f", "ENTRY", "REJECT", "UNKNOWN_KEY", "(unknown key)"),
    ("suspended", key_of("c-suspended"), "ENTRY", "REJECT", "SUSPENDED", "shopper-suspended"),
    (
        "suspended at exit",
        key_of("c-suspended"),
        "EXIT",
        "ACCEPT",
        "EXIT_OVERRIDE",
        "shopper-suspended",
    ),
    ("revoked", key_of("c-revoked"), "ENTRY", "REJECT", "REVOKED", "shopper-revoked"),
]


@pytest.mark.parametrize(
    ("value", "location", "action", "reason", "identity_id"),
    [pytest.param(*case[1:], id=case[0]) for case in LOOKUP_CASES],
)
def test_lookup_prints_decision(
    used_daemon: Daemon, value: str, location: str, action: str, reason: str, identity_id: str
) -> None:
    fields = lookup(used_daemon.config, value, "--location", location)

    assert fields["action"] == action
    assert fields["reason"] == reason
    assert fields["id"] == identity_id


def test_lookup_reads_stdin(used_daemon: Daemon) -> None:
    fields = lookup(used_daemon.config, "-", stdin=key_of("c-shopper") + "\n")

    assert fields["action"] == "ACCEPT"
    assert fields["id"] == "shopper-1"


def recorded_rows(database: Path) -> tuple[list[Any], list[Any]]:
    return (
        query_all(database, "SELECT * FROM decisions ORDER BY scan_event_id"),
        query_all(database, "SELECT * FROM outbox ORDER BY seq"),
    )


def test_lookup_records_nothing(used_daemon: Daemon) -> None:
    decisions, outbox = recorded_rows(used_daemon.database)

    for value in (key_of("c-shopper"), "KEY-NEVER-IMPORTED-9f9f"):
        lookup(used_daemon.config, value)

    decisions_after, outbox_after = recorded_rows(used_daemon.database)
    assert len(decisions) == DECIDED_BEFORE
    assert decisions_after == decisions
    assert outbox_after == outbox


# (text line pattern, JSON field, expected number)
STATUS_COUNTS = [
    (r"^identities:\s+(\d+)$", "identities", len(SAMPLE_RECORDS)),
    (r"^decisions kept:\s+(\d+)", "decisionsRetained", DECIDED_BEFORE),
    (r"^outbox:\s+(\d+) events", "outboxDepth", DECIDED_BEFORE),
]


@pytest.fixture(scope="module")
def status_outputs(used_daemon: Daemon) -> tuple[Any, Any]:
    """The text and the JSON output of `status`, run once for every count checked."""
    text = run_cli("status", "--config", str(used_daemon.config))
    as_json = run_cli("status", "--config", str(used_daemon.config), "--json")
    return text, as_json


@pytest.mark.parametrize(
    ("pattern", "field", "expected"), STATUS_COUNTS, ids=[case[1] for case in STATUS_COUNTS]
)
def test_status_prints_counts(
    status_outputs: tuple[Any, Any], pattern: str, field: str, expected: int
) -> None:
    text, as_json = status_outputs

    assert text.returncode == 0, text.stderr
    match = re.search(pattern, text.stdout, re.MULTILINE)
    assert match is not None, text.stdout
    assert int(match.group(1)) == expected
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)[field] == expected


def test_status_names_the_cache_file(status_outputs: tuple[Any, Any], used_daemon: Daemon) -> None:
    text, as_json = status_outputs
    (cache_file,) = cachefile.cache_files(used_daemon.database)

    assert f"cache file:     {cache_file}\n" in text.stdout
    assert json.loads(as_json.stdout)["cacheFile"] == str(cache_file)
    assert json.loads(as_json.stdout)["cacheBytes"] == cache_file.stat().st_size


# --- check-config ----------------------------------------------------------------------------

VALID_BASE = """\
[server]
host = "127.0.0.1"
port = 8080

[stores]
ids = ["STORE-001"]

[policy]
value_encoding = "auto"
max_scan_age = "5m"
"""


def replace_line(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new)


# (case, configuration text, key the message names or None, text of the line it must name)
INVALID_CONFIGS: list[tuple[str, str, str | None, str]] = [
    (
        "unknown key",
        replace_line(VALID_BASE, "port = 8080", "prot = 8080"),
        "server.prot",
        "prot = 8080",
    ),
    (
        "wrong type",
        replace_line(VALID_BASE, "port = 8080", 'port = "8080"'),
        "server.port",
        'port = "8080"',
    ),
    (
        "bad duration",
        replace_line(VALID_BASE, 'max_scan_age = "5m"', 'max_scan_age = "5 minutes"'),
        "policy.max_scan_age",
        "max_scan_age",
    ),
    (
        "duration not a string",
        replace_line(VALID_BASE, 'max_scan_age = "5m"', "max_scan_age = 300"),
        "policy.max_scan_age",
        "max_scan_age",
    ),
    (
        "bad enum",
        replace_line(VALID_BASE, 'value_encoding = "auto"', 'value_encoding = "hex"'),
        "policy.value_encoding",
        "value_encoding",
    ),
    (
        "bad synchronous mode",
        VALID_BASE + '\n[database]\nsynchronous = "off"\n',
        "database.synchronous",
        'synchronous = "off"',
    ),
    (
        "missing stores.ids",
        replace_line(VALID_BASE, 'ids = ["STORE-001"]\n', ""),
        "stores.ids",
        "[stores]",
    ),
    (
        # tomllib reports where parsing failed, which need not name a key.
        "invalid TOML",
        replace_line(VALID_BASE, "port = 8080", "port = = 8080"),
        None,
        "port = = 8080",
    ),
]


def line_number(text: str, fragment: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), start=1) if fragment in line)


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [pytest.param(*case[1:], id=case[0]) for case in INVALID_CONFIGS],
)
def test_check_config_rejects(tmp_path: Path, text: str, key: str | None, fragment: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")

    result = run_cli("check-config", str(path))

    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    if key is not None:
        assert key in result.stderr, result.stderr
    assert re.search(rf"\bline {line_number(text, fragment)}\b", result.stderr), result.stderr


def written_config(directory: Path) -> Path:
    return write_config(directory, free_port())


def example_config(directory: Path) -> Path:
    return REPO / "docs" / "examples" / "config.toml"


@pytest.mark.parametrize("make_config", [written_config, example_config], ids=["tests", "example"])
def test_check_config_accepts_valid(tmp_path: Path, make_config: Callable[[Path], Path]) -> None:
    path = make_config(tmp_path)

    result = run_cli("check-config", str(path))

    assert result.returncode == 0, result.stderr
    assert "configuration is valid" in result.stdout


@pytest.mark.parametrize("command", [["status"], ["lookup", "ANY-VALUE"]])
def test_read_command_without_database(tmp_path: Path, command: list[str]) -> None:
    config = write_config(tmp_path, free_port())
    result = run_cli(command[0], "--config", str(config), *command[1:])
    assert result.returncode == 2
    assert "not found: import identities first" in result.stderr
    assert not (tmp_path / "connector.sqlite3").exists()


def test_status_into_closed_pipe_is_quiet(config: Path, tmp_path: Path) -> None:
    records = tmp_path / "records.jsonl"
    records.write_bytes(jsonl_line(good_record(1)))
    assert import_file(config, records).returncode == 0
    command = [sys.executable, "-m", "daemon", "status", "--config", str(config)]

    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO
    ) as process:
        assert process.stdout is not None and process.stderr is not None
        process.stdout.close()  # the reader leaves before the first line, as `head -0` would
        errors = process.stderr.read().decode()
        returncode = process.wait(timeout=60)

    assert "Traceback" not in errors
    assert returncode == 141


# --- status --json errors ------------------------------------------------------------------

# Bytes that SQLite reads as neither a database header nor a valid page.
GARBAGE = bytes(range(256)) * 16


@pytest.fixture(scope="module")
def imported_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a database, its cache file and secret, to copy for each broken case."""
    directory = tmp_path_factory.mktemp("imported")
    config = write_config(directory, free_port())
    records = directory / "records.jsonl"
    records.write_bytes(jsonl_line(good_record(1)))
    assert import_file(config, records).returncode == 0
    return directory


def set_user_version(path: Path, version: int) -> None:
    connection = sqlite3.connect(path)
    try:
        connection.execute(f"PRAGMA user_version = {version}")
        connection.commit()
    finally:
        connection.close()


def cache_file_of(directory: Path) -> Path:
    (path,) = cachefile.cache_files(directory / "connector.sqlite3")
    return path


def damage(path: Path) -> None:
    """Overwrite a file after its first 100 bytes, which hold the SQLite header."""
    with path.open("r+b") as handle:
        handle.seek(100)
        handle.write(GARBAGE)


def drop_outbox(path: Path) -> None:
    connection = sqlite3.connect(path)
    try:
        connection.execute("DROP TABLE outbox")
        connection.commit()
    finally:
        connection.close()


def config_missing(directory: Path) -> Path:
    return directory / "absent.toml"


def config_is_folder(directory: Path) -> Path:
    (directory / "folder.toml").mkdir()
    return directory / "folder.toml"


def config_invalid_toml(directory: Path) -> Path:
    config = directory / "config.toml"
    config.write_text(config.read_text(encoding="utf-8") + "\nport = = 1\n", encoding="utf-8")
    return config


def config_unknown_key(directory: Path) -> Path:
    config = directory / "config.toml"
    text = config.read_text(encoding="utf-8")
    config.write_text(text.replace("[logging]\n", "[logging]\nlevle = 1\n"), encoding="utf-8")
    return config


def database_missing(directory: Path) -> Path:
    (directory / "connector.sqlite3").unlink()
    return directory / "config.toml"


def database_is_folder(directory: Path) -> Path:
    for path in directory.glob("connector.sqlite3*"):
        path.unlink()
    (directory / "connector.sqlite3").mkdir()
    return directory / "config.toml"


def database_newer(directory: Path) -> Path:
    set_user_version(directory / "connector.sqlite3", 99)
    return directory / "config.toml"


def database_older(directory: Path) -> Path:
    set_user_version(directory / "connector.sqlite3", 1)
    return directory / "config.toml"


def database_damaged(directory: Path) -> Path:
    damage(directory / "connector.sqlite3")
    return directory / "config.toml"


def database_without_table(directory: Path) -> Path:
    drop_outbox(directory / "connector.sqlite3")
    return directory / "config.toml"


def cache_file_missing(directory: Path) -> Path:
    cache_file_of(directory).unlink()
    return directory / "config.toml"


def cache_file_damaged(directory: Path) -> Path:
    damage(cache_file_of(directory))
    return directory / "config.toml"


def cache_file_newer(directory: Path) -> Path:
    set_user_version(cache_file_of(directory), 99)
    return directory / "config.toml"


def secret_missing(directory: Path) -> Path:
    (directory / "connector.sqlite3.key").unlink()
    return directory / "config.toml"


def secret_invalid(directory: Path) -> Path:
    (directory / "connector.sqlite3.key").write_text("not hex\n", encoding="ascii")
    return directory / "config.toml"


# (case, breakage, exit status, errorKind, fragment of the message)
STATUS_ERRORS: list[tuple[str, Callable[[Path], Path], int, str, str]] = [
    ("config missing", config_missing, 2, "configuration", "absent.toml not found"),
    ("config unreadable", config_is_folder, 2, "configuration", "cannot read configuration"),
    ("config invalid TOML", config_invalid_toml, 2, "configuration", "invalid TOML"),
    ("config unknown key", config_unknown_key, 2, "configuration", "logging.levle"),
    ("database missing", database_missing, 2, "database", "import identities first"),
    ("database a folder", database_is_folder, 2, "database", "is not a file"),
    ("database newer", database_newer, 2, "database", "schema version 99, newer"),
    ("database older", database_older, 2, "database", "schema version 1, older"),
    ("database damaged", database_damaged, 2, "database", "is damaged"),
    ("cache file missing", cache_file_missing, 2, "database", "is missing"),
    ("cache file damaged", cache_file_damaged, 2, "database", "is damaged"),
    ("cache file newer", cache_file_newer, 2, "database", "schema version 99, newer"),
    ("secret missing", secret_missing, 2, "database", "connector.sqlite3.key not found"),
    ("secret invalid", secret_invalid, 2, "database", "connector.sqlite3.key is invalid"),
    ("table missing", database_without_table, 1, "internal", "no such table: outbox"),
]


@pytest.mark.parametrize(
    ("breakage", "status", "kind", "fragment"),
    [pytest.param(*case[1:], id=case[0]) for case in STATUS_ERRORS],
)
def test_status_json_reports_error(
    imported_folder: Path,
    tmp_path: Path,
    breakage: Callable[[Path], Path],
    status: int,
    kind: str,
    fragment: str,
) -> None:
    directory = tmp_path / "copy"
    shutil.copytree(imported_folder, directory)
    write_config(directory, free_port())
    config = breakage(directory)

    text = run_cli("status", "--config", str(config))
    as_json = run_cli("status", "--config", str(config), "--json")

    assert as_json.returncode == status, as_json.stderr
    error = json.loads(as_json.stdout)
    assert set(error) == {"error", "errorKind"}
    assert error["errorKind"] == kind
    assert fragment in error["error"]
    assert text.returncode == status, text.stderr
    assert text.stdout == ""
    if kind == "internal":
        assert "Traceback" in as_json.stderr
        assert fragment in text.stderr
    else:
        assert "error: " not in as_json.stderr
        assert f"error: {error['error']}\n" in text.stderr


def test_status_json_without_error(imported_folder: Path, tmp_path: Path) -> None:
    directory = tmp_path / "copy"
    shutil.copytree(imported_folder, directory)
    config = write_config(directory, free_port())

    result = run_cli("status", "--config", str(config), "--json")

    assert result.returncode == 0, result.stderr
    assert "error" not in json.loads(result.stdout)


def hq_table(directory: Path) -> str:
    """An [hq] table whose HQ is never called: `status` only reads the database."""
    token = directory / "hq-token"
    token.write_text("token-for-status-only\n", encoding="utf-8")
    return f'[hq]\nurl = "http://127.0.0.1:9"\ntoken_file = "{token}"\n'


def ten_days_ahead() -> str:
    return str(time.time() + 10 * 86400)


@pytest.mark.parametrize(
    ("with_hq", "stored"),
    [
        pytest.param(False, lambda: "yesterday", id="without hq"),
        pytest.param(True, lambda: "yesterday", id="with hq"),
        pytest.param(True, ten_days_ahead, id="with hq, ten days ahead"),
    ],
)
def test_status_with_invalid_last_pull(
    imported_folder: Path, tmp_path: Path, with_hq: bool, stored: Callable[[], str]
) -> None:
    directory = tmp_path / "copy"
    shutil.copytree(imported_folder, directory)
    config = write_config(directory, free_port(), hq_table(directory) if with_hq else "")
    connection = sqlite3.connect(cache_file_of(directory))
    try:
        connection.execute(
            "INSERT INTO cache_meta (key, value) VALUES ('last_pull_at', ?)", (stored(),)
        )
        connection.commit()
    finally:
        connection.close()

    text = run_cli("status", "--config", str(config))
    as_json = run_cli("status", "--config", str(config), "--json")

    assert text.returncode == 0, text.stderr
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["lastPull"] is None
    if with_hq:
        assert "last pull:      unknown: the stored time is not a valid Unix time" in text.stdout
        assert "The next successful pull replaces it" in text.stdout
        assert "until then the cache counts as stale" in text.stdout
        assert "cache:          STALE" in text.stdout
        assert json.loads(as_json.stdout)["cacheStale"] is True


# --- import: rejected enum values ------------------------------------------------------------

# (case, format, changes to a good record, text the rejection must show, value it must not show)
ENUM_VALUE_CASES: list[tuple[str, str, dict[str, Any], str, str | None]] = [
    (
        "status from another system",
        "jsonl",
        {"status": "PAUSED"},
        "Invalid enum value 'PAUSED' at field status; use one of ACTIVE, SUSPENDED, REVOKED",
        None,
    ),
    (
        "type in lower case",
        "csv",
        {"type": "shopper"},
        "Invalid enum value 'shopper' at field type; use one of SHOPPER,",
        None,
    ),
    (
        "second channel",
        "csv",
        {"channels": ["OPTICAL", "NFC"]},
        "Invalid enum value 'NFC' at field channels[1]; use one of OPTICAL, RADIO, CONTACT",
        None,
    ),
    (
        "location of words",
        "jsonl",
        {"locations": ["Back Door"]},
        "Invalid enum value 'Back Door' at field locations[0]; use one of ENTRY,",
        None,
    ),
    (
        "key with digits as type",
        "csv",
        {"type": "QR-7731-0042"},
        "Invalid enum value at field type; use one of SHOPPER, ASSOCIATE, CASH, LOYALTY (the"
        " value is not shown",
        "QR-7731-0042",
    ),
    (
        # msgspec quotes a value with a single quote in double quotes.
        "key with a quote as status",
        "jsonl",
        {"status": "KEY'quote'secret"},
        "Invalid enum value at field status; use one of ACTIVE,",
        "quote'secret",
    ),
    (
        "key of many letters as channel",
        "jsonl",
        {"channels": ["ABCDEFGHIJKLMNOPQRSTUVWXYZ"]},
        "Invalid enum value at field channels[0]; use one of OPTICAL,",
        "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    ),
    (
        "empty status",
        "jsonl",
        {"status": ""},
        "Invalid enum value at field status, which is empty; use one of ACTIVE,",
        None,
    ),
    (
        "empty channel",
        "jsonl",
        {"channels": ["OPTICAL", ""]},
        "Invalid enum value at field channels[1], which is empty; use one of OPTICAL,",
        None,
    ),
    (
        "status of spaces",
        "csv",
        {"status": "   "},
        "Invalid enum value at field status, which contains only whitespace; use one of ACTIVE,",
        None,
    ),
    (
        "allowed status with trailing space",
        "csv",
        {"status": "ACTIVE "},
        "Invalid enum value 'ACTIVE ' at field status; remove the whitespace around ACTIVE",
        None,
    ),
    (
        "allowed location after a tab",
        "jsonl",
        {"locations": ["\tEXIT"]},
        "Invalid enum value '\\tEXIT' at field locations[0]; remove the whitespace around EXIT",
        None,
    ),
    (
        "padded type from another system",
        "jsonl",
        {"type": " Visitor "},
        "Invalid enum value ' Visitor ' at field type; use one of SHOPPER,",
        None,
    ),
    (
        "padded key as type",
        "csv",
        {"type": " QR-7731-0042 "},
        "Invalid enum value at field type; use one of SHOPPER, ASSOCIATE, CASH, LOYALTY (the"
        " value is not shown",
        "QR-7731-0042",
    ),
]


@pytest.mark.parametrize(
    ("file_format", "changes", "shown", "hidden"),
    [pytest.param(*case[1:], id=case[0]) for case in ENUM_VALUE_CASES],
)
def test_import_names_rejected_enum_value(
    config: Path, file_format: str, changes: dict[str, Any], shown: str, hidden: str | None
) -> None:
    encode = csv_line if file_format == "csv" else jsonl_line
    header = CSV_HEADER if file_format == "csv" else b""
    source = config.parent / f"records.{file_format}"
    source.write_bytes(header + encode(good_record(1, **changes)))

    result = import_file(config, source)

    assert result.returncode == 1
    (rejection,) = [line for line in result.stderr.splitlines() if ": rejected: " in line]
    assert shown in rejection
    if hidden is not None:
        assert hidden not in result.stdout + result.stderr


# --- curl-example and make run -----------------------------------------------------------------

SHOPPER_0001 = good_record(1, key="SHOPPER-0001", id="shopper-0001")
NAMED_HOST = "connector.store.example"
CURL_TIMEOUT = 20.0


def self_signed_server(directory: Path, names: list[x509.GeneralName]) -> tuple[Path, Path]:
    """Write a self-signed server certificate for ``names`` and its key; return both files."""
    return self_signed_certificate(directory, [x509.SubjectAlternativeName(names)])


def self_signed_certificate(
    directory: Path,
    extensions: list[x509.ExtensionType],
    common_name: str = "identity-connector",
    edit_der: Callable[[bytes], bytes] = lambda der: der,
) -> tuple[Path, Path]:
    """Write a self-signed server certificate with ``extensions`` and its key.

    ``edit_der`` changes the signed DER bytes, to write a certificate that no builder makes.
    """
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=7))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    certificate = builder.sign(key, hashes.SHA256())
    der = edit_der(certificate.public_bytes(serialization.Encoding.DER))
    cert_file = directory / "server.crt"
    key_file = directory / "server.key"
    cert_file.write_text(ssl.DER_cert_to_PEM_cert(der), encoding="ascii")
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)
    return cert_file, key_file


def tls_for_loopback(directory: Path) -> tuple[str, Path]:
    """A [tls] table whose certificate a CA issued for localhost, 127.0.0.1 and ::1."""
    server = CertificateAuthority(directory / "ca", "curl-ca").issue("server", server=True)
    table = f'[tls]\ncert_file = "{server.cert_file}"\nkey_file = "{server.key_file}"\n'
    return table, server.cert_file


def tls_for_host_name(directory: Path) -> tuple[str, Path]:
    """A [tls] table whose self-signed certificate names only NAMED_HOST."""
    cert_file, key_file = self_signed_server(directory / "named", [x509.DNSName(NAMED_HOST)])
    return f'[tls]\ncert_file = "{cert_file}"\nkey_file = "{key_file}"\n', cert_file


def curl_example(config: Path) -> str:
    result = run_cli("curl-example", "--config", str(config))
    assert result.returncode == 0, result.stderr
    return result.stdout


def set_host(config: Path, host: str) -> None:
    text = config.read_text(encoding="utf-8")
    config.write_text(text.replace('host = "127.0.0.1"', f'host = "{host}"'), encoding="utf-8")


def test_curl_example_plain_http(tmp_path: Path) -> None:
    config = write_config(tmp_path, 18123)

    command = curl_example(config)

    assert "curl -s http://127.0.0.1:18123/v1/identity/scan \\\n" in command
    assert "--cacert" not in command
    assert '"storeId": "STORE-001"' in command


def test_curl_example_tls_names_address(tmp_path: Path) -> None:
    table, cert_file = tls_for_loopback(tmp_path)
    config = write_config(tmp_path, 18124, table)

    command = curl_example(config)

    assert "curl -s https://127.0.0.1:18124/v1/identity/scan \\\n" in command
    assert f"  --cacert {cert_file} \\\n" in command
    assert "--connect-to" not in command


def test_curl_example_tls_names_host(tmp_path: Path) -> None:
    table, _cert_file = tls_for_host_name(tmp_path)
    config = write_config(tmp_path, 18125, table)

    command = curl_example(config)

    assert f"curl -s https://{NAMED_HOST}:18125/v1/identity/scan \\\n" in command
    assert f"  --connect-to {NAMED_HOST}:18125:127.0.0.1:18125 \\\n" in command


def test_curl_example_any_port(tmp_path: Path) -> None:
    config = write_config(tmp_path, 0)

    command = curl_example(config)

    assert "curl -s http://127.0.0.1:PORT/v1/identity/scan" in command
    assert command.startswith("# [server] port = 0 takes any free port: replace PORT")


def test_curl_example_ipv6_host(tmp_path: Path) -> None:
    config = write_config(tmp_path, 18126)
    set_host(config, "::1")

    command = curl_example(config)

    assert "curl -s 'http://[::1]:18126/v1/identity/scan' \\\n" in command


def test_curl_example_client_certificate(tmp_path: Path) -> None:
    table, _cert_file = tls_for_loopback(tmp_path)
    client_ca = CertificateAuthority(tmp_path / "clients", "client-ca")
    table += f'client_ca_file = "{client_ca.cert_file}"\n'
    config = write_config(tmp_path, 18127, table)

    command = curl_example(config)

    assert "  --cert CLIENT.crt --key CLIENT.key \\\n" in command
    assert "# [tls] client_ca_file is set: replace CLIENT.crt and CLIENT.key" in command


def test_curl_example_api_key(tmp_path: Path) -> None:
    key_file = write_api_key(tmp_path / "keys" / "gateway", "curl-example-key-5d0c7a")
    config = write_config(tmp_path, 18128, f'[auth]\napi_key_files = ["{key_file}"]\n')

    command = curl_example(config)

    assert f"""  -H @<(printf '%s: %s\\n' x-api-key "$(cat {key_file})") \\\n""" in command
    assert "curl-example-key-5d0c7a" not in command


# --- curl-example: notes, wildcard names and damaged certificates ----------------------------

WILDCARD_HOST = "connector.store.example"
# A subjectAltName extension whose DER ends early: cryptography raises ValueError on it.
TRUNCATED_SAN = x509.UnrecognizedExtension(
    x509.oid.ExtensionOID.SUBJECT_ALTERNATIVE_NAME, b"\x30\x03\x82\x05ab"
)
# The DER of the OIDs of issuerAltName (2.5.29.18) and subjectAltName (2.5.29.17).
ISSUER_ALT_NAME_OID = bytes.fromhex("0603551d12")
SUBJECT_ALT_NAME_OID = bytes.fromhex("0603551d11")


def tls_table(cert_file: Path, key_file: Path) -> str:
    return (
        f"[tls]\ncert_file = {json.dumps(str(cert_file))}\nkey_file = {json.dumps(str(key_file))}\n"
    )


def wildcard_config(pattern: str, host: str) -> Callable[[Path], Path]:
    """Return a builder of a TLS configuration listening on ``host``, certified for ``pattern``."""

    def build(directory: Path) -> Path:
        cert_file, key_file = self_signed_server(directory / "tls", [x509.DNSName(pattern)])
        config = write_config(directory, 18140, tls_table(cert_file, key_file))
        set_host(config, host)
        return config

    return build


def damaged_san_config(directory: Path) -> Path:
    cert_file, key_file = self_signed_certificate(directory / "tls", [TRUNCATED_SAN])
    return write_config(directory, 18141, tls_table(cert_file, key_file))


def duplicate_san_config(directory: Path) -> Path:
    cert_file, key_file = self_signed_certificate(
        directory / "tls",
        [
            x509.SubjectAlternativeName([x509.DNSName(NAMED_HOST)]),
            x509.IssuerAlternativeName([x509.DNSName(NAMED_HOST)]),
        ],
        edit_der=lambda der: der.replace(ISSUER_ALT_NAME_OID, SUBJECT_ALT_NAME_OID),
    )
    return write_config(directory, 18142, tls_table(cert_file, key_file))


def api_key_config(directory: Path) -> Path:
    key_file = write_api_key(directory / "keys" / "gateway", "curl-example-key-0b77e2")
    return write_config(directory, 18143, f'[auth]\napi_key_files = ["{key_file}"]\n')


def plain_config(directory: Path) -> Path:
    return write_config(directory, 18144)


# (case, configuration builder, URL the command calls, texts of `#` notes, texts of no note)
CURL_NOTE_CASES: list[tuple[str, Callable[[Path], Path], str, list[str], list[str]]] = [
    (
        "wildcard names the host",
        wildcard_config("*.store.example", WILDCARD_HOST),
        f"https://{WILDCARD_HOST}:18140/v1/identity/scan",
        [],
        ["curl rejects it", "--connect-to"],
    ),
    (
        "wildcard with capitals and a final dot",
        wildcard_config("*.Store.Example.", WILDCARD_HOST.upper()),
        f"https://{WILDCARD_HOST.upper()}:18140/v1/identity/scan",
        [],
        ["curl rejects it"],
    ),
    (
        "wildcard of one dot",
        wildcard_config("*.example", "connector.example"),
        "https://connector.example:18140/v1/identity/scan",
        ["names neither connector.example nor a host name without a wildcard, so curl rejects"],
        [],
    ),
    (
        "wildcard for two labels",
        wildcard_config("*.store.example", f"gate.{WILDCARD_HOST}"),
        f"https://gate.{WILDCARD_HOST}:18140/v1/identity/scan",
        ["so curl rejects it"],
        [],
    ),
    (
        "wildcard for an IP address",
        wildcard_config("*.store.example", "127.0.0.1"),
        "https://127.0.0.1:18140/v1/identity/scan",
        ["names neither 127.0.0.1 nor a host name without a wildcard, so curl rejects it"],
        [],
    ),
    (
        "subjectAltName that does not parse",
        damaged_san_config,
        "https://127.0.0.1:18141/v1/identity/scan",
        ["cannot read the names in the certificate", "fix [tls] cert_file"],
        [],
    ),
    (
        "subjectAltName twice",
        duplicate_san_config,
        "https://127.0.0.1:18142/v1/identity/scan",
        ["cannot read the names in the certificate", "Duplicate 2.5.29.17 extension"],
        [],
    ),
    (
        "api key needs bash",
        api_key_config,
        "http://127.0.0.1:18143/v1/identity/scan",
        ["run this command in bash", "sh (dash) rejects"],
        [],
    ),
    (
        "plain http needs no bash",
        plain_config,
        "http://127.0.0.1:18144/v1/identity/scan",
        [],
        ["bash"],
    ),
]


@pytest.mark.parametrize(
    ("build", "url", "notes", "absent"),
    [pytest.param(*case[1:], id=case[0]) for case in CURL_NOTE_CASES],
)
def test_curl_example_notes(
    tmp_path: Path,
    build: Callable[[Path], Path],
    url: str,
    notes: list[str],
    absent: list[str],
) -> None:
    command = curl_example(build(tmp_path))

    comments = "\n".join(line for line in command.splitlines() if line.startswith("#"))
    assert f"curl -s {url} \\\n" in command
    for note in notes:
        assert note in comments
    for text in absent:
        assert text not in command
    if not notes:
        assert comments == ""


# --- curl-example: values that a shell would run ----------------------------------------------

# Each run of a printed command in these tests creates this file if the shell runs a
# command hidden in a configuration value or a certificate name.
INJECTED_FILE = "INJECTED"
# Replaces curl: it writes its arguments, each ended by a NUL byte, to $CURL_ARGUMENTS,
# and the file that an -H @FILE argument names to $CURL_HEADERS.
FAKE_CURL = """#!/bin/bash
for argument in "$@"; do
    printf '%s\\0' "$argument" >> "$CURL_ARGUMENTS"
    case $argument in
        @*) cat "${argument#@}" >> "$CURL_HEADERS" ;;
    esac
done
"""


def host_config(host: str) -> Callable[[Path], Path]:
    """Return a builder of a plain configuration whose [server] host is ``host``."""

    def build(directory: Path) -> Path:
        config = write_config(directory, 18150)
        text = config.read_text(encoding="utf-8")
        config.write_text(
            text.replace('host = "127.0.0.1"', f"host = {json.dumps(host)}"), encoding="utf-8"
        )
        return config

    return build


def certificate_names_config(names: list[str]) -> Callable[[Path], Path]:
    """Return a builder of a TLS configuration whose certificate has these DNS names."""

    def build(directory: Path) -> Path:
        dns_names: list[x509.GeneralName] = [x509.DNSName(name) for name in names]
        cert_file, key_file = self_signed_server(directory / "tls", dns_names)
        return write_config(directory, 18151, tls_table(cert_file, key_file))

    return build


def common_name_config(directory: Path) -> Path:
    cert_file, key_file = self_signed_certificate(
        directory / "tls", [], common_name=f"box\ntouch {INJECTED_FILE};"
    )
    return write_config(directory, 18152, tls_table(cert_file, key_file))


def quoted_cert_file_config(directory: Path) -> Path:
    cert_file, key_file = self_signed_server(
        directory / f"it's $(touch {INJECTED_FILE})", [x509.IPAddress(IPv4Address("127.0.0.1"))]
    )
    return write_config(directory, 18153, tls_table(cert_file, key_file))


def quoted_api_key_config(directory: Path) -> Path:
    key_file = write_api_key(
        directory / f"key's `touch {INJECTED_FILE}`" / "gateway", "curl-example-key-4e19aa"
    )
    auth = (
        '[auth]\napi_key_header = "x-key-$HOME-`true`"\n'
        f"api_key_files = {json.dumps([str(key_file)])}\n"
    )
    return write_config(directory, 18154, auth)


# (case, configuration builder, arguments curl must get, header lines it must read, notes)
CURL_SHELL_CASES: list[tuple[str, Callable[[Path], Path], list[str], str, list[str]]] = [
    (
        "host with a semicolon",
        host_config(f"box;touch {INJECTED_FILE};"),
        ["http://HOST:18150/v1/identity/scan"],
        "",
        [f"[server] host = 'box;touch {INJECTED_FILE};' is neither a host name nor an IP"],
    ),
    (
        "host with a command substitution",
        host_config(f"$(touch {INJECTED_FILE})"),
        ["http://HOST:18150/v1/identity/scan"],
        "",
        ["replace HOST with the address the daemon listens on"],
    ),
    (
        "host with a line break",
        host_config(f"box\ntouch {INJECTED_FILE};"),
        ["http://HOST:18150/v1/identity/scan"],
        "",
        [f"[server] host = 'box\\ntouch {INJECTED_FILE};'"],
    ),
    (
        "certificate name with a semicolon",
        certificate_names_config([f"box;touch {INJECTED_FILE};", NAMED_HOST]),
        [
            f"https://{NAMED_HOST}:18151/v1/identity/scan",
            f"{NAMED_HOST}:18151:127.0.0.1:18151",
        ],
        "",
        [f"names 'box;touch {INJECTED_FILE};', which the command leaves out"],
    ),
    (
        "certificate name with backquotes only",
        certificate_names_config([f"`touch {INJECTED_FILE}`"]),
        ["https://127.0.0.1:18151/v1/identity/scan"],
        "",
        [f"names '`touch {INJECTED_FILE}`', which the command leaves out", "curl rejects it"],
    ),
    (
        "common name with a line break",
        common_name_config,
        ["https://127.0.0.1:18152/v1/identity/scan"],
        "",
        [f"names 'box\\ntouch {INJECTED_FILE};', which the command leaves out"],
    ),
    (
        "certificate file with a quote",
        quoted_cert_file_config,
        ["https://127.0.0.1:18153/v1/identity/scan", "--cacert"],
        "",
        [],
    ),
    (
        "api key file with a quote",
        quoted_api_key_config,
        ["http://127.0.0.1:18154/v1/identity/scan"],
        "x-key-$HOME-`true`: curl-example-key-4e19aa\n",
        ["run this command in bash"],
    ),
]


@pytest.mark.parametrize(
    ("build", "arguments", "headers", "notes"),
    [pytest.param(*case[1:], id=case[0]) for case in CURL_SHELL_CASES],
)
def test_curl_example_blocks_injection(
    tmp_path: Path,
    build: Callable[[Path], Path],
    arguments: list[str],
    headers: str,
    notes: list[str],
) -> None:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "curl").write_text(FAKE_CURL, encoding="utf-8")
    (fake_bin / "curl").chmod(0o755)
    (tmp_path / "config").mkdir()
    command = curl_example(build(tmp_path / "config"))
    work = tmp_path / "work"
    work.mkdir()
    environment = {
        **os.environ,
        "PATH": f"{fake_bin}:{os.environ['PATH']}",
        "CURL_ARGUMENTS": str(tmp_path / "arguments"),
        "CURL_HEADERS": str(tmp_path / "headers"),
    }

    result = subprocess.run(
        ["bash", "-c", command], cwd=work, env=environment, capture_output=True, text=True
    )

    assert not (work / INJECTED_FILE).exists()
    assert list(work.iterdir()) == []
    assert result.returncode == 0, result.stderr
    received = (tmp_path / "arguments").read_text(encoding="utf-8").split("\0")[:-1]
    for argument in arguments:
        assert argument in received
    if "--cacert" in arguments:
        cert_file = received[received.index("--cacert") + 1]
        assert Path(cert_file).is_file()
    if headers:
        assert (tmp_path / "headers").read_text(encoding="utf-8") == headers
    comments = [line for line in command.splitlines() if line.startswith("#")]
    for note in notes:
        assert any(note in comment for comment in comments), comments


def run_until_answered(command: str) -> subprocess.CompletedProcess[str]:
    """Run a printed curl command until the listener answers it, for up to CURL_TIMEOUT."""
    deadline = time.monotonic() + CURL_TIMEOUT
    while True:
        result = subprocess.run(
            ["bash", "-c", command], capture_output=True, text=True, timeout=CURL_TIMEOUT
        )
        # curl exits 7 while nothing listens on the port yet.
        if result.returncode != 7 or time.monotonic() > deadline:
            return result
        time.sleep(0.2)


def no_tls(directory: Path) -> tuple[str, Path | None]:
    return "", None


def tls_host_name_and_api_key(directory: Path) -> tuple[str, Path | None]:
    table, cert_file = tls_for_host_name(directory)
    key_file = write_api_key(directory / "keys" / "gateway", "curl-example-key-91ab3e")
    return table + f'\n[auth]\napi_key_files = ["{key_file}"]\n', cert_file


LISTENERS: list[tuple[str, Callable[[Path], tuple[str, Path | None]]]] = [
    ("plain", no_tls),
    ("tls", tls_for_loopback),
    ("tls for a host name, api key", tls_host_name_and_api_key),
]
needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


@needs_curl
@pytest.mark.parametrize("listener", [pytest.param(case[1], id=case[0]) for case in LISTENERS])
def test_curl_example_gets_accept(
    tmp_path: Path, listener: Callable[[Path], tuple[str, Path | None]]
) -> None:
    table, _cert_file = listener(tmp_path)
    daemon = make_daemon(tmp_path / "daemon", table, records=[SHOPPER_0001])
    command = curl_example(daemon.config)
    daemon.start(wait=False)
    try:
        result = run_until_answered(command)
    finally:
        daemon.stop()

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["action"] == "ACCEPT"


def make_would_install() -> bool:
    """Return whether `make run` would install packages first: its stamp is out of date."""
    query = subprocess.run(["make", "-q", ".venv/.installed-run"], cwd=REPO, check=False)
    return query.returncode != 0


@needs_curl
@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_run_prints_working_curl(tmp_path: Path) -> None:
    if make_would_install():
        pytest.skip("the virtual environment's stamp is out of date, so make would install")
    table, cert_file = tls_for_loopback(tmp_path)
    config = write_config(tmp_path, free_port(), table)
    output = tmp_path / "make-run.out"

    with output.open("wb") as sink:
        process = subprocess.Popen(
            ["make", "-s", "run", f"CONFIG={config}"],
            cwd=REPO,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        printed = wait_for_curl_command(output, process)
        result = run_until_answered(printed)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)

    assert f"--cacert {cert_file}" in printed
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["action"] == "ACCEPT"


def wait_for_curl_command(output: Path, process: subprocess.Popen[bytes]) -> str:
    """Return the curl command that `make run` printed, from its first line to the -d line."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        lines = output.read_text(encoding="utf-8", errors="replace").splitlines()
        starts = [n for n, line in enumerate(lines) if line.startswith("curl ")]
        ends = [n for n, line in enumerate(lines) if line.startswith("  -d '")]
        if starts and ends:
            return "\n".join(lines[starts[0] : ends[0] + 1])
        assert process.poll() is None, "\n".join(lines)
        time.sleep(0.1)
    raise AssertionError(f"make run printed no curl command:\n{output.read_text()}")


# --- messages and files as store IT meets them -----------------------------------------------


def test_version_option() -> None:
    result = run_cli("--version")

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"identity-connector {metadata.version('identity-connector')}\n"


def test_status_shows_version(imported_folder: Path, tmp_path: Path) -> None:
    directory = tmp_path / "copy"
    shutil.copytree(imported_folder, directory)
    config = write_config(directory, free_port())
    version = metadata.version("identity-connector")

    text = run_cli("status", "--config", str(config))
    as_json = run_cli("status", "--config", str(config), "--json")

    assert text.returncode == 0, text.stderr
    assert f"version:        {version}\n" in text.stdout
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["version"] == version


def add_outbox_events(path: Path, count: int) -> None:
    connection = sqlite3.connect(path)
    try:
        connection.executemany(
            "INSERT INTO outbox (event_id, created_at, body) VALUES (?, ?, ?)",
            [(f"event-{index}", time.time(), b"{}") for index in range(count)],
        )
        connection.commit()
    finally:
        connection.close()


@pytest.mark.parametrize(("events", "shown"), [(1, "1 event kept"), (2, "2 events kept")])
def test_status_outbox_number_agreement(
    imported_folder: Path, tmp_path: Path, events: int, shown: str
) -> None:
    directory = tmp_path / "copy"
    shutil.copytree(imported_folder, directory)
    config = write_config(directory, free_port())
    add_outbox_events(directory / "connector.sqlite3", events)

    result = run_cli("status", "--config", str(config))

    assert result.returncode == 0, result.stderr
    assert f"outbox:         {shown}, none sent" in result.stdout


# (records imported after records 1 and 2, fragments the summary must contain)
SUMMARY_NUMBER_CASES = [
    pytest.param(
        [good_record(3, key="KEY-CLI-GOOD-1"), good_record(3, key="KEY-CLI-GOOD-1", id="p-3")],
        [
            "; 1 older credential gave up its key",
            "; 1 line repeated the credentialId of an earlier line (at line 2), and that later"
            " line was imported",
        ],
        id="one",
    ),
    pytest.param(
        [
            good_record(3, key="KEY-CLI-GOOD-1"),
            good_record(4, key="KEY-CLI-GOOD-2"),
            good_record(3, key="KEY-CLI-GOOD-1", id="p-3"),
            good_record(4, key="KEY-CLI-GOOD-2", id="p-4"),
        ],
        [
            "; 2 older credentials gave up their key",
            "; 2 lines repeated the credentialId of an earlier line (first at line 3), and the"
            " last line of each was imported",
        ],
        id="two",
    ),
]


@pytest.mark.parametrize(("records", "fragments"), SUMMARY_NUMBER_CASES)
def test_import_summary_number_agreement(
    config: Path, records: list[dict[str, Any]], fragments: list[str]
) -> None:
    first = config.parent / "first.jsonl"
    first.write_bytes(b"".join(jsonl_line(good_record(n)) for n in (1, 2)))
    second = config.parent / "second.jsonl"
    second.write_bytes(b"".join(jsonl_line(r) for r in records))
    assert import_file(config, first).returncode == 0

    result = import_file(config, second)

    assert result.returncode == 0, result.stderr
    for fragment in fragments:
        assert fragment in result.stdout


@pytest.mark.parametrize("command", [["status", "--config"], ["check-config"]])
def test_missing_config_names_installed_files(tmp_path: Path, command: list[str]) -> None:
    missing = tmp_path / "absent.toml"

    result = run_cli(*command, str(missing))

    assert result.returncode == 2
    assert f"configuration file {missing} not found" in result.stderr
    assert f"cp /opt/identity-connector/config.toml.example {missing}" in result.stderr
    assert "systemd/config.toml" in result.stderr
    assert "/etc/identity-connector/config.toml" in result.stderr
    assert "/opt/identity-connector/README.md" in result.stderr


def test_secret_permission_warning_gives_chmod(imported_folder: Path, tmp_path: Path) -> None:
    directory = tmp_path / "copy"
    shutil.copytree(imported_folder, directory)
    config = write_config(directory, free_port())
    secret = directory / "connector.sqlite3.key"
    secret.chmod(0o644)

    result = run_cli("status", "--config", str(config))

    assert result.returncode == 0, result.stderr
    warnings = [
        json.loads(line)
        for line in result.stderr.splitlines()
        if "store.secret_permissions" in line
    ]
    assert len(warnings) == 1, result.stderr
    assert warnings[0]["fix"] == f"chmod 0600 {secret}"


def run_cli_with_umask_022(*args: str) -> subprocess.CompletedProcess[str]:
    """Run a command with umask 0022, the usual umask of a shell that runuser or sudo keeps."""
    return subprocess.run(
        ["sh", "-c", 'umask 022 && exec "$@"', "sh", sys.executable, "-m", "daemon", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


def test_commands_create_owner_only_files(tmp_path: Path) -> None:
    # Nothing listens on this loopback port, so `sync --now` fails after it takes its lock.
    config = write_config(tmp_path, free_port(), f'[hq]\nurl = "http://127.0.0.1:{free_port()}"\n')
    records = tmp_path / "records.jsonl"
    records.write_bytes(jsonl_line(good_record(1)))

    imported = run_cli_with_umask_022("import", "--config", str(config), str(records))
    synced = run_cli_with_umask_022("sync", "--now", "--config", str(config))

    assert imported.returncode == 0, imported.stderr
    assert synced.returncode == 1, synced.stderr
    database = database_of(config)
    created = sorted(database.parent.glob(f"{database.name}*"))
    names = [path.name for path in created]
    assert database.name in names
    assert f"{database.name}.key" in names
    assert f"{database.name}.sync-lock" in names
    assert any(".cache-" in name for name in names), names
    for path in created:
        assert (path.name, stat.S_IMODE(path.stat().st_mode)) == (path.name, 0o600)


# --- as another user, and on a full disk (root only) ------------------------------------------


def nobody_command(*args: str) -> list[str]:
    """Return the command line that runs ``args`` as the user nobody with no other groups."""
    entry = pwd.getpwnam("nobody")
    return [
        "setpriv",
        f"--reuid={entry.pw_uid}",
        f"--regid={entry.pw_gid}",
        "--clear-groups",
        *args,
    ]


def run_cli_as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        nobody_command(sys.executable, "-m", "daemon", *args),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


@pytest.fixture
def nobody_folder() -> Iterator[Path]:
    """A folder owned by the user nobody, which that user can reach, for commands run as it."""
    if os.geteuid() != 0:
        pytest.skip("running a command as another user needs root")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("this system has no user nobody")
    probe = subprocess.run(
        nobody_command(sys.executable, "-c", "import daemon.cli"),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    if probe.returncode != 0:
        pytest.skip(f"the user nobody cannot run {sys.executable}: {probe.stderr.strip()}")
    # pytest's temporary folders lie below a folder that only root may enter.
    directory = Path(tempfile.mkdtemp(prefix="cli-as-nobody-"))
    try:
        os.chown(directory, entry.pw_uid, entry.pw_gid)
        directory.chmod(0o755)
        yield directory
    finally:
        shutil.rmtree(directory)


def config_readable_by_root_only(directory: Path) -> tuple[Path, list[str]]:
    config = directory / "config.toml"
    config.chmod(0o600)
    return config, [
        f"cannot read configuration file {config}: permission denied for user nobody",
        "owner root:root and mode 0600",
        f"chown root:identity-connector {config}; chmod 0640 {config}",
        "runuser -u identity-connector --",
    ]


def secret_owned_by_root(directory: Path) -> tuple[Path, list[str]]:
    secret = directory / "state" / "connector.sqlite3.key"
    os.chown(secret, 0, 0)
    return directory / "config.toml", [
        f"cannot read secret file {secret}: permission denied for user nobody",
        "owner root:root and mode 0600",
        f"chown identity-connector:identity-connector {secret}; chmod 0600 {secret}",
    ]


def database_folder_closed(directory: Path) -> tuple[Path, list[str]]:
    folder = directory / "state"
    os.chown(folder, 0, 0)
    folder.chmod(0o700)
    return directory / "config.toml", [
        f"cannot access file {folder / 'connector.sqlite3'}: permission denied for user nobody",
        "a folder above the file does not let that user in",
        f"namei -l {folder / 'connector.sqlite3'}",
    ]


@pytest.mark.parametrize(
    "breakage", [config_readable_by_root_only, secret_owned_by_root, database_folder_closed]
)
def test_unreadable_file_names_user_and_fix(
    nobody_folder: Path, breakage: Callable[[Path], tuple[Path, list[str]]]
) -> None:
    config = write_config(nobody_folder, free_port())
    database = nobody_folder / "state" / "connector.sqlite3"
    text = config.read_text(encoding="utf-8")
    config.write_text(
        text.replace(str(nobody_folder / "connector.sqlite3"), str(database)), encoding="utf-8"
    )
    records = nobody_folder / "records.jsonl"
    records.write_bytes(jsonl_line(good_record(1)))
    imported = run_cli_as_nobody("import", "--config", str(config), str(records))
    assert imported.returncode == 0, imported.stderr
    config, fragments = breakage(nobody_folder)

    result = run_cli_as_nobody("status", "--config", str(config))

    assert result.returncode == 2, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


@pytest.fixture
def small_tmpfs() -> Iterator[Path]:
    """A 1 MiB tmpfs mounted on a new folder, unmounted and removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount_point = Path(tempfile.mkdtemp(prefix="cli-small-tmpfs-"))
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        mount_point.rmdir()
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)
        mount_point.rmdir()


def fill_file_system(folder: Path) -> None:
    """Write zeros into a new file in ``folder`` until its file system has no space left."""
    descriptor = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    block = bytes(4096)
    try:
        while True:
            os.write(descriptor, block)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(descriptor)


@pytest.mark.parametrize("command", ["status", "import"])
def test_full_disk_says_disk_is_full(small_tmpfs: Path, tmp_path: Path, command: str) -> None:
    config = write_config(small_tmpfs, free_port())
    records = tmp_path / "records.jsonl"
    records.write_bytes(jsonl_line(good_record(1)))
    assert import_file(config, records).returncode == 0
    fill_file_system(small_tmpfs)
    arguments = [str(records)] if command == "import" else []

    result = run_cli(command, "--config", str(config), *arguments)

    assert result.returncode == 2, result.stderr
    assert f"cannot open database {database_of(config)}" in result.stderr
    assert f"The file system of {small_tmpfs} is full: 0 bytes free of 1.0 MiB" in result.stderr
    assert "Free space on it" in result.stderr
    assert "names a database file" not in result.stderr


def test_full_disk_leaves_no_partial_secret(small_tmpfs: Path, tmp_path: Path) -> None:
    secret = small_tmpfs / "connector.key"
    config = write_config(tmp_path, free_port())
    text = config.read_text(encoding="utf-8")
    assert "[database]\n" in text
    config.write_text(
        text.replace("[database]\n", f'[database]\nsecret_file = "{secret}"\n'), encoding="utf-8"
    )
    records = tmp_path / "records.jsonl"
    records.write_bytes(jsonl_line(good_record(1)))
    fill_file_system(small_tmpfs)

    result = import_file(config, records)

    assert result.returncode == 2, result.stderr
    assert f"cannot create secret file {secret}" in result.stderr
    assert f"The file system of {small_tmpfs} is full" in result.stderr
    assert not secret.exists()
