"""TOML configuration: types, defaults, and errors that name the key and line."""

from __future__ import annotations

import contextlib
import datetime
import difflib
import functools
import importlib
import ipaddress
import re
import tomllib
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import msgspec

from daemon.store import SynchronousMode
from drivers.base import DeviceSettings, parse_duration_text

DEFAULT_CONFIG_PATH = Path("/etc/identity-connector/config.toml")

OverridableReason = Literal[
    "SUSPENDED",
    "EXPIRED",
    "NOT_YET_VALID",
    "CACHE_STALE",
    "REVOKED",
    "SCAN_STALE",
    "SCAN_FROM_FUTURE",
]


class ConfigError(Exception):
    """A configuration that cannot be used; the message names the key, line and fix."""


class Duration(float):
    """A length of time in seconds, written in TOML as "300ms", "30s", "5m", "24h" or "7d"."""


def parse_duration(text: str) -> Duration:
    """Convert "5m"-style text to seconds, raising ValueError with the accepted forms.

    The grammar is that of the duration strings of [[devices]] tables, but a plain number
    without a unit is rejected here.
    """
    try:
        seconds = parse_duration_text(
            text,
            'write a number and a unit, one of ms, s, m, h, d (for example "30s", "24h" or'
            ' "1h30m")',
        )
    except ValueError as error:
        # parse_duration_text quotes the whole text, which can be hundreds of characters.
        message = str(error)
        quoted = f"invalid duration {text!r}"
        if message.startswith(quoted):
            message = f"invalid duration {_quoted(text)}{message[len(quoted) :]}"
        raise ValueError(message) from None
    return Duration(seconds)


def _decode_hook(kind: type, value: Any) -> Any:
    if kind is Duration:
        if isinstance(value, str):
            return parse_duration(value)
        raise ValueError(f'invalid duration {_quoted(value)}: write it as a string such as "30s"')
    raise NotImplementedError(kind)


class _Section(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A table of the file.

    A ``__post_init__`` check's message starts with "invalid <key>" where one key is at
    fault, so that the problem is listed at that key's line and only that key is left out
    while the rest of the file is checked.
    """


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_size: int = 16384
    """Largest ResolveScan body accepted, in bytes; larger bodies get 413."""
    keepalive_timeout: Duration = Duration(75)
    """How long an idle connection stays open, also before its first request is complete."""
    client_timeout: Duration = Duration(10)
    """Maximum wait for a request body after its headers; a slower client gets 408."""
    max_line_size: int = 8190
    """Maximum length of the request line (method, path and version), in bytes; longer gets 400.

    aiohttp applies it to the request line only; header lines are bounded by max_field_size.
    """
    max_field_size: int = 8190
    """Maximum length of a header value, in bytes; longer ones get 400."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"invalid port {self.port}: use 1-65535, or 0 for any free port")
        if not 256 <= self.max_body_size <= 1_048_576:
            raise ValueError(
                f"invalid max_body_size {self.max_body_size}: use 256 to 1048576 bytes"
            )
        for name in ("keepalive_timeout", "client_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"invalid {name} {getattr(self, name)}: use a duration above 0")
        for name in ("max_line_size", "max_field_size"):
            if not 1024 <= getattr(self, name) <= 65536:
                raise ValueError(f"invalid {name} {getattr(self, name)}: use 1024 to 65536 bytes")


class StoresConfig(_Section):
    ids: list[str] = []
    """Store ids this box serves; a request for any other store gets 400."""

    def __post_init__(self) -> None:
        for store_id in self.ids:
            if not 1 <= len(store_id) <= 255:
                raise ValueError(
                    f"invalid ids entry {_quoted(store_id)}: a store id has 1 to 255 characters"
                )


class DatabaseConfig(_Section):
    path: str = "/var/lib/identity-connector/connector.sqlite3"
    secret_file: str = ""
    """File with the HMAC key for scanned values; empty means `<path>.key`, made at first start."""
    busy_timeout: Duration = Duration(5.0)
    synchronous: SynchronousMode = "normal"
    """SQLite's synchronous setting for the writer: "full" also syncs the WAL at each commit."""

    @property
    def secret_path(self) -> Path:
        if self.secret_file:
            return Path(self.secret_file)
        return Path(self.path + ".key")


class PolicyConfig(_Section):
    value_encoding: Literal["raw", "base64", "auto"] = "auto"
    max_cache_age: Duration = Duration(24 * 3600)
    max_scan_age: Duration = Duration(300)
    max_clock_skew: Duration = Duration(30)
    """How far in the future a scan's timestamp may be before it is rejected as stale."""
    exit_override: list[OverridableReason] = msgspec.field(
        default_factory=lambda: ["SUSPENDED", "EXPIRED", "CACHE_STALE"]
    )
    """Reasons that do not keep a known identity inside the store at EXIT."""
    idempotency_retention: Duration = Duration(7 * 86400)


class LoggingConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console", "journal"] = "auto"
    """auto: journald fields when systemd connects stdout to the journal, text on a
    terminal, JSON lines otherwise."""
    journal_socket: str = "/run/systemd/journal/socket"
    """journald's native socket, used by format "journal" (and "auto" under systemd)."""


class TlsConfig(_Section):
    cert_file: str
    """PEM certificate chain of the listener, server certificate first; reread on SIGHUP."""
    key_file: str
    """Unencrypted PEM private key of cert_file; reread on SIGHUP."""
    client_ca_file: str = ""
    """PEM CA bundle that signs gateway client certificates; set means a certificate is required."""
    client_names: list[str] = []
    """Accepted client certificate names (subject CN or a SAN value); empty accepts any."""
    min_version: Literal["1.2", "1.3"] = "1.2"
    """Oldest TLS version the listener accepts."""

    def __post_init__(self) -> None:
        if not self.cert_file or not self.key_file:
            raise ValueError("cert_file and key_file must both name PEM files")
        if self.client_names and not self.client_ca_file:
            raise ValueError(
                "client_names is set without client_ca_file: set client_ca_file to the CA"
                " that signs the gateway's client certificates"
            )


_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


class AuthConfig(_Section):
    api_key_header: str = "x-api-key"
    """Request header that carries the API key."""
    api_key_files: list[str] = []
    """Files of one API key each; any listed key is accepted. Relative paths are read from
    $CREDENTIALS_DIRECTORY (systemd LoadCredential=). Reread on SIGHUP."""
    allow_networks: list[str] = msgspec.field(default_factory=lambda: ["0.0.0.0/0", "::/0"])
    """Client networks (CIDR) that may call the connector; others get 403."""
    trusted_proxies: list[str] = []
    """Proxy networks (CIDR) whose X-Forwarded-For header names the client."""
    rate_limit: float = 200.0
    """Requests per second each client address may send on average; 0 turns limiting off."""
    rate_burst: int = 400
    """Requests a client address may send at once before rate_limit applies."""
    rate_limit_clients: int = 10000
    """Client addresses whose rate is tracked at once; the longest idle ones are dropped."""
    log_interval: Duration = Duration(60)
    """Shortest time between two log lines about one client's rejected requests."""

    def __post_init__(self) -> None:
        if not _HEADER_NAME.match(self.api_key_header):
            raise ValueError(
                f"invalid api_key_header {_quoted(self.api_key_header)}: use an HTTP header name"
                ' such as "x-api-key"'
            )
        for name in ("allow_networks", "trusted_proxies"):
            for network in getattr(self, name):
                try:
                    ipaddress.ip_network(network, strict=False)
                except ValueError:
                    raise ValueError(
                        f"invalid {name} entry {_quoted(network)}: use CIDR notation such as"
                        " 10.0.0.0/8"
                    ) from None
        if self.rate_limit < 0:
            raise ValueError(f"invalid rate_limit {self.rate_limit}: use 0 (off) or more")
        if self.rate_burst < 1:
            raise ValueError(f"invalid rate_burst {self.rate_burst}: use 1 or more")
        if self.rate_limit_clients < 1:
            raise ValueError(f"invalid rate_limit_clients {self.rate_limit_clients}: use 1 or more")


DEFAULT_BACKOFF_MAX = Duration(60)
"""Default of [hq] backoff_max, the cap of the retry delay after failed HQ calls."""


class HqConfig(_Section):
    url: str
    token_file: str = ""
    pull_interval: Duration = Duration(30)
    lookup_timeout: Duration = Duration(0.3)
    store_id: str = ""
    """Store whose feed is pulled; empty means the first of [stores] ids."""
    client_cert_file: str = ""
    client_key_file: str = ""
    ca_file: str = ""
    """CA bundle that signs HQ's certificate; empty means the system's trust store."""
    request_timeout: Duration = Duration(10)
    pull_batch_size: int = 1000
    snapshot_batch_size: int = 2000
    reconcile_interval: Duration = Duration(3600)
    upload_interval: Duration = Duration(1)
    upload_batch_size: int = 500
    upload_max_bytes: int = 1_048_576
    upload_max_delay: Duration = Duration(2)
    gzip_uploads: bool = False
    outbox_max_events: int = 1_000_000
    outbox_max_age: Duration = Duration(30 * 86400)
    outbox_overflow: Literal["drop_oldest", "drop_newest"] = "drop_oldest"
    outbox_trim_interval: Duration = Duration(10)
    backoff_initial: Duration = Duration(1)
    backoff_max: Duration = DEFAULT_BACKOFF_MAX
    offline_after: int = 3
    clock_offset_threshold: Duration = Duration(10)

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"invalid url {_quoted(self.url)}: use an http:// or https:// address")
        # An address without a host or with an invalid port passes the scheme check, but no
        # HQ request to it can succeed: without a host, the sync retries for ever.
        address = urlsplit(self.url)
        try:
            port = address.port
        except ValueError:
            port = -1  # not a number, or above 65535
        if port is not None and not 1 <= port <= 65535:
            raise ValueError(
                f"invalid url {_quoted(self.url)}: the port must be a number from 1 to 65535"
            )
        if not address.hostname:
            raise ValueError(
                f"invalid url {_quoted(self.url)}: the host is missing; write it as"
                ' "https://<host>[:<port>]", for example "https://hq.example.com"'
            )
        for name in (
            "pull_batch_size",
            "snapshot_batch_size",
            "upload_batch_size",
            "outbox_max_events",
            "offline_after",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"invalid {name} {getattr(self, name)}: use 1 or more")
        if self.upload_max_bytes < 4096:
            raise ValueError(
                f"invalid upload_max_bytes {self.upload_max_bytes}: use 4096 bytes or more"
            )
        self._check_backoff()
        if self.client_key_file and not self.client_cert_file:
            raise ValueError(
                f"invalid client_key_file {_quoted(self.client_key_file)}: it is set without"
                " client_cert_file; set client_cert_file to the certificate of this key, or"
                " remove client_key_file"
            )

    def _check_backoff(self) -> None:
        """Check the retry delays, naming the one key whose default makes the pair valid.

        parse_config leaves out the key that a message names and checks the table again with
        that key's default. Naming backoff_initial when it exceeds the default backoff_max
        keeps that second check from failing on the same pair.
        """
        initial = f"{self.backoff_initial:g}s"
        maximum = f"{self.backoff_max:g}s"
        if self.backoff_initial <= 0:
            raise ValueError(
                f'invalid backoff_initial {initial}: use a duration above 0, such as "1s"'
            )
        if self.backoff_max <= 0:
            raise ValueError(
                f'invalid backoff_max {maximum}: use a duration above 0, such as "60s"'
            )
        if self.backoff_max >= self.backoff_initial:
            return
        if self.backoff_initial <= DEFAULT_BACKOFF_MAX:
            raise ValueError(
                f"invalid backoff_max {maximum}: use backoff_initial ({initial}) or more"
            )
        raise ValueError(
            f"invalid backoff_initial {initial}: use backoff_max ({maximum}) or less, or raise"
            " backoff_max"
        )


class LocalConfig(_Section):
    """Scans read by the box's own scanners at associate stations, and their event stream."""

    store_id: str = ""
    """Store that local scans are decided for; empty means the first of [stores] ids."""
    session_timeout: Duration = Duration(300)
    """An associate session closes this long after the station's last counted scan."""
    debounce: Duration = Duration(1.5)
    """The same value read again by the same device within this window counts once."""
    allow_networks: list[str] = msgspec.field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    """Client networks allowed on /v1/local/events and /v1/local/devices."""
    events_queue_size: int = 256
    """Events buffered per stream client; a client that falls further behind is dropped."""
    events_keepalive: Duration = Duration(15)
    """Interval of SSE comment lines that keep idle streams open through proxies."""

    def __post_init__(self) -> None:
        if self.session_timeout <= 0:
            raise ValueError('invalid session_timeout: use a duration above 0, such as "5m"')
        if self.events_queue_size < 1:
            raise ValueError(f"invalid events_queue_size {self.events_queue_size}: use 1 or more")
        if self.events_keepalive <= 0:
            raise ValueError('invalid events_keepalive: use a duration above 0, such as "15s"')
        for network in self.allow_networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(
                    f"invalid allow_networks entry {_quoted(network)}: use CIDR notation such as"
                    " 127.0.0.0/8"
                ) from None


class Config(_Section):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    stores: StoresConfig = msgspec.field(default_factory=StoresConfig)
    database: DatabaseConfig = msgspec.field(default_factory=DatabaseConfig)
    policy: PolicyConfig = msgspec.field(default_factory=PolicyConfig)
    logging: LoggingConfig = msgspec.field(default_factory=LoggingConfig)
    tls: TlsConfig | None = None
    auth: AuthConfig | None = None
    hq: HqConfig | None = None
    local: LocalConfig = msgspec.field(default_factory=LocalConfig)
    devices: list[dict[str, Any]] = []
    """Scanner tables; each driver validates its own keys."""


def load_config(path: Path | str, check_listener: bool = False) -> Config:
    """Read and validate a TOML configuration file, as ``parse_config`` does.

    Raises ConfigError whose message names the file, the key and its line.
    """
    path = Path(path)
    try:
        # utf-8-sig drops the byte order mark that some Windows editors write, which TOML
        # parsers reject as an invalid statement at line 1.
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(
            f"configuration file {path} not found: create it (see the configuration"
            " reference in README.md) or name another file (--config FILE, or the file"
            " argument of check-config)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc}") from None
    return parse_config(text, source=str(path), check_listener=check_listener)


def parse_config(text: str, source: str = "<config>", check_listener: bool = False) -> Config:
    """Validate configuration text; ``source`` names it in error messages.

    Raises one ConfigError that lists every problem found, one per line in file order. With
    ``check_listener``, a listener off loopback without authentication is one of them, as
    `serve` refuses it; other commands can read such a file. When the file has problems,
    ``check_listener`` also adds those of the key, certificate and token files that the
    [tls], [auth] and [hq] tables without problems of their own name. check-config reads
    those files itself only after the file parsed without problems.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {_describe_toml_error(text, exc)}") from None

    problems: list[_Problem] = []
    removed: set[str] = set()
    kept_indices: dict[tuple[str, ...], list[int]] = {}
    config = _convert_collecting(data, text, source, problems, removed, kept_indices)
    if config is not None:
        problems.extend(_check_stores(config, data, text, source, removed))
        device_indices = kept_indices.get(("devices",), list(range(len(config.devices))))
        problems.extend(_check_devices(config, text, source, device_indices))
        if check_listener and _listener_keys_intact(removed):
            problems.extend(_check_listener(config, text, source))
        if check_listener and problems:
            problems.extend(_check_files(config, text, source, removed, problems))
    if problems:
        raise ConfigError(_format_problems(problems, complete=config is not None))
    assert config is not None
    return config


_TOML_ERROR_POSITION = re.compile(r"\(at line (\d+), column (\d+)\)$")
# A line that sets a key, or a dotted key, to text without quotes, such as 24h or
# drop_oldest, with an optional comment after it.
_BARE_VALUE_LINE = re.compile(
    r"\s*(?P<key>[A-Za-z0-9_-]+(?:\s*\.\s*[A-Za-z0-9_-]+)*)\s*=\s*(?P<value>[\w.+-]+)\s*(?:#.*)?"
)


def _describe_toml_error(text: str, error: tomllib.TOMLDecodeError) -> str:
    """Add the fix to tomllib's message for a value without quotes or a key set twice.

    tomllib's message ends with the line and column of the error, or with "at end of
    document". The fix names the key but never repeats the value, which could be a secret.
    """
    message = str(error)
    position = _TOML_ERROR_POSITION.search(message)
    if message.startswith(_DUPLICATE_KEY_ERROR):
        if position is not None:
            line_number = int(position.group(1))
        elif message.endswith("(at end of document)"):
            # tomllib counts lines by "\n" only, unlike str.splitlines.
            line_number = text.count("\n") + 1
        else:
            return message
        hint = _duplicate_key_hint(text, line_number)
    elif position is not None:
        hint = _bare_value_hint(text, int(position.group(1)), int(position.group(2)))
    else:
        return message
    return f"{message}; {hint}" if hint else message


def _bare_value_hint(text: str, line_number: int, column: int) -> str | None:
    """Return the fix for a value without quotes at a 1-based line and column, or None.

    None means that the error is not at such a value, so that nothing is guessed for other
    syntax errors.
    """
    # tomllib counts lines by "\n" only, unlike str.splitlines.
    lines = text.split("\n")
    if not 1 <= line_number <= len(lines):
        return None
    assignment = _BARE_VALUE_LINE.fullmatch(lines[line_number - 1].rstrip("\r"))
    if assignment is None:
        return None
    value = assignment.group("value")
    start, end = assignment.span("value")
    if not start < column <= end or not any(character.isalpha() for character in value):
        return None
    try:
        tomllib.loads(f"value = {value}")
    except tomllib.TOMLDecodeError:
        pass
    else:
        return None  # a valid value such as true or inf, so the error has another cause
    key = re.sub(r"\s+", "", assignment.group("key"))
    # NOTE: [[devices]] keys have no type in Config, so a device key that takes a number,
    # such as baudrate, gets the advice to write quotes, and the next check names its type.
    kind = _key_type(".".join([*_table_at_line(lines, line_number), key]))
    if kind is bool:
        return f"{key} takes true or false, in lower case and without quotes"
    if kind in (int, float):
        return f"{key} takes a number, written without quotes or a unit"
    if typing.get_origin(kind) is list:
        return f'write each item of {key} in quotes, inside brackets: {key} = ["<value>"]'
    return f'write the value of {key} in quotes: {key} = "<value>"'


def _table_at_line(lines: list[str], line_number: int) -> list[str]:
    """Return the dotted-key parts of the table that a 1-based line belongs to.

    An array table gets index 0 in place of its place in the file, which is enough to look
    up the type of one of its keys.
    """
    table: list[str] = []
    for line in lines[: line_number - 1]:
        stripped = line.strip()
        array_header = _ARRAY_HEADER.match(stripped)
        table_header = _TABLE_HEADER.match(stripped)
        if array_header:
            table = [*array_header.group(1).split("."), "0"]
        elif table_header:
            table = table_header.group(1).split(".")
    return table


# tomllib's message for a key that the same table sets twice, and for a dotted key whose
# parent is a value already. _duplicate_key_hint gives a fix for the first case only.
_DUPLICATE_KEY_ERROR = "Cannot overwrite a value"
# One part of a dotted key: bare, or in double or single quotes.
_KEY_PART_TEXT = r"""(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')"""
# A line that starts with a key, or a dotted key, and "=".
_ASSIGNMENT_LINE = re.compile(rf"\s*(?P<key>{_KEY_PART_TEXT}(?:\s*\.\s*{_KEY_PART_TEXT})*)\s*=")
_KEY_PART = re.compile(r"""(?P<bare>[A-Za-z0-9_-]+)|"(?P<basic>[^"]*)"|'(?P<literal>[^']*)'""")
# A table header that is commented out, such as "#[local]" or "# [[devices]]".
_COMMENTED_HEADER = re.compile(r"\s*#\s*(\[\[?[^\]]+\]\]?)\s*(?:#.*)?")


def _duplicate_key_hint(text: str, line_number: int) -> str | None:
    """Return the fix for a key that its table sets twice, with the line of the first one.

    ``line_number`` is the 1-based line of tomllib's error, which is where the value of the
    second key ends. Returns None when no earlier line of the same table sets that key, as
    for ``a = 1`` followed by ``a.b = 2``, so that nothing is guessed.
    """
    lines = text.split("\n")
    if not 1 <= line_number <= len(lines):
        return None
    second = _assignment_above(lines, line_number - 1)
    if second is None:
        return None
    key = _key_parts(lines[second])
    first = _assignment_above(lines, second - 1, key)
    if first is None:
        return None

    name = _excerpt(".".join(key))
    table = _table_at_line(lines, second + 1)
    place = _table_place(lines, second)
    hint = (
        f"{name} is already set at line {first + 1} {place}, and a key may appear only once"
        " per table"
    )
    # The last header between the two lines that is commented out, such as "#[local]" of
    # the configuration template.
    commented = None
    for index in range(second - 1, first, -1):
        header = _COMMENTED_HEADER.fullmatch(lines[index])
        if header is not None:
            commented = (index + 1, header.group(1))
            break
    if commented is not None:
        return (
            f"{hint}. The header of the table it belongs in is probably commented out"
            f" (remove the # of #{commented[1]} at line {commented[0]})"
        )
    # Without a commented-out header, a key of the table it is in was most likely written
    # twice. A key of an array table such as [[devices]] is not among those keys, because
    # the second one more likely belongs in the next table of the array.
    if len(key) == 1 and key[0] in _table_key_names(table):
        return f"{hint}, so remove one of the two lines"
    return f"{hint}. The header of the table it belongs in is probably commented out (remove the #)"


def _assignment_above(lines: list[str], index: int, key: list[str] | None = None) -> int | None:
    """Find the nearest line at or above a 0-based index that sets a key, within its table.

    With ``key``, only a line that sets that key counts. Returns None when a table header
    comes first.
    """
    for number in range(index, -1, -1):
        line = lines[number]
        stripped = line.strip()
        if _ARRAY_HEADER.match(stripped) or _TABLE_HEADER.match(stripped):
            return None
        if _ASSIGNMENT_LINE.match(line) and (key is None or _key_parts(line) == key):
            return number
    return None


def _key_parts(line: str) -> list[str]:
    """Return the parts of the key, dotted or quoted, that a line sets, without quotes."""
    assignment = _ASSIGNMENT_LINE.match(line)
    if assignment is None:
        return []
    return [
        part.group("bare") or part.group("basic") or part.group("literal") or ""
        for part in _KEY_PART.finditer(assignment.group("key"))
    ]


def _table_place(lines: list[str], index: int) -> str:
    """Return the table that a 0-based line is in, as "in [stores]" or "at the top level"."""
    for number in range(index, -1, -1):
        stripped = lines[number].strip()
        array_header = _ARRAY_HEADER.match(stripped)
        if array_header:
            return f"in this [[{array_header.group(1)}]] table"
        table_header = _TABLE_HEADER.match(stripped)
        if table_header:
            return f"in [{table_header.group(1)}]"
    return "at the top level"


def _table_key_names(table: list[str]) -> set[str]:
    """Return the names of the keys that Config defines for a table, given by its parts."""
    return {field.name for field in _table_fields(".".join(table))}


MAX_LISTED_PROBLEMS = 20
"""Problems a ConfigError lists; its last line counts the others."""
MAX_COLLECTED_PROBLEMS = 100
"""Problems after which parse_config stops converting, which bounds its time on a huge file."""


@dataclass(frozen=True, slots=True)
class _Problem:
    """One line of a ConfigError: where the problem is and the message that names it."""

    line: int | None
    message: str
    key: str
    """Dotted path of the key or table at fault, or "" for the top level."""


def _problem(text: str, source: str, key_path: str, detail: str) -> _Problem:
    line = find_key_line(text, key_path)
    location = f"line {line}, " if line else ""
    return _Problem(
        line, f"{source}: {location}key {key_path or '(top level)'}: {detail}", key_path
    )


def _format_problems(problems: list[_Problem], complete: bool) -> str:
    # Problems without a line come last. The sort is stable, so problems on one line keep
    # the order in which they were found.
    ordered = sorted(problems, key=lambda problem: (problem.line is None, problem.line or 0))
    lines = [problem.message for problem in ordered[:MAX_LISTED_PROBLEMS]]
    others = len(ordered) - MAX_LISTED_PROBLEMS
    if not complete and others > 0:
        lines.append(
            f"... and at least {others} more: checking stopped after {len(ordered)} problems;"
            " fix these and check the file again"
        )
    elif others > 0:
        lines.append(f"... and {others} more; fix these and check the file again to list them")
    return "\n".join(lines)


def _convert_collecting(
    data: dict[str, Any],
    text: str,
    source: str,
    problems: list[_Problem],
    removed: set[str],
    kept_indices: dict[tuple[str, ...], list[int]],
) -> Config | None:
    """Convert TOML data to a Config, appending a problem for each part that is invalid.

    msgspec stops at the first invalid value, so after each ValidationError the part it
    names is removed from ``data`` and the rest is converted again. Returns the Config of
    what remains, or None when the problems reach MAX_COLLECTED_PROBLEMS first. Adds the
    dotted path of each removed part to ``removed``. ``kept_indices`` maps each list that
    lost items to the original index of each item still in it, so that problems keep
    naming items by their place in the file.
    """
    while len(problems) < MAX_COLLECTED_PROBLEMS:
        try:
            config = msgspec.convert(
                data,
                Config,
                # The same conversion as msgspec.toml.decode.
                builtin_types=(datetime.datetime, datetime.date, datetime.time),
                str_keys=True,
                dec_hook=_decode_hook,
            )
            return config
        except msgspec.ValidationError as exc:
            message = str(exc)

        detail, _, where = message.partition(" - at `$")
        path: list[str | int] = [
            name if name else int(index)
            for name, index in re.findall(r"\.(\w+)|\[(\d+)\]", where.rstrip("`"))
        ]
        file_path = _file_path(path, kept_indices)
        detail = _describe_type_error(detail, path, data)
        key_path, detail = _describe_validation_error(detail, ".".join(file_path), text)
        value = _value_at(data, path)
        if detail.startswith("Invalid enum value") and value is not _MISSING:
            detail = _describe_enum_error(key_path, value)
        problems.append(_problem(text, source, key_path, detail))

        # Leave out the unknown key, or the key that a table's own check names when it has a
        # default, and otherwise the value, list item or table at the error's path.
        # NOTE: a table left out whole, such as [hq] with an invalid url, hides the problems
        # that its own checks would find next, which the run after the fix then lists.
        candidates = [path]
        unknown = re.match(r"Object contains unknown field `(.+?)`", message)
        if unknown:
            candidates.insert(0, [*path, unknown.group(1)])
        elif key_path != ".".join(file_path) and _is_optional_key(key_path):
            candidates.insert(0, [*path, key_path.rpartition(".")[2]])
        for candidate in candidates:
            candidate_key = ".".join(_file_path(candidate, kept_indices))
            if _remove(data, candidate, kept_indices):
                removed.add(candidate_key)
                break
        else:
            return None
    return None


def _file_path(path: list[str | int], kept_indices: dict[tuple[str, ...], list[int]]) -> list[str]:
    """Return the dotted-key parts of a path into the data, with list items by place in the file."""
    parts: list[str] = []
    for part in path:
        if isinstance(part, int):
            kept = kept_indices.get(tuple(parts))
            part = kept[part] if kept is not None and part < len(kept) else part
        parts.append(str(part))
    return parts


def _is_optional_key(key_path: str) -> bool:
    """Tell whether a dotted key of a table has a default, so that it can be left out."""
    table_path, _, name = key_path.rpartition(".")
    field = next((field for field in _table_fields(table_path) if field.name == name), None)
    return field is not None and not field.required


def _table_fields(table_path: str) -> tuple[msgspec.structs.FieldInfo, ...]:
    """Return the keys of the table at a dotted path (the top level for ""), or none."""
    table = _key_type(table_path) if table_path else Config
    if not (isinstance(table, type) and issubclass(table, msgspec.Struct)):
        return ()
    return msgspec.structs.fields(table)


_MISSING: Any = object()


def _value_at(data: Any, path: list[str | int]) -> Any:
    """Return the value at ``path`` in the TOML data, or _MISSING when there is none."""
    value = data
    for part in path:
        try:
            value = value[part]
        except (KeyError, IndexError, TypeError):
            return _MISSING
    return value


def _remove(
    data: dict[str, Any], path: list[str | int], kept_indices: dict[tuple[str, ...], list[int]]
) -> bool:
    """Delete the value at ``path`` from ``data``; return False when there is none."""
    if not path:
        return False
    parent = _value_at(data, path[:-1])
    last = path[-1]
    if isinstance(parent, list) and isinstance(last, int) and last < len(parent):
        parents = tuple(str(part) for part in path[:-1])
        kept = kept_indices.setdefault(parents, list(range(len(parent))))
        del kept[last]
        del parent[last]
        return True
    if isinstance(parent, dict) and last in parent:
        del parent[last]
        return True
    return False


def _check_stores(
    config: Config, data: dict[str, Any], text: str, source: str, removed: set[str]
) -> list[_Problem]:
    """Check that [stores] ids lists a store and that [local] and [hq] store_id are among them.

    ``data`` is the TOML data that the Config was converted from, to tell an empty list from
    a missing key.
    """
    if not config.stores.ids:
        if any(path == "stores" or path.startswith("stores.ids") for path in removed):
            return []  # already reported as invalid
        if _value_at(data, ["stores", "ids"]) is not _MISSING:
            detail = (
                "the list is empty; write at least one store id that this box serves, for"
                ' example ids = ["STORE-001"]'
            )
            return [_problem(text, source, "stores.ids", detail)]
        line = find_key_line(text, "stores.ids")
        location = f"line {line}, " if line else ""
        return [
            _Problem(
                line,
                f"{source}: {location}missing key stores.ids: list the store ids this box"
                ' serves, for example [stores] ids = ["STORE-001"]',
                "stores.ids",
            )
        ]
    problems = []
    for key, store_id in (
        ("local.store_id", config.local.store_id),
        ("hq.store_id", config.hq.store_id if config.hq is not None else ""),
    ):
        if store_id and store_id not in config.stores.ids:
            detail = (
                f"store {_quoted(store_id)} is not in [stores] ids; use one of"
                f" {', '.join(config.stores.ids)} or leave it empty"
            )
            problems.append(_problem(text, source, key, detail))
    return problems


def _check_files(
    config: Config, text: str, source: str, removed: set[str], problems: list[_Problem]
) -> list[_Problem]:
    """Read the files that [tls], [auth] and [hq] name, as check-config does for a valid file.

    A table with a problem of its own, in ``removed`` or ``problems``, is skipped, because
    its files may change with the fix. Each API key file, the HQ token file and the other
    [hq] files are checked on their own, so that the problems of each are listed.
    """
    # Imported here because daemon.security imports this module, and daemon.hq pulls in
    # the aiohttp client.
    from daemon import security
    from daemon.hq import read_token, settings_from_config

    with_problems = {path.split(".")[0] for path in removed}
    with_problems.update(problem.key.split(".")[0] for problem in problems)
    found: list[_Problem] = []

    def check(table: str, read: Callable[[], object]) -> None:
        try:
            read()
        except ConfigError as error:
            found.append(_file_problem(config, text, source, table, str(error)))

    # NOTE: load_api_key logs a warning for a key file that other users can read. Here that
    # warning goes to standard output, because check-config sets up logging only for a file
    # that parsed without problems.
    if config.tls is not None and "tls" not in with_problems:
        tls = config.tls
        check("tls", lambda: security.build_server_context(tls, security.read_tls_material(tls)))
    if config.auth is not None and "auth" not in with_problems:
        for path in config.auth.api_key_files:
            check("auth", functools.partial(security.load_api_key, path))
    if config.hq is not None and "hq" not in with_problems:
        hq = config.hq
        check("hq", lambda: read_token(hq.token_file, warn=False))
        # settings_from_config also reads the token, which is checked above, and it takes
        # the first of [stores] ids for an empty store_id, which fails when that list is
        # empty. Only its file checks matter here, and the settings it returns are dropped.
        hq_files = msgspec.structs.replace(hq, token_file="", store_id=hq.store_id or "-")
        check("hq", lambda: settings_from_config(config, hq_files, warn=False))
    return found


def _file_problem(config: Config, text: str, source: str, table: str, message: str) -> _Problem:
    """Place a file's ConfigError at the line of the key it names, such as "[tls] key_file".

    That line names the key already, so "[tls] key_file " is dropped where the file's path
    follows it, as in "[tls] key_file /etc/tls.key not found". A message on its own, as
    check-config prints for a file without other problems, keeps it.
    """
    named = re.search(rf"\[{table}\] (\w+)", message)
    key_path = f"{table}.{named.group(1)}" if named else table
    if _key_type(key_path) is None:
        key_path = table
    elif named is not None:
        for path in _path_forms(config, key_path):
            forms = (f"{named.group(0)} entry {path}", f"{named.group(0)} {path}")
            repeated = next((form for form in forms if form in message), None)
            if repeated is not None:
                message = message.replace(repeated, path, 1)
                break
    return _problem(text, source, key_path, message)


def _path_forms(config: Config, key_path: str) -> list[str]:
    """Return the forms in which file errors write the paths that a key such as tls.key_file sets.

    An error writes a path as configured, as Python's repr, or, for a relative API key
    file, joined to $CREDENTIALS_DIRECTORY.
    """
    # Imported here because daemon.security imports this module.
    from daemon.security import resolve_key_path

    table, _, key = key_path.partition(".")
    value = getattr(getattr(config, table, None), key, None)
    forms = []
    for path in value if isinstance(value, list) else [value]:
        if not isinstance(path, str) or not path:
            continue
        forms += [str(Path(path)), repr(path)]
        if key_path == "auth.api_key_files":
            # Without $CREDENTIALS_DIRECTORY, a relative path is shown as its repr.
            with contextlib.suppress(ConfigError):
                forms.append(str(resolve_key_path(path)))
    return forms


# The keys that daemon.security.listener_problem reads, by dotted path.
_LISTENER_KEYS = ("server.host", "auth.api_key_files", "tls.client_ca_file")


def _listener_keys_intact(removed: set[str]) -> bool:
    """Tell whether no key of the listener check, or its table, was left out as invalid.

    Without that key the check would report a missing authentication that is only invalid.
    """
    for path in removed:
        for key in _LISTENER_KEYS:
            if key == path or key.startswith(f"{path}.") or path.startswith(f"{key}."):
                return False
    return True


def _check_listener(config: Config, text: str, source: str) -> list[_Problem]:
    """Check that a listener off loopback requires API keys or client certificates."""
    # Imported here because daemon.security imports this module.
    from daemon.security import listener_problem

    problem = listener_problem(config)
    if problem is None:
        return []
    return [_problem(text, source, "server.host", problem)]


def _check_devices(config: Config, text: str, source: str, indices: list[int]) -> list[_Problem]:
    """Check each [[devices]] table against its driver's settings and the other tables.

    ``indices`` is the place in the file of each table in ``config.devices``.
    """
    if not config.devices:
        return []
    # Imported here because daemon.devices imports the drivers, which config loading
    # should not pay for when no device is configured.
    from daemon.devices import device_table_errors

    tables = dict(zip(indices, config.devices, strict=True))
    problems = []
    for key_path, detail in device_table_errors(list(config.devices), positions=indices):
        # "devices.<place in the file>", then the key when the problem has one.
        parts = key_path.split(".", 2)
        key = parts[2] if len(parts) == 3 else ""
        value = tables[int(parts[1])].get(key, _MISSING) if key else _MISSING
        problems.append(_problem(text, source, key_path, _reword_device_detail(detail, key, value)))
    return problems


def _reword_device_detail(detail: str, key: str, value: Any) -> str:
    """Word a [[devices]] problem as those of the other tables: lower case, values cut short.

    daemon.devices quotes a value as Python's repr, and adds "; use one of ..." to
    msgspec's "Invalid enum value ..." when the key takes fixed values.
    """
    if value is _MISSING:
        return detail
    if detail.startswith("Invalid enum value"):
        _, hint, allowed = detail.rpartition("; use one of ")
        return _describe_enum_error(key, value, allowed.split(", ") if hint else ())
    return detail.replace(repr(value), _quoted(value))


_TYPE_MISMATCH = re.compile(r"Expected `(\w+)`, got `(\w+)`")
# The TOML form of each of msgspec's type names, for error messages.
_TYPE_WORDS = {
    "int": "a whole number",
    "float": "a number",
    "str": "a string in quotes",
    "bool": "true or false",
    "array": 'a list in brackets, such as ["A", "B"]',
    "object": "a table",
}


def _describe_type_error(detail: str, path: list[str | int], data: dict[str, Any]) -> str:
    """Turn msgspec's "Expected `int`, got `str`" into a sentence with the value and the fix."""
    mismatch = _TYPE_MISMATCH.fullmatch(detail)
    if mismatch is None or not path:
        return detail
    expected = _TYPE_WORDS.get(mismatch.group(1))
    if expected is None:
        return detail
    value = _value_at(data, path)
    if value is _MISSING:
        return detail
    name = next((part for part in reversed(path) if isinstance(part, str)), "the key")
    if isinstance(path[-1], int):
        name = f"each item of {name}"
    message = f"invalid value {_quoted(value)}: {name} must be {expected}"
    if mismatch.group(1) in ("int", "float") and isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return message
        message += "; remove the quotes around the number"
    return message


MAX_SHOWN_CHARACTERS = 60
"""Characters of a string value that an error shows; longer ones are cut and end in "..."."""


def _excerpt(text: str) -> str:
    """Cut a string to MAX_SHOWN_CHARACTERS, its last three being "..." when it was longer."""
    if len(text) <= MAX_SHOWN_CHARACTERS:
        return text
    return text[: MAX_SHOWN_CHARACTERS - 3] + "..."


def _quoted(value: Any) -> str:
    """Show a TOML value in an error: a string as Python's repr does, cut short.

    repr escapes line breaks and the other characters that are not printable, such as
    U+2028, so the value stays on the error's line. true, false and dates are written as
    TOML writes them. A list is shown item by item unless that is longer than
    MAX_SHOWN_CHARACTERS, and then, like every table, it is named by its kind.
    """
    if isinstance(value, str):
        return repr(_excerpt(value))
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, list):
        items = "[" + ", ".join(_quoted(item) for item in value) + "]"
        return items if len(items) <= MAX_SHOWN_CHARACTERS else "a list"
    if isinstance(value, dict):
        return "a table"
    return repr(value)


def _describe_validation_error(detail: str, key_path: str, text: str) -> tuple[str, str]:
    """Return the key a msgspec ValidationError names, and its message for store IT.

    ``detail`` is the error without its " - at `$...`" suffix, ``key_path`` the dotted
    path of that suffix, with list items by their place in the file, and ``text`` the file.
    """
    unknown = re.match(r"Object contains unknown field `(.+)`", detail)
    if unknown:
        table_path = key_path
        key_path = f"{key_path}.{unknown.group(1)}" if key_path else unknown.group(1)
        detail = _describe_unknown_key(table_path, unknown.group(1), text)
    # msgspec reports a table's own check (__post_init__) at the table. Its message starts
    # with "invalid <key>", so point at that key's line instead of the table header.
    invalid_key = re.match(r"invalid (\w+)\b", detail)
    if invalid_key and _key_type(f"{key_path}.{invalid_key.group(1)}".lstrip(".")) is not None:
        key_path = f"{key_path}.{invalid_key.group(1)}".lstrip(".")
    return key_path, detail


def _describe_enum_error(key_path: str, value: Any, allowed: Sequence[str] | None = None) -> str:
    """Replace msgspec's "Invalid enum value 'x'" with the key, the value and the values it takes.

    ``allowed`` defaults to the values of the Literal type of ``key_path`` in Config.
    """
    if allowed is None:
        allowed = _allowed_values(key_path)
    parts = key_path.split(".")
    subject = f"{parts[-2]} entry" if parts[-1].isdigit() and len(parts) > 1 else parts[-1]
    if not allowed:
        return (
            f"invalid {subject} {_quoted(value)}: use one of the values that the configuration"
            " reference lists for it"
        )
    return f"invalid {subject} {_quoted(value)}: use one of {', '.join(allowed)}"


def _allowed_values(key_path: str) -> tuple[str, ...]:
    """Return the values a Literal-typed key such as ``policy.exit_override.2`` accepts."""
    kind = _key_type(key_path)
    if typing.get_origin(kind) is Literal:
        return tuple(str(value) for value in typing.get_args(kind))
    return ()


def _describe_unknown_key(table_path: str, name: str, text: str) -> str:
    """Describe a key that the table at ``table_path`` does not have, for an error message.

    A likely misspelling of one of the table's keys gets "did you mean". A key of other
    tables, [[devices]] among them, gets the tables it belongs in, which catches a key that
    is uncommented below a table header that is still commented out, as in the
    configuration template.
    """
    location = f"in [{table_path}]" if table_path else "at the top level"
    homes = [
        table
        for table in _table_names()
        if table != table_path and any(field.name == name for field in _table_fields(table))
    ]
    if name in _device_keys():
        homes.append("devices")
    suggestion = _similar_key(table_path, name)
    if suggestion is not None:
        detail = f"unknown key; did you mean {suggestion}?"
        if homes and suggestion != name.lower().replace("-", "_"):
            detail += f" A key named {name} belongs in {_or_list(homes)}"
        return detail
    if not homes:
        return "unknown key; check its spelling against the configuration reference"
    if len(homes) > 1:
        return (
            f"{name} belongs in {_or_list(homes)}, not {location}; put it below the header of the"
            " table it is meant for"
        )
    home = homes[0]
    # Each [[devices]] header starts a new device table, so the fix is to write one above
    # the key, even when the file has [[devices]] tables already.
    if home == "devices":
        return (
            f"{name} belongs in [[devices]], not {location}; write the [[devices]] header"
            " above it (remove the # if it is commented out)"
        )
    # A second header of a table that the file has already is a TOML error, so the fix
    # then is to move the key, not to write the header.
    header_line = find_key_line(text, home)
    if header_line is not None:
        return (
            f"{name} belongs in [{home}], not {location}; move it below the [{home}] header at"
            f" line {header_line}"
        )
    return (
        f"{name} belongs in [{home}], not {location}; write the [{home}] header above it (remove"
        " the # if it is commented out)"
    )


def _table_names() -> list[str]:
    """Return the names of the top-level tables whose keys Config defines, in file order."""
    return [field.name for field in msgspec.structs.fields(Config) if _table_fields(field.name)]


@functools.cache
def _device_keys() -> frozenset[str]:
    """Return the keys that a [[devices]] table of at least one kind can have.

    NOTE: a kind whose driver module cannot be imported, such as hid without python-evdev,
    adds none of its own keys, so such a key outside [[devices]] is reported as unknown.
    """
    # Imported here because only an unknown key needs daemon.devices and the driver modules.
    from daemon.devices import KINDS

    keys = {field.name for field in msgspec.structs.fields(DeviceSettings)}
    tag_field = DeviceSettings.__struct_config__.tag_field  # kind
    if tag_field is not None:
        keys.add(tag_field)
    for module_name, settings_name, _ in KINDS.values():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        settings = getattr(module, settings_name)
        keys.update(field.name for field in msgspec.structs.fields(settings))
    return frozenset(keys)


def _or_list(tables: Sequence[str]) -> str:
    """Join table names as their headers are written, such as "[database] or [[devices]]"."""
    return " or ".join(f"[[{table}]]" if table == "devices" else f"[{table}]" for table in tables)


def _similar_key(table_path: str, name: str) -> str | None:
    """Return the key of the table at ``table_path`` that ``name`` is a likely typing slip of.

    Case, ``-`` for ``_`` and small misspellings count, such as ``Policy`` or
    ``max_scan_agee``.
    """
    names = [field.name for field in _table_fields(table_path)]
    folded = name.lower().replace("-", "_")
    if folded in names:
        return folded
    matches = difflib.get_close_matches(folded, names, n=1, cutoff=0.8)
    return matches[0] if matches else None


def _key_type(key_path: str) -> Any:
    """Return the type of a dotted configuration key, or None when Config has no such key."""
    kind: Any = Config
    for part in key_path.split("."):
        if part.isdigit():
            arguments = typing.get_args(kind)
            kind = arguments[0] if arguments else None
        elif isinstance(kind, type) and issubclass(kind, msgspec.Struct):
            kind = typing.get_type_hints(kind).get(part)
        else:
            return None
        # Unwrap "X | None" and Annotated[X, ...] down to X.
        while typing.get_origin(kind) in (typing.Union, types.UnionType, typing.Annotated):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
    return kind


# Headers of an array table ("[[devices]]") and of a table ("[policy]"), in a stripped line.
_ARRAY_HEADER = re.compile(r"^\[\[\s*([^\]]+?)\s*\]\]")
_TABLE_HEADER = re.compile(r"^\[\s*([^\]]+?)\s*\]")


def find_key_line(text: str, key_path: str) -> int | None:
    """Find the 1-based line where a dotted key such as ``policy.max_scan_age`` is set.

    Array tables and list items are addressed by index (``devices.1.kind``,
    ``policy.exit_override.1``). An item of a list gets the line where the list's key is
    written, which is where a list that spans several lines starts. Returns the line of the
    table header when the key itself is not written, and None when neither is.
    """
    parts = key_path.split(".") if key_path else []
    if not parts:
        return None
    table: list[str] = []
    array_counts: dict[str, int] = {}
    header_line: int | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        array_header = _ARRAY_HEADER.match(line)
        table_header = _TABLE_HEADER.match(line)
        if array_header:
            name = array_header.group(1)
            index = array_counts.get(name, -1) + 1
            array_counts[name] = index
            table = [*name.split("."), str(index)]
        elif table_header:
            table = table_header.group(1).split(".")
        else:
            assignment = re.match(r"^([A-Za-z0-9_\-\"']+)\s*=", line)
            if assignment is None:
                continue
            key = [*table, assignment.group(1).strip("\"'")]
            # The key itself, or the list or inline table that contains the item it names.
            if key == parts[: len(key)]:
                return number
            continue
        if table == parts[: len(table)] and header_line is None and table:
            header_line = number
    return header_line
