"""Configured scanners: decoding [[devices]] tables, running their drivers, and health.

Driver modules are imported only for the kinds that are configured, because
the PC/SC and HID drivers need optional packages (pyscard, python-evdev).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fnmatch
import http.client
import importlib
import json
import os
import re
import sqlite3
import sys
import time
import typing
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import msgspec
import msgspec.inspect
import structlog

from daemon.store import DEVICE_HEALTH_META_KEY
from drivers.base import Driver, Dropped, Event, Health, Scan, backoff_delay

if TYPE_CHECKING:
    from daemon.config import Config

log = structlog.get_logger(__name__)

# kind -> (module, settings class, driver class)
KINDS: dict[str, tuple[str, str, str]] = {
    "serial": ("drivers.serial", "SerialSettings", "SerialDriver"),
    "pcsc": ("drivers.pcsc", "PcscSettings", "PcscDriver"),
    "hid": ("drivers.hid", "HidSettings", "HidDriver"),
}


def _install_hint(package: str, extra: str) -> str:
    """Name the package an optional kind needs, and the pip command that installs it.

    The project is not on PyPI, so the extra is installed from the source folder with the
    pip of the Python that runs the daemon.
    """
    pip = Path(sys.executable).with_name("pip")
    source = Path(__file__).resolve().parent.parent
    target = str(source) if (source / "pyproject.toml").is_file() else "/path/to/source"
    return f"{package} (install the {extra} extra: {pip} install '{target}[{extra}]')"


# The package each optional kind needs, for error messages.
OPTIONAL_PACKAGES = {
    "pcsc": _install_hint("pyscard", "pcsc"),
    "hid": _install_hint("python-evdev", "hid"),
}

# A driver that raises out of ``run`` is restarted after this backoff, in seconds.
RESTART_DELAY = 1.0
RESTART_DELAY_MAX = 60.0
# A driver that ran at least this many seconds before it failed is restarted after
# RESTART_DELAY again, because its failure is a new one rather than a repeat of the last.
RESTART_BACKOFF_RESET_AFTER = 60.0

NOT_STARTED = "not opened yet"


class DriverUnavailable(Exception):
    """A configured device whose driver cannot run on this box, such as a missing package."""


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    """The keys every device has, read from a table that may not decode fully."""

    name: str
    kind: str
    station: str
    table: dict[str, Any]


def _settings_class(kind: str) -> type:
    module_name, settings_name, _ = KINDS[kind]
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise DriverUnavailable(
            f"kind {kind!r} needs {OPTIONAL_PACKAGES.get(kind, error.name)}, which is not"
            f" installed: {error}"
        ) from None
    return getattr(module, settings_name)


def decode_settings(table: dict[str, Any]) -> Any:
    """Decode one table into its driver's settings; raise DriverUnavailable or ValidationError."""
    return msgspec.convert(table, _settings_class(table["kind"]))


def make_driver(table: dict[str, Any]) -> Driver:
    """Build the driver of one validated table; raise DriverUnavailable when it cannot run."""
    kind = table["kind"]
    settings = decode_settings(table)
    module = importlib.import_module(KINDS[kind][0])
    try:
        return getattr(module, KINDS[kind][2])(settings)
    except RuntimeError as error:  # PcscDriver without pyscard
        raise DriverUnavailable(str(error)) from None


def device_table_errors(
    tables: list[dict[str, Any]], positions: Sequence[int] | None = None
) -> list[tuple[str, str]]:
    """Check every device table, and return the dotted key and problem of each invalid one.

    Each table gets at most one problem, in table order. A table with a problem is left out
    of the checks between tables (unique names, serial paths, PC/SC readers and HID
    matches), so no later table is reported for clashing with it. Messages name a table as
    ``devices.N``, where N is its index in ``tables``, or ``positions[N]`` when given, such
    as its place in the file after other items of the list were left out.
    """
    if positions is None:
        positions = range(len(tables))
    if len(positions) != len(tables):
        raise ValueError(
            f"expected one position per device table, got {len(positions)} for {len(tables)}"
        )
    labels = [f"devices.{position}" for position in positions]

    problems: list[tuple[str, str]] = []
    claims = _Claims()
    for index, table in enumerate(tables):
        problem = _table_error(table) or _clash_error(table, claims, tables, labels)
        if problem is None:
            claims.add(index, table)
            continue
        key, detail = problem
        problems.append((f"{labels[index]}.{key}" if key else labels[index], detail))
    return problems


def device_table_error(tables: list[dict[str, Any]]) -> tuple[str, str] | None:
    """Return the first problem that device_table_errors finds, or None."""
    problems = device_table_errors(tables)
    return problems[0] if problems else None


def _table_error(table: dict[str, Any]) -> tuple[str | None, str] | None:
    """Check one table on its own, and return its key (None for the whole table) and problem."""
    kind = table.get("kind")
    if kind is None:
        return "kind", f"missing key: set kind to one of {', '.join(KINDS)}"
    if not isinstance(kind, str) or kind not in KINDS:
        return "kind", f"invalid kind {kind!r}: use one of {', '.join(KINDS)}"

    try:
        decode_settings(table)
    except DriverUnavailable:
        # NOTE: without the optional package only name and station are checked here; the
        # device then reports itself unavailable, and the gateway keeps being served.
        pass
    except msgspec.ValidationError as error:
        key, detail = _describe(str(error), table)
        if key is not None and detail.startswith("Invalid enum value"):
            detail += _allowed_values_hint(kind, key)
        elif key is not None and detail.startswith("Expected `"):
            # msgspec names the type it expected, such as "Expected `int`, got `str`".
            detail = _expected_value_message(kind, key, table.get(key)) or detail
        return key, detail

    return _common_key_error(table, kind)


@dataclass(slots=True)
class _Claims:
    """The names and devices that valid tables use, each mapped to the table's index."""

    names: dict[str, int] = dataclasses.field(default_factory=dict)
    serial_paths: dict[str, int] = dataclasses.field(default_factory=dict)
    sources: dict[tuple[str, str], int] = dataclasses.field(default_factory=dict)
    """PC/SC ``reader`` and HID ``match`` patterns, by (kind, pattern)."""

    def add(self, index: int, table: dict[str, Any]) -> None:
        kind = table["kind"]
        self.names[table["name"]] = index
        path = table.get("path")
        if kind == "serial" and isinstance(path, str):
            self.serial_paths[os.path.normpath(path)] = index
        source_key = _SHARED_SOURCE_KEYS.get(kind)
        source = table.get(source_key) if source_key else None
        if isinstance(source, str):
            self.sources[(kind, source)] = index


def _clash_error(
    table: dict[str, Any], claims: _Claims, tables: list[dict[str, Any]], labels: list[str]
) -> tuple[str, str] | None:
    """Check a valid table against the earlier valid ones, and return its key and problem."""
    kind = table["kind"]
    name = table["name"]
    if name in claims.names:
        return (
            "name",
            f"duplicate device name {name!r}: {labels[claims.names[name]]} has it too; give"
            " each device a unique name",
        )

    path = table.get("path")
    if kind == "serial" and isinstance(path, str):
        # Only the first device could lock the port, so the second would stay
        # unavailable. NOTE: two different paths to one tty, such as its by-id link
        # and /dev/ttyACM0, are not caught, because the links exist only while the
        # scanner is plugged in.
        earlier = claims.serial_paths.get(os.path.normpath(path))
        if earlier is not None:
            return (
                "path",
                f"duplicate path {path!r}: {labels[earlier]} reads it"
                " already, and a serial port can be opened by one device only; remove"
                " one of the two tables or fix its path",
            )

    source_key = _SHARED_SOURCE_KEYS.get(kind)
    source = table.get(source_key) if source_key else None
    if source_key and isinstance(source, str):
        # The first table would grab the device (an exclusive grab for HID, the first
        # matching reader for PC/SC), and the second would never get a scan.
        if (kind, source) in claims.sources:
            return (
                source_key,
                f"duplicate {source_key} {source!r}: {labels[claims.sources[(kind, source)]]}"
                f" uses it already, so this table would never get a scan; remove one of"
                f" the two tables or make its {source_key} name another device",
            )
        overlap = _pattern_overlap_error(kind, source, claims.sources, tables, labels)
        if overlap is not None:
            return source_key, overlap
    return None


# The key that picks the device of a kind whose tables must not share it; serial ports are
# checked by their normalised path above.
_SHARED_SOURCE_KEYS = {"hid": "match", "pcsc": "reader"}

_GLOB_CHARACTERS = frozenset("*?[")
_WILDCARDS = frozenset("*?")


@dataclass(frozen=True, slots=True)
class _PatternOverlap:
    """Wording of one kind's overlap error: what a literal pattern names, the harm, a fix."""

    subject: str
    consequence: str
    example_fix: str


_PATTERN_OVERLAPS = {
    "pcsc": _PatternOverlap(
        "reader",
        "both tables would read that reader and decide each card twice",
        "writing the full reader name in each table",
    ),
    "hid": _PatternOverlap(
        "input device name",
        "both tables would pick that device, and the one that tries to grab it second would"
        " stay unavailable",
        "writing the full device name or its /dev/input/by-id path in each table",
    ),
}


def _pattern_overlap_error(
    kind: str,
    pattern: str,
    earlier: dict[tuple[str, str], int],
    tables: list[dict[str, Any]],
    labels: list[str],
) -> str | None:
    """Describe how a PC/SC ``reader`` or HID ``match`` glob overlaps an earlier table's.

    Returns None when the patterns are disjoint, and for kinds without name patterns. Only
    a glob that matches another table's full name is caught. A pattern without ``*`` or
    ``?`` counts as a full name too, because a name written in full matches even when it
    contains brackets. Two globs with wildcards, such as ``ACS*`` and ``*PICC*``, overlap
    only if a device whose name both match is plugged in, which the configuration cannot
    show. The PC/SC driver then lets the first table
    that opens such a reader read it alone. A HID ``match`` that is an absolute path names
    a device node rather than a device name, so no glob is compared with it.
    """
    overlap_kind = _PATTERN_OVERLAPS.get(kind)
    if overlap_kind is None or _is_device_path(kind, pattern):
        return None
    subject = overlap_kind.subject
    is_glob = not _GLOB_CHARACTERS.isdisjoint(pattern)
    is_name = _WILDCARDS.isdisjoint(pattern)
    for (other_kind, other), index in earlier.items():
        if other_kind != kind or _is_device_path(kind, other):
            continue
        other_is_glob = not _GLOB_CHARACTERS.isdisjoint(other)
        other_is_name = _WILDCARDS.isdisjoint(other)
        if is_glob and other_is_name and fnmatch.fnmatchcase(other, pattern):
            overlap = f"glob {pattern!r} matches the {subject} {other!r}"
        elif other_is_glob and is_name and fnmatch.fnmatchcase(pattern, other):
            overlap = f"{subject} {pattern!r} is matched by the glob {other!r}"
        else:
            continue
        return (
            f"{overlap} of {labels[index]} ({tables[index]['name']!r}), so"
            f" {overlap_kind.consequence}; make the two patterns disjoint, for example by"
            f" {overlap_kind.example_fix}"
        )
    return None


def _is_device_path(kind: str, pattern: str) -> bool:
    """Tell whether a HID ``match`` is a device path, which the driver opens without a glob."""
    return kind == "hid" and os.path.isabs(pattern)


def _allowed_values_hint(kind: str, key: str) -> str:
    """Return "; use one of ..." for a key of a kind's settings that takes fixed values."""
    try:
        settings_class = _settings_class(kind)
    except DriverUnavailable:
        return ""
    annotation = typing.get_type_hints(settings_class).get(key)
    if typing.get_origin(annotation) is not Literal:
        return ""
    return f"; use one of {', '.join(str(value) for value in typing.get_args(annotation))}"


def _expected_value_message(kind: str, key: str, value: Any) -> str | None:
    """Build the error for a value of the wrong type, or None for a key of unknown type."""
    try:
        settings_class = _settings_class(kind)
    except DriverUnavailable:
        return None
    info = msgspec.inspect.type_info(settings_class)
    assert isinstance(info, msgspec.inspect.StructType)
    field = next((field for field in info.fields if field.name == key), None)
    if field is None:
        return None

    annotation = typing.get_type_hints(settings_class).get(key)
    if typing.get_origin(annotation) is Literal:
        # The annotation keeps the order the settings class declares, and msgspec sorts it.
        expected = "one of " + ", ".join(_toml_value(v) for v in typing.get_args(annotation))
    else:
        expected = _describe_type(field.type, field.default)
    if expected is None:
        return None
    return f"invalid value {_toml_value(value)}: {key} must be {expected}"


def _describe_type(field_type: msgspec.inspect.Type, default: Any) -> str | None:
    """Describe the values of a settings type, such as "an integer of 1 or more, such as 2048"."""
    inspect = msgspec.inspect
    options = field_type.types if isinstance(field_type, inspect.UnionType) else (field_type,)
    # TOML has no null, so an optional key is either left out or set to the other type.
    options = tuple(option for option in options if not isinstance(option, inspect.NoneType))
    if {type(option) for option in options} == {inspect.FloatType, inspect.StrType}:
        # The drivers' Duration type, which drivers.base.parse_duration reads.
        return 'a duration: a number of seconds, or a string such as "500ms", "1.5s" or "1m30s"'
    if len(options) != 1:
        return None

    [option] = options
    if isinstance(option, inspect.BoolType):
        return "true or false"
    if isinstance(option, inspect.ListType) and isinstance(option.item_type, inspect.StrType):
        return "a list of strings"
    if isinstance(option, inspect.IntType):
        expected = "an integer" + _describe_range(option)
    elif isinstance(option, inspect.FloatType):
        expected = "a number"
    elif isinstance(option, inspect.StrType):
        expected = "a non-empty string" if option.min_length else "a string"
    else:
        return None
    # A default of 0 or "" usually means "off", which makes a poor example.
    if default is not msgspec.NODEFAULT and default:
        expected += f", such as {_toml_value(default)}"
    return expected


def _describe_range(int_type: msgspec.inspect.IntType) -> str:
    """Return " from 50 to 4000000", " of 1 or more" or "" for an integer's bounds."""
    lowest = int_type.ge
    if lowest is None and int_type.gt is not None:
        lowest = int_type.gt + 1
    highest = int_type.le
    if highest is None and int_type.lt is not None:
        highest = int_type.lt - 1
    if lowest is not None and highest is not None:
        return f" from {lowest} to {highest}"
    if lowest is not None:
        return f" of {lowest} or more"
    if highest is not None:
        return f" of {highest} or less"
    return ""


def _toml_value(value: Any) -> str:
    """Format a configuration value for a message: TOML's true and false, else Python's repr."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


# The key that names the device of each kind, which the same character rule as name and
# station applies to.
_DEVICE_SOURCE_KEYS = {"serial": "path", **_SHARED_SOURCE_KEYS}

# How to fix a key that contains a non-printable character.
_PRINTABLE_FIXES = {
    "name": "use letters, digits, spaces and punctuation only",
    "station": "use letters, digits, spaces and punctuation only",
    "path": "write the path as `ls -l /dev/serial/by-id/` shows it",
    "match": "write the input device name or path as `identity-connector devices` lists it",
    "reader": "write the reader name as `identity-connector devices` lists it",
}


def _common_key_error(table: dict[str, Any], kind: str) -> tuple[str, str] | None:
    """Check name and station, and the characters of the key that names the device."""
    for key in ("name", "station"):
        value = table.get(key)
        if not isinstance(value, str) or not value:
            return key, "missing or empty: set it to a non-empty string"
        problem = _unprintable_error(key, value)
        if problem is not None:
            return key, problem

    source_key = _DEVICE_SOURCE_KEYS[kind]
    source = table.get(source_key)
    if isinstance(source, str):
        problem = _unprintable_error(source_key, source)
        if problem is not None:
            return source_key, problem
    return None


def _unprintable_error(key: str, value: str) -> str | None:
    """Describe the first non-printable character of a device key's value, or return None.

    A newline would split log lines, and other control characters garble metric labels,
    health errors and the output of the devices command. In a path or a pattern such a
    character is most likely a typing mistake, such as a tab pasted after the value.
    """
    unprintable = next((character for character in value if not character.isprintable()), None)
    if unprintable is None:
        return None
    return (
        f"invalid {key} {value!r}: it contains the non-printable character"
        f" U+{ord(unprintable):04X}; {_PRINTABLE_FIXES[key]}"
    )


_AT_KEY = re.compile(r"^(.*) - at `\$\.([A-Za-z0-9_]+)")
_NAMED_FIELD = re.compile(r"(?:unknown|missing required) field `([A-Za-z0-9_]+)`")
_KEY_PREFIX = re.compile(r"^([A-Za-z0-9_]+): ")
_INVALID_KEY = re.compile(r"^invalid ([A-Za-z0-9_]+) ")


def _describe(message: str, table: dict[str, Any]) -> tuple[str | None, str]:
    """Find the key a driver's settings error is about; None when the message names none."""
    match = _AT_KEY.match(message)
    if match:
        return match.group(2), match.group(1)
    match = _NAMED_FIELD.search(message)
    if match:
        if message.startswith("Object contains unknown field"):
            return match.group(1), "unknown key; check its spelling against docs/devices.md"
        return match.group(1), "missing key; see docs/devices.md for the keys of each kind"
    match = _KEY_PREFIX.match(message)
    if match and match.group(1) in table:
        return match.group(1), message[match.end() :]
    # Messages such as "invalid reader '': ..." start with the key they are about.
    match = _INVALID_KEY.match(message)
    if match and match.group(1) in table:
        return match.group(1), message
    # Messages such as "invalid duration 'x': ..." name the value rather than the key.
    for key, value in table.items():
        if re.search(rf"\b{re.escape(key)}\b", message) or (
            isinstance(value, str) and repr(value) in message
        ):
            return key, message
    return None, message


def device_configs(tables: list[dict[str, Any]]) -> list[DeviceConfig]:
    """Return the common keys of validated device tables."""
    return [DeviceConfig(table["name"], table["kind"], table["station"], table) for table in tables]


ScanHandler = Callable[[DeviceConfig, Driver, Scan], Awaitable[None]]
HealthHandler = Callable[[DeviceConfig, Health], None]
DropHandler = Callable[[DeviceConfig, Dropped], None]


@dataclass
class _Running:
    device: DeviceConfig
    task: asyncio.Task[None] | None


@dataclass(frozen=True, slots=True)
class RestartBackoff:
    """Backoff, in seconds, before the supervisor restarts a failed driver. Tests shorten it."""

    delay: float = RESTART_DELAY
    delay_max: float = RESTART_DELAY_MAX
    reset_after: float = RESTART_BACKOFF_RESET_AFTER
    """A driver that ran this long before it failed is restarted after ``delay`` again."""


class DeviceManager:
    """Start, restart and stop one driver task per configured device."""

    def __init__(
        self,
        on_scan: ScanHandler,
        on_health: HealthHandler,
        on_drop: DropHandler,
        *,
        restart_backoff: RestartBackoff = RestartBackoff(),
    ) -> None:
        self._on_scan = on_scan
        self._on_health = on_health
        self._on_drop = on_drop
        self._restart_backoff = restart_backoff
        self._running: dict[str, _Running] = {}
        self._lock = asyncio.Lock()

    async def apply(self, devices: list[DeviceConfig]) -> None:
        """Run exactly ``devices``: stop removed or changed ones, start new or changed ones."""
        async with self._lock:
            configured = {device.name: device for device in devices}
            for name, running in list(self._running.items()):
                if configured.get(name) != running.device:
                    await self._stop_one(name)
            for name, device in configured.items():
                if name not in self._running:
                    self._start_one(device)

    async def stop(self) -> None:
        async with self._lock:
            for name in list(self._running):
                await self._stop_one(name)

    def _start_one(self, device: DeviceConfig) -> None:
        self._on_health(device, Health(device.name, available=False, error=NOT_STARTED))
        try:
            driver = make_driver(device.table)
        except DriverUnavailable as error:
            log.error(
                "device.driver_unavailable", device=device.name, kind=device.kind, error=str(error)
            )
            self._on_health(device, Health(device.name, available=False, error=str(error)))
            self._running[device.name] = _Running(device, None)
            return

        # Strong reference in _running: the loop keeps only weak ones to tasks.
        task = asyncio.create_task(self._supervise(device, driver), name=f"device-{device.name}")
        self._running[device.name] = _Running(device, task)
        log.info("device.started", device=device.name, kind=device.kind, station=device.station)

    async def _stop_one(self, name: str) -> None:
        running = self._running.pop(name)
        if running.task is not None:
            running.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running.task
        log.info("device.stopped", device=name)

    async def _supervise(self, device: DeviceConfig, driver: Driver) -> None:
        """Run the driver, restarting it with a backoff if it raises or returns."""

        async def sink(event: Event) -> None:
            if isinstance(event, Health):
                self._on_health(device, event)
                return
            if isinstance(event, Dropped):
                self._on_drop(device, event)
                return
            try:
                await self._on_scan(device, driver, event)
            except Exception:
                # One scan that fails to process must not stop the device.
                log.exception("scan.failed", device=device.name, station=device.station)

        backoff = self._restart_backoff
        attempt = 0
        while True:
            started = time.monotonic()
            failure: Exception | None = None
            try:
                await driver.run(sink)
            except Exception as exc:
                failure = exc
            if failure is None:
                error = "driver stopped without an error"
            else:
                error = f"driver failed: {failure!r}"

            if time.monotonic() - started >= backoff.reset_after:
                # The driver ran long enough that this failure starts a new backoff.
                attempt = 0
            delay = backoff_delay(attempt, backoff.delay, backoff.delay_max)
            log.error(
                "device.driver_failed",
                device=device.name,
                error=error,
                attempt=attempt,
                restart_in=delay,
                exc_info=failure,
            )
            self._on_health(device, Health(device.name, available=False, error=error))
            await asyncio.sleep(delay)
            attempt += 1


# --- The `devices` command -----------------------------------------------------------------

SERIAL_BY_ID = "/dev/serial/by-id"
SERIAL_BY_PATH = "/dev/serial/by-path"
# The command reads the running daemon's health with this timeout, in seconds.
HEALTH_TIMEOUT = 3.0


def _links_by_target(folder: str) -> dict[str, str]:
    """Map each device a udev symlink folder points at to its link."""
    links: dict[str, str] = {}
    directory = Path(folder)
    if not directory.is_dir():
        return links
    for link in sorted(directory.iterdir()):
        links.setdefault(os.path.realpath(link), str(link))
    return links


def serial_port_lines() -> list[str]:
    """Describe the serial ports pyserial finds, with their stable udev names."""
    from serial.tools import list_ports

    by_id = _links_by_target(SERIAL_BY_ID)
    by_path = _links_by_target(SERIAL_BY_PATH)
    lines = []
    for port in sorted(list_ports.comports(), key=lambda port: port.device):
        if port.hwid == "n/a":
            # pyserial has no details of a port built into the board, such as ttyS0.
            lines.append(f"  {port.device}  built-in port, no device information")
        else:
            lines.append(f"  {port.device}  {port.description}  [{port.hwid}]")
        for label, links in (("by-id", by_id), ("by-path", by_path)):
            link = links.get(os.path.realpath(port.device))
            if link is not None:
                lines.append(f"      {label}: {link}")
    return lines or ["  none found"]


def pcsc_reader_lines() -> list[str]:
    """List the PC/SC readers pcscd reports, or the reason they cannot be listed."""
    try:
        from smartcard import scard
    except ImportError:
        return [f"  not listed: the PC/SC driver needs {OPTIONAL_PACKAGES['pcsc']}"]

    hresult, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    if hresult != scard.SCARD_S_SUCCESS:
        message = scard.SCardGetErrorMessage(hresult).rstrip(".")
        return [f"  not listed: cannot reach pcscd ({message}); is pcscd installed and running?"]
    try:
        hresult, readers = scard.SCardListReaders(context, [])
    finally:
        scard.SCardReleaseContext(context)
    if hresult == scard.SCARD_E_NO_READERS_AVAILABLE or (
        hresult == scard.SCARD_S_SUCCESS and not readers
    ):
        return ["  none found"]
    if hresult != scard.SCARD_S_SUCCESS:
        return [f"  not listed: {scard.SCardGetErrorMessage(hresult).rstrip('.')}"]
    return [f"  {reader}" for reader in sorted(readers)]


def input_device_lines() -> list[str]:
    """List the Linux input devices python-evdev can open, with their names for ``match``."""
    try:
        import evdev
    except ImportError:
        return [f"  not listed: the HID driver needs {OPTIONAL_PACKAGES['hid']}"]

    lines = []
    unreadable = 0
    for path in sorted(evdev.list_devices()):
        try:
            device = evdev.InputDevice(path)
        except OSError:
            unreadable += 1
            continue
        lines.append(f"  {path}  {device.name!r}  [{device.phys or 'no phys'}]")
        device.close()
    if unreadable:
        lines.append(f"  ({unreadable} more that this user cannot open; try as root)")
    return lines or ["  none found"]


def daemon_device_health(config: Config) -> tuple[dict[str, dict[str, Any]] | None, str]:
    """Read device health from the running daemon; return it by name, or None and why not."""
    if config.tls is not None:
        # The daemon serves HTTPS and may accept gateway certificates only, so the health
        # comes from the record it keeps in the database.
        return recorded_device_health(config)
    host = config.server.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1" if host != "::" else "::1"
    headers = {}
    if config.auth is not None and config.auth.api_key_files:
        try:
            key = Path(config.auth.api_key_files[0]).read_text(encoding="utf-8").strip()
        except OSError as error:
            return None, f"not read: cannot read API key file: {error}"
        headers[config.auth.api_key_header] = key

    connection = http.client.HTTPConnection(host, config.server.port, timeout=HEALTH_TIMEOUT)
    try:
        connection.request("GET", "/v1/local/devices", headers=headers)
        response = connection.getresponse()
        body = response.read()
    except ConnectionRefusedError:
        return None, f"daemon not running (nothing listens on {host}:{config.server.port})"
    except (OSError, http.client.HTTPException) as error:
        return None, f"daemon not reachable at {host}:{config.server.port}: {error}"
    finally:
        connection.close()
    if response.status != 200:
        return None, f"not read: {host}:{config.server.port} returned HTTP {response.status}"
    devices = json.loads(body)["devices"]
    return {device["device"]: device for device in devices}, "from the running daemon"


def recorded_device_health(config: Config) -> tuple[dict[str, dict[str, Any]] | None, str]:
    """Read the device health that the running daemon keeps in its database.

    Returns it by device name in the shape of /v1/local/devices, or None and why not. A
    record whose process is gone (the daemon was killed) is not used.
    """
    path = Path(config.database.path)
    if not Path(f"{path}-shm").exists():
        # The daemon keeps its WAL index open while it runs. Opening the database without
        # one would create it, owned by the caller (often root), and lock the service out.
        return None, f"daemon not running (no open database at {path})"
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=HEALTH_TIMEOUT)
        try:
            row = connection.execute(
                "SELECT value FROM meta WHERE key = ?", (DEVICE_HEALTH_META_KEY,)
            ).fetchone()
        finally:
            connection.close()
    except sqlite3.Error as error:
        return None, f"not read: cannot read {path}: {error}"
    if row is None:
        return None, "daemon not running (no health recorded: the daemon removes it when it stops)"
    try:
        record = json.loads(row[0])
        pid = int(record["pid"])
        recorded_at = _iso(float(record["recordedAt"]))
        devices = {
            name: {
                "device": name,
                "available": bool(state["available"]),
                "error": state["error"],
                "since": _iso(float(state["since"])),
            }
            for name, state in record["devices"].items()
        }
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        return None, f"not read: the device health record in {path} is invalid: {error!r}"
    if not process_exists(pid):
        return None, f"daemon not running (process {pid}, which recorded at {recorded_at}, is gone)"
    return devices, f"recorded by the running daemon (process {pid}) at {recorded_at}"


def process_exists(pid: int) -> bool:
    """Return whether a process with this id runs, whatever user it runs as."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        # It runs as another user, such as the service's.
        return True
    return True


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


def configured_device_lines(
    config: Config, health: tuple[dict[str, dict[str, Any]] | None, str] | None = None
) -> list[str]:
    """Describe the configured devices, with their health when the daemon runs.

    ``health`` is a result of ``daemon_device_health`` or ``recorded_device_health``;
    without it, the first is called.
    """
    devices = device_configs(config.devices)
    if not devices:
        return ["  none configured"]
    states, source = health if health is not None else daemon_device_health(config)
    lines = [f"  health: {source}"]
    for device in devices:
        line = f"  {device.name}  kind={device.kind}  station={device.station}"
        state = None if states is None else states.get(device.name)
        if state is not None and state["available"]:
            line += f"  available since {state['since']}"
        elif state is not None:
            line += f"  UNAVAILABLE since {state['since']}: {state['error']}"
        lines.append(line)
    return lines


def print_device_inventory(config: Config) -> None:
    """Print the scanners this box can see and the configured ones with their health."""
    sections = [
        ("Serial ports", serial_port_lines),
        ("PC/SC readers", pcsc_reader_lines),
        ("Input devices", input_device_lines),
    ]
    for title, describe in sections:
        print(f"{title}:")
        for line in describe():
            print(line)
    print("Configured devices:")
    for line in configured_device_lines(config):
        print(line)
