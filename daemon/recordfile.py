"""Identity records and the files they come in.

It defines the record schema and its validation, checks a file's kind and CSV header before the
first record, and reads JSON Lines and CSV files record by record."""

from __future__ import annotations

import codecs
import collections
import csv
import re
import shlex
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import IO, Annotated, Literal, get_args

import msgspec

from daemon.normalize import normalize_key
from daemon.schema import Channel, IdentityType, Location

Status = Literal["ACTIVE", "SUSPENDED", "REVOKED"]
NonEmpty255 = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
LIST_FIELDS = ("stores", "channels", "locations")
_NOT_UTF8 = re.compile("[\udc80-\udcff]")


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


def _check_file_kind(head: bytes, path: Path) -> None:
    """Raise ImportFileError when the first bytes of a file show it is not UTF-8 text."""
    for magic, problem in _WRONG_FILE_KINDS:
        if head.startswith(magic):
            raise ImportFileError(problem)
    # bzip2's magic is "BZh" and a block size digit; a CSV column may start with "BZh" too.
    if head.startswith(b"BZh") and head[3:4].isdigit() and head[3:4] != b"0":
        raise ImportFileError(
            "the file is bzip2-compressed: decompress it (bunzip2) and import the result"
        )
    encoding = _utf16_without_bom(head)
    if encoding is not None:
        converted = path.with_name(f"{path.stem}-utf8{path.suffix}")
        raise ImportFileError(
            f"the file is {encoding} text without a byte order mark: convert it to UTF-8,"
            f" for example with iconv -f {encoding} -t UTF-8 {shlex.quote(str(path))}"
            f" > {shlex.quote(str(converted))}"
        )


# Bytes at the start of a file that show UTF-16 without a byte order mark.
_UTF16_SAMPLE_BYTES = 32


def _utf16_without_bom(head: bytes) -> str | None:
    """Return UTF-16LE or UTF-16BE when the file starts with UTF-16 text but no byte order mark.

    In UTF-16, a character from U+0001 to U+00FF is two bytes, one of them NUL, and UTF-8
    text has no NUL bytes. A CSV header or a JSON object starts with such characters. So in
    the first ``_UTF16_SAMPLE_BYTES`` of a UTF-16 records file every second byte is NUL and
    the others are not, which rules out a file of NULs and UTF-32 text.
    NOTE: a file with a character from U+0100 on among its first 16 is not recognised.
    """
    sample = head[:_UTF16_SAMPLE_BYTES]
    sample = sample[: len(sample) - len(sample) % 2]
    if len(sample) < 4:
        return None
    even, odd = sample[0::2], sample[1::2]
    if odd.count(0) == len(odd) and 0 not in even:
        return "UTF-16LE"
    if even.count(0) == len(even) and 0 not in odd:
        return "UTF-16BE"
    return None


def _check_not_json_array(text: bytes, cr_line_ends: bool, path: Path, kind: str) -> None:
    """Raise ImportFileError when a records file starts as one JSON array does.

    Read line by line, such a file gets an error on every line, or a CSV header error, and no
    hint at the cause. A JSON Lines file must not start with '['. A CSV file is taken for an
    array only when '[' is followed by '{' or ']', because a CSV column name may start with
    '['. ``text`` is the start of the file after any byte order mark. A file whose first
    ``_HEAD_BYTES`` bytes are all whitespace is not checked.
    """
    body = text.lstrip()
    if not body.startswith(b"["):
        return
    if kind == "csv" and not body[1:].lstrip().startswith((b"{", b"]")):
        return
    blank = text[: len(text) - len(body)]
    line = blank.count(b"\r" if cr_line_ends else b"\n") + 1
    # jq must not write to the file it reads, which the shell empties first.
    if path.suffix.lower() == ".jsonl":
        converted = path.with_name(f"{path.stem}-lines.jsonl")
    else:
        converted = path.with_suffix(".jsonl")
    expected = "CSV" if kind == "csv" else "JSON Lines"
    raise ImportFileError(
        f"the file is one JSON array, not {expected}: write one JSON object per line, for"
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
    closed makes one, and its cells can still pass as a record whose key contains the following
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


def open_records(path: Path) -> IO[bytes]:
    try:
        return path.open("rb")
    except OSError as exc:
        raise ImportFileError(f"the file cannot be opened: {exc.strerror}") from None


def start_reading(handle: IO[bytes], kind: str, path: Path) -> IO[bytes] | _CrLineReader:
    """Check the start of a records file and return its lines, after any byte order mark."""
    head = handle.read(_HEAD_BYTES)
    _check_file_kind(head, path)
    # Excel's "CSV UTF-8" and some editors start the file with a UTF-8 byte order mark,
    # which would otherwise become part of the first column name or JSON line.
    start = len(codecs.BOM_UTF8) if head.startswith(codecs.BOM_UTF8) else 0
    cr_line_ends = _ends_lines_with_cr(head)
    _check_not_json_array(head[start:], cr_line_ends, path, kind)
    handle.seek(start)
    return _CrLineReader(handle) if cr_line_ends else handle
