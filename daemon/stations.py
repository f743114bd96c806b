"""Associate sessions at stations, and the debounce of repeated reads.

Both are plain state machines over a monotonic clock that the caller passes
in, so the scan handler decides when "now" is and tests can step time.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum


class SessionChange(StrEnum):
    """A change of a station's associate session."""

    OPENED = "opened"
    CLOSED = "closed"  # the same badge was read again
    EXPIRED = "expired"  # no counted scan for the session timeout
    REPLACED = "replaced"  # another associate's badge took over the station


@dataclass(frozen=True, slots=True)
class Session:
    """An associate signed in at a station."""

    station: str
    associate: str
    """Identity id of the associate, as the audit events name them."""
    credential_id: str
    """The badge that opened the session; reading it again closes the session."""
    opened_at: float
    """Unix time the session opened."""
    expires_at: float
    """Monotonic time after which the session is closed."""


@dataclass(frozen=True, slots=True)
class SessionEvent:
    change: SessionChange
    session: Session


class Stations:
    """Open associate sessions, one per station at most."""

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}

    def sessions(self) -> list[Session]:
        """Return the open sessions, ordered by station."""
        return [self._sessions[station] for station in sorted(self._sessions)]

    def expire(self, now: float) -> list[SessionEvent]:
        """Close the sessions whose time ran out by monotonic time ``now``."""
        ended = [session for session in self._sessions.values() if session.expires_at <= now]
        for session in ended:
            del self._sessions[session.station]
        return [SessionEvent(SessionChange.EXPIRED, session) for session in ended]

    def next_expiry(self) -> float | None:
        """Return the monotonic time of the next expiry, or None with no session open."""
        if not self._sessions:
            return None
        return min(session.expires_at for session in self._sessions.values())

    def badge(
        self,
        station: str,
        associate: str,
        credential_id: str,
        *,
        now: float,
        wall_time: float,
        timeout: float,
    ) -> list[SessionEvent]:
        """Apply an accepted associate badge read at ``station``.

        The badge that opened the open session closes it. Any other associate
        badge opens a session, replacing the one that was open. Call
        ``expire`` first, so an expired session is not closed or replaced twice.
        """
        current = self._sessions.get(station)
        if current is not None and current.credential_id == credential_id:
            del self._sessions[station]
            return [SessionEvent(SessionChange.CLOSED, current)]

        events = []
        if current is not None:
            events.append(SessionEvent(SessionChange.REPLACED, current))
        opened = Session(station, associate, credential_id, wall_time, now + timeout)
        self._sessions[station] = opened
        events.append(SessionEvent(SessionChange.OPENED, opened))
        return events

    def touch(self, station: str, *, now: float, timeout: float) -> Session | None:
        """Renew the open session at ``station`` after a counted scan and return it."""
        current = self._sessions.get(station)
        if current is None:
            return None
        renewed = replace(current, expires_at=now + timeout)
        self._sessions[station] = renewed
        return renewed


class Debouncer:
    """Count a value read again by the same device within a window once.

    The window restarts on every repeat, so a scanner in continuous mode that
    keeps reading a code held under it produces one scan.
    """

    def __init__(self) -> None:
        self._last_seen: dict[tuple[str, bytes], float] = {}

    def is_repeat(self, device: str, key_hash: bytes, *, now: float, window: float) -> bool:
        """Record a read at monotonic time ``now``; return True when it repeats a recent one."""
        self._forget_older_than(now - window)
        key = (device, key_hash)
        previous = self._last_seen.get(key)
        self._last_seen[key] = now
        return previous is not None and now - previous < window

    def _forget_older_than(self, cutoff: float) -> None:
        # Pruned on every read, so memory stays bounded by the reads within one window.
        stale = [key for key, seen in self._last_seen.items() if seen <= cutoff]
        for key in stale:
            del self._last_seen[key]
