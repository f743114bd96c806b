"""`identity-connector import` on files as retailers export them, right or wrong.

Each case writes a real file, runs the command as a subprocess against a real SQLite
database in a temporary folder, and checks the exit code, the message and what was imported.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import io
import json
import lzma
import os
import subprocess
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from daemon.identities import BATCH_SIZE
from tests.conftest import free_port, write_config
from tests.helpers_store import count_rows, query_one
from tests.test_cli import CSV_HEADER, csv_line, database_of, import_file, jsonl_line
from tests.test_cli import good_record as cli_record

# Every key in these files starts with this, so a printed key is easy to find.
KEY_PREFIX = "KEY-IMPORT-"


def good_record(number: int, **changes: Any) -> dict[str, Any]:
    return cli_record(number, **{"key": f"{KEY_PREFIX}{number}", **changes})


def csv_file(header: str, rows: list[list[str]], separator: str = ",") -> bytes:
    lines = [header, *(separator.join(row) for row in rows)]
    return "".join(line + "\n" for line in lines).encode()


# The cells of good_record(1) and good_record(2) in the columns of REQUIRED_HEADER.
ROW_1 = ["c-good-1", f"{KEY_PREFIX}1", "person-1", "SHOPPER", "ACTIVE", "STORE-001"]
ROW_2 = ["c-good-2", f"{KEY_PREFIX}2", "person-2", "SHOPPER", "ACTIVE", "STORE-001"]
REQUIRED_HEADER = "credentialId,key,id,type,status,stores"
GOOD_CSV = CSV_HEADER + csv_line(good_record(1)) + csv_line(good_record(2))
GOOD_JSONL = jsonl_line(good_record(1)) + jsonl_line(good_record(2))
# The row Excel writes for a formatted but empty row of CSV_HEADER's 11 columns.
EMPTY_CSV_ROW = b"," * 10 + b"\r\n"
# Python's csv module reads a cell of at most this many characters.
CSV_CELL_LIMIT = 131_072


def zip_of(name: str, content: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(name, content)
    return buffer.getvalue()


def file_with(name: str, content: bytes) -> Callable[[Path], Path]:
    def write(directory: Path) -> Path:
        path = directory / name
        path.write_bytes(content)
        return path

    return write


def folder(directory: Path) -> Path:
    path = directory / "exports"
    path.mkdir()
    (path / "records.csv").write_bytes(GOOD_CSV)
    return path


def named_pipe(directory: Path) -> Path:
    path = directory / "records.csv"
    os.mkfifo(path)
    return path


# (case, file maker, exit code, message on standard error, identities imported). The test
# replaces "{path}" in the message with the file's path, and "{folder}" with its folder.
CASES: list[tuple[str, Callable[[Path], Path], int, str, int]] = [
    (
        "repeated column",
        file_with("records.csv", csv_file(REQUIRED_HEADER + ",key", [[*ROW_1, "KEY-IMPORT-9"]])),
        2,
        "error: {path}:1: invalid CSV header. The column key appears 2 times (columns 2 and 7)",
        0,
    ),
    (
        "misspelt required columns",
        file_with(
            "records.csv",
            csv_file("credentialID, key,id,type,status,stores", [ROW_1]),
        ),
        2,
        "error: {path}:1: invalid CSV header. The required columns credentialId and key are"
        " missing. Rename column 1 'credentialID' to credentialId and column 2 ' key' to key,",
        0,
    ),
    (
        "misspelt optional column",
        file_with(
            "records.csv", csv_file(REQUIRED_HEADER + ",valid_until", [[*ROW_1, "2027-01-01"]])
        ),
        2,
        "error: {path}:1: invalid CSV header. Rename column 7 'valid_until' to validUntil,",
        0,
    ),
    (
        "column in two spellings",
        file_with("records.csv", csv_file(REQUIRED_HEADER + ",Key", [[*ROW_1, "KEY-IMPORT-9"]])),
        2,
        "error: {path}:1: invalid CSV header. Remove column 7 'Key', because column 2 is key",
        0,
    ),
    (
        "header after blank lines",
        file_with("records.csv", b"\n\r\n" + GOOD_CSV),
        0,
        "",
        2,
    ),
    (
        "separated by semicolons",
        file_with("records.csv", csv_file(REQUIRED_HEADER.replace(",", ";"), [ROW_1], ";")),
        2,
        "error: {path}:1: the header separates its column names with semicolons",
        0,
    ),
    (
        "separated by tabs",
        file_with("records.csv", csv_file(REQUIRED_HEADER.replace(",", "\t"), [ROW_1], "\t")),
        2,
        "error: {path}:1: the header separates its column names with tabs",
        0,
    ),
    (
        "no header",
        file_with("records.csv", csv_line(good_record(1)) + csv_line(good_record(2))),
        2,
        "error: {path}:1: this line names none of the record fields, but it must be the header",
        0,
    ),
    (
        "header quote never closed",
        file_with("records.csv", b'credentialId,"key,id\n' + csv_line(good_record(1))),
        2,
        "error: {path}:1: invalid CSV header: a quote opened in this record is never closed",
        0,
    ),
    (
        "header not UTF-8",
        file_with(
            "records.csv",
            csv_file(REQUIRED_HEADER + ",Gültig", [[*ROW_1, "ja"]]).replace(
                "ü".encode(), "ü".encode("latin-1")
            ),
        ),
        2,
        "error: {path}:1: the header is not valid UTF-8: save it as UTF-8 text",
        0,
    ),
    (
        "JSON Lines named .csv",
        file_with("records.csv", GOOD_JSONL),
        2,
        "error: {path}:1: this line is a JSON object, not a CSV header: import the file with"
        " --format jsonl",
        0,
    ),
    (
        "CSV named .txt",
        file_with("records.txt", GOOD_CSV),
        2,
        "error: {path}:1: this line is a CSV header, not a JSON record: import the file with"
        " --format csv",
        0,
    ),
    (
        "CSV named .txt after blank lines",
        file_with("records.txt", b"\n" + GOOD_CSV),
        2,
        "error: {path}:2: this line is a CSV header",
        0,
    ),
    (
        "gzip",
        file_with("records.csv.gz", gzip.compress(GOOD_CSV)),
        2,
        "error: {path}: the file is gzip-compressed: decompress it (gunzip)",
        0,
    ),
    (
        "gzip named .csv",
        file_with("records.csv", gzip.compress(GOOD_CSV)),
        2,
        "error: {path}: the file is gzip-compressed",
        0,
    ),
    (
        "bzip2",
        file_with("records.csv.bz2", bz2.compress(GOOD_CSV)),
        2,
        "error: {path}: the file is bzip2-compressed: decompress it (bunzip2) and import the"
        " result. Nothing was imported.",
        0,
    ),
    (
        "xz",
        file_with("records.jsonl.xz", lzma.compress(GOOD_JSONL)),
        2,
        "error: {path}: the file is xz-compressed",
        0,
    ),
    (
        # The zstd frame magic number; Python 3.11 has no zstd compressor to write a whole frame.
        "zstd",
        file_with("records.jsonl.zst", b"\x28\xb5\x2f\xfd" + bytes(16)),
        2,
        "error: {path}: the file is zstd-compressed",
        0,
    ),
    (
        "ZIP archive",
        file_with("records.zip", zip_of("records.csv", GOOD_CSV)),
        2,
        "error: {path}: the file is a ZIP archive, as an Excel workbook (.xlsx) is",
        0,
    ),
    (
        # Excel's "Unicode Text" is UTF-16, little-endian, with a byte order mark.
        "UTF-16 little-endian",
        file_with("records.csv", codecs.BOM_UTF16_LE + GOOD_CSV.decode().encode("utf-16-le")),
        2,
        "error: {path}: the file is UTF-16 text (it starts with the byte order mark FF FE)",
        0,
    ),
    (
        "UTF-16 big-endian",
        file_with("records.jsonl", codecs.BOM_UTF16_BE + GOOD_JSONL.decode().encode("utf-16-be")),
        2,
        "error: {path}: the file is UTF-16 text (it starts with the byte order mark FE FF)",
        0,
    ),
    (
        "UTF-16 little-endian without byte order mark",
        file_with("records.csv", GOOD_CSV.decode().replace("\n", "\r\n").encode("utf-16-le")),
        2,
        "error: {path}: the file is UTF-16LE text without a byte order mark: convert it to"
        " UTF-8, for example with iconv -f UTF-16LE -t UTF-8"
        " {path} > {folder}/records-utf8.csv. Nothing was imported.",
        0,
    ),
    (
        "UTF-16 big-endian without byte order mark",
        file_with("records.jsonl", GOOD_JSONL.decode().encode("utf-16-be")),
        2,
        "error: {path}: the file is UTF-16BE text without a byte order mark: convert it to"
        " UTF-8, for example with iconv -f UTF-16BE -t UTF-8"
        " {path} > {folder}/records-utf8.jsonl. Nothing was imported.",
        0,
    ),
    (
        "directory",
        folder,
        2,
        "error: records file {path} is a directory: name a records file",
        0,
    ),
    (
        "named pipe",
        named_pipe,
        2,
        "error: records file {path} is not a regular file (a pipe or a device)",
        0,
    ),
    ("empty", file_with("records.jsonl", b""), 1, "warning: {path} contains no records", 0),
    (
        "byte order mark only",
        file_with("records.csv", codecs.BOM_UTF8),
        1,
        "warning: {path} contains no records",
        0,
    ),
    (
        "blank lines only",
        file_with("records.jsonl", b"\n \r\n\t\n"),
        1,
        "warning: {path} contains no records",
        0,
    ),
    ("CSV header only", file_with("records.csv", CSV_HEADER), 1, "warning: {path} contains", 0),
    ("CSV with CR line ends", file_with("records.csv", GOOD_CSV.replace(b"\n", b"\r")), 0, "", 2),
    (
        "JSON Lines with CR line ends",
        file_with("records.jsonl", GOOD_JSONL.replace(b"\n", b"\r")),
        0,
        "",
        2,
    ),
    (
        "date without time",
        file_with(
            "records.csv",
            CSV_HEADER + csv_line(good_record(1, validUntil="2027-01-01")),
        ),
        1,
        "{path}:2: rejected: Invalid RFC3339 encoded datetime at field validUntil: write a"
        " date, a time and a UTC offset, such as 2027-01-01T00:00:00Z",
        0,
    ),
    (
        "time without offset",
        file_with("records.jsonl", jsonl_line(good_record(1, validFrom="2026-01-01T00:00:00"))),
        1,
        "{path}:1: rejected: Expected datetime with a timezone component at field validFrom:"
        " add a UTC offset, such as 2027-01-01T00:00:00Z",
        0,
    ),
    (
        "rows of only commas",
        file_with(
            "records.csv",
            CSV_HEADER
            + csv_line(good_record(1))
            + EMPTY_CSV_ROW
            + b" , ,\t,,,,,,,,\n"
            + b"," * 14
            + b"\n"
            + csv_line(good_record(2))
            + EMPTY_CSV_ROW,
        ),
        0,
        "",
        2,
    ),
    (
        "rows of only commas before the header",
        file_with("records.csv", EMPTY_CSV_ROW + GOOD_CSV),
        0,
        "",
        2,
    ),
    (
        "CSV header and rows of only commas",
        file_with("records.csv", CSV_HEADER + EMPTY_CSV_ROW * 3),
        1,
        "warning: {path} contains no records",
        0,
    ),
    (
        "JSON array on one line",
        file_with("records.json", json.dumps([good_record(1), good_record(2)]).encode()),
        2,
        "error: {path}:1: the file is one JSON array, not JSON Lines: write one JSON object per"
        " line, for example with jq -c '.[]' {path} > {path}l. Nothing was imported.",
        0,
    ),
    (
        "JSON array over several lines",
        file_with(
            "records.jsonl",
            codecs.BOM_UTF8
            + b"\r\n \r\n"
            + json.dumps([good_record(1), good_record(2)], indent=2)
            .encode()
            .replace(b"\n", b"\r\n"),
        ),
        2,
        # jq would empty the file it reads if it wrote to the same name.
        "error: {path}:3: the file is one JSON array, not JSON Lines: write one JSON object per"
        " line, for example with jq -c '.[]' {path} > {folder}/records-lines.jsonl. Nothing",
        0,
    ),
    (
        "JSON array with CR line ends",
        file_with("records.txt", b"\r[\r" + GOOD_JSONL.replace(b"\n", b",\r") + b"]\r"),
        2,
        "error: {path}:2: the file is one JSON array",
        0,
    ),
    (
        "JSON array named .csv",
        file_with("records.csv", json.dumps([good_record(1), good_record(2)]).encode()),
        2,
        "error: {path}:1: the file is one JSON array, not CSV: write one JSON object per line,"
        " for example with jq -c '.[]' {path} > {folder}/records.jsonl. Nothing was imported.",
        0,
    ),
    (
        "JSON array over several lines named .csv",
        file_with(
            "records.csv",
            b"\n" + json.dumps([good_record(1), good_record(2)], indent=2).encode(),
        ),
        2,
        "error: {path}:2: the file is one JSON array, not CSV: write one JSON object per line,",
        0,
    ),
    (
        "empty JSON array named .csv",
        file_with("records.csv", b"[ ]\n"),
        2,
        "error: {path}:1: the file is one JSON array, not CSV",
        0,
    ),
    (
        # A column name may start with '[': only '[' before '{' or ']' is taken for JSON.
        "CSV column name starting with a bracket",
        file_with("records.csv", csv_file("[notes]," + REQUIRED_HEADER, [["a note", *ROW_1]])),
        0,
        "",
        1,
    ),
    (
        # bzip2 files start with "BZh" and a digit from 1 to 9, so this header is CSV.
        "CSV column name starting with BZh",
        file_with("records.csv", csv_file("BZhNotes," + REQUIRED_HEADER, [["a note", *ROW_1]])),
        0,
        "",
        1,
    ),
    (
        "cell over the size limit",
        file_with(
            "records.csv",
            csv_file(
                REQUIRED_HEADER + ",notes",
                [[*ROW_1, "n" * (CSV_CELL_LIMIT + 1)], [*ROW_2, "a short note"]],
            ),
        ),
        1,
        "{path}:2: rejected: invalid CSV: field larger than field limit (131072), so a cell has"
        " more than 131,072 characters, the maximum that Python's csv module reads: shorten"
        " the cell, or leave its column out of the export",
        1,
    ),
    (
        # The limit counts characters: this cell is at the limit, in twice as many bytes.
        "cell of multi-byte characters",
        file_with(
            "records.csv",
            csv_file(
                REQUIRED_HEADER + ",notes",
                [[*ROW_1, "ä" * CSV_CELL_LIMIT], [*ROW_2, "a short note"]],
            ),
        ),
        0,
        "",
        2,
    ),
    (
        "header cell over the size limit",
        file_with(
            "records.csv", csv_file(REQUIRED_HEADER + "," + "n" * (CSV_CELL_LIMIT + 1), [ROW_1])
        ),
        2,
        "error: {path}:1: invalid CSV header: field larger than field limit (131072), so a cell"
        " has more than 131,072 characters",
        0,
    ),
]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path, free_port())


def imported_rows(database: Path) -> int:
    # The command checks the file before it opens, and so creates, the database.
    return count_rows(database, "identities") if database.exists() else 0


@pytest.mark.parametrize(
    ("make_file", "exit_code", "message", "rows"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_import_file_as_exported(
    config: Path, make_file: Callable[[Path], Path], exit_code: int, message: str, rows: int
) -> None:
    source = make_file(config.parent)

    result = import_file(config, source)

    assert result.returncode == exit_code, result.stderr
    expected = message.replace("{path}", str(source)).replace("{folder}", str(source.parent))
    assert expected in result.stderr
    assert imported_rows(database_of(config)) == rows
    assert KEY_PREFIX not in result.stdout + result.stderr, "a key was printed"
    if exit_code == 2:
        assert not database_of(config).exists(), "a file that stops the import made a database"


# (case, file name, lines of a first import, lines of the second, duplicate lines, line of the
# first duplicate, counts of the second import). Each repeat of c-good-1 gives it another id,
# so that the test can tell which line was imported.
DUPLICATE_CASES: list[tuple[str, str, bytes, bytes, int, int, str]] = [
    (
        "JSON Lines",
        "records.jsonl",
        b"",
        jsonl_line(good_record(1))
        + jsonl_line(good_record(2))
        + jsonl_line(good_record(1, id="person-1-second"))
        + jsonl_line(good_record(3))
        + jsonl_line(good_record(2))
        + jsonl_line(good_record(1, id="person-1-last")),
        3,
        3,
        "3 inserted, 0 updated, 0 rejected",
    ),
    (
        "CSV",
        "records.csv",
        b"",
        CSV_HEADER + csv_line(good_record(1)) + csv_line(good_record(1, id="person-1-last")),
        1,
        3,
        "1 inserted, 0 updated, 0 rejected",
    ),
    (
        "in a later batch",
        "records.jsonl",
        b"",
        b"".join(jsonl_line(good_record(n)) for n in range(1, BATCH_SIZE + 1))
        + jsonl_line(good_record(1, id="person-1-last")),
        1,
        BATCH_SIZE + 1,
        f"{BATCH_SIZE} inserted, 0 updated, 0 rejected",
    ),
    (
        "of a credential imported before",
        "records.jsonl",
        jsonl_line(good_record(1)),
        jsonl_line(good_record(1, id="person-1-second"))
        + jsonl_line(good_record(1, id="person-1-last")),
        1,
        2,
        "0 inserted, 1 updated, 0 rejected",
    ),
]


@pytest.mark.parametrize(
    ("name", "before", "records", "duplicates", "first_line", "counts"),
    [pytest.param(*case[1:], id=case[0]) for case in DUPLICATE_CASES],
)
def test_import_counts_duplicates(
    config: Path,
    name: str,
    before: bytes,
    records: bytes,
    duplicates: int,
    first_line: int,
    counts: str,
) -> None:
    if before:
        earlier = config.parent / f"earlier-{name}"
        earlier.write_bytes(before)
        assert import_file(config, earlier).returncode == 0
    source = config.parent / name
    source.write_bytes(records)

    result = import_file(config, source)

    assert result.returncode == 0, result.stderr
    assert counts in result.stdout
    if duplicates == 1:
        repeated = f"; 1 line repeated the credentialId of an earlier line (at line {first_line})"
    else:
        repeated = (
            f"; {duplicates} lines repeated the credentialId of an earlier line (first at line"
            f" {first_line})"
        )
    assert repeated in result.stdout
    warnings = [
        line for line in result.stderr.splitlines() if "import.duplicate_credentials" in line
    ]
    assert len(warnings) == 1, result.stderr
    event = json.loads(warnings[0])
    assert event["level"] == "warning"
    assert event["duplicates"] == duplicates
    assert event["first_line"] == first_line
    assert event["path"] == str(source)
    assert "c-good-" not in warnings[0], "a credentialId was logged"
    assert KEY_PREFIX not in result.stdout + result.stderr, "a key was printed"
    identity = query_one(
        database_of(config), "SELECT identity_id FROM identities WHERE credential_id = 'c-good-1'"
    )
    assert identity == "person-1-last"


def test_import_logs_no_duplicates_without_repeats(config: Path) -> None:
    source = config.parent / "records.jsonl"
    source.write_bytes(GOOD_JSONL)

    result = import_file(config, source)

    assert result.returncode == 0, result.stderr
    assert "import.duplicate_credentials" not in result.stderr


def test_import_utf16_fix_command_works(config: Path) -> None:
    source = config.parent / "records.csv"
    source.write_bytes(GOOD_CSV.decode().encode("utf-16-le"))
    failed = import_file(config, source)
    assert failed.returncode == 2, failed.stderr
    command = failed.stderr.split("for example with ", 1)[1].split(". Nothing", 1)[0]

    converted = subprocess.run(["sh", "-c", command], capture_output=True, text=True)

    assert converted.returncode == 0, converted.stderr
    result = import_file(config, config.parent / "records-utf8.csv")
    assert result.returncode == 0, result.stderr
    assert "2 inserted, 0 updated, 0 rejected" in result.stdout
    assert imported_rows(database_of(config)) == 2
