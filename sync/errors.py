"""Errors of HQ calls, split by what the sync loops do about them."""

from __future__ import annotations


class HqError(Exception):
    """An HQ call that did not succeed.

    ``reachable`` is False when HQ sent no HTTP response at all. ``retry_after`` is the
    delay in seconds that HQ asked for in a ``Retry-After`` header, or None.
    """

    reachable = True
    retry_after: float | None = None


class HqUnreachable(HqError):
    """No HTTP answer: connection refused or reset, DNS failure, TLS failure or timeout."""

    reachable = False


class HqStatusError(HqError):
    """HQ responded with a status code the contract does not allow for this call."""

    def __init__(self, call: str, status: int, url: str | None = None) -> None:
        message = f"HQ {call} returned HTTP {status}"
        if status == 404 and url:
            message += f" for {url}; check [hq] url and [hq] store_id"
        super().__init__(message)
        self.call = call
        self.status = status


class HqAuthFailed(HqStatusError):
    """HQ rejected the bearer token or the client certificate (401 or 403)."""

    def __init__(self, call: str, status: int) -> None:
        super().__init__(call, status)
        self.args = (
            f"HQ {call} returned HTTP {status}: HQ rejected the token or client certificate;"
            " check [hq] token_file and client_cert_file",
        )


class HqRedirected(HqStatusError):
    """HQ responded with a redirect, which the daemon does not follow.

    Following it would drop the Authorization header on another host, and turn a POST into
    a GET on 301 and 302, so the error names the new address instead.
    """

    def __init__(self, call: str, status: int, location: str | None) -> None:
        super().__init__(call, status)
        target = repr(location[:200]) if location else "no Location header"
        self.args = (
            f"HQ {call} returned HTTP {status} redirecting to {target}; the daemon does not"
            " follow redirects: set [hq] url to the final address",
        )


class HqResponseInvalid(HqError):
    """HQ responded 200 with a body or stream that breaks the contract (invalid or truncated)."""


class HqBodyIncomplete(HqError):
    """A response body from HQ was cut short, or its HTTP framing was malformed.

    HQ sent a status and headers, then the connection broke or the chunked or gzip framing
    did not decode. HQ or the network may be at fault, and the loops retry after the backoff.
    """


class CursorExpired(HqError):
    """HQ responded 410 Gone to a changes request: the feed must restart from a snapshot."""

    def __init__(self, message: str, cursor: str | None = None) -> None:
        super().__init__(message)
        self.cursor = cursor
        """The cursor of the request that HQ responded to with 410."""
