"""[[devices]], [local] and list validation: errors name the key and its line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from daemon.config import ConfigError, parse_config
from tests.conftest import run_cli

BASE = """\
[stores]
ids = ["STORE-001"]

[[devices]]
name = "scanner-1"
kind = "serial"
station = "station-1"
path = "/dev/ttyACM0"
"""
# Lines of the text that each case appends to BASE start at line 10.


@dataclass(frozen=True)
class BadConfig:
    name: str
    extra: str
    key: str
    line: int
    message: str
    # Python module of an optional driver. Without it, only name and station are checked.
    needs: str | None = None


CASES = [
    BadConfig(
        "unknown-key",
        '\n[[devices]]\nname = "s2"\nkind = "serial"\nstation = "x"\npath = "/p"\nbaud = 9600\n',
        "devices.1.baud",
        15,
        "unknown key",
    ),
    BadConfig(
        "wrong-type",
        '\n[[devices]]\nname = "s2"\nkind = "serial"\nstation = "x"\npath = "/p"\n'
        'baudrate = "fast"\n',
        "devices.1.baudrate",
        15,
        "invalid value 'fast': baudrate must be an integer from 50 to 4000000, such as 9600",
    ),
    BadConfig(
        "kind-not-a-string",
        '\n[[devices]]\nname = "s2"\nkind = ["serial"]\nstation = "x"\n',
        "devices.1.kind",
        12,
        "invalid kind ['serial']: use one of",
    ),
    BadConfig(
        "missing-kind",
        '\n[[devices]]\nname = "s2"\nstation = "x"\n',
        "devices.1.kind",
        10,
        "missing key",
    ),
    BadConfig(
        "unknown-kind",
        '\n[[devices]]\nname = "s2"\nkind = "usb"\nstation = "x"\n',
        "devices.1.kind",
        12,
        "invalid kind 'usb'",
    ),
    BadConfig(
        "missing-path",
        '\n[[devices]]\nname = "s2"\nkind = "serial"\nstation = "x"\n',
        "devices.1.path",
        10,
        "missing key",
    ),
    BadConfig(
        "bad-serial-duration",
        '\n[[devices]]\nname = "s2"\nkind = "serial"\nstation = "x"\npath = "/p"\n'
        'idle_gap = "soon"\n',
        "devices.1.idle_gap",
        15,
        "invalid duration",
    ),
    BadConfig(
        "bad-pcsc-duration",
        '\n[[devices]]\nname = "r1"\nkind = "pcsc"\nstation = "x"\nreader = "ACS*"\n'
        'poll_interval = "fast"\n',
        "devices.1.poll_interval",
        15,
        "invalid duration",
    ),
    BadConfig(
        "bad-stopbits",
        '\n[[devices]]\nname = "s2"\nkind = "serial"\nstation = "x"\npath = "/p"\nstopbits = 3\n',
        "devices.1.stopbits",
        15,
        "invalid value",
    ),
    BadConfig(
        "empty-station",
        '\n[[devices]]\nname = "s2"\nkind = "serial"\nstation = ""\npath = "/p"\n',
        "devices.1.station",
        13,
        "invalid value '': station must be a non-empty string",
    ),
    BadConfig(
        "duplicate-name",
        '\n[[devices]]\nname = "scanner-1"\nkind = "serial"\nstation = "x"\npath = "/p"\n',
        "devices.1.name",
        11,
        "duplicate device name 'scanner-1': devices.0 has it too",
    ),
    BadConfig(
        "duplicate-path",
        '\n[[devices]]\nname = "s2"\nkind = "serial"\nstation = "x"\npath = "/dev/ttyACM0"\n',
        "devices.1.path",
        14,
        "duplicate path '/dev/ttyACM0': devices.0 reads it already",
    ),
    BadConfig(
        "duplicate-path-spelled-differently",
        '\n[[devices]]\nname = "s2"\nkind = "serial"\nstation = "x"\npath = "/dev//ttyACM0"\n',
        "devices.1.path",
        14,
        "duplicate path '/dev//ttyACM0': devices.0 reads it already",
    ),
    BadConfig(
        "duplicate-hid-match",
        '\n[[devices]]\nname = "h1"\nkind = "hid"\nstation = "x"\nmatch = "Wedge*"\n'
        '\n[[devices]]\nname = "h2"\nkind = "hid"\nstation = "y"\nmatch = "Wedge*"\n',
        "devices.2.match",
        20,
        "duplicate match 'Wedge*': devices.1 uses it already",
        needs="evdev",
    ),
    BadConfig(
        "duplicate-pcsc-reader",
        '\n[[devices]]\nname = "r1"\nkind = "pcsc"\nstation = "x"\nreader = "ACS*"\n'
        '\n[[devices]]\nname = "r2"\nkind = "pcsc"\nstation = "y"\nreader = "ACS*"\n',
        "devices.2.reader",
        20,
        "duplicate reader 'ACS*': devices.1 uses it already",
        needs="smartcard",
    ),
    BadConfig(
        "relative-path",
        '\n[[devices]]\nname = "s2"\nkind = "serial"\nstation = "x"\npath = "ttyACM1"\n',
        "devices.1.path",
        14,
        "invalid relative path 'ttyACM1'; use the absolute path of the device",
    ),
    BadConfig(
        "max-frame-length-over-limit",
        '\n[[devices]]\nname = "s2"\nkind = "serial"\nstation = "x"\npath = "/p"\n'
        "max_frame_length = 100000000\n",
        "devices.1.max_frame_length",
        15,
        "invalid value 100000000: max_frame_length must be an integer from 1 to 131072",
    ),
    BadConfig(
        "serial-enum",
        '\n[[devices]]\nname = "s2"\nkind = "serial"\nstation = "x"\npath = "/p"\n'
        'terminator = "crlf"\n',
        "devices.1.terminator",
        15,
        "invalid terminator 'crlf': use one of CR, LF, CRLF, TAB, ETX, none",
    ),
    BadConfig(
        "serial-int-enum",
        '\n[[devices]]\nname = "s2"\nkind = "serial"\nstation = "x"\npath = "/p"\nbytesize = 9\n',
        "devices.1.bytesize",
        15,
        "invalid bytesize 9: use one of 5, 6, 7, 8",
    ),
    BadConfig(
        "pcsc-enum",
        '\n[[devices]]\nname = "r1"\nkind = "pcsc"\nstation = "x"\nreader = "ACS*"\n'
        'uid_byte_order = "big"\n',
        "devices.1.uid_byte_order",
        15,
        "invalid uid_byte_order 'big': use one of msb, lsb",
        needs="smartcard",
    ),
    BadConfig(
        "hid-enum",
        '\n[[devices]]\nname = "h1"\nkind = "hid"\nstation = "x"\nmatch = "Scanner*"\n'
        'layout = "fr"\n',
        "devices.1.layout",
        15,
        "invalid layout 'fr': use one of us, de",
        needs="evdev",
    ),
    BadConfig(
        "local-unknown-key",
        '\n[local]\nsession_time = "5m"\n',
        "local.session_time",
        11,
        "unknown key",
    ),
    BadConfig(
        "local-bad-network",
        '\n[local]\nallow_networks = ["loopback"]\n',
        "local.allow_networks",
        11,
        "invalid allow_networks entry 'loopback': use CIDR notation",
    ),
    # An item of a list is reported at the line of the list's key.
    BadConfig(
        "list-item-one-line",
        '\n[policy]\nexit_override = ["SUSPENDED", "EXPIRD"]\n',
        "policy.exit_override.1",
        11,
        "invalid exit_override entry 'EXPIRD'",
    ),
    BadConfig(
        "list-item-multi-line",
        '\n[policy]\nexit_override = [\n    "SUSPENDED",\n    "EXPIRD",\n]\n',
        "policy.exit_override.1",
        11,
        "invalid exit_override entry 'EXPIRD'",
    ),
    BadConfig(
        "local-store-not-served",
        '\n[local]\nstore_id = "STORE-999"\n',
        "local.store_id",
        11,
        "not in [stores] ids",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_bad_table_rejected(case: BadConfig) -> None:
    if case.needs is not None:
        pytest.importorskip(case.needs)

    with pytest.raises(ConfigError) as raised:
        parse_config(BASE + case.extra, source="config.toml")

    message = str(raised.value)
    assert f"key {case.key}:" in message
    assert f"line {case.line}," in message
    assert case.message in message


def test_valid_tables_accepted() -> None:
    extra = (
        '\n[[devices]]\nname = "r1"\nkind = "pcsc"\nstation = "station-1"\nreader = "ACS*"\n'
        '\n[local]\nsession_timeout = "2m"\ndebounce = "0ms"\n'
    )

    config = parse_config(BASE + extra)

    assert [device["name"] for device in config.devices] == ["scanner-1", "r1"]
    assert config.local.session_timeout == 120.0
    assert config.local.debounce == 0.0


def test_check_config_names_key_and_line(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(BASE + CASES[0].extra, encoding="utf-8")

    result = run_cli("check-config", str(path))

    assert result.returncode == 2
    assert f"{path}: line 15, key devices.1.baud: unknown key" in result.stderr


def test_inline_device_list_keeps_places() -> None:
    # The first item is left out while converting, and the problems of the others still
    # name them by their place in the list, at the line of the list's key.
    text = (
        'devices = [\n    "scanner-0",\n'
        '    {name = "scanner-1", kind = "serial", station = "x", path = "/dev/ttyACM0"},\n'
        '    {name = "scanner-1", kind = "serial", station = "x", path = "/dev/ttyACM1"},\n'
        ']\n\n[stores]\nids = ["STORE-001"]\n'
    )

    with pytest.raises(ConfigError) as raised:
        parse_config(text, source="config.toml")

    message = str(raised.value)
    assert (
        "config.toml: line 1, key devices.0: invalid value 'scanner-0': each item of devices must"
        " be a table" in message
    )
    assert (
        "config.toml: line 1, key devices.2.name: duplicate device name 'scanner-1':"
        " devices.1 has it too" in message
    )
