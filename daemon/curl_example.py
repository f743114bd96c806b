"""The curl command that `identity-connector curl-example` and `make run` print."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from daemon.config import Config, TlsConfig

# A key of docs/examples/identities.jsonl, which `make run` imports.
CURL_EXAMPLE_VALUE = "SHOPPER-0001"
# Printed in the URL in place of a [server] host that the command leaves out.
HOST_PLACEHOLDER = "HOST"
# A DNS host name: labels of letters, digits and hyphens, separated by dots. The printed
# command takes a name from the configuration or the certificate only in this form, because
# a shell reads characters such as ; $ ` and spaces, and curl reads [ ] { } in URLs.
_HOST_NAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(?:\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")
_HOST_NAME_MAX_CHARS = 253


def curl_example(config: Config) -> str:
    """Return a curl command that sends a sample scan to the listener, after `#` notes.

    The request ids and the timestamp are shell substitutions, so each run of the command
    is a new scan. The command takes a host name from the configuration or the certificate
    only when ``_is_host_name_or_address`` accepts it, and shell-quotes every value it takes.
    """
    notes: list[str] = []
    address = _client_address(config.server.host)
    if not _is_host_name_or_address(address):
        notes.append(
            f"[server] host = {address!r} is neither a host name nor an IP address, so the"
            f" command leaves it out: replace {HOST_PLACEHOLDER} with the address the daemon"
            " listens on"
        )
        address = HOST_PLACEHOLDER
    url_host = f"[{address}]" if ":" in address else address
    port = str(config.server.port)
    if config.server.port == 0:
        port = "PORT"
        notes.append(
            "[server] port = 0 takes any free port: replace PORT with the port the daemon"
            " listens on (`ss -ltnp` lists it)"
        )

    scheme = "http"
    options: list[str] = []
    if config.tls is not None:
        scheme = "https"
        tls_options, url_host = _tls_options(config.tls, address, url_host, port, notes)
        options += tls_options
    if config.auth is not None and config.auth.api_key_files:
        # Read from the file by the shell, so the key appears neither here nor in `ps`.
        key_file = config.auth.api_key_files[0]
        options.append(
            f"-H @<(printf '%s: %s\\n' {shlex.quote(config.auth.api_key_header)}"
            f' "$(cat {shlex.quote(key_file)})")'
        )
        notes.append(
            "run this command in bash: it reads the API key with the process substitution"
            " <(...), which sh (dash) rejects"
        )
        if not Path(key_file).is_absolute():
            notes.append(
                f"the API key file {key_file} is relative to the service's credentials"
                " directory: write its full path"
            )

    store_id = json.dumps(config.stores.ids[0]).replace("'", "'\\''")
    new_uuid = "\"'$(cat /proc/sys/kernel/random/uuid)'\""
    body = (
        f'{{"requestId": {new_uuid}, "storeId": {store_id}, "scanEvent": {{"id": {new_uuid},'
        ' "timestamp": "\'$(date -u +%Y-%m-%dT%H:%M:%SZ)\'", "location": "ENTRY",'
        f' "value": "{CURL_EXAMPLE_VALUE}", "channel": "OPTICAL"}}}}'
    )
    url = f"{scheme}://{url_host}:{port}/v1/identity/scan"
    # A line break in a note (from a file name) would end the comment and start a command.
    lines = [f"# {' '.join(note.splitlines())}" for note in notes]
    lines.append(f"curl -s {shlex.quote(url)} \\")
    lines += [f"  {option} \\" for option in options]
    lines.append("  -H 'Content-Type: application/json' \\")
    lines.append(f"  -d '{body}'")
    return "\n".join(lines)


def _tls_options(
    tls: TlsConfig, address: str, url_host: str, port: str, notes: list[str]
) -> tuple[list[str], str]:
    """Return the curl options for a TLS listener and the host to put in the URL.

    Appends to ``notes`` what the reader must change or know.
    """
    # curl 7.68 and later, built with OpenSSL, accepts a certificate of the --cacert file
    # as the end of the chain, so the listener's own certificate serves as the CA file.
    cert_file = os.path.abspath(tls.cert_file)
    options = [_shell_words("--cacert", cert_file)]
    name, certificate_notes = _certificate_name_for_curl(cert_file, address)
    notes += certificate_notes
    if name is not None:
        options.append(_shell_words("--connect-to", f"{name}:{port}:{url_host}:{port}"))
        url_host = name
    if tls.client_ca_file:
        options.append("--cert CLIENT.crt --key CLIENT.key")
        notes.append(
            "[tls] client_ca_file is set: replace CLIENT.crt and CLIENT.key with a client"
            " certificate and its key that this CA issued"
        )
    return options, url_host


def _shell_words(*words: str) -> str:
    return " ".join(shlex.quote(word) for word in words)


def _client_address(host: str) -> str:
    """Return the address at which a client on the box reaches a listener on ``host``."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        # asyncio and uvloop set IPV6_V6ONLY on a "::" listener, so it takes no IPv4 calls.
        return "::1"
    return host


def _is_host_name_or_address(name: str) -> bool:
    """Return whether ``name`` is a DNS host name, or an IP address without a zone index."""
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return _is_host_name(name)
    # A zone index ("fe80::1%eth0") may hold any character but "%".
    return not (isinstance(address, ipaddress.IPv6Address) and address.scope_id)


def _is_host_name(name: str) -> bool:
    """Return whether ``name`` is a DNS host name and not an IP address."""
    if len(name) > _HOST_NAME_MAX_CHARS or _HOST_NAME.fullmatch(name) is None:
        return False
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return True
    return False


def _certificate_name_for_curl(cert_file: str, address: str) -> tuple[str | None, list[str]]:
    """Return a host name for curl to check when the certificate does not name ``address``.

    Returns (None, []) when curl accepts the certificate for ``address``. The notes name the
    certificate's host names that the command leaves out, and explain a None name.
    """
    try:
        certificate = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    except (OSError, ValueError) as exc:
        return None, [f"cannot read the certificate {cert_file} ({exc}): fix [tls] cert_file"]
    try:
        host_names, addresses = _certificate_names(certificate)
    except (ValueError, x509.DuplicateExtension) as exc:
        return None, [
            f"cannot read the names in the certificate {cert_file} ({exc}): fix [tls] cert_file"
        ]
    if _certificate_matches(host_names, addresses, address):
        return None, []

    notes: list[str] = []
    # A wildcard name cannot be called, and curl never matches it to an IP address.
    candidates = [name for name in host_names if "*" not in name]
    callable_names = [name for name in candidates if _is_host_name(name)]
    left_out = [name for name in candidates if name not in callable_names]
    if left_out:
        notes.append(
            f"{cert_file} names {', '.join(repr(name) for name in left_out)}, which the"
            " command leaves out because they are not host names"
        )
    if callable_names:
        return callable_names[0], notes
    notes.append(
        f"{cert_file} names neither {address} nor a host name without a wildcard, so curl"
        f" rejects it: issue a certificate that names {address}"
    )
    return None, notes


def _certificate_names(certificate: x509.Certificate) -> tuple[list[str], list[Any]]:
    """Return the DNS names and IP addresses that curl checks a host against.

    Raises ValueError or x509.DuplicateExtension when the extensions cannot be parsed.
    """
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        # Without a subjectAltName curl checks the subject's common name.
        common_names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return [str(attribute.value) for attribute in common_names], []
    return names.get_values_for_type(x509.DNSName), names.get_values_for_type(x509.IPAddress)


def _certificate_matches(host_names: list[str], addresses: list[Any], address: str) -> bool:
    """Return whether curl accepts a certificate with these names for a call to ``address``.

    Matches as curl 7.88.1 does (checked against a loopback TLS server): names compare without
    case and without one trailing dot. A wildcard matches only as the whole leftmost label of
    a name with at least two dots, stands for exactly one label, and never matches an IP
    address, so "*.store.example" matches "a.store.example" but not "store.example".
    """
    try:
        return ipaddress.ip_address(address) in addresses
    except ValueError:
        pass
    host = address.removesuffix(".").lower()
    host_suffix = host.partition(".")[2]
    for name in host_names:
        pattern = name.removesuffix(".").lower()
        if pattern == host:
            return True
        is_wildcard = pattern.startswith("*.") and pattern.count(".") >= 2
        if is_wildcard and host_suffix == pattern[2:]:
            return True
    return False
