"""The decision policy: ACCEPT or REJECT for an identity at a store, location and channel.

Pure functions of their inputs, so the HTTP handler, the CLI `lookup` and local scanners
decide the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from daemon.config import PolicyConfig
from daemon.store import Identity


class Reason(StrEnum):
    """Internal reason codes: logged and stored in audit events, never sent to Amazon."""

    ACCEPTED = "ACCEPTED"
    EXIT_OVERRIDE = "EXIT_OVERRIDE"
    UNKNOWN_KEY = "UNKNOWN_KEY"
    INVALID_ENCODING = "INVALID_ENCODING"
    REVOKED = "REVOKED"
    SUSPENDED = "SUSPENDED"
    NOT_YET_VALID = "NOT_YET_VALID"
    EXPIRED = "EXPIRED"
    STORE_NOT_ALLOWED = "STORE_NOT_ALLOWED"
    LOCATION_NOT_ALLOWED = "LOCATION_NOT_ALLOWED"
    CHANNEL_NOT_ALLOWED = "CHANNEL_NOT_ALLOWED"
    CACHE_STALE = "CACHE_STALE"
    SCAN_STALE = "SCAN_STALE"
    SCAN_FROM_FUTURE = "SCAN_FROM_FUTURE"


@dataclass(frozen=True, slots=True)
class ScanContext:
    store_id: str
    location: str
    channel: str
    scanned_at: float
    """Event time of the scan, in seconds since the epoch."""
    now: float
    cache_stale: bool


@dataclass(frozen=True, slots=True)
class Verdict:
    action: str
    reason: Reason
    overridden: tuple[Reason, ...] = ()
    """Reasons the EXIT rule set aside to let a known identity out."""


def failing_reasons(identity: Identity, context: ScanContext, policy: PolicyConfig) -> list[Reason]:
    """List every rule the identity breaks for this scan, in order of severity."""
    reasons: list[Reason] = []
    if identity.status == "REVOKED":
        reasons.append(Reason.REVOKED)
    elif identity.status == "SUSPENDED":
        reasons.append(Reason.SUSPENDED)
    if identity.valid_from is not None and context.now < identity.valid_from:
        reasons.append(Reason.NOT_YET_VALID)
    if identity.valid_until is not None and context.now >= identity.valid_until:
        reasons.append(Reason.EXPIRED)
    if "*" not in identity.stores and context.store_id not in identity.stores:
        reasons.append(Reason.STORE_NOT_ALLOWED)
    if identity.locations is not None and context.location not in identity.locations:
        reasons.append(Reason.LOCATION_NOT_ALLOWED)
    if identity.channels is not None and context.channel not in identity.channels:
        reasons.append(Reason.CHANNEL_NOT_ALLOWED)
    if context.cache_stale and identity.type != "ASSOCIATE":
        reasons.append(Reason.CACHE_STALE)
    return reasons


def scan_time_reason(context: ScanContext, policy: PolicyConfig) -> Reason | None:
    """Return SCAN_STALE or SCAN_FROM_FUTURE when the event time is out of bounds."""
    if context.scanned_at < context.now - policy.max_scan_age:
        return Reason.SCAN_STALE
    if context.scanned_at > context.now + policy.max_clock_skew:
        return Reason.SCAN_FROM_FUTURE
    return None


def decide(identity: Identity | None, context: ScanContext, policy: PolicyConfig) -> Verdict:
    """Apply the policy to a looked-up identity (None when the key is unknown)."""
    if identity is None:
        return Verdict("REJECT", Reason.UNKNOWN_KEY)

    reasons = failing_reasons(identity, context, policy)
    time_reason = scan_time_reason(context, policy)
    if time_reason is not None:
        # First, so outside the EXIT override it is the reason given.
        reasons = [time_reason, *reasons]
    if not reasons:
        return Verdict("ACCEPT", Reason.ACCEPTED)

    # The gate must never trap someone inside the store: at EXIT a known identity leaves
    # when every rule it breaks is one the configuration lets go.
    if context.location == "EXIT" and all(r.value in policy.exit_override for r in reasons):
        return Verdict("ACCEPT", Reason.EXIT_OVERRIDE, overridden=tuple(reasons))
    return Verdict("REJECT", reasons[0])
