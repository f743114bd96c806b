"""Admission of the gateway: TLS and mutual TLS, API keys, network allow-list, rate limits.

`Admission` contains the running settings and the listener's SSLContext. Its `apply` method is a
reload hook: it reads every key file and certificate of the new configuration first and
changes nothing unless all of them load, so a bad file on SIGHUP keeps the running material.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import math
import os
import ssl
import stat
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from daemon.certs import certificate_validity
from daemon.config import AuthConfig, Config, ConfigError, ServerConfig, TlsConfig

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
ProblemFactory = Callable[..., web.Response]

HEALTH_PATHS = frozenset({"/healthz", "/readyz"})
# A floor that rejects hand-typed words; `openssl rand -hex 32` makes 64 characters.
MIN_API_KEY_LENGTH = 16
FINGERPRINT_LENGTH = 12
# TLS 1.2 suites with forward-secret key exchange and AEAD ciphers only. OpenSSL configures
# the TLS 1.3 suites separately, and all of them are AEAD.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
CREDENTIALS_DIRECTORY_VARIABLE = "CREDENTIALS_DIRECTORY"
# Idle buckets dropped per request at most, so one request never pays for a large sweep.
EVICTIONS_PER_REQUEST = 8
LOG_THROTTLE_KEYS = 4096


def fingerprint(value: bytes) -> str:
    """Return a short SHA-256 prefix that names a key or certificate in logs, not the value."""
    return hashlib.sha256(value).hexdigest()[:FINGERPRINT_LENGTH]


# ---------------------------------------------------------------------------------------------
# Listener safety


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def has_authentication(config: Config) -> bool:
    """Tell whether clients must prove who they are, by API key or client certificate."""
    api_keys = config.auth is not None and bool(config.auth.api_key_files)
    client_certificates = config.tls is not None and bool(config.tls.client_ca_file)
    return api_keys or client_certificates


def listener_problem(config: Config) -> str | None:
    """Describe how a non-loopback listener would admit clients without authentication.

    Returns None for a safe listener. The text starts with the key, ``host = ...``.
    """
    host = config.server.host
    if is_loopback_host(host) or has_authentication(config):
        return None
    return (
        f"host = {host!r} would expose the connector without authentication: add [auth]"
        " api_key_files (API keys) or [tls] client_ca_file (client certificates), or set"
        " host to 127.0.0.1 or ::1"
    )


def check_listener_safety(config: Config) -> None:
    """Raise ConfigError when a non-loopback listener would admit clients without authentication."""
    problem = listener_problem(config)
    if problem is not None:
        raise ConfigError(f"[server] {problem}")


def log_listener_warnings(config: Config) -> None:
    """Warn at start about a listener that accepts unauthenticated or unencrypted requests."""
    host = config.server.host
    if config.tls is None and config.auth is None:
        log.warning(
            "server.unauthenticated",
            host=host,
            detail="no [tls] or [auth] configured; serving plain HTTP on loopback only",
        )
    elif not has_authentication(config):
        log.warning(
            "server.unauthenticated",
            host=host,
            detail="no [auth] api_key_files or [tls] client_ca_file; any local client is admitted",
        )
    if config.tls is None and not is_loopback_host(host):
        log.warning(
            "server.plaintext",
            host=host,
            detail="API keys cross the network unencrypted; set [tls] cert_file and key_file",
        )


def handler_options(server: ServerConfig) -> dict[str, Any]:
    """Return the aiohttp request-handler settings for AppRunner from [server]."""
    return {
        "keepalive_timeout": float(server.keepalive_timeout),
        # After an error response aiohttp keeps reading an unfinished body this long before it
        # closes the connection. A slow client gets no more time here than for its body.
        "lingering_time": float(server.client_timeout),
        "max_line_size": server.max_line_size,
        "max_field_size": server.max_field_size,
    }


# ---------------------------------------------------------------------------------------------
# TLS


@dataclass(frozen=True)
class TlsMaterial:
    """The bytes of the listener's certificate chain, key and client CA bundle."""

    chain: bytes
    key: bytes
    client_ca: bytes

    @property
    def certificate_fingerprint(self) -> str:
        der = ssl.PEM_cert_to_DER_cert(_first_pem_block(self.chain))
        return fingerprint(der)


def _first_pem_block(chain: bytes) -> str:
    text = chain.decode("ascii", errors="replace")
    end_marker = "-----END CERTIFICATE-----"
    start = text.find("-----BEGIN CERTIFICATE-----")
    end = text.find(end_marker, start)
    if start < 0 or end < 0:
        return ""
    return text[start : end + len(end_marker)] + "\n"


def _read_file(path: str, key: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"[tls] {key} {path} not found: create it or correct the path") from None
    except OSError as exc:
        raise ConfigError(
            f"cannot read [tls] {key} {path}: {exc.strerror}; let the service user read it"
        ) from None


def read_tls_material(tls: TlsConfig) -> TlsMaterial:
    """Read the PEM files of [tls]; raise ConfigError naming the file that cannot be read."""
    chain = _read_file(tls.cert_file, "cert_file")
    key = _read_file(tls.key_file, "key_file")
    client_ca = _read_file(tls.client_ca_file, "client_ca_file") if tls.client_ca_file else b""
    return TlsMaterial(chain=chain, key=key, client_ca=client_ca)


@contextmanager
def _memory_file(content: bytes) -> Iterator[str]:
    """Yield a path to an anonymous in-memory file, so OpenSSL reads exactly these bytes.

    Loading from the bytes read once keeps a file replaced mid-reload from mixing old and new
    material, and keeps the private key off any temporary file on disk.
    """
    descriptor = os.memfd_create("identity-connector-tls", os.MFD_CLOEXEC)
    try:
        os.write(descriptor, content)
        yield f"/proc/self/fd/{descriptor}"
    finally:
        os.close(descriptor)


def _reject_password() -> str:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
    raise ConfigError(
        "[tls] key_file is encrypted: store the key unencrypted, readable only by the service"
    )


def _load_chain(context: ssl.SSLContext, tls: TlsConfig, material: TlsMaterial) -> None:
    with _memory_file(material.chain) as chain_path, _memory_file(material.key) as key_path:
        try:
            context.load_cert_chain(chain_path, key_path, password=_reject_password)
        except ssl.SSLError as exc:
            raise ConfigError(
                f"cannot load [tls] cert_file {tls.cert_file} with key_file {tls.key_file}:"
                f" {exc.reason or exc}; check that both are PEM and that the key belongs to"
                " the first certificate"
            ) from None


def _load_client_ca(context: ssl.SSLContext, tls: TlsConfig, material: TlsMaterial) -> None:
    try:
        context.load_verify_locations(cadata=material.client_ca.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise ConfigError(
            f"cannot load [tls] client_ca_file {tls.client_ca_file}: {reason}; use PEM"
            " certificates of the CA that signs the gateway's client certificates"
        ) from None


def build_server_context(tls: TlsConfig, material: TlsMaterial) -> ssl.SSLContext:
    """Build the listener's SSLContext; raise ConfigError when the material does not load."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = TLS_VERSIONS[tls.min_version]
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= (
        ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    )
    context.set_alpn_protocols(["http/1.1"])
    _load_chain(context, tls, material)
    if material.client_ca:
        _load_client_ca(context, tls, material)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def certificate_names(peer_certificate: dict[str, Any]) -> set[str]:
    """Collect the subject common names and SAN values of a certificate from getpeercert()."""
    names: set[str] = set()
    for relative_name in peer_certificate.get("subject", ()):
        for attribute, value in relative_name:
            if attribute == "commonName":
                names.add(value)
    for _kind, value in peer_certificate.get("subjectAltName", ()):
        names.add(value)
    return names


# ---------------------------------------------------------------------------------------------
# API keys


@dataclass(frozen=True)
class ApiKey:
    digest: bytes
    """SHA-256 of the key, the only form kept in memory after loading."""
    fingerprint: str
    path: str


def resolve_key_path(path: str) -> Path:
    """Resolve a key file path; a relative one is read from systemd's credentials directory."""
    candidate = Path(path)
    if candidate.is_absolute():
        return candidate
    directory = os.environ.get(CREDENTIALS_DIRECTORY_VARIABLE)
    if not directory:
        raise ConfigError(
            f"[auth] api_key_files entry {path!r} is relative but ${CREDENTIALS_DIRECTORY_VARIABLE}"
            " is not set: give an absolute path, or pass the file with systemd LoadCredential="
        )
    return Path(directory) / candidate


def load_api_key(path: str) -> ApiKey:
    """Read one API key file; raise ConfigError naming the file and the fix."""
    resolved = resolve_key_path(path)
    try:
        raw = resolved.read_bytes()
        mode = resolved.stat().st_mode
    except FileNotFoundError:
        raise ConfigError(
            f"[auth] api_key_files entry {resolved} not found: create it with one key,"
            " for example from `openssl rand -hex 32`"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"cannot read [auth] api_key_files entry {resolved}: {exc.strerror};"
            " let the service user read it"
        ) from None

    key = raw.strip()
    if not key:
        raise ConfigError(f"[auth] api_key_files entry {resolved} is empty: write one key in it")
    if len(key.split()) > 1:
        raise ConfigError(
            f"[auth] api_key_files entry {resolved} contains more than one key: write one key"
            " per file and list each file"
        )
    if not all(0x21 <= byte <= 0x7E for byte in key):
        raise ConfigError(
            f"[auth] api_key_files entry {resolved} contains characters other than printable"
            " ASCII, which cannot travel in an HTTP header: use a hex or base64 key"
        )
    if len(key) < MIN_API_KEY_LENGTH:
        raise ConfigError(
            f"[auth] api_key_files entry {resolved} holds a key shorter than"
            f" {MIN_API_KEY_LENGTH} characters: use a longer one, for example from"
            " `openssl rand -hex 32`"
        )
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        log.warning(
            "auth.key_file_exposed",
            path=str(resolved),
            detail="other users can read or write this key file; give it owner root, group"
            " identity-connector and mode 0640 (docs/security.md)",
        )
    return ApiKey(digest=hashlib.sha256(key).digest(), fingerprint=fingerprint(key), path=path)


class ApiKeys:
    """The accepted API keys, compared in constant time."""

    def __init__(self, keys: tuple[ApiKey, ...]) -> None:
        self.keys = keys

    @classmethod
    def load(cls, paths: list[str]) -> ApiKeys:
        return cls(tuple(load_api_key(path) for path in paths))

    @property
    def fingerprints(self) -> list[str]:
        return [key.fingerprint for key in self.keys]

    def __bool__(self) -> bool:
        return bool(self.keys)

    def matches(self, presented: bytes) -> bool:
        # Comparing digests of equal length, against every key without an early exit,
        # keeps the time independent of which key matched and of the presented length.
        digest = hashlib.sha256(presented).digest()
        matched = False
        for key in self.keys:
            matched |= hmac.compare_digest(digest, key.digest)
        return matched


# ---------------------------------------------------------------------------------------------
# Client addresses


class ForwardedForInvalid(ValueError):
    """An X-Forwarded-For entry from a trusted proxy that is not an IP address."""


def parse_address(text: str) -> IpAddress:
    """Parse an IP address as peers and proxies write it, dropping a zone id and a port.

    IPv4-mapped IPv6 addresses (::ffff:192.0.2.1, from a dual-stack listener) become IPv4.
    """
    text = text.strip()
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else text
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    text = text.partition("%")[0]
    address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_networks(values: list[str]) -> tuple[IpNetwork, ...]:
    return tuple(ipaddress.ip_network(value, strict=False) for value in values)


def in_networks(address: IpAddress, networks: tuple[IpNetwork, ...]) -> bool:
    return any(address in network for network in networks)


def client_address(
    peer: IpAddress, forwarded_for: list[str], trusted_proxies: tuple[IpNetwork, ...]
) -> IpAddress:
    """Find the client behind trusted proxies from the X-Forwarded-For header values.

    The walk starts at the TCP peer and moves left through the header only while the current
    hop is a trusted proxy, so a client cannot pose as another by writing the header itself.
    Raises ForwardedForInvalid when an entry the walk reaches is not an IP address.
    """
    hops = [entry.strip() for value in forwarded_for for entry in value.split(",")]
    address = peer
    while hops and in_networks(address, trusted_proxies):
        entry = hops.pop()
        try:
            address = parse_address(entry)
        except ValueError:
            raise ForwardedForInvalid(entry) from None
    return address


# ---------------------------------------------------------------------------------------------
# Rate limiting and log throttling


class RateLimiter:
    """Token buckets per client: `rate` tokens per second, at most `burst` saved up.

    The table keeps at most `max_clients` buckets in least-recently-used order. A bucket idle
    long enough to be full again is dropped, which changes nothing for its client.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        max_clients: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._refill_seconds = burst / rate if rate > 0 else 0.0

    def __len__(self) -> int:
        return len(self._buckets)

    def acquire(self, client: str) -> float:
        """Take one token; return 0.0 when admitted, else the seconds until a token is due."""
        if self.rate <= 0:
            return 0.0
        now = self._clock()
        self._evict_idle(now)

        tokens, updated = self._buckets.pop(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - updated) * self.rate)
        if len(self._buckets) >= self.max_clients:
            # NOTE: a client evicted here while its bucket is not full starts again with a
            # full burst; that takes more than max_clients distinct busy addresses.
            self._buckets.popitem(last=False)

        if tokens >= 1.0:
            self._buckets[client] = (tokens - 1.0, now)
            return 0.0
        self._buckets[client] = (tokens, now)
        return (1.0 - tokens) / self.rate

    def _evict_idle(self, now: float) -> None:
        for _ in range(EVICTIONS_PER_REQUEST):
            if not self._buckets:
                return
            oldest = next(iter(self._buckets))
            if now - self._buckets[oldest][1] < self._refill_seconds:
                return
            del self._buckets[oldest]


class LogThrottle:
    """Allows one log line per key per interval and counts the lines held back in between."""

    def __init__(
        self,
        interval: float,
        max_keys: int = LOG_THROTTLE_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = interval
        self.max_keys = max_keys
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def admit(self, key: str) -> int | None:
        """Return the count of lines suppressed since the last one when a line may be written
        now, or None when it must be suppressed."""
        now = self._clock()
        entry = self._entries.pop(key, None)
        if entry is not None and now - entry[0] < self.interval:
            self._entries[key] = (entry[0], entry[1] + 1)
            return None
        if len(self._entries) >= self.max_keys:
            self._entries.popitem(last=False)
        self._entries[key] = (now, 0)
        return entry[1] if entry is not None else 0


# ---------------------------------------------------------------------------------------------
# Admission


@dataclass(frozen=True)
class AdmissionState:
    """Everything one configuration admits, loaded and checked before it goes live."""

    config: Config
    auth: AuthConfig | None
    api_keys: ApiKeys
    allow_networks: tuple[IpNetwork, ...]
    trusted_proxies: tuple[IpNetwork, ...]
    client_names: frozenset[str]
    tls_material: TlsMaterial | None


def effective_auth(config: Config) -> AuthConfig | None:
    """Return the [auth] settings in force; a TLS listener gets the defaults without the table.

    None means a plain loopback listener with no admission checks.
    """
    if config.auth is not None:
        return config.auth
    if config.tls is not None:
        return AuthConfig()
    return None


def load_state(config: Config) -> AdmissionState:
    """Read every key file and TLS file of `config`; raise ConfigError on the first failure."""
    auth = effective_auth(config)
    api_keys = ApiKeys.load(auth.api_key_files) if auth is not None else ApiKeys(())
    material = read_tls_material(config.tls) if config.tls is not None else None
    if config.tls is not None and material is not None:
        # A scratch context proves the chain, the key and the CA bundle load together.
        build_server_context(config.tls, material)
    return AdmissionState(
        config=config,
        auth=auth,
        api_keys=api_keys,
        allow_networks=parse_networks(auth.allow_networks) if auth else (),
        trusted_proxies=parse_networks(auth.trusted_proxies) if auth else (),
        client_names=frozenset(config.tls.client_names) if config.tls else frozenset(),
        tls_material=material,
    )


class Admission:
    """The running admission settings, the listener's SSLContext and the per-client state."""

    def __init__(self, config: Config, problem: ProblemFactory) -> None:
        self._problem = problem
        self._state = load_state(config)
        self._previous: AdmissionState | None = None
        self.stopping = asyncio.Event()
        """Set when the daemon begins to stop. A request that reaches admission after that
        gets 503 with Retry-After, and so does an admitted one whose body is still arriving."""
        self.rejected_while_stopping = 0
        """The number of 503 responses sent because the daemon was stopping."""
        self.ssl_context: ssl.SSLContext | None = None
        if config.tls is not None and self._state.tls_material is not None:
            self.ssl_context = build_server_context(config.tls, self._state.tls_material)
            _log_tls_loaded("tls.loaded", config.tls, self._state.tls_material)
        if self._state.api_keys:
            log.info("auth.keys_loaded", fingerprints=self._state.api_keys.fingerprints)
        self._limiter = self._new_limiter(self._state.auth)
        self._log_throttle = self._new_throttle(self._state.auth)

    @property
    def state(self) -> AdmissionState:
        """The settings in force."""
        return self._state

    # Reload ----------------------------------------------------------------------------------

    def apply(self, config: Config) -> None:
        """Switch to the settings of a reloaded configuration; a reload hook for Runtime.

        Raises ConfigError, keeping the running settings and TLS material, when a file does
        not load or the change needs a restart. Called again with the previous configuration
        when a later hook fails, it restores the previous state without reading files.
        """
        if config is self._state.config:
            return
        if self._previous is not None and config is self._previous.config:
            self._commit(self._previous)
            return

        check_listener_safety(config)
        if (config.tls is None) != (self.ssl_context is None):
            raise ConfigError(
                "[tls] was added or removed: the listener keeps serving"
                f" {'TLS' if self.ssl_context else 'plain HTTP'} until the daemon restarts;"
                " restart it to switch"
            )
        try:
            state = load_state(config)
        except ConfigError as exc:
            event = "tls.reload_failed" if "[tls]" in str(exc) else "auth.reload_failed"
            log.error(event, error=str(exc), kept="the running keys, certificate and key")
            raise
        self._commit(state)

    def _commit(self, state: AdmissionState) -> None:
        old = self._state
        if self.ssl_context is not None and state.config.tls is not None:
            self._switch_tls(old, state)
        if state.api_keys.fingerprints != old.api_keys.fingerprints:
            log.info("auth.keys_loaded", fingerprints=state.api_keys.fingerprints)
        if _limiter_settings(state.auth) != _limiter_settings(old.auth):
            self._limiter = self._new_limiter(state.auth)
        if _throttle_settings(state.auth) != _throttle_settings(old.auth):
            self._log_throttle = self._new_throttle(state.auth)
        self._previous = old
        self._state = state

    def _switch_tls(self, old: AdmissionState, new: AdmissionState) -> None:
        context = self.ssl_context
        tls = new.config.tls
        assert context is not None and tls is not None
        assert new.tls_material is not None and old.tls_material is not None

        # New handshakes use what the context holds then; open connections keep their own.
        context.minimum_version = TLS_VERSIONS[tls.min_version]
        if (new.tls_material.chain, new.tls_material.key) != (
            old.tls_material.chain,
            old.tls_material.key,
        ):
            _load_chain(context, tls, new.tls_material)
            _log_tls_loaded("tls.reloaded", tls, new.tls_material)

        if not new.tls_material.client_ca:
            context.verify_mode = ssl.CERT_NONE
        elif new.tls_material.client_ca != old.tls_material.client_ca:
            trusted_before = set(_ca_certificates(context))
            _load_client_ca(context, tls, new.tls_material)
            context.verify_mode = ssl.CERT_REQUIRED
            # NOTE: OpenSSL cannot remove a CA from a live context, so a CA deleted from
            # client_ca_file is still trusted by this process until it restarts.
            if trusted_before - set(_ca_certificates(_scratch_ca_context(tls, new))):
                log.warning(
                    "tls.client_ca_removal_needs_restart",
                    path=tls.client_ca_file,
                    detail="a CA removed from client_ca_file stays trusted until restart",
                )
        else:
            context.verify_mode = ssl.CERT_REQUIRED

    # Per-client state ------------------------------------------------------------------------

    @staticmethod
    def _new_limiter(auth: AuthConfig | None) -> RateLimiter:
        if auth is None:
            return RateLimiter(rate=0.0, burst=1, max_clients=1)
        return RateLimiter(auth.rate_limit, auth.rate_burst, auth.rate_limit_clients)

    @staticmethod
    def _new_throttle(auth: AuthConfig | None) -> LogThrottle:
        return LogThrottle(auth.log_interval if auth is not None else 60.0)

    def _log_rejection(self, event: str, client: str, **fields: Any) -> None:
        # One line per client, reason and key sent: during a key rotation each old key that a
        # client still sends gets its own line, even from an address that several share.
        reason = fields.get("reason", "")
        key = fields.get("key_fingerprint") or ""
        suppressed = self._log_throttle.admit(f"{event} {client} {reason} {key}")
        if suppressed is not None:
            log.warning(event, client=client, suppressed=suppressed, **fields)

    # Request path ----------------------------------------------------------------------------

    async def admit(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Check a request in order: stopping, network, rate, client certificate name, API key."""
        if self.stopping.is_set():
            return self._stopping_response()
        state = self._state
        auth = state.auth
        if auth is None:
            return await self._call_with_body_deadline(request, handler, state)

        peer = _peer_address(request)
        if peer is None:
            # The connection closed before the request was dispatched.
            return self._problem(400, "no-peer", "Bad Request", "the connection has no peer")
        try:
            client = client_address(
                peer, request.headers.getall("X-Forwarded-For", []), state.trusted_proxies
            )
        except ForwardedForInvalid as exc:
            self._log_rejection("auth.forwarded_for_invalid", str(peer))
            return self._problem(
                400,
                "invalid-forwarded-for",
                "Bad Request",
                f"X-Forwarded-For entry {str(exc)[:64]!r} from a trusted proxy is not an IP"
                " address; fix the proxy's header configuration",
            )
        client_text = str(client)

        if not in_networks(client, state.allow_networks):
            self._log_rejection("auth.network_denied", client_text)
            return self._problem(
                403,
                "forbidden",
                "Forbidden",
                f"client {client_text} is not in the networks allowed to call this connector",
            )
        if request.path in HEALTH_PATHS:
            return await handler(request)

        wait = self._limiter.acquire(client_text)
        if wait > 0:
            retry_after = max(1, math.ceil(wait))
            self._log_rejection("auth.rate_limited", client_text, limit=auth.rate_limit)
            return self._problem(
                429,
                "rate-limited",
                "Too Many Requests",
                f"client {client_text} sent more than {auth.rate_burst} requests at once or"
                f" {auth.rate_limit:g} per second; retry after {retry_after} s",
                headers={"Retry-After": str(retry_after)},
            )

        if state.client_names:
            rejected = self._check_client_name(request, state, client_text)
            if rejected is not None:
                return rejected

        if state.api_keys:
            rejected = self._check_api_key(request, state, auth, client_text)
            if rejected is not None:
                return rejected

        return await self._call_with_body_deadline(request, handler, state)

    def _check_client_name(
        self, request: web.Request, state: AdmissionState, client: str
    ) -> web.Response | None:
        peer_certificate = request.get_extra_info("peercert") or {}
        names = certificate_names(peer_certificate)
        if names & state.client_names:
            return None
        self._log_rejection("auth.client_name_denied", client, names=sorted(names)[:8])
        return self._problem(
            403,
            "forbidden",
            "Forbidden",
            "the client certificate names none of the clients this connector accepts",
        )

    def _check_api_key(
        self, request: web.Request, state: AdmissionState, auth: AuthConfig, client: str
    ) -> web.Response | None:
        values = request.headers.getall(auth.api_key_header, [])
        if len(values) == 1 and state.api_keys.matches(values[0].encode("utf-8", "replace")):
            return None

        header = auth.api_key_header
        sent: str | None = None
        if not values:
            reason = "missing"
            detail = f"missing API key: send it in the {header} header"
        elif len(values) > 1:
            reason = "repeated"
            detail = f"the {header} header was sent {len(values)} times: send it once"
        else:
            reason = "invalid"
            detail = f"invalid API key in the {header} header"
            sent = fingerprint(values[0].encode("utf-8", "replace"))
        self._log_rejection("auth.rejected", client, reason=reason, key_fingerprint=sent)
        return self._problem(
            401,
            "unauthorized",
            "Unauthorized",
            detail,
            headers={"WWW-Authenticate": f'ApiKey header="{auth.api_key_header}"'},
        )

    async def _call_with_body_deadline(
        self, request: web.Request, handler: Handler, state: AdmissionState
    ) -> web.StreamResponse:
        """Read the body within [server] client_timeout, then run the handler.

        aiohttp's keep-alive timer already closes a connection whose headers never complete;
        this deadline covers a client that sends its body too slowly. The body is cached by
        aiohttp, so the handler's own read returns at once.
        """
        # A body that arrived with its headers, as a ResolveScan body does, needs no timer.
        if (
            request.body_exists
            and request.method in ("POST", "PUT", "PATCH")
            and not request.content.is_eof()
        ):
            timeout = float(state.config.server.client_timeout)
            reading = asyncio.ensure_future(request.read())
            stopping = asyncio.ensure_future(self.stopping.wait())
            try:
                await asyncio.wait(
                    (reading, stopping), timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                stopping.cancel()
                if not reading.done():
                    reading.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await reading
            if reading.done() and not reading.cancelled():
                reading.result()  # raises what the read raised, such as a broken encoding
            elif self.stopping.is_set():
                return self._stopping_response()
            else:
                peer = _peer_address(request)
                self._log_rejection("request.body_timed_out", str(peer), timeout=timeout)
                response = self._problem(
                    408,
                    "request-timeout",
                    "Request Timeout",
                    f"the request body did not arrive within {timeout:g} s",
                )
                response.force_close()
                return response
        return await handler(request)

    def _stopping_response(self) -> web.Response:
        """Build the 503 for a request that the stopping daemon did not decide."""
        self.rejected_while_stopping += 1
        response = self._problem(
            503,
            "stopping",
            "Service Unavailable",
            "the connector is stopping and did not decide this request; send it again",
            headers={"Retry-After": "1"},
        )
        response.force_close()
        return response


ADMISSION_KEY = web.AppKey("admission", Admission)


@web.middleware
async def admission_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Admit a request through the application's `Admission` before its handler runs."""
    return await request.app[ADMISSION_KEY].admit(request, handler)


def _peer_address(request: web.Request) -> IpAddress | None:
    peername = request.get_extra_info("peername")
    if not peername:
        return None
    try:
        return parse_address(str(peername[0]))
    except ValueError:
        return None


def _limiter_settings(auth: AuthConfig | None) -> tuple[float, int, int] | None:
    if auth is None:
        return None
    return (auth.rate_limit, auth.rate_burst, auth.rate_limit_clients)


def _throttle_settings(auth: AuthConfig | None) -> float | None:
    return auth.log_interval if auth is not None else None


def _ca_certificates(context: ssl.SSLContext) -> list[bytes]:
    return list(context.get_ca_certs(binary_form=True))


def _scratch_ca_context(tls: TlsConfig, state: AdmissionState) -> ssl.SSLContext:
    assert state.tls_material is not None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _load_client_ca(context, tls, state.tls_material)
    return context


def _log_tls_loaded(event: str, tls: TlsConfig, material: TlsMaterial) -> None:
    validity = certificate_validity(material.chain)
    log.info(
        event,
        cert_file=tls.cert_file,
        certificate_fingerprint=material.certificate_fingerprint,
        not_after=validity.not_after.isoformat() if validity is not None else None,
        client_certificates="required" if material.client_ca else "not requested",
        min_version=tls.min_version,
    )
    warn_certificate_dates(tls, material)


def warn_certificate_dates(tls: TlsConfig, material: TlsMaterial) -> None:
    """Warn when the listener's certificate is outside its validity period now."""
    validity = certificate_validity(material.chain)
    if validity is None:
        return
    problem = validity.problem(datetime.now(UTC))
    if problem is None:
        return
    # The listener still serves it: a gateway that accepts it (a test client, a clock that
    # is also off) keeps working, and IT can replace the file and reload.
    log.warning(
        f"tls.cert_{problem}",
        cert_file=tls.cert_file,
        not_before=validity.not_before.isoformat(),
        not_after=validity.not_after.isoformat(),
        detail="gateways reject this certificate in the TLS handshake: install a valid one"
        " in [tls] cert_file and key_file and reload the service, or check the box's clock",
    )
