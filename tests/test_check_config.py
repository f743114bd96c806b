"""`check-config` runs the checks `serve` makes before it opens anything, not only parsing."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from daemon.config import ConfigError, parse_config
from tests.conftest import REPO, free_port, run_cli, write_config
from tests.tls_helpers import CertificateAuthority

CASES = [
    pytest.param(
        "",
        "would expose the connector without authentication",
        id="open-listener-without-auth",
    ),
    pytest.param(
        '[auth]\napi_key_files = ["{missing}"]\n',
        "{missing}",
        id="missing-api-key-file",
    ),
    pytest.param(
        '[tls]\ncert_file = "{missing}"\nkey_file = "{missing}"\n',
        "{missing}",
        id="missing-certificate",
    ),
]


@pytest.mark.parametrize(("extra", "message"), CASES)
def test_check_config_runs_start_up_checks(tmp_path: Path, extra: str, message: str) -> None:
    missing = tmp_path / "absent.pem"
    config = write_config(tmp_path, free_port(), extra.format(missing=missing))
    if not extra:
        text = config.read_text(encoding="utf-8")
        config.write_text(text.replace('host = "127.0.0.1"', 'host = "0.0.0.0"'), "utf-8")

    result = run_cli("check-config", str(config))

    assert result.returncode == 2, result.stdout
    assert message.format(missing=missing) in result.stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            '[policy]\nexit_override = ["SUSPENDED", "SCAN_FUTURE"]\n',
            "key policy.exit_override.1: invalid exit_override entry 'SCAN_FUTURE': use one of"
            " SUSPENDED, EXPIRED, NOT_YET_VALID, CACHE_STALE, REVOKED, SCAN_STALE,"
            " SCAN_FROM_FUTURE",
        ),
        (
            '[policy]\nvalue_encoding = "hex"\n',
            "key policy.value_encoding: invalid value_encoding 'hex': use one of raw, base64, auto",
        ),
    ],
    ids=["list-item", "single-value"],
)
def test_check_config_lists_allowed_values(tmp_path: Path, extra: str, message: str) -> None:
    config = write_config(tmp_path, free_port(), extra)

    result = run_cli("check-config", str(config))

    assert result.returncode == 2, result.stdout
    assert message in result.stderr


def test_check_config_lists_synchronous_modes(tmp_path: Path) -> None:
    config = write_config(tmp_path, free_port())
    text = config.read_text(encoding="utf-8")
    config.write_text(text.replace("[database]\n", '[database]\nsynchronous = "off"\n'), "utf-8")

    result = run_cli("check-config", str(config))

    assert result.returncode == 2, result.stdout
    assert (
        "key database.synchronous: invalid synchronous 'off': use one of normal, full"
        in result.stderr
    )


# (table written after the base configuration, key the message names, line of that key):
# a table's own checks name the key and its line, not the table header.
TABLE_CHECK_CASES = [
    ('[local]\nstore_id = ""\nsession_timeout = "0s"\n', "local.session_timeout", 3),
    ('[hq]\nurl = "http://127.0.0.1:9"\npull_batch_size = 0\n', "hq.pull_batch_size", 3),
    ('[hq]\nurl = "ftp://hq.example"\n', "hq.url", 2),
    ('[auth]\nrate_limit = 5\ntrusted_proxies = ["proxy"]\n', "auth.trusted_proxies", 3),
    ('[local]\nstore_id = ""\nallow_networks = ["loopback"]\n', "local.allow_networks", 3),
]


@pytest.mark.parametrize(
    ("extra", "key", "offset"), TABLE_CHECK_CASES, ids=[case[1] for case in TABLE_CHECK_CASES]
)
def test_table_check_names_key_line(tmp_path: Path, extra: str, key: str, offset: int) -> None:
    config = write_config(tmp_path, free_port(), extra)
    lines = config.read_text(encoding="utf-8").splitlines()
    table_line = lines.index(extra.splitlines()[0]) + 1

    result = run_cli("check-config", str(config))

    assert result.returncode == 2, result.stdout
    assert f"line {table_line + offset - 1}, key {key}: invalid" in result.stderr


# (settings under [hq], fragment of the error). With each of these, `serve` stops or retries
# for ever after it has started, so check-config must reject them first.
HQ_CASES = [
    pytest.param(
        'store_id = "OTHER"\n',
        "key hq.store_id: store 'OTHER' is not in [stores] ids; use one of STORE-001, STORE-002",
        id="store-id-not-served",
    ),
    pytest.param(
        'token_file = "{missing}"\n',
        "[hq] token_file {missing} not found",
        id="missing-token-file",
    ),
    pytest.param(
        'ca_file = "{missing}"\n',
        "[hq] ca_file {missing} not found",
        id="missing-ca-file",
    ),
    pytest.param(
        'client_cert_file = "{missing}"\n',
        "[hq] client_cert_file {missing} not found",
        id="missing-client-certificate",
    ),
    pytest.param(
        'client_cert_file = "{present}"\nclient_key_file = "{missing}"\n',
        "[hq] client_key_file {missing} not found",
        id="missing-client-key",
    ),
]


@pytest.mark.parametrize(("settings", "message"), HQ_CASES)
def test_check_config_runs_hq_checks(tmp_path: Path, settings: str, message: str) -> None:
    missing = tmp_path / "absent.pem"
    present = tmp_path / "present.pem"
    present.write_text("only its existence is checked\n", encoding="utf-8")
    table = '[hq]\nurl = "http://127.0.0.1:9"\n' + settings.format(missing=missing, present=present)
    config = write_config(tmp_path, free_port(), table)

    result = run_cli("check-config", str(config))

    assert result.returncode == 2, result.stdout
    assert message.format(missing=missing) in result.stderr


@pytest.mark.parametrize(
    "url",
    ["http://", "http:///v1", "https://:8443/", "http://127.0.0.1:port/", "http://127.0.0.1:70000"],
)
def test_check_config_rejects_hq_url(tmp_path: Path, url: str) -> None:
    config = write_config(tmp_path, free_port(), f'[hq]\nurl = "{url}"\n')
    url_line = config.read_text(encoding="utf-8").splitlines().index(f'url = "{url}"') + 1

    result = run_cli("check-config", str(config))

    assert result.returncode == 2, result.stdout
    assert f"line {url_line}, key hq.url: invalid url {url!r}" in result.stderr


def test_check_config_accepts_hq_files(tmp_path: Path) -> None:
    token = tmp_path / "hq.token"
    token.write_text("token-from-hq\n", encoding="utf-8")
    table = (
        f'[hq]\nurl = "https://127.0.0.1:8443/"\nstore_id = "STORE-002"\ntoken_file = "{token}"\n'
    )
    config = write_config(tmp_path, free_port(), table)

    result = run_cli("check-config", str(config))

    assert result.returncode == 0, result.stderr
    assert "configuration is valid" in result.stdout
    assert "token-from-hq" not in result.stdout + result.stderr


def mismatched_client_pair(directory: Path) -> str:
    authority = CertificateAuthority(directory / "ca", "hq-client-ca")
    first = authority.issue("store-001", file_stem="first")
    second = authority.issue("store-001", file_stem="second")
    return f'client_cert_file = "{first.cert_file}"\nclient_key_file = "{second.key_file}"\n'


def encrypted_client_key(directory: Path) -> str:
    authority = CertificateAuthority(directory / "ca", "hq-client-ca")
    client = authority.issue("store-001")
    key = serialization.load_pem_private_key(client.key_pem, None)
    encrypted = directory / "client-encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    return f'client_cert_file = "{client.cert_file}"\nclient_key_file = "{encrypted}"\n'


def certificate_without_key(directory: Path) -> str:
    authority = CertificateAuthority(directory / "ca", "hq-client-ca")
    client = authority.issue("store-001")
    return f'client_cert_file = "{client.cert_file}"\n'


def ca_file_not_pem(directory: Path) -> str:
    bundle = directory / "ca-bundle.pem"
    bundle.write_text("not a certificate\n", encoding="utf-8")
    return f'ca_file = "{bundle}"\n'


# (settings written after an https url, key the error names)
HQ_TLS_CASES: dict[str, tuple[Callable[[Path], str], str]] = {
    "key of another certificate": (mismatched_client_pair, "[hq] client_cert_file"),
    "CA file not PEM": (ca_file_not_pem, "[hq] ca_file"),
    "encrypted client key": (encrypted_client_key, "is encrypted"),
    "no key file, none in the certificate file": (
        certificate_without_key,
        "set client_key_file to the file of the certificate's key",
    ),
}


@pytest.mark.parametrize("kind", list(HQ_TLS_CASES))
def test_check_config_loads_hq_tls_files(tmp_path: Path, kind: str) -> None:
    make_settings, message = HQ_TLS_CASES[kind]
    table = '[hq]\nurl = "https://127.0.0.1:8443/"\n' + make_settings(tmp_path)
    config = write_config(tmp_path, free_port(), table)

    result = run_cli("check-config", str(config))

    assert result.returncode == 2, result.stdout
    assert message in result.stderr
    assert "Traceback" not in result.stderr


# (start of the client certificate's validity from now, warning check-config prints)
CLIENT_CERT_DATE_CASES = [
    (timedelta(days=-10), "hq.client_cert_expired"),
    (timedelta(days=2), "hq.client_cert_not_yet_valid"),
    (timedelta(days=-1), None),
]


@pytest.mark.parametrize(("valid_from", "warning"), CLIENT_CERT_DATE_CASES)
def test_check_config_warns_client_cert_dates(
    tmp_path: Path, valid_from: timedelta, warning: str | None
) -> None:
    authority = CertificateAuthority(tmp_path / "ca", "hq-client-ca")
    client = authority.issue("store-001", valid_from=valid_from, valid_for=timedelta(days=7))
    table = (
        '[hq]\nurl = "https://127.0.0.1:8443/"\n'
        f'client_cert_file = "{client.cert_file}"\nclient_key_file = "{client.key_file}"\n'
    )
    config = write_config(tmp_path, free_port(), table)

    result = run_cli("check-config", str(config))

    assert result.returncode == 0, result.stderr
    if warning is None:
        assert "hq.client_cert" not in result.stderr
    else:
        assert warning in result.stderr


def test_check_config_accepts_byte_order_mark(tmp_path: Path) -> None:
    config = write_config(tmp_path, free_port())
    config.write_bytes(b"\xef\xbb\xbf" + config.read_bytes())

    result = run_cli("check-config", str(config))

    assert result.returncode == 0, result.stderr


# ([hq] url, warning check-config prints about it)
PLAIN_HTTP_CASES = [
    ("http://127.0.0.1:9", "hq.token_over_plain_http"),
    ("http://127.0.0.1:9", "hq.tls_settings_ignored"),
    ("https://127.0.0.1:9", None),
]


@pytest.mark.parametrize(("url", "warning"), PLAIN_HTTP_CASES)
def test_check_config_warns_plain_http_hq(tmp_path: Path, url: str, warning: str | None) -> None:
    token = tmp_path / "hq.token"
    token.write_text("token-from-hq\n", encoding="utf-8")
    authority = CertificateAuthority(tmp_path / "ca", "hq-ca")
    table = f'[hq]\nurl = "{url}"\ntoken_file = "{token}"\nca_file = "{authority.cert_file}"\n'
    config = write_config(tmp_path, free_port(), table)

    result = run_cli("check-config", str(config))

    assert result.returncode == 0, result.stderr
    if warning is None:
        assert "plain_http" not in result.stderr
        assert "ignored" not in result.stderr
    else:
        assert warning in result.stderr


def test_check_config_warns_expired_listener_certificate(tmp_path: Path) -> None:
    authority = CertificateAuthority(tmp_path / "ca", "server-ca")
    server = authority.issue(
        "connector.test", server=True, valid_from=timedelta(days=-10), valid_for=timedelta(days=1)
    )
    key = tmp_path / "gateway.key"
    key.write_text("check-config-key-0123456789abcdef\n", encoding="utf-8")
    key.chmod(0o600)
    table = (
        f'[tls]\ncert_file = "{server.cert_file}"\nkey_file = "{server.key_file}"\n'
        f'\n[auth]\napi_key_files = ["{key}"]\n'
    )
    config = write_config(tmp_path, free_port(), table)

    result = run_cli("check-config", str(config))

    assert result.returncode == 0, result.stderr
    assert "tls.cert_expired" in result.stderr


# Keys that select the device of each kind. Every other key keeps its default.
DEVICE_SOURCES = {
    "serial": {"path": '"/dev/ttyACM0"'},
    "pcsc": {"reader": '"ACS ACR122U*"'},
    "hid": {"match": '"Example Scanner*"'},
}

# Python module that each kind's driver needs. Without it, only name and station are checked.
DRIVER_MODULES = {"serial": "serial", "pcsc": "smartcard", "hid": "evdev"}


def device_table(kind: str, settings: dict[str, str], name: str = "scanner-1") -> list[str]:
    """Return the lines of a [[devices]] table, with ``settings`` mapping keys to TOML values."""
    keys = {"name": f'"{name}"', "kind": f'"{kind}"', "station": '"station-1"'}
    keys |= DEVICE_SOURCES[kind]
    keys |= settings
    return ["[[devices]]", *(f"{key} = {value}" for key, value in keys.items())]


# (kind, settings as TOML values, key the error names, fragment of the error that the
# check-config output must contain): one row per cause of a rejected device setting.
DEVICE_SETTING_CASES = [
    pytest.param(
        "serial",
        {"silence_timeout": '"0s"'},
        "silence_timeout",
        "invalid duration '0s': use 100ms or more, because",
        id="serial-silence-timeout-zero",
    ),
    pytest.param(
        "serial",
        {"idle_gap": '"500ms"', "silence_timeout": '"200ms"'},
        "silence_timeout",
        "invalid duration '200ms': use idle_gap (0.5s) or more",
        id="serial-silence-timeout-below-idle-gap",
    ),
    pytest.param(
        "serial",
        {"reconnect_delay": '"0s"'},
        "reconnect_delay",
        "invalid duration '0s': use more than 0",
        id="serial-reconnect-delay-zero",
    ),
    pytest.param(
        "serial",
        {"idle_gap": "0"},
        "idle_gap",
        "invalid duration 0.0: use more than 0",
        id="serial-idle-gap-zero",
    ),
    pytest.param(
        "serial",
        {"partial_timeout": '"0ms"'},
        "partial_timeout",
        "invalid duration '0ms': use more than 0",
        id="serial-partial-timeout-zero",
    ),
    pytest.param(
        "serial",
        {"idle_gap": "inf"},
        "idle_gap",
        "invalid duration inf: use a finite number",
        id="serial-duration-infinite",
    ),
    pytest.param(
        "serial",
        {"baudrate": "99999999999"},
        "baudrate",
        "invalid value 99999999999: baudrate must be an integer from 50 to 4000000",
        id="serial-baudrate-too-high",
    ),
    pytest.param(
        "serial",
        {"baudrate": '"fast"'},
        "baudrate",
        "invalid value 'fast': baudrate must be an integer from 50 to 4000000, such as 9600",
        id="serial-baudrate-not-integer",
    ),
    pytest.param(
        "serial",
        {"aim_ids": '"yes"'},
        "aim_ids",
        "invalid value 'yes': aim_ids must be true or false",
        id="serial-flag-not-boolean",
    ),
    pytest.param(
        "serial",
        {"name": '"scanner\\n1"'},
        "name",
        "invalid name 'scanner\\n1': it contains the non-printable character U+000A",
        id="name-with-newline",
    ),
    pytest.param(
        "serial",
        {"station": '"station\\t1"'},
        "station",
        "invalid station 'station\\t1': it contains the non-printable character U+0009",
        id="station-with-tab",
    ),
    pytest.param(
        "serial",
        {"path": '"/dev/ttyACM0\\n"'},
        "path",
        "invalid path '/dev/ttyACM0\\n': it contains the non-printable character U+000A;"
        " write the path as",
        id="serial-path-with-newline",
    ),
    pytest.param(
        "hid",
        {"match": '"Example Scanner\\t"'},
        "match",
        "invalid match 'Example Scanner\\t': it contains the non-printable character U+0009;"
        " write the input device name or path as",
        id="hid-match-with-tab",
    ),
    pytest.param(
        "pcsc",
        {"reader": '"ACS ACR122U\\u0001*"'},
        "reader",
        "invalid reader 'ACS ACR122U\\x01*': it contains the non-printable character U+0001;"
        " write the reader name as",
        id="pcsc-reader-with-control-character",
    ),
    pytest.param(
        "pcsc",
        {"reader": '"ACS\\u00a0ACR122U*"'},
        "reader",
        "invalid reader 'ACS\\xa0ACR122U*': it contains the non-printable character U+00A0",
        id="pcsc-reader-with-no-break-space",
    ),
    pytest.param(
        "pcsc",
        {"reader": '""'},
        "reader",
        "invalid reader '': give a reader name glob",
        id="pcsc-reader-empty",
    ),
    pytest.param(
        "pcsc",
        {"poll_interval": "true"},
        "poll_interval",
        "invalid value true: poll_interval must be a duration",
        id="pcsc-duration-not-duration",
    ),
    pytest.param(
        "pcsc",
        {"poll_interval": '"25h"'},
        "poll_interval",
        "invalid duration '25h': use 24h or less",
        id="pcsc-poll-interval-too-long",
    ),
    pytest.param(
        "pcsc",
        {"reconnect_delay": '"2m"', "reconnect_delay_max": '"1m"'},
        "reconnect_delay_max",
        "must not be shorter than reconnect_delay",
        id="pcsc-reconnect-delay-max-too-short",
    ),
    pytest.param(
        "hid",
        {"max_scan_length": '"long"'},
        "max_scan_length",
        "invalid value 'long': max_scan_length must be an integer of 1 or more, such as 2048",
        id="hid-integer-not-integer",
    ),
    pytest.param(
        "hid",
        {"poll_interval": "nan"},
        "poll_interval",
        "invalid duration nan: use a finite number",
        id="hid-duration-not-a-number",
    ),
]


@pytest.mark.parametrize(("kind", "settings", "key", "fix"), DEVICE_SETTING_CASES)
def test_check_config_rejects_device_setting(
    tmp_path: Path, kind: str, settings: dict[str, str], key: str, fix: str
) -> None:
    pytest.importorskip(DRIVER_MODULES[kind])
    table = device_table(kind, settings)
    config = write_config(tmp_path, free_port(), "\n".join(table) + "\n")
    lines = config.read_text(encoding="utf-8").splitlines()
    key_line = lines.index(next(line for line in table if line.startswith(f"{key} ="))) + 1

    result = run_cli("check-config", str(config))

    assert result.returncode == 2, result.stdout
    assert f"line {key_line}, key devices.0.{key}: " in result.stderr
    assert fix in result.stderr
    assert "Traceback" not in result.stderr


# Duration forms that every device kind accepts: seconds as a TOML number, or a string of
# number-unit pairs.
DURATION_FORMS = ["1", "2.5", '"250ms"', '"1m30s"', '"1m 30s"', '"90 s"', '"1h"', '"1d"']


# Duration strings that the rest of the configuration accepts too, with their seconds.
CONFIG_DURATION_FORMS = [
    ('"90s"', 90.0),
    ('"1m30s"', 90.0),
    ('"1.5m"', 90.0),
    ('"1m 30s"', 90.0),
    ('"90 s"', 90.0),
    ('"0.025h"', 90.0),
]


@pytest.mark.parametrize(("value", "seconds"), CONFIG_DURATION_FORMS)
def test_config_durations_take_device_forms(value: str, seconds: float) -> None:
    text = f'[stores]\nids = ["S1"]\n[policy]\nmax_scan_age = {value}\n'

    assert parse_config(text).policy.max_scan_age == pytest.approx(seconds)


# (case, duration as a TOML value, fragment of the error). The rest of the configuration
# rejects plain numbers, unlike [[devices]] tables.
CONFIG_DURATION_ERRORS = [
    ("plain number", "300", 'invalid duration 300: write it as a string such as "30s"'),
    (
        "number without unit",
        '"5 5s"',
        "invalid duration '5 5s': write a number and a unit, one of ms, s, m, h, d",
    ),
    ("infinite total", '"1' + "0" * 400 + 's"', "the total is too large; use a shorter duration"),
]


@pytest.mark.parametrize(
    ("value", "message"),
    [pytest.param(*case[1:], id=case[0]) for case in CONFIG_DURATION_ERRORS],
)
def test_config_duration_rejected(value: str, message: str) -> None:
    text = f'[stores]\nids = ["S1"]\n[policy]\nmax_scan_age = {value}\n'

    with pytest.raises(ConfigError) as raised:
        parse_config(text, source="test.toml")

    assert "test.toml: line 4, key policy.max_scan_age: invalid duration" in str(raised.value)
    assert message in str(raised.value)


@pytest.mark.parametrize("value", DURATION_FORMS)
def test_check_config_accepts_device_durations(tmp_path: Path, value: str) -> None:
    pytest.importorskip(DRIVER_MODULES["pcsc"])
    pytest.importorskip(DRIVER_MODULES["hid"])
    tables = [
        device_table("serial", {"partial_timeout": value}, name="serial-1"),
        device_table("pcsc", {"poll_interval": value}, name="pcsc-1"),
        device_table("hid", {"poll_interval": value}, name="hid-1"),
    ]
    text = "\n\n".join("\n".join(table) for table in tables)
    config = write_config(tmp_path, free_port(), text + "\n")

    result = run_cli("check-config", str(config))

    assert result.returncode == 0, result.stderr


# (match of the first HID table, match of the second, fragment of the error on the second
# table's match, or None when check-config accepts the pair)
HID_MATCH_CASES = [
    pytest.param(
        "Wedge*",
        "Wedge Scanner",
        "input device name 'Wedge Scanner' is matched by the glob 'Wedge*' of devices.0 ('hid-1')",
        id="name-after-glob",
    ),
    pytest.param(
        "Wedge Scanner",
        "Wedge Scan[n]er",
        "glob 'Wedge Scan[n]er' matches the input device name 'Wedge Scanner' of devices.0"
        " ('hid-1')",
        id="glob-after-name",
    ),
    # A name written in full matches with its brackets, so it is compared as a name too.
    pytest.param(
        "Wedge*",
        "Wedge Scanner [Keyboard] 01",
        "input device name 'Wedge Scanner [Keyboard] 01' is matched by the glob 'Wedge*' of"
        " devices.0 ('hid-1')",
        id="bracket-name-after-glob",
    ),
    pytest.param(
        "Wedge Scanner [Keyboard] 01",
        "Wedge*",
        "glob 'Wedge*' matches the input device name 'Wedge Scanner [Keyboard] 01' of"
        " devices.0 ('hid-1')",
        id="glob-after-bracket-name",
    ),
    pytest.param("Wedge Scanner", "Wedge Scanner 2", None, id="two-names"),
    pytest.param("Wedge Scanner", "Wedge Scanner ?", None, id="glob-missing-name"),
    # Both match "Wedge Scanner", but which names exist is known only at run time.
    pytest.param("Wedge*", "*Scanner", None, id="two-globs"),
    # A path names a device node, so a glob on device names is not compared with it.
    pytest.param("/dev/input/by-id/usb-Wedge-event-kbd", "*", None, id="path-and-glob"),
]


@pytest.mark.parametrize(("first_match", "second_match", "message"), HID_MATCH_CASES)
def test_check_config_rejects_overlapping_hid_match(
    tmp_path: Path, first_match: str, second_match: str, message: str | None
) -> None:
    pytest.importorskip(DRIVER_MODULES["hid"])
    first = device_table("hid", {"match": f'"{first_match}"'}, name="hid-1")
    second = device_table("hid", {"match": f'"{second_match}"'}, name="hid-2")
    text = "\n".join(first) + "\n\n" + "\n".join(second) + "\n"
    config = write_config(tmp_path, free_port(), text)
    lines = config.read_text(encoding="utf-8").splitlines()
    match_line = len(lines) - lines[::-1].index(f'match = "{second_match}"')

    result = run_cli("check-config", str(config))

    if message is None:
        assert result.returncode == 0, result.stderr
        return
    assert result.returncode == 2, result.stdout
    assert f"line {match_line}, key devices.1.match: " in result.stderr
    assert message in result.stderr
    assert "make the two patterns disjoint" in result.stderr


# Problems of several kinds in one file, each as (line that the problem is on, key that the
# message names), in file order. A [[devices]] table or [local] written before [policy]
# checks that the list follows the file, not the order of the checks.
MANY_PROBLEM_CASES = [
    pytest.param(
        '[policy]\nmax_cache_ag = "24h"\n\n[auth]\nrate_burst = "lots"\n',
        [
            ('max_cache_ag = "24h"', "policy.max_cache_ag"),
            ('rate_burst = "lots"', "auth.rate_burst"),
        ],
        id="unknown-key-and-wrong-type",
    ),
    pytest.param(
        '[[devices]]\nname = "scanner-1"\nkind = "laser"\nstation = "station-1"\n\n'
        '[policy]\nvalue_encoding = "hex"\n',
        [('kind = "laser"', "devices.0.kind"), ('value_encoding = "hex"', "policy.value_encoding")],
        id="device-table-and-enum-value",
    ),
    pytest.param(
        '[local]\nstore_id = "STORE-009"\n\n'
        '[policy]\nexit_override = ["SUSPENDED", "SCAN_FUTURE", "EXPIRD"]\nmax_scan_age = 300\n\n'
        "[server_extra]\n",
        [
            ('store_id = "STORE-009"', "local.store_id"),
            ("exit_override = [", "policy.exit_override.1"),
            ("exit_override = [", "policy.exit_override.2"),
            ("max_scan_age = 300", "policy.max_scan_age"),
            ("[server_extra]", "server_extra"),
        ],
        id="store-id-list-items-duration-and-table",
    ),
    pytest.param(
        '[[devices]]\nname = "scanner-1"\nkind = "laser"\nstation = "station-1"\n\n'
        '[[devices]]\nname = "scanner-2"\nkind = "serial"\nstation = "station-1"\n'
        'path = "/dev/ttyACM0"\n\n'
        '[[devices]]\nname = \'scanner-2\'\nkind = "serial"\nstation = "station-2"\n'
        'path = "/dev/ttyACM1"\n\n'
        "[hq]\n"
        'url = "http://127.0.0.1:9"\npull_intervall = "30s"\n',
        [
            ('kind = "laser"', "devices.0.kind"),
            ("name = 'scanner-2'", "devices.2.name"),
            ('pull_intervall = "30s"', "hq.pull_intervall"),
        ],
        id="two-device-tables-and-unknown-key",
    ),
    # The invalid list entry leaves out only its key, so the next check of [auth] runs too.
    pytest.param(
        '[auth]\nallow_networks = ["10.0.0.300/8"]\nrate_burst = 0\n',
        [
            ('allow_networks = ["10.0.0.300/8"]', "auth.allow_networks"),
            ("rate_burst = 0", "auth.rate_burst"),
        ],
        id="auth-network-and-burst",
    ),
]


@pytest.mark.parametrize(("extra", "expected"), MANY_PROBLEM_CASES)
def test_check_config_lists_every_problem(
    tmp_path: Path, extra: str, expected: list[tuple[str, str]]
) -> None:
    config = write_config(tmp_path, free_port(), extra)
    lines = config.read_text(encoding="utf-8").splitlines()

    result = run_cli("check-config", str(config))

    assert result.returncode == 2, result.stdout
    # Problems on one line, such as two items of a list, are searched for from that line.
    start = 0
    positions = []
    for marker, key in expected:
        line = next(n for n in range(start, len(lines)) if lines[n].startswith(marker)) + 1
        start = line - 1
        fragment = f"error: {config}: line {line}, key {key}: "
        assert fragment in result.stderr
        positions.append(result.stderr.index(fragment))
    assert positions == sorted(positions)
    assert result.stderr.count("error: ") == len(expected)


def test_check_config_maps_device_indices(tmp_path: Path) -> None:
    # The first table is left out of the later checks, and the duplicate name must still
    # name the tables by their place in the file.
    extra = MANY_PROBLEM_CASES[3].values[0]
    config = write_config(tmp_path, free_port(), extra)

    result = run_cli("check-config", str(config))

    assert result.returncode == 2, result.stdout
    assert "duplicate device name 'scanner-2': devices.1 has it too" in result.stderr


# (device tables written after the base configuration, then each problem as (index of the
# table, key that the message names, fragment of the message)), in file order. Every table
# with a problem is listed in one run. A table with a problem is left out of the checks
# between tables, so no later table is reported for clashing with it.
DEVICE_PROBLEM_CASES = [
    pytest.param(
        [
            device_table("serial", {"baudrate": '"fast"'}, name="serial-1"),
            device_table("pcsc", {"reader": '"ACS ACR122U PICC 00 00"'}, name="pcsc-1"),
            device_table("hid", {"layout": '"fr"'}, name="hid-1"),
            device_table("pcsc", {"reader": '"ACS*"'}, name="pcsc-2"),
        ],
        [
            (0, "baudrate", "invalid value 'fast': baudrate must be an integer"),
            (2, "layout", "invalid layout 'fr': use one of us, de"),
            (
                3,
                "reader",
                "glob 'ACS*' matches the reader 'ACS ACR122U PICC 00 00' of devices.1 ('pcsc-1')",
            ),
        ],
        id="two-bad-tables-and-reader-overlap",
    ),
    pytest.param(
        [
            device_table("hid", {"match": '"Wedge Scanner"'}, name="hid-1"),
            device_table("serial", {"stopbits": "3"}, name="serial-1"),
            device_table("pcsc", {"poll_interval": '"25h"'}, name="pcsc-1"),
            device_table("hid", {"match": '"Wedge*"'}, name="hid-2"),
        ],
        [
            (1, "stopbits", "invalid value 3.0, expected 1, 1.5 or 2"),
            (2, "poll_interval", "invalid duration '25h': use 24h or less"),
            (
                3,
                "match",
                "glob 'Wedge*' matches the input device name 'Wedge Scanner' of devices.0"
                " ('hid-1')",
            ),
        ],
        id="two-bad-tables-and-match-overlap",
    ),
    pytest.param(
        [
            device_table("serial", {}, name="serial-1"),
            device_table("serial", {"path": '"/dev/ttyACM1"'}, name="serial-1"),
            device_table("serial", {"path": '"/dev/./ttyACM0"'}, name="serial-2"),
            device_table("hid", {"match": '"Wedge Scanner"'}, name="hid-1"),
            device_table("hid", {"match": '"Wedge*"'}, name="hid-2"),
        ],
        [
            (1, "name", "duplicate device name 'serial-1': devices.0 has it too"),
            (2, "path", "duplicate path '/dev/./ttyACM0': devices.0 reads it already"),
            (4, "match", "glob 'Wedge*' matches the input device name 'Wedge Scanner'"),
        ],
        id="name-path-and-match-clashes",
    ),
    pytest.param(
        [
            device_table("serial", {"baudrate": "0"}, name="serial-1"),
            device_table("serial", {}, name="serial-2"),
            device_table("hid", {"match": '"Wedge*"', "layout": '"fr"'}, name="hid-1"),
            device_table("hid", {"match": '"Wedge Scanner"'}, name="hid-2"),
        ],
        [
            (0, "baudrate", "invalid value 0: baudrate must be an integer from 50"),
            (2, "layout", "invalid layout 'fr'"),
        ],
        id="no-clash-with-bad-table",
    ),
    # The duplicate name contains text that reads like a table's index.
    pytest.param(
        [
            device_table("serial", {"kind": '"laser"'}, name="serial-1"),
            device_table("serial", {}, name="spare devices.0"),
            device_table("serial", {"path": '"/dev/ttyACM1"'}, name="spare devices.0"),
        ],
        [
            (0, "kind", "invalid kind 'laser'"),
            (2, "name", "duplicate device name 'spare devices.0': devices.1 has it too"),
        ],
        id="name-with-index-text",
    ),
]


@pytest.mark.parametrize(("tables", "expected"), DEVICE_PROBLEM_CASES)
def test_check_config_lists_device_problems(
    tmp_path: Path, tables: list[list[str]], expected: list[tuple[int, str, str]]
) -> None:
    for kind in ("serial", "pcsc", "hid"):
        pytest.importorskip(DRIVER_MODULES[kind])
    text = "\n\n".join("\n".join(table) for table in tables)
    config = write_config(tmp_path, free_port(), text + "\n")
    lines = config.read_text(encoding="utf-8").splitlines()
    headers = [number for number, line in enumerate(lines) if line == "[[devices]]"]

    result = run_cli("check-config", str(config))

    assert result.returncode == 2, result.stdout
    positions = []
    for index, key, message in expected:
        key_line = next(n for n in range(headers[index], len(lines)) if lines[n].startswith(key))
        fragment = f"error: {config}: line {key_line + 1}, key devices.{index}.{key}: {message}"
        assert fragment in result.stderr
        positions.append(result.stderr.index(fragment))
    assert positions == sorted(positions)
    assert result.stderr.count("error: ") == len(expected)


def test_store_id_check_names_ids_line() -> None:
    text = '[server]\nport = 8081\n\n[stores]\nids = ["S1", ""]\n'

    with pytest.raises(ConfigError) as raised:
        parse_config(text, source="test.toml")

    assert str(raised.value) == (
        "test.toml: line 5, key stores.ids: invalid ids entry '': a store id has 1 to 255"
        " characters"
    )


def test_check_config_caps_problem_list(tmp_path: Path) -> None:
    keys = [f"unknown_key_{number:02}" for number in range(25)]
    extra = "[policy]\n" + "".join(f"{key} = 1\n" for key in keys)
    config = write_config(tmp_path, free_port(), extra)

    result = run_cli("check-config", str(config))

    assert result.returncode == 2, result.stdout
    assert result.stderr.count(": unknown key;") == 20
    assert f"key policy.{keys[19]}: " in result.stderr
    assert f"key policy.{keys[20]}: " not in result.stderr
    assert "... and 5 more" in result.stderr


def test_status_json_carries_every_problem(tmp_path: Path) -> None:
    extra = MANY_PROBLEM_CASES[0].values[0]
    config = write_config(tmp_path, free_port(), extra)

    result = run_cli("status", "--config", str(config), "--json")

    assert result.returncode == 2, result.stderr
    error = json.loads(result.stdout)
    assert error["errorKind"] == "configuration"
    assert error["error"].count("\n") == 1
    assert "key policy.max_cache_ag: unknown key" in error["error"]
    assert "key auth.rate_burst: invalid value" in error["error"]


# (case, TOML after [stores], the message for the key). msgspec's "Expected `int`, got `str`"
# becomes a sentence with the value and what the key takes.
TYPE_ERROR_CASES = [
    (
        "number in quotes",
        '[server]\nport = "8081"\n',
        "key server.port: invalid value '8081': port must be a whole number; remove the quotes"
        " around the number",
    ),
    (
        "word for a number",
        '[auth]\nrate_burst = "many"\n',
        "key auth.rate_burst: invalid value 'many': rate_burst must be a whole number",
    ),
    (
        "string for a list",
        '[policy]\nexit_override = "SUSPENDED"\n',
        "key policy.exit_override: invalid value 'SUSPENDED': exit_override must be a list in"
        ' brackets, such as ["A", "B"]',
    ),
    (
        "true for a number",
        "[auth]\nrate_limit = true\n",
        "key auth.rate_limit: invalid value true: rate_limit must be a number",
    ),
    (
        "string for true or false",
        '[hq]\nurl = "https://hq.example"\ngzip_uploads = "yes"\n',
        "key hq.gzip_uploads: invalid value 'yes': gzip_uploads must be true or false",
    ),
    (
        "number in a list of strings",
        '[policy]\nexit_override = ["SUSPENDED", 5]\n',
        "key policy.exit_override.1: invalid value 5: each item of exit_override must be a"
        " string in quotes",
    ),
    (
        "line break in a string",
        '[server]\nport = "80\\n80"\n',
        "key server.port: invalid value '80\\n80': port must be a whole number",
    ),
]


@pytest.mark.parametrize(
    ("text", "message"),
    [pytest.param(*case[1:], id=case[0]) for case in TYPE_ERROR_CASES],
)
def test_type_error_names_value_and_type(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config('[stores]\nids = ["S1"]\n' + text, source="test.toml")

    assert message in str(raised.value)


# A string value is shown escaped, so that one problem stays on one line of the error.
@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("80\\n80", "'80\\n80'"),
        ("80\\r\\n80", "'80\\r\\n80'"),
        ("80\\u202880", "'80\\u202880'"),
        ('8\\"0', "'8\"0'"),
        ("8é0", "'8é0'"),
    ],
    ids=["line-feed", "carriage-return", "line-separator", "quote", "accent"],
)
def test_type_error_escapes_string(value: str, shown: str) -> None:
    text = f'[stores]\nids = ["S1"]\n[server]\nport = "{value}"\n'

    with pytest.raises(ConfigError) as raised:
        parse_config(text, source="test.toml")

    message = str(raised.value)
    assert message.splitlines() == [message]
    assert f"key server.port: invalid value {shown}: port must be a whole number" in message


# (TOML added to the test configuration, fragment of the check-config output). One run
# lists all of them, and each message quotes a value the same way: a string as Python's
# repr, true and false as TOML writes them, a list item by item.
QUOTED_VALUE_CASES = [
    (
        '[auth]\nrate_burst = "many"\n',
        "key auth.rate_burst: invalid value 'many': rate_burst must be a whole number",
    ),
    (
        "\n".join(device_table("serial", {"baudrate": '"fast"'})) + "\n",
        "key devices.0.baudrate: invalid value 'fast': baudrate must be an integer",
    ),
    (
        '[hq]\nurl = "http://127.0.0.1:9"\nstore_id = ["STORE-001", true]\n',
        "key hq.store_id: invalid value ['STORE-001', true]: store_id must be a string in quotes",
    ),
    (
        '[policy]\nvalue_encoding = "hex"\n',
        "key policy.value_encoding: invalid value_encoding 'hex': use one of raw, base64, auto",
    ),
]


def test_check_config_quotes_values_alike(tmp_path: Path) -> None:
    extra = "".join(table for table, _ in QUOTED_VALUE_CASES)
    config = write_config(tmp_path, free_port(), extra)

    result = run_cli("check-config", str(config))

    assert result.returncode == 2, result.stdout
    for _, fragment in QUOTED_VALUE_CASES:
        assert fragment in result.stderr
    assert result.stderr.count("error: ") == len(QUOTED_VALUE_CASES)


# (case, TOML added to the test configuration, the keys check-config names, in order).
CROSS_KEY_CASES = [
    (
        "open listener beside a bad value",
        '[local]\nstore_id = "STORE-9"\n',
        ("server.host", "local.store_id"),
    ),
    (
        "hq store beside local store",
        '[local]\nstore_id = "STORE-9"\n[hq]\nurl = "http://127.0.0.1:9"\nstore_id = "STORE-8"\n',
        ("server.host", "local.store_id", "hq.store_id"),
    ),
    (
        "invalid auth is not read as missing",
        '[auth]\napi_key_files = "keys"\n',
        ("auth.api_key_files",),
    ),
    (
        "open listener beside a bad auth network",
        '[auth]\nallow_networks = ["everyone"]\n',
        ("server.host", "auth.allow_networks"),
    ),
    (
        "invalid auth table is not read as missing",
        '[auth]\nrate_limit = -1\napi_key_files = ["keys"]\n',
        ("auth.rate_limit",),
    ),
]


@pytest.mark.parametrize(
    ("extra", "keys"),
    [pytest.param(*case[1:], id=case[0]) for case in CROSS_KEY_CASES],
)
def test_check_config_lists_cross_key_problems(
    tmp_path: Path, extra: str, keys: tuple[str, ...]
) -> None:
    config = write_config(tmp_path, free_port(), extra)
    config.write_text(
        config.read_text(encoding="utf-8").replace('host = "127.0.0.1"', 'host = "0.0.0.0"'),
        encoding="utf-8",
    )

    result = run_cli("check-config", str(config))

    named = re.findall(r"key ([\w.]+): ", result.stderr)
    assert result.returncode == 2, result.stdout
    assert tuple(named) == keys


# (case, TOML after [stores], the message for the unknown key).
UNKNOWN_KEY_CASES = [
    (
        "table in capitals",
        '[Policy]\nmax_scan_age = "5m"\n',
        "key Policy: unknown key; did you mean policy?",
    ),
    (
        "letter too many",
        '[policy]\nmax_scan_agee = "5m"\n',
        "key policy.max_scan_agee: unknown key; did you mean max_scan_age?",
    ),
    (
        "dash for underscore",
        "[policy]\nexit-override = []\n",
        "key policy.exit-override: unknown key; did you mean exit_override?",
    ),
    (
        "nothing alike",
        "[policy]\ncolour = 1\n",
        "key policy.colour: unknown key; check its spelling against the configuration reference",
    ),
]


@pytest.mark.parametrize(
    ("text", "message"),
    [pytest.param(*case[1:], id=case[0]) for case in UNKNOWN_KEY_CASES],
)
def test_unknown_key_suggests_known_one(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config('[stores]\nids = ["S1"]\n' + text, source="test.toml")

    assert message in str(raised.value)


# (commented-out line of systemd/config.toml that store IT uncomments without its table
# header, header of the table the key belongs in). Every table header above it is still
# commented out, so TOML puts the key in [stores]. A [[devices]] key is one that every
# kind has, the kind itself, or a key of one kind.
TEMPLATE_KEY_CASES = [
    pytest.param('#max_scan_age = "5m"', "[policy]", id="policy"),
    pytest.param("#port = 8080", "[server]", id="server"),
    pytest.param('#level = "info"', "[logging]", id="logging"),
    pytest.param('#name = "station-1-handheld"', "[[devices]]", id="device-name"),
    pytest.param('#kind = "pcsc"', "[[devices]]", id="device-kind"),
    pytest.param("#baudrate = 9600", "[[devices]]", id="serial-baudrate"),
    pytest.param('#reader = "ACS ACR122U*"', "[[devices]]", id="pcsc-reader"),
]


@pytest.mark.parametrize(("commented", "header"), TEMPLATE_KEY_CASES)
def test_check_config_template_key_without_header(
    tmp_path: Path, commented: str, header: str
) -> None:
    text = (REPO / "systemd" / "config.toml").read_text(encoding="utf-8")
    line = text.splitlines().index(commented) + 1
    config = tmp_path / "config.toml"
    config.write_text(text.replace(commented, commented[1:]), encoding="utf-8")
    key = commented[1:].partition(" ")[0]

    result = run_cli("check-config", str(config))

    assert result.returncode == 2, result.stdout
    assert (
        f"line {line}, key stores.{key}: {key} belongs in {header}, not in [stores]; write"
        f" the {header} header above it (remove the # if it is commented out)"
    ) in result.stderr
    assert result.stderr.count("error: ") == 1


# (case, text before the test configuration, TOML added after it, line with the key, key
# the message names, message, where {header} is the line of the [policy] header).
WRONG_TABLE_CASES = [
    (
        "key below another table",
        "",
        'max_scan_age = "5m"\n',
        'max_scan_age = "5m"',
        "logging.max_scan_age",
        "max_scan_age belongs in [policy], not in [logging]; write the [policy] header above"
        " it (remove the # if it is commented out)",
    ),
    (
        "key before the first table",
        'max_scan_age = "5m"\n',
        "",
        'max_scan_age = "5m"',
        "max_scan_age",
        "max_scan_age belongs in [policy], not at the top level; write the [policy] header"
        " above it (remove the # if it is commented out)",
    ),
    (
        "table written elsewhere",
        "",
        '[policy]\nvalue_encoding = "raw"\n\n[local]\nmax_scan_age = "5m"\n',
        'max_scan_age = "5m"',
        "local.max_scan_age",
        "max_scan_age belongs in [policy], not in [local]; move it below the [policy] header"
        " at line {header}",
    ),
    (
        "key of two tables",
        "",
        '[policy]\nstore_id = "STORE-001"\n',
        'store_id = "STORE-001"',
        "policy.store_id",
        "store_id belongs in [hq] or [local], not in [policy]; put it below the header of the"
        " table it is meant for",
    ),
    (
        "key of a table and of devices",
        "",
        '[local]\npath = "/dev/ttyACM0"\n',
        'path = "/dev/ttyACM0"',
        "local.path",
        "path belongs in [database] or [[devices]], not in [local]; put it below the header of"
        " the table it is meant for",
    ),
    (
        "device key after a device table",
        "",
        "\n".join(device_table("serial", {})) + '\n\n[local]\nstation = "station-2"\n',
        'station = "station-2"',
        "local.station",
        "station belongs in [[devices]], not in [local]; write the [[devices]] header above it"
        " (remove the # if it is commented out)",
    ),
    (
        "misspelling that is a key of another table",
        "",
        '[hq]\nurl = "http://127.0.0.1:9"\nlog_interval = "1m"\n',
        'log_interval = "1m"',
        "hq.log_interval",
        "unknown key; did you mean upload_interval? A key named log_interval belongs in [auth]",
    ),
]


@pytest.mark.parametrize(
    ("prefix", "extra", "key_line", "key", "message"),
    [pytest.param(*case[1:], id=case[0]) for case in WRONG_TABLE_CASES],
)
def test_check_config_names_table_of_key(
    tmp_path: Path, prefix: str, extra: str, key_line: str, key: str, message: str
) -> None:
    config = write_config(tmp_path, free_port(), extra)
    text = prefix + config.read_text(encoding="utf-8")
    config.write_text(text, encoding="utf-8")
    lines = text.splitlines()
    line = lines.index(key_line) + 1
    header = lines.index("[policy]") + 1 if "[policy]" in lines else None

    result = run_cli("check-config", str(config))

    assert result.returncode == 2, result.stdout
    assert f"line {line}, key {key}: {message.format(header=header)}" in result.stderr
    assert result.stderr.count("error: ") == 1


# (case, TOML added to the test configuration, line of the error within it, column of the
# error, text after tomllib's message). A value that TOML reads as bare text gets the fix
# that names its key. Other syntax errors keep tomllib's message alone.
TOML_SYNTAX_CASES = [
    (
        "duration without quotes",
        "[policy]\nmax_cache_age = 24h\n",
        2,
        19,
        '; write the value of max_cache_age in quotes: max_cache_age = "<value>"',
    ),
    (
        "word without quotes",
        '[hq]\nurl = "http://127.0.0.1:9"\noutbox_overflow = drop_oldest\n',
        3,
        19,
        '; write the value of outbox_overflow in quotes: outbox_overflow = "<value>"',
    ),
    (
        "comment after the value",
        "[policy]\nmax_scan_age = 5m  # five minutes\n",
        2,
        17,
        '; write the value of max_scan_age in quotes: max_scan_age = "<value>"',
    ),
    (
        "file name without quotes",
        '[hq]\nurl = "http://127.0.0.1:9"\ntoken_file = s3cr3t-t0ken\n',
        3,
        14,
        '; write the value of token_file in quotes: token_file = "<value>"',
    ),
    (
        "capitalised boolean",
        '[hq]\nurl = "http://127.0.0.1:9"\ngzip_uploads = True\n',
        3,
        16,
        "; gzip_uploads takes true or false, in lower case and without quotes",
    ),
    (
        "number with a unit",
        "[auth]\nrate_burst = 5k\n",
        2,
        15,
        "; rate_burst takes a number, written without quotes or a unit",
    ),
    (
        "list without brackets",
        "[policy]\nexit_override = SUSPENDED\n",
        2,
        17,
        "; write each item of exit_override in quotes, inside brackets: exit_override ="
        ' ["<value>"]',
    ),
    ("address without quotes", "[hq]\nurl = http://127.0.0.1:9\n", 2, 7, ""),
    ("space before the unit", "[policy]\nmax_scan_age = 5 m\n", 2, 18, ""),
]


@pytest.mark.parametrize(
    ("extra", "offset", "column", "hint"),
    [pytest.param(*case[1:], id=case[0]) for case in TOML_SYNTAX_CASES],
)
def test_check_config_hints_toml_syntax_fix(
    tmp_path: Path, extra: str, offset: int, column: int, hint: str
) -> None:
    config = write_config(tmp_path, free_port(), extra)
    lines = config.read_text(encoding="utf-8").splitlines()
    line = lines.index(extra.splitlines()[0]) + offset
    value = lines[line - 1].partition("=")[2].partition("#")[0].strip()

    result = run_cli("check-config", str(config))

    assert result.returncode == 2, result.stdout
    assert result.stderr.count("error: ") == 1
    assert result.stderr.endswith(f"(at line {line}, column {column}){hint}\n")
    detail = result.stderr.partition("invalid TOML: ")[2]
    assert value not in detail


TEMPLATE = (REPO / "systemd" / "config.toml").read_text(encoding="utf-8")
TEMPLATE_STORE_ID = '#store_id = ""'

# (case, configuration text, line the key is set on, text after tomllib's message with
# {first} for the line where that key is set first and {header} for the line of the last
# commented-out header above the second key). tomllib names only the second key's line,
# and the fix names the first. An error that is not a key set twice keeps tomllib's
# message alone. A file that ends without a line break gets the error "at end of document".
DUPLICATE_KEY_CASES = [
    (
        "template key below two commented-out headers",
        TEMPLATE.replace(TEMPLATE_STORE_ID, 'store_id = "STORE-001"'),
        'store_id = "STORE-001"',
        "; store_id is already set at line {first} in [stores], and a key may appear only once"
        " per table. The header of the table it belongs in is probably commented out (remove"
        " the # of #[local] at line {header})",
    ),
    (
        "device key without the next device header",
        '[stores]\nids = ["S1"]\n\n'
        + "\n".join(device_table("serial", {}, name="serial-1"))
        + "\n\n#[[devices]]\n"
        + 'name = "serial-2"\n',
        "name = ",
        "; name is already set at line {first} in this [[devices]] table, and a key may appear"
        " only once per table. The header of the table it belongs in is probably commented out"
        " (remove the # of #[[devices]] at line {header})",
    ),
    (
        "key of its table set twice",
        '[stores]\nids = ["S1"]\n\n[auth]\nrate_limit = inf\nrate_limit = inf\n',
        "rate_limit = inf",
        "; rate_limit is already set at line {first} in [auth], and a key may appear only once"
        " per table, so remove one of the two lines",
    ),
    (
        "key set twice at the end",
        '[stores]\nids = ["S1"]\n\n[auth]\nrate_limit = inf\nrate_limit = inf',
        "rate_limit = inf",
        "; rate_limit is already set at line {first} in [auth], and a key may appear only once"
        " per table, so remove one of the two lines",
    ),
    (
        "unknown key set twice",
        '[stores]\nids = ["S1"]\nsecret = "s3cr3t"\nsecret = [\n  "s3cr3t",\n]\n',
        "secret = ",
        "; secret is already set at line {first} in [stores], and a key may appear only once per"
        " table. The header of the table it belongs in is probably commented out (remove the #)",
    ),
    (
        "dotted key below a value",
        '[stores]\nids = ["S1"]\nsecret = "s3cr3t"\nsecret.part = "s3cr3t"\n',
        "secret",
        "",
    ),
]


@pytest.mark.parametrize(
    ("text", "key_line", "hint"),
    [pytest.param(*case[1:], id=case[0]) for case in DUPLICATE_KEY_CASES],
)
def test_check_config_names_key_set_twice(
    tmp_path: Path, text: str, key_line: str, hint: str
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(text, encoding="utf-8")
    lines = text.split("\n")
    key_lines = [number for number, line in enumerate(lines, 1) if line.startswith(key_line)]
    headers = [
        number for number, line in enumerate(lines[: key_lines[-1]], 1) if line.startswith("#[")
    ]
    expected = hint.format(first=key_lines[0], header=headers[-1] if headers else None)

    result = run_cli("check-config", str(config))

    assert result.returncode == 2, result.stdout
    assert result.stderr.count("error: ") == 1
    assert "invalid TOML: Cannot overwrite a value" in result.stderr
    assert result.stderr.endswith(f"){expected}\n")
    assert "s3cr3t" not in result.stderr
    assert "STORE-001" not in result.stderr.partition("invalid TOML: ")[2]
    assert "inf" not in result.stderr.partition("invalid TOML: ")[2]


# (line that replaces the ids line of the test configuration, lines from [stores] to the
# line the problem names, message): an empty list is reported as empty, not as missing.
STORE_IDS_CASES = [
    pytest.param(
        "ids = []",
        1,
        "key stores.ids: the list is empty; write at least one store id that this box serves,"
        ' for example ids = ["STORE-001"]',
        id="empty-list",
    ),
    pytest.param(
        "ids = [\n]",
        1,
        "key stores.ids: the list is empty; write at least one store id",
        id="empty-list-on-two-lines",
    ),
    pytest.param("", 0, "missing key stores.ids: list the store ids", id="missing-key"),
]


@pytest.mark.parametrize(("ids_line", "offset", "message"), STORE_IDS_CASES)
def test_check_config_names_empty_store_ids(
    tmp_path: Path, ids_line: str, offset: int, message: str
) -> None:
    config = write_config(tmp_path, free_port())
    text = config.read_text(encoding="utf-8").replace('ids = ["STORE-001", "STORE-002"]', ids_line)
    config.write_text(text, encoding="utf-8")
    line = text.splitlines().index("[stores]") + 1 + offset

    result = run_cli("check-config", str(config))

    assert result.returncode == 2, result.stdout
    assert f"error: {config}: line {line}, {message}" in result.stderr
    assert result.stderr.count("error: ") == 1


# (TOML added to the test configuration, key the message names, message). msgspec's
# "Invalid enum value" is reworded as the other messages are: lower case, the key, the value
# and the values the key takes.
ENUM_CASES = [
    pytest.param(
        '[hq]\nurl = "http://127.0.0.1:9"\noutbox_overflow = "drop"\n',
        "hq.outbox_overflow",
        "invalid outbox_overflow 'drop': use one of drop_oldest, drop_newest",
        id="table-key",
    ),
    pytest.param(
        '[policy]\nexit_override = ["EXPIRED", "GONE"]\n',
        "policy.exit_override.1",
        "invalid exit_override entry 'GONE': use one of SUSPENDED, EXPIRED,",
        id="list-item",
    ),
    pytest.param(
        "\n".join(device_table("serial", {"terminator": '"crlf"'})) + "\n",
        "devices.0.terminator",
        "invalid terminator 'crlf': use one of CR, LF, CRLF, TAB, ETX, none",
        id="device-key",
    ),
    pytest.param(
        "\n".join(device_table("serial", {"bytesize": "9"})) + "\n",
        "devices.0.bytesize",
        "invalid bytesize 9: use one of 5, 6, 7, 8",
        id="device-integer",
    ),
]


@pytest.mark.parametrize(("extra", "key", "message"), ENUM_CASES)
def test_check_config_words_enum_errors(tmp_path: Path, extra: str, key: str, message: str) -> None:
    config = write_config(tmp_path, free_port(), extra)

    result = run_cli("check-config", str(config))

    assert result.returncode == 2, result.stdout
    assert f"key {key}: {message}" in result.stderr
    assert "Invalid enum value" not in result.stderr


# A 400-character value that starts with a line break, written as a TOML escape.
LONG_VALUE = "\\n" + "x" * 400

# (TOML added to the test configuration, where {long} stands for LONG_VALUE, key the
# message names). Every message that quotes a value shows an escaped excerpt of it.
LONG_VALUE_CASES = [
    pytest.param('[policy]\nmax_scan_age = "{long}"\n', "policy.max_scan_age", id="duration"),
    pytest.param('[policy]\nvalue_encoding = "{long}"\n', "policy.value_encoding", id="enum"),
    pytest.param('[auth]\nrate_burst = "{long}"\n', "auth.rate_burst", id="type"),
    pytest.param('[auth]\napi_key_header = "{long}"\n', "auth.api_key_header", id="header"),
    pytest.param('[auth]\ntrusted_proxies = ["{long}"]\n', "auth.trusted_proxies", id="network"),
    pytest.param('[hq]\nurl = "ftp://{long}"\n', "hq.url", id="url"),
    pytest.param(
        '[hq]\nurl = "http://127.0.0.1:9"\nclient_key_file = "{long}"\n',
        "hq.client_key_file",
        id="hq-key-without-certificate",
    ),
    pytest.param('[local]\nstore_id = "{long}"\n', "local.store_id", id="store-not-served"),
    pytest.param(
        "\n".join(device_table("serial", {"idle_gap": '"{long}"'})) + "\n",
        "devices.0.idle_gap",
        id="device-duration",
    ),
    pytest.param(
        "\n".join(device_table("serial", {"path": '"dev/{long}"'})) + "\n",
        "devices.0.path",
        id="device-relative-path",
    ),
]


@pytest.mark.parametrize(("extra", "key"), LONG_VALUE_CASES)
def test_check_config_cuts_long_values(tmp_path: Path, extra: str, key: str) -> None:
    config = write_config(tmp_path, free_port(), extra.replace("{long}", LONG_VALUE))

    result = run_cli("check-config", str(config))

    assert result.returncode == 2, result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    prefix = f"key {key}: "
    assert prefix in lines[0]
    detail = lines[0].partition(prefix)[2]
    assert len(detail) <= 250
    assert "\\nxxx" in detail
    assert "x" * 60 not in detail
    assert "xxx..." in detail


# (TOML added before a [policy] table whose max_scan_age is invalid, where {missing} names
# a file that does not exist, {short_key} an API key file with a key that is too short and
# {broken_token} a token file with a line break; then (key, fragment of its message) of
# each problem in file order). A table whose own values are valid has its files read in the
# same run; a table with a problem does not. The line names the key, so a file's message
# starts at its path, and a message that names no path after the key keeps the key.
FILE_PROBLEM_CASES = [
    pytest.param(
        '[auth]\napi_key_files = ["{missing}", "{short_key}", "relative.key"]\n',
        [
            ("auth.api_key_files", "{missing} not found"),
            ("auth.api_key_files", "{short_key} holds a key shorter"),
            ("auth.api_key_files", "'relative.key' is relative but $CREDENTIALS_DIRECTORY"),
        ],
        id="api-key-files",
    ),
    pytest.param(
        '[tls]\ncert_file = "{missing}"\nkey_file = "{missing}"\n',
        [("tls.cert_file", "{missing} not found")],
        id="tls-certificate",
    ),
    pytest.param(
        '[tls]\ncert_file = "{short_key}"\nkey_file = "{short_key}"\n',
        [("tls.cert_file", "cannot load {short_key} with key_file {short_key}: ")],
        id="tls-pair-not-pem",
    ),
    pytest.param(
        '[hq]\nurl = "https://127.0.0.1:9"\ntoken_file = "{missing}"\nca_file = "{missing}"\n',
        [
            ("hq.token_file", "{missing} not found"),
            ("hq.ca_file", "{missing} not found"),
        ],
        id="hq-token-and-ca",
    ),
    pytest.param(
        '[hq]\nurl = "http://127.0.0.1:9"\ntoken_file = "{broken_token}"\n',
        [("hq.token_file", "{broken_token} contains a line break after character 3")],
        id="hq-token-with-line-break",
    ),
    pytest.param(
        '[hq]\nurl = "https://127.0.0.1:9"\nclient_cert_file = "{short_key}"\n',
        [
            (
                "hq.client_key_file",
                "[hq] client_key_file is not set, so the key must be in client_cert_file"
                " {short_key}",
            )
        ],
        id="hq-client-key-not-set",
    ),
    pytest.param(
        '[tls]\ncert_file = "{missing}"\nkey_file = "{missing}"\nmin_version = "1.1"\n',
        [("tls.min_version", "invalid min_version '1.1'")],
        id="tls-with-invalid-value",
    ),
    pytest.param(
        '[hq]\nurl = "http://127.0.0.1:9"\ntoken_file = "{missing}"\nstore_id = "OTHER"\n',
        [("hq.store_id", "store 'OTHER' is not in [stores] ids")],
        id="hq-with-store-not-served",
    ),
]


@pytest.mark.parametrize(("extra", "expected"), FILE_PROBLEM_CASES)
def test_check_config_lists_file_problems(
    tmp_path: Path, extra: str, expected: list[tuple[str, str]]
) -> None:
    names = {
        "missing": tmp_path / "absent.pem",
        "short_key": tmp_path / "short.key",
        "broken_token": tmp_path / "broken.token",
    }
    names["short_key"].write_text("abc\n", encoding="utf-8")
    names["short_key"].chmod(0o600)
    names["broken_token"].write_text("abc\ndef\n", encoding="utf-8")
    text = extra.format(**names) + '\n[policy]\nmax_scan_age = "soon"\n'
    config = write_config(tmp_path, free_port(), text)

    result = run_cli("check-config", str(config))

    assert result.returncode == 2, result.stdout
    problems = [*expected, ("policy.max_scan_age", "invalid duration 'soon'")]
    positions = []
    for key, fragment in problems:
        line = f"key {key}: {fragment.format(**names)}"
        assert line in result.stderr
        positions.append(result.stderr.index(line))
    assert positions == sorted(positions)
    assert result.stderr.count("error: ") == len(problems)


# (settings under [hq] beside a store_id that [stores] ids lacks, then (key, fragment of
# its message) of the [hq] check). A check of two keys names one of them, so only that key
# is left out and the rest of [hq] is still checked.
HQ_PAIR_CASES = [
    pytest.param(
        'backoff_initial = "2m"\n',
        ("hq.backoff_initial", "invalid backoff_initial 120s: use backoff_max (60s) or less"),
        id="initial-above-default-max",
    ),
    pytest.param(
        'backoff_initial = "2m"\nbackoff_max = "90s"\n',
        ("hq.backoff_initial", "invalid backoff_initial 120s: use backoff_max (90s) or less"),
        id="initial-above-max",
    ),
    pytest.param(
        'backoff_initial = "10s"\nbackoff_max = "5s"\n',
        ("hq.backoff_max", "invalid backoff_max 5s: use backoff_initial (10s) or more"),
        id="max-below-initial",
    ),
    pytest.param(
        'backoff_initial = "0s"\n',
        ("hq.backoff_initial", "invalid backoff_initial 0s: use a duration above 0"),
        id="initial-zero",
    ),
    pytest.param(
        'backoff_max = "0s"\n',
        ("hq.backoff_max", "invalid backoff_max 0s: use a duration above 0"),
        id="max-zero",
    ),
    pytest.param(
        'client_key_file = "/etc/hq.key"\n',
        ("hq.client_key_file", "invalid client_key_file '/etc/hq.key': it is set without"),
        id="key-without-certificate",
    ),
]


@pytest.mark.parametrize(("settings", "expected"), HQ_PAIR_CASES)
def test_check_config_hq_pair_names_one_key(
    tmp_path: Path, settings: str, expected: tuple[str, str]
) -> None:
    table = '[hq]\nurl = "http://127.0.0.1:9"\nstore_id = "OTHER"\n' + settings
    config = write_config(tmp_path, free_port(), table)
    lines = config.read_text(encoding="utf-8").splitlines()
    key, fragment = expected
    key_line = next(n for n, line in enumerate(lines, 1) if line.startswith(key.split(".")[1]))

    result = run_cli("check-config", str(config))

    assert result.returncode == 2, result.stdout
    assert f"line {key_line}, key {key}: {fragment}" in result.stderr
    assert "key hq.store_id: store 'OTHER' is not in [stores] ids" in result.stderr
    assert result.stderr.count("error: ") == 2
