"""Errors of HQ calls, split by what the sync loops do about them."""

from __future__ import annotations


class HqError(Exception):
    """An HQ call that did not succeed.

    ``reachable`` is False when HQ sent no HTTP response at all.
    """

    reachable = True


class HqUnreachable(HqError):
    """No HTTP answer: connection refused or reset, DNS failure, TLS failure or timeout."""

    reachable = False


class HqStatusError(HqError):
    """HQ responded with a status code the contract does not allow for this call."""

    def __init__(self, call: str, status: int) -> None:
        super().__init__(f"HQ {call} returned HTTP {status}")
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


class HqResponseInvalid(HqError):
    """HQ responded 200 with a body or stream that breaks the contract (invalid or truncated)."""


class CursorExpired(HqError):
    """HQ responded 410 Gone to a changes request: the feed must restart from a snapshot."""
