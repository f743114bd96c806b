"""HQ over https: the CA file, the client certificate, and what a refusal reads like."""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509

from tests.conftest import SAMPLE_RECORDS, labelled_samples, make_daemon, run_cli
from tests.fakehq import FakeHq, hq_config, local_versions, versions_of
from tests.tls_helpers import CertificateAuthority

CLIENT_NAME = "store-001.example"


@pytest.fixture
def authority(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority(tmp_path / "pki", "hq-test-ca")


@pytest.fixture
def hq(authority: CertificateAuthority) -> Iterator[FakeHq]:
    """HQ with a certificate of ``authority``, requiring a client certificate it issued."""
    issued = authority.issue("hq", server=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(issued.cert_file, issued.key_file)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(authority.cert_file)
    server = FakeHq(ssl_context=context).start()
    server.put(*SAMPLE_RECORDS)
    yield server
    server.close()


def sync_now(tmp_path: Path, hq: FakeHq, tls: str) -> tuple[int, str, Path]:
    directory = tmp_path / "daemon"
    daemon = make_daemon(directory, hq_config(hq, directory, tls), records=[])
    result = run_cli("sync", "--now", "--config", str(daemon.config))
    return result.returncode, result.stdout + result.stderr, daemon.database


def client_files(authority: CertificateAuthority) -> str:
    client = authority.issue(CLIENT_NAME)
    return f'client_cert_file = "{client.cert_file}"\nclient_key_file = "{client.key_file}"\n'


def test_client_certificate_accepted(
    tmp_path: Path, hq: FakeHq, authority: CertificateAuthority
) -> None:
    tls = f'ca_file = "{authority.cert_file}"\n' + client_files(authority)

    code, output, database = sync_now(tmp_path, hq, tls)

    assert code == 0, output
    assert local_versions(database) == versions_of(hq.records)


def no_client_certificate(authority: CertificateAuthority, tmp_path: Path) -> str:
    return f'ca_file = "{authority.cert_file}"\n'


def client_certificate_of_another_ca(authority: CertificateAuthority, tmp_path: Path) -> str:
    other = CertificateAuthority(tmp_path / "other-pki", "other-ca")
    return f'ca_file = "{authority.cert_file}"\n' + client_files(other)


def no_ca_file(authority: CertificateAuthority, tmp_path: Path) -> str:
    return client_files(authority)


def ca_file_of_another_ca(authority: CertificateAuthority, tmp_path: Path) -> str:
    other = CertificateAuthority(tmp_path / "other-pki", "other-ca")
    return f'ca_file = "{other.cert_file}"\n' + client_files(authority)


@pytest.mark.parametrize(
    ("settings", "hint"),
    [
        (no_client_certificate, "set [hq] client_cert_file and client_key_file"),
        (client_certificate_of_another_ca, "HQ does not accept the client certificate"),
        (no_ca_file, "set [hq] ca_file to the CA that issued it"),
        (ca_file_of_another_ca, "check that [hq] ca_file holds the CA"),
    ],
)
def test_tls_refusal_names_the_setting(
    tmp_path: Path,
    hq: FakeHq,
    authority: CertificateAuthority,
    settings: Callable[[CertificateAuthority, Path], str],
    hint: str,
) -> None:
    code, output, _database = sync_now(tmp_path, hq, settings(authority, tmp_path))

    assert code == 1
    assert hint in output


def test_metrics_show_client_certificate_expiry(
    tmp_path: Path, hq: FakeHq, authority: CertificateAuthority
) -> None:
    client = authority.issue(CLIENT_NAME, valid_for=timedelta(days=20))
    tls = (
        f'ca_file = "{authority.cert_file}"\n'
        f'client_cert_file = "{client.cert_file}"\nclient_key_file = "{client.key_file}"\n'
    )
    directory = tmp_path / "daemon"
    daemon = make_daemon(directory, hq_config(hq, directory, tls), records=[])
    daemon.start()
    try:
        samples = labelled_samples(
            daemon, "identity_connector_certificate_not_after_seconds", "certificate"
        )
    finally:
        daemon.stop()
    expected = x509.load_der_x509_certificate(client.der).not_valid_after_utc.timestamp()

    assert samples == {"hq_client": expected}
