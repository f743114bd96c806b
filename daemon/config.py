"""TOML configuration: types, defaults, and errors that name the key and line."""

from __future__ import annotations

import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import msgspec

DEFAULT_CONFIG_PATH = Path("/etc/identity-connector/config.toml")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

Action = Literal["ACCEPT", "REJECT"]
OverridableReason = Literal["SUSPENDED", "EXPIRED", "NOT_YET_VALID", "CACHE_STALE", "REVOKED"]


class ConfigError(Exception):
    """A configuration that cannot be used; the message names the key, line and fix."""


class Duration(float):
    """A length of time in seconds, written in TOML as "300ms", "30s", "5m", "24h" or "7d"."""


def parse_duration(text: str) -> Duration:
    """Convert "5m"-style text to seconds, raising ValueError with the accepted forms."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(
            f"invalid duration {text!r}: write a number and a unit, one of ms, s, m, h, d"
            ' (for example "30s" or "24h")'
        )
    return Duration(float(match.group(1)) * _UNIT_SECONDS[match.group(2)])


def _decode_hook(kind: type, value: Any) -> Any:
    if kind is Duration:
        if isinstance(value, str):
            return parse_duration(value)
        raise ValueError(f'invalid duration {value!r}: write it as a string such as "30s"')
    raise NotImplementedError(kind)


class _Section(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pass


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_size: int = 16384
    """Largest ResolveScan body accepted, in bytes; larger bodies get 413."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"invalid port {self.port}: use 1-65535, or 0 for any free port")
        if not 256 <= self.max_body_size <= 1_048_576:
            raise ValueError(
                f"invalid max_body_size {self.max_body_size}: use 256 to 1048576 bytes"
            )


class StoresConfig(_Section):
    ids: list[str] = []
    """Store ids this box serves; a request for any other store gets 400."""

    def __post_init__(self) -> None:
        for store_id in self.ids:
            if not 1 <= len(store_id) <= 255:
                raise ValueError(f"invalid store id {store_id!r}: use 1 to 255 characters")


class DatabaseConfig(_Section):
    path: str = "/var/lib/identity-connector/connector.sqlite3"
    secret_file: str = ""
    """File with the HMAC key for scanned values; empty means `<path>.key`, made at first start."""
    busy_timeout: Duration = Duration(5.0)

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
    format: Literal["auto", "json", "console"] = "auto"


class TlsConfig(_Section):
    cert_file: str
    key_file: str
    client_ca_file: str = ""


class AuthConfig(_Section):
    api_key_header: str = "x-api-key"
    api_key_files: list[str] = []
    allow_networks: list[str] = msgspec.field(default_factory=lambda: ["0.0.0.0/0", "::/0"])

    def __post_init__(self) -> None:
        for network in self.allow_networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(
                    f"invalid network {network!r}: use CIDR notation such as 10.0.0.0/8"
                ) from None


class HqConfig(_Section):
    url: str
    token_file: str = ""
    pull_interval: Duration = Duration(30)
    lookup_timeout: Duration = Duration(0.3)

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"invalid url {self.url!r}: use an http:// or https:// address")


class Config(_Section):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    stores: StoresConfig = msgspec.field(default_factory=StoresConfig)
    database: DatabaseConfig = msgspec.field(default_factory=DatabaseConfig)
    policy: PolicyConfig = msgspec.field(default_factory=PolicyConfig)
    logging: LoggingConfig = msgspec.field(default_factory=LoggingConfig)
    tls: TlsConfig | None = None
    auth: AuthConfig | None = None
    hq: HqConfig | None = None
    devices: list[dict[str, Any]] = []
    """Scanner tables; each driver validates its own keys."""


def load_config(path: Path | str) -> Config:
    """Read and validate a TOML configuration file.

    Raises ConfigError whose message names the file, the key and its line.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"configuration file {path} not found: create it (see the configuration"
            " reference in README.md) or pass another with --config"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc}") from None
    return parse_config(text, source=str(path))


def parse_config(text: str, source: str = "<config>") -> Config:
    """Validate configuration text; ``source`` names it in error messages."""
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None

    try:
        config = msgspec.toml.decode(text.encode(), type=Config, dec_hook=_decode_hook)
    except msgspec.ValidationError as exc:
        raise ConfigError(_describe_validation_error(str(exc), text, source)) from None

    if not config.stores.ids:
        raise ConfigError(
            f"{source}: missing key stores.ids: list the store ids this box serves,"
            ' for example [stores] ids = ["STORE-001"]'
        )
    return config


def _describe_validation_error(message: str, text: str, source: str) -> str:
    detail, _, where = message.partition(" - at `$")
    key_path = where.rstrip("`").lstrip(".")
    unknown = re.match(r"Object contains unknown field `(.+)`", detail)
    if unknown:
        key_path = f"{key_path}.{unknown.group(1)}" if key_path else unknown.group(1)
        detail = "unknown key; check its spelling against the configuration reference"
    key_path = re.sub(r"\[(\d+)\]", r".\1", key_path)
    line = find_key_line(text, key_path)
    location = f"line {line}, " if line else ""
    return f"{source}: {location}key {key_path or '(top level)'}: {detail}"


def find_key_line(text: str, key_path: str) -> int | None:
    """Find the 1-based line where a dotted key such as ``policy.max_scan_age`` is set.

    Array tables are addressed by index (``devices.1.kind``). Returns the line of the
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
        array_header = re.match(r"^\[\[\s*([^\]]+?)\s*\]\]", line)
        table_header = re.match(r"^\[\s*([^\]]+?)\s*\]", line)
        if array_header:
            name = array_header.group(1)
            index = array_counts.get(name, -1) + 1
            array_counts[name] = index
            table = [*name.split("."), str(index)]
        elif table_header:
            table = table_header.group(1).split(".")
        else:
            assignment = re.match(r"^([A-Za-z0-9_\-\"']+)\s*=", line)
            if assignment and [*table, assignment.group(1).strip("\"'")] == parts:
                return number
            continue
        if table == parts[: len(table)] and header_line is None and table:
            header_line = number
    return header_line


def dump_defaults() -> dict[str, Any]:
    """Return the default configuration as plain data, for documentation and tests."""
    return msgspec.to_builtins(Config(stores=StoresConfig(ids=["STORE-001"])))
