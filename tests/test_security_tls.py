"""TLS and mutual TLS on the listener: handshakes, versions, and certificate reload on SIGHUP."""

from __future__ import annotations

import http.client
import re
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509

from tests.conftest import labelled_samples
from tests.tls_helpers import (
    CertificateAuthority,
    Issued,
    SecureDaemon,
    client_context,
    legacy_client_context,
    make_secure_daemon,
    scan_request,
    write_api_key,
)

API_KEY = "tls-suite-key-6b0f3e9a41d27c58"
# OpenSSL reasons for a handshake the server ended: asyncio drops the alert and closes.
SERVER_CLOSED_HANDSHAKE = {"UNEXPECTED_EOF_WHILE_READING", "TLSV1_ALERT_PROTOCOL_VERSION"}


@dataclass
class Pki:
    server_ca: CertificateAuthority
    gateway_ca: CertificateAuthority
    rogue_ca: CertificateAuthority
    server: Issued
    gateway: Issued
    expired: Issued
    not_yet_valid: Issued
    unlisted: Issued
    rogue: Issued


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    server_ca = CertificateAuthority(directory / "server-ca", "server-ca")
    gateway_ca = CertificateAuthority(directory / "gateway-ca", "gateway-ca")
    rogue_ca = CertificateAuthority(directory / "rogue-ca", "rogue-ca")
    return Pki(
        server_ca=server_ca,
        gateway_ca=gateway_ca,
        rogue_ca=rogue_ca,
        server=server_ca.issue("connector.test", server=True, file_stem="server"),
        gateway=gateway_ca.issue("gateway-1"),
        expired=gateway_ca.issue(
            "gateway-1",
            valid_from=timedelta(days=-10),
            valid_for=timedelta(days=1),
            file_stem="expired",
        ),
        not_yet_valid=gateway_ca.issue(
            "gateway-1", valid_from=timedelta(days=5), file_stem="not-yet-valid"
        ),
        unlisted=gateway_ca.issue("intruder-7"),
        rogue=rogue_ca.issue("gateway-1", file_stem="rogue-gateway"),
    )


def tls_table(pki: Pki, client_ca: bool, names: str = "") -> str:
    ca_line = f'client_ca_file = "{pki.gateway_ca.cert_file}"\n' if client_ca else ""
    return (
        "[tls]\n"
        f'cert_file = "{pki.server.cert_file}"\n'
        f'key_file = "{pki.server.key_file}"\n'
        f"{ca_line}{names}"
    )


@pytest.fixture(scope="module")
def mtls_daemon(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[SecureDaemon]:
    directory = tmp_path_factory.mktemp("mtls")
    key_file = write_api_key(directory / "keys" / "gateway", API_KEY)
    extra = tls_table(pki, client_ca=True, names='client_names = ["gateway-1"]\n') + (
        f'\n[auth]\napi_key_files = ["{key_file}"]\nallow_networks = ["127.0.0.0/8"]\n'
    )
    instance = make_secure_daemon(
        directory,
        extra,
        context=client_context(pki.server_ca.cert_file, pki.gateway),
        api_key=API_KEY,
    )
    instance.start()
    yield instance
    if instance.process is not None:
        instance.stop()


def test_valid_client_certificate_accepted(mtls_daemon: SecureDaemon) -> None:
    reply = mtls_daemon.scan("KEY-SHOPPER-5f1c2b")

    assert reply.status == 200
    assert reply.json()["action"] == "ACCEPT"


HANDSHAKE_FAILURES = [
    # (case, attribute of Pki with the client certificate, or None for no certificate)
    ("no certificate", None),
    ("wrong CA", "rogue"),
    ("expired", "expired"),
    ("not yet valid", "not_yet_valid"),
]
VERSIONS = [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3]


@pytest.mark.parametrize("version", VERSIONS, ids=["tls1.2", "tls1.3"])
@pytest.mark.parametrize(
    ("case", "certificate"), HANDSHAKE_FAILURES, ids=[case for case, _ in HANDSHAKE_FAILURES]
)
def test_bad_client_certificate_fails_handshake(
    mtls_daemon: SecureDaemon,
    pki: Pki,
    case: str,
    certificate: str | None,
    version: ssl.TLSVersion,
) -> None:
    client = getattr(pki, certificate) if certificate else None
    context = client_context(pki.server_ca.cert_file, client, version)
    connection = mtls_daemon.connect(context, timeout=10)

    # asyncio closes the connection on a failed handshake without sending OpenSSL's alert, so
    # the client sees an EOF. With TLS 1.2 that happens during its handshake. With TLS 1.3 it
    # happens on the first read, because the server checks the certificate after Finished.
    with pytest.raises((ssl.SSLError, ConnectionError)) as failure:
        scan_request(connection, {"x-api-key": API_KEY})
    connection.close()

    assert not isinstance(failure.value, ssl.SSLCertVerificationError), failure.value
    assert mtls_daemon.process is not None and mtls_daemon.process.poll() is None


def test_valid_client_certificate_over_tls12(mtls_daemon: SecureDaemon, pki: Pki) -> None:
    context = client_context(pki.server_ca.cert_file, pki.gateway, ssl.TLSVersion.TLSv1_2)
    connection = mtls_daemon.connect(context)

    reply = scan_request(connection, {"x-api-key": API_KEY})
    connection.close()

    assert reply.status == 200


def test_unlisted_client_name_gets_403(mtls_daemon: SecureDaemon, pki: Pki) -> None:
    context = client_context(pki.server_ca.cert_file, pki.unlisted)
    connection = mtls_daemon.connect(context)

    reply = scan_request(connection, {"x-api-key": API_KEY})
    connection.close()

    assert reply.status == 403
    assert reply.headers["Content-Type"] == "application/problem+json"
    assert reply.json()["status"] == 403


def test_tls_1_1_refused(mtls_daemon: SecureDaemon, pki: Pki) -> None:
    connection = mtls_daemon.connect(legacy_client_context(pki.server_ca.cert_file), timeout=10)

    with pytest.raises(ssl.SSLError) as failure:
        connection.connect()
    connection.close()

    # The server closed the handshake; a client unable to offer TLS 1.1 at all would fail
    # with NO_PROTOCOLS_AVAILABLE before sending anything.
    assert failure.value.reason in SERVER_CLOSED_HANDSHAKE, failure.value


def test_tls_1_2_uses_forward_secret_aead(mtls_daemon: SecureDaemon, pki: Pki) -> None:
    context = client_context(
        pki.server_ca.cert_file, pki.gateway, maximum_version=ssl.TLSVersion.TLSv1_2
    )
    connection = mtls_daemon.connect(context)
    reply = scan_request(connection, {"x-api-key": API_KEY})
    assert isinstance(connection.sock, ssl.SSLSocket)
    cipher, version, _bits = connection.sock.cipher()
    connection.close()

    assert reply.status == 200
    assert version == "TLSv1.2"
    assert re.fullmatch(r"ECDHE-(ECDSA|RSA)-(AES\d+-GCM-SHA\d+|CHACHA20-POLY1305)", cipher)


def test_keep_alive_reuses_connection(mtls_daemon: SecureDaemon) -> None:
    connection = mtls_daemon.connect()
    first = scan_request(connection, {"x-api-key": API_KEY})
    sock = connection.sock
    second = scan_request(connection, {"x-api-key": API_KEY})
    reused = connection.sock is sock
    connection.close()

    assert first.status == 200
    assert second.status == 200
    assert "close" not in first.headers.get("Connection", "").lower()
    assert reused


def test_logs_hold_no_tls_key_or_api_key(mtls_daemon: SecureDaemon, pki: Pki) -> None:
    mtls_daemon.request("GET", "/metrics", headers={"x-api-key": "wrong-key-0123456789abcdef"})
    log = mtls_daemon.log_bytes()

    assert API_KEY.encode() not in log
    assert b"wrong-key-0123456789abcdef" not in log
    for line in pki.server.key_pem.splitlines()[1:-1]:
        assert line not in log


# Reload -----------------------------------------------------------------------------------


@pytest.fixture
def tls_daemon(tmp_path: Path, pki: Pki) -> Iterator[tuple[SecureDaemon, CertificateAuthority]]:
    """A TLS daemon with its own server CA, whose certificate files the test may replace."""
    server_ca = CertificateAuthority(tmp_path / "own-ca", "own-ca")
    server = server_ca.issue("connector.test", server=True, file_stem="server")
    key_file = write_api_key(tmp_path / "keys" / "gateway", API_KEY)
    extra = (
        f'[tls]\ncert_file = "{server.cert_file}"\nkey_file = "{server.key_file}"\n'
        f'\n[auth]\napi_key_files = ["{key_file}"]\n'
    )
    instance = make_secure_daemon(
        tmp_path / "daemon",
        extra,
        context=client_context(server_ca.cert_file),
        api_key=API_KEY,
    )
    instance.start()
    yield instance, server_ca
    if instance.process is not None:
        instance.stop()


def peer_certificate(connection: http.client.HTTPConnection) -> bytes:
    assert isinstance(connection.sock, ssl.SSLSocket)
    der = connection.sock.getpeercert(binary_form=True)
    assert der is not None
    return der


def test_certificate_reload_keeps_open_connection(
    tls_daemon: tuple[SecureDaemon, CertificateAuthority],
) -> None:
    daemon, server_ca = tls_daemon
    held = daemon.connect()
    before = scan_request(held, {"x-api-key": API_KEY})
    held_socket = held.sock
    old_der = peer_certificate(held)

    # A second client keeps sending on its own keep-alive connection through the reload.
    statuses: list[int] = []
    errors: list[str] = []
    stop = threading.Event()

    def keep_sending() -> None:
        connection = daemon.connect()
        try:
            while not stop.is_set():
                statuses.append(scan_request(connection, {"x-api-key": API_KEY}).status)
        except (OSError, http.client.HTTPException) as exc:
            errors.append(repr(exc))
        finally:
            connection.close()

    sender = threading.Thread(target=keep_sending)
    sender.start()
    lines = len(daemon.log_lines())
    renewed = server_ca.issue("connector-renewed.test", server=True, file_stem="server")
    daemon.sighup()
    reloaded = daemon.wait_for_log("tls.reloaded", after=lines)
    stop.set()
    sender.join(timeout=30)

    after = scan_request(held, {"x-api-key": API_KEY})
    fresh = daemon.connect()
    fresh_reply = scan_request(fresh, {"x-api-key": API_KEY})
    new_der = peer_certificate(fresh)
    fresh.close()

    assert before.status == 200
    assert after.status == 200
    assert held.sock is held_socket
    assert peer_certificate(held) == old_der
    held.close()
    assert fresh_reply.status == 200
    assert new_der == renewed.der
    assert new_der != old_der
    assert errors == []
    assert statuses and set(statuses) == {200}
    assert reloaded["level"] == "info"


BAD_RELOADS = [
    # (case, what replaces the key file, or the certificate file)
    ("mismatched key", "key"),
    ("garbage certificate", "certificate"),
]


@pytest.mark.parametrize(("case", "broken"), BAD_RELOADS, ids=[case for case, _ in BAD_RELOADS])
def test_failed_reload_keeps_certificate(
    tls_daemon: tuple[SecureDaemon, CertificateAuthority], case: str, broken: str
) -> None:
    daemon, server_ca = tls_daemon
    first = daemon.connect()
    scan_request(first, {"x-api-key": API_KEY})
    served_der = peer_certificate(first)
    first.close()

    server_cert = daemon.directory.parent / "own-ca" / "server.crt"
    server_key = daemon.directory.parent / "own-ca" / "server.key"
    if broken == "key":
        stranger = server_ca.issue("stranger.test", server=True)
        server_key.write_bytes(stranger.key_pem)
    else:
        server_cert.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64\n")
    lines = len(daemon.log_lines())
    daemon.sighup()
    failed = daemon.wait_for_log("tls.reload_failed", after=lines)

    connection = daemon.connect()
    reply = scan_request(connection, {"x-api-key": API_KEY})
    still_served = peer_certificate(connection)
    connection.close()

    assert failed["level"] == "error"
    assert "[tls]" in failed["error"]
    assert reply.status == 200
    assert still_served == served_der


def not_after(issued: Issued) -> float:
    return x509.load_der_x509_certificate(issued.der).not_valid_after_utc.timestamp()


def certificate_samples(daemon: SecureDaemon) -> dict[str, float]:
    return labelled_samples(
        daemon, "identity_connector_certificate_not_after_seconds", "certificate"
    )


def test_metrics_show_listener_certificate_expiry(
    tls_daemon: tuple[SecureDaemon, CertificateAuthority],
) -> None:
    daemon, server_ca = tls_daemon
    before = certificate_samples(daemon)
    lines = len(daemon.log_lines())
    renewed = server_ca.issue(
        "connector-renewed.test", server=True, valid_for=timedelta(days=30), file_stem="server"
    )
    daemon.sighup()
    daemon.wait_for_log("tls.reloaded", after=lines)

    after = certificate_samples(daemon)

    assert before["gateway_tls"] < after["gateway_tls"]
    assert after["gateway_tls"] == not_after(renewed)


def test_expired_listener_certificate_warned(tmp_path: Path) -> None:
    server_ca = CertificateAuthority(tmp_path / "own-ca", "own-ca")
    expired = server_ca.issue(
        "connector.test",
        server=True,
        valid_from=timedelta(days=-10),
        valid_for=timedelta(days=1),
        file_stem="server",
    )
    key_file = write_api_key(tmp_path / "keys" / "gateway", API_KEY)
    extra = (
        f'[tls]\ncert_file = "{expired.cert_file}"\nkey_file = "{expired.key_file}"\n'
        f'\n[auth]\napi_key_files = ["{key_file}"]\n'
    )
    daemon = make_secure_daemon(tmp_path / "daemon", extra, api_key=API_KEY)
    # A client that verifies the certificate cannot reach /healthz, so no wait for it.
    daemon.start(wait=False)
    try:
        warning = daemon.wait_for_log("tls.cert_expired")
    finally:
        daemon.stop()
    assert warning["level"] == "warning"
