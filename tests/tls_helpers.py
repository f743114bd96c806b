"""Throwaway certificate authorities and HTTPS clients for the security tests."""

from __future__ import annotations

import http.client
import ipaddress
import json
import re
import signal
import socket
import ssl
import time
import warnings
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.conftest import Daemon, Reply, make_daemon, scan_body

LOG_WAIT = 15.0


@dataclass
class Issued:
    """A certificate and its key, as PEM bytes and as files."""

    cert_pem: bytes
    key_pem: bytes
    cert_file: Path
    key_file: Path
    der: bytes


class CertificateAuthority:
    """A self-signed EC P-256 CA that issues server and client certificates into a folder."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.name = name
        directory.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.now(UTC)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        self.cert_file = directory / f"{name}.pem"
        self.cert_file.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))

    def issue(
        self,
        common_name: str,
        *,
        server: bool = False,
        valid_from: timedelta = timedelta(days=-1),
        valid_for: timedelta = timedelta(days=7),
        file_stem: str | None = None,
    ) -> Issued:
        """Issue a certificate valid from now + valid_from for valid_for, and write it."""
        key = ec.generate_private_key(ec.SECP256R1())
        start = datetime.now(UTC) + valid_from

        names: list[x509.GeneralName] = [x509.DNSName(common_name)]
        if server:
            names = [
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.IPAddress(ipaddress.ip_address("::1")),
            ]
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH

        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + valid_for)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )

        cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

        stem = file_stem or common_name
        cert_file = self.directory / f"{stem}.crt"
        key_file = self.directory / f"{stem}.key"
        cert_file.write_bytes(cert_pem)
        key_file.write_bytes(key_pem)
        key_file.chmod(0o600)
        der = certificate.public_bytes(serialization.Encoding.DER)
        return Issued(cert_pem, key_pem, cert_file, key_file, der)


def client_context(
    ca_file: Path,
    client: Issued | None = None,
    maximum_version: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    """Build a client SSLContext that trusts `ca_file` and presents `client` when given."""
    context = ssl.create_default_context(cafile=str(ca_file))
    if client is not None:
        context.load_cert_chain(client.cert_file, client.key_file)
    if maximum_version is not None:
        context.maximum_version = maximum_version
    return context


def legacy_client_context(ca_file: Path) -> ssl.SSLContext:
    """Build a client that offers TLS 1.1 only, with the security level that permits it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(ca_file))
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    # Python warns on purpose about TLS 1.1, which this client exists to offer.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1_1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    return context


def write_api_key(path: Path, key: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(key + "\n", encoding="utf-8")
    path.chmod(0o600)
    return path


@dataclass
class SecureDaemon(Daemon):
    """A daemon subprocess called over HTTPS when `context` is set, with an optional API key."""

    host: str = "127.0.0.1"
    context: ssl.SSLContext | None = None
    api_key: str | None = None
    extra_headers: dict[str, str] = field(default_factory=dict)

    def connect(
        self, context: ssl.SSLContext | None = None, timeout: float = 30
    ) -> http.client.HTTPConnection:
        """Open a connection with `context`, or the daemon's own one, without sending anything."""
        context = context or self.context
        if context is None:
            return http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        return http.client.HTTPSConnection(self.host, self.port, timeout=timeout, context=context)

    def headers_with_key(self, headers: dict[str, str] | None = None) -> dict[str, str]:
        merged = dict(self.extra_headers)
        if self.api_key is not None:
            merged["x-api-key"] = self.api_key
        merged.update(headers or {})
        return merged

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        connection = self.connect()
        try:
            connection.request(method, path, body=body, headers=self.headers_with_key(headers))
            response = connection.getresponse()
            return Reply(response.status, dict(response.getheaders()), response.read())
        finally:
            connection.close()

    def sighup(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGHUP)

    def log_bytes(self) -> bytes:
        return self.log_path.read_bytes()

    def wait_for_log(self, event: str, after: int = 0) -> dict[str, Any]:
        """Return the first log line of `event` past line index `after`, waiting for it."""
        deadline = time.monotonic() + LOG_WAIT
        while time.monotonic() < deadline:
            for line in self.log_lines()[after:]:
                if line.get("event") == event:
                    return line
            time.sleep(0.05)
        log = self.log_path.read_text()
        raise AssertionError(f"no {event} log line after line {after}:\n{log}")


def make_secure_daemon(
    directory: Path,
    extra_config: str = "",
    *,
    host: str = "127.0.0.1",
    server_options: str = "",
    context: ssl.SSLContext | None = None,
    api_key: str | None = None,
) -> SecureDaemon:
    """Prepare (not start) a daemon with the sample records and extra [server] options."""
    plain = make_daemon(directory, extra_config)
    port = plain.port
    if host != "127.0.0.1":
        port = free_port_on(host)
    set_server_options(plain.config, host, port, server_options)
    return SecureDaemon(
        plain.directory,
        port,
        plain.config,
        plain.log_path,
        host=host,
        context=context,
        api_key=api_key,
    )


def free_port_on(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def set_server_options(config: Path, host: str, port: int, options: str = "") -> None:
    """Rewrite the [server] table of a test configuration with `host`, `port` and `options`."""
    text = config.read_text(encoding="utf-8")
    server = f'[server]\nhost = "{host}"\nport = {port}\n{options}\n'
    text, count = re.subn(r"\[server\]\nhost = \"[^\"]*\"\nport = \d+\n", server, text)
    assert count == 1, text
    config.write_text(text, encoding="utf-8")


def replace_in_config(config: Path, old: str, new: str) -> None:
    text = config.read_text(encoding="utf-8")
    assert text.count(old) == 1, f"{old!r} not found once in {config}"
    config.write_text(text.replace(old, new), encoding="utf-8")


def scan_request(
    connection: http.client.HTTPConnection,
    headers: dict[str, str],
    value: str = "KEY-SHOPPER-5f1c2b",
) -> Reply:
    """Send one ResolveScan on an open connection and read the whole reply."""
    body = json.dumps(scan_body(value)).encode()
    connection.request(
        "POST",
        "/v1/identity/scan",
        body,
        {"Content-Type": "application/json", **headers},
    )
    response = connection.getresponse()
    return Reply(response.status, dict(response.getheaders()), response.read())
