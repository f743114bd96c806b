"""PC/SC card reader driver: card UIDs read with GET DATA, reader health, beep/LED feedback.

One driver watches one reader, chosen by a glob on the PC/SC reader name. It
yields a scan per card presented and a health change when the reader or the
PC/SC service (pcscd) goes away or comes back. Every pyscard call blocks, so
each runs on this driver's own worker thread. pcsc-lite serialises the calls
on one context, and a single thread keeps them in order. Errors from that
thread come back through the awaited future, so none is lost.

Cards that yield no usable key are skipped without a scan, each logged as
``card.skipped`` with a ``reason``:

- ``uid_random``: a single-size ISO 14443-A UID (4 bytes) starting 0x08, which
  the card draws anew at every power-up (phones and many payment cards);
- ``uid_missing``: the reader or card returned no UID (status word not 90 00);
- ``uid_length_invalid``: status 90 00 but not 4, 7 or 10 bytes of UID;
- ``card_removed``: the card left the field before its UID was read;
- ``read_failed``: any other PC/SC error while reading the card.
"""

from __future__ import annotations

import asyncio
import fnmatch
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

import structlog

from drivers.base import (
    Channel,
    DeviceSettings,
    Dropped,
    Duration,
    EventSink,
    Health,
    Scan,
    name_matches,
    parse_duration,
    parse_duration_setting,
    parse_positive_duration_setting,
    sleep_backoff,
)

try:
    from smartcard import scard
except ImportError:  # pyscard is the optional "pcsc" extra
    scard = None

log = structlog.get_logger(__name__)

_T = TypeVar("_T")

# PC/SC Part 3 GET DATA with P1 = 00: the card's UID, all of it (Le = 00).
GET_UID_APDU = (0xFF, 0xCA, 0x00, 0x00, 0x00)
SW_SUCCESS = 0x9000

# ISO/IEC 14443-3 UID sizes: single (4), double (7) and triple (10) bytes.
UID_LENGTHS = frozenset({4, 7, 10})

# A single-size UID whose first byte is 0x08 is a random ID (ISO/IEC 14443-3,
# "UID0 = 08h"), new at every power-up, so it can never name a credential.
RANDOM_UID_FIRST_BYTE = 0x08

# The pseudo-reader pcsc-lite updates when readers are added or removed.
PNP_NOTIFICATION = "\\\\?PnP?\\Notification"

# A status word 6C xx (wrong Le) or 61 xx (more data) is followed up at most
# this many times, so a card that keeps asking cannot hold the reader.
MAX_FOLLOW_UPS = 2

# A transaction that fails while the card is still listed is tried this many
# times in all. Between tries the driver waits up to READ_RETRY_DELAY seconds
# for the card to be reported gone. The delay outlasts the 400 ms presence
# poll that pcsc-lite runs for readers that do not signal card events.
READ_ATTEMPTS = 3
READ_RETRY_DELAY = 0.5

# ACR122U "Bi-color LED and Buzzer Control" pseudo-APDU, FF 00 40 P2 04 T1 T2 N B
# (ACS reference manuals): P2 selects LEDs and blinking, T1/T2 are the on/off
# times in units of 100 ms, N the repetitions, B = 01 sounds the buzzer during T1.
ACR122U_ACCEPTED_APDU = (0xFF, 0x00, 0x40, 0xA8, 0x04, 0x02, 0x01, 0x01, 0x01)  # green, 1 beep
ACR122U_REJECTED_APDU = (0xFF, 0x00, 0x40, 0x54, 0x04, 0x01, 0x01, 0x03, 0x01)  # red, 3 beeps
ACR122U_NAME_GLOB = "*ACR122*"

# Escape IOCTL of the CCID driver, SCARD_CTL_CODE(3500) on pcsc-lite, used to
# reach the ACR122U's LED and buzzer when no card is on the reader.
CCID_ESCAPE_FUNCTION = 3500

# Maximum poll_interval, in seconds. pcsc-lite carries the wait of SCardGetStatusChange
# to pcscd as a 32-bit count of milliseconds (uint32_t timeOut in winscard_msg.h), so a
# wait of 2**32 ms (about 49.7 days) or more cannot reach pcscd as set. A day stays far
# inside that and still rechecks readers from /etc/reader.conf.d/, which never notify.
MAX_POLL_INTERVAL = 24 * 3600.0

SkipReason = Literal[
    "uid_random", "uid_missing", "uid_length_invalid", "card_removed", "read_failed"
]


class PcscSettings(DeviceSettings, tag="pcsc"):
    """One ``[[devices]]`` table with ``kind = "pcsc"``."""

    reader: str
    """Glob on the PC/SC reader name, e.g. "ACS ACR122U*"; the first match in name order that
    no other device table reads wins."""
    uid_byte_order: Literal["msb", "lsb"] = "msb"
    """msb: the UID bytes as GET DATA returns them (UID0 first); lsb: reversed."""
    interface: Literal["auto", "contactless", "contact"] = "auto"
    """Channel of the scans; auto detects contactless cards by their PC/SC Part 3 ATR."""
    feedback: Literal["auto", "acr122u", "off"] = "auto"
    """auto: ACR122U LED/buzzer commands when the reader name matches *ACR122*."""
    poll_interval: Duration = "500ms"
    """Maximum length of one wait on pcscd; the reader list is rechecked at least this often."""
    reconnect_delay: Duration = "500ms"
    """First wait before re-establishing a lost PC/SC context; doubles on every failure."""
    reconnect_delay_max: Duration = "30s"
    """Cap of that doubling wait."""

    def __post_init__(self) -> None:
        if not self.reader:
            raise ValueError("invalid reader '': give a reader name glob such as \"ACS ACR122U*\"")

        poll_interval = parse_positive_duration_setting(
            "poll_interval", self.poll_interval, "each wait on pcscd would return at once"
        )
        if poll_interval > MAX_POLL_INTERVAL:
            raise ValueError(
                f"poll_interval: invalid duration {self.poll_interval!r}: use 24h or less,"
                " because pcscd takes the wait as a 32-bit count of milliseconds"
            )
        self.poll_interval = poll_interval
        reconnect_delay = parse_positive_duration_setting(
            "reconnect_delay",
            self.reconnect_delay,
            "the wait doubles from this value, so 0 reconnects to pcscd without pause",
        )
        reconnect_delay_max = parse_duration_setting(
            "reconnect_delay_max", self.reconnect_delay_max
        )
        if reconnect_delay_max < reconnect_delay:
            raise ValueError(
                f"reconnect_delay_max: invalid duration {self.reconnect_delay_max!r}: must not"
                f" be shorter than reconnect_delay ({reconnect_delay:g}s)"
            )
        self.reconnect_delay = reconnect_delay
        self.reconnect_delay_max = reconnect_delay_max

    @property
    def poll_seconds(self) -> float:
        return parse_duration(self.poll_interval)

    @property
    def reconnect_seconds(self) -> float:
        return parse_duration(self.reconnect_delay)

    @property
    def reconnect_max_seconds(self) -> float:
        return parse_duration(self.reconnect_delay_max)


class PcscError(Exception):
    """A PC/SC call failed in a way that loses the context or the reader."""


class ReaderGone(Exception):
    """The configured reader is not (or no longer) in pcscd's reader list."""


class CardSkipped(Exception):
    """A presented card gave no usable UID; ``reason`` is one of SkipReason."""

    def __init__(self, reason: SkipReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: SkipReason = reason
        self.detail = detail


def describe_result(operation: str, hresult: int) -> str:
    """Format a PC/SC result code as "<operation> failed: <message> (0x...)"."""
    message = scard.SCardGetErrorMessage(hresult) if scard is not None else "unknown error"
    return f"{operation} failed: {message.rstrip('.')} (0x{hresult & 0xFFFFFFFF:08X})"


def extract_uid(response: Sequence[int]) -> bytes:
    """Return the UID in a GET DATA response, or raise CardSkipped saying why there is none.

    Completeness is decided by the status word and the data length only. The
    first byte is never used to guess a size: 0x88 is the cascade tag inside the
    anticollision frames, yet a 4-byte UID reported by a reader may start with it.
    """
    if len(response) < 2:
        # No status word means the exchange broke off, as when the card leaves
        # the field mid-command; vpcd then reports success with no bytes at all.
        raise CardSkipped("read_failed", f"response of {len(response)} bytes has no status word")

    data = bytes(response[:-2])
    status_word = (response[-2] << 8) | response[-1]
    if status_word != SW_SUCCESS:
        raise CardSkipped("uid_missing", f"status word {status_word:04X}")
    if len(data) not in UID_LENGTHS:
        raise CardSkipped("uid_length_invalid", f"{len(data)} bytes; expected 4, 7 or 10")
    if len(data) == 4 and data[0] == RANDOM_UID_FIRST_BYTE:
        raise CardSkipped("uid_random", "4-byte UID starting 08 is drawn anew at every power-up")
    return data


def format_uid(uid: bytes, byte_order: Literal["msb", "lsb"]) -> str:
    """Return the canonical key: uppercase hex, no separators, in the configured byte order."""
    ordered = uid if byte_order == "msb" else uid[::-1]
    return ordered.hex().upper()


def is_contactless_atr(atr: bytes) -> bool:
    """Tell whether an ATR has the form PC/SC Part 3 readers build for contactless cards.

    That form is 3B 8n 80 01 followed by n historical bytes and a check byte:
    only TD1 and TD2 are present, announcing T=0 and then T=1.
    """
    return len(atr) >= 4 and atr[0] == 0x3B and atr[1] & 0xF0 == 0x80 and atr[2:4] == b"\x80\x01"


@dataclass(frozen=True, slots=True)
class CardRead:
    """The result of reading one presented card."""

    uid: bytes
    atr: bytes


class _Session:
    """One PC/SC context and the blocking calls on it; only the driver's worker thread calls it.

    ``stop`` is the exception, because SCardCancel is meant to be called from
    another thread to end a pending SCardGetStatusChange.
    """

    def __init__(self, settings: PcscSettings) -> None:
        self._settings = settings
        self._context: Any = None
        self._stopping = False

    def establish(self) -> None:
        self.release()
        hresult, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
        if hresult != scard.SCARD_S_SUCCESS:
            raise PcscError(describe_result("SCardEstablishContext", hresult))
        self._context = context

    def release(self) -> None:
        context, self._context = self._context, None
        if context is not None:
            # A context whose pcscd died cannot be released cleanly; nothing is left to free.
            scard.SCardReleaseContext(context)

    def stop(self) -> None:
        """End a pending wait now and keep new waits from starting (any thread may call this)."""
        self._stopping = True
        if self._context is not None:
            scard.SCardCancel(self._context)

    def list_readers(self) -> list[str]:
        hresult, readers = scard.SCardListReaders(self._context, [])
        if hresult == scard.SCARD_E_NO_READERS_AVAILABLE:
            return []
        if hresult != scard.SCARD_S_SUCCESS:
            raise PcscError(describe_result("SCardListReaders", hresult))
        return list(readers)

    def find_readers(self) -> list[str]:
        """Return the readers matching the glob, in name order."""
        return sorted(
            name for name in self.list_readers() if name_matches(name, self._settings.reader)
        )

    def wait_for_change(
        self, states: list[tuple[str, int]], timeout: float
    ) -> list[tuple[str, int]] | None:
        """Wait for a reader state to differ from ``states``; None when it timed out or stopped."""
        if self._stopping:
            # SCardCancel only ends a wait already pending; this catches one about to start.
            return None
        hresult, new_states = scard.SCardGetStatusChange(self._context, int(timeout * 1000), states)
        if hresult in (scard.SCARD_E_TIMEOUT, scard.SCARD_E_CANCELLED):
            return None
        if hresult == scard.SCARD_E_UNKNOWN_READER:
            raise ReaderGone("the reader left pcscd's reader list")
        if hresult != scard.SCARD_S_SUCCESS:
            raise PcscError(describe_result("SCardGetStatusChange", hresult))
        return [(name, event_state) for name, event_state, _atr in new_states]

    def read_card(self, reader: str, feedback_on_skip: bool) -> CardRead:
        """Connect to the card on ``reader`` and read its UID with GET DATA.

        Raises CardSkipped when the card yields no usable UID; with
        ``feedback_on_skip`` the ACR122U then blinks red and beeps three times.
        """
        hresult, card, protocol = scard.SCardConnect(
            self._context,
            reader,
            scard.SCARD_SHARE_SHARED,
            scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1,
        )
        if hresult in (scard.SCARD_E_NO_SMARTCARD, scard.SCARD_W_REMOVED_CARD):
            raise CardSkipped("card_removed", "card left before the connection was made")
        if hresult != scard.SCARD_S_SUCCESS:
            raise CardSkipped("read_failed", describe_result("SCardConnect", hresult))

        try:
            hresult, _reader, _state, _protocol, atr = scard.SCardStatus(card)
            if hresult != scard.SCARD_S_SUCCESS:
                raise _card_error("SCardStatus", hresult)

            try:
                uid = extract_uid(transmit_with_follow_ups(card, protocol, GET_UID_APDU))
            except CardSkipped as skipped:
                if feedback_on_skip and skipped.reason.startswith("uid_"):
                    # Best effort: the skip is logged by the caller either way, and a
                    # reader that rejects the command has nothing more to tell us.
                    scard.SCardTransmit(card, protocol, list(ACR122U_REJECTED_APDU))
                raise
            return CardRead(uid=uid, atr=bytes(atr))
        finally:
            scard.SCardDisconnect(card, scard.SCARD_LEAVE_CARD)


def _card_error(operation: str, hresult: int) -> CardSkipped:
    if hresult in (scard.SCARD_W_REMOVED_CARD, scard.SCARD_E_NO_SMARTCARD):
        return CardSkipped("card_removed", describe_result(operation, hresult))
    return CardSkipped("read_failed", describe_result(operation, hresult))


def transmit_with_follow_ups(card: Any, protocol: int, apdu: Sequence[int]) -> list[int]:
    """Send ``apdu`` and return data plus final status word, following 6C xx and 61 xx.

    6C xx requests the same command again with Le = xx, and 61 xx announces xx
    more bytes to fetch with GET RESPONSE (ISO/IEC 7816-4, used by T=0 cards).
    """
    command = list(apdu)
    collected: list[int] = []
    for _ in range(MAX_FOLLOW_UPS + 1):
        hresult, response = scard.SCardTransmit(card, protocol, command)
        if hresult != scard.SCARD_S_SUCCESS:
            raise _card_error("SCardTransmit", hresult)
        if len(response) < 2:
            return collected + list(response)

        sw1, sw2 = response[-2], response[-1]
        if sw1 == 0x6C:
            command = [*command[:4], sw2]
        elif sw1 == 0x61:
            collected += response[:-2]
            command = [0x00, 0xC0, 0x00, 0x00, sw2]
        else:
            return collected + list(response)
    return collected + list(response)


# The driver that reads each reader, by reader name. Two [[devices]] tables whose globs
# match one reader would otherwise both decide every card on it. Every driver of the
# daemon runs in its one event loop and claims or releases a reader only on that loop,
# between two awaits, so no lock is needed.
_reader_owners: dict[str, PcscDriver] = {}


class PcscDriver:
    """Reads card UIDs from the PC/SC reader that the settings' glob selects.

    The driver claims the reader it watches, and a driver whose glob matches a reader that
    another driver claimed leaves it alone until that driver releases it.
    """

    def __init__(self, settings: PcscSettings) -> None:
        if scard is None:
            raise RuntimeError(
                f"device {settings.name!r} needs pyscard, which is not installed: install the"
                " pcsc extra with the daemon's pip, for example /opt/identity-connector/venv/"
                "bin/pip install '/path/to/source[pcsc]' (it builds with swig against"
                " libpcsclite-dev)"
            )
        self.name = settings.name
        self.settings = settings
        self._executor: ThreadPoolExecutor | None = None
        self._feedback_executor: ThreadPoolExecutor | None = None
        self._session = _Session(settings)
        self._available: bool | None = None
        self._error: str | None = None
        self._error_is_conflict = False
        self._reader: str | None = None
        self._claimed: str | None = None
        # Readers that another device owned at the last search, with that device, so each
        # conflict is logged once instead of at every poll.
        self._conflicts_logged: dict[str, PcscDriver] = {}

    async def run(self, sink: EventSink) -> None:
        """Watch the reader until cancelled, re-establishing the PC/SC context when it is lost."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"pcsc-{self.name}")
        self._session = _Session(self.settings)
        attempt = 0
        try:
            while True:
                try:
                    await self._call(self._session.establish)
                    reader = await self._wait_for_reader(sink)
                    attempt = 0
                    try:
                        await self._watch_reader(reader, sink)
                    finally:
                        self._release_reader()
                except ReaderGone as error:
                    await self._set_health(sink, False, f"reader {self._reader!r}: {error}")
                    self._reader = None
                except PcscError as error:
                    await self._set_health(sink, False, str(error))
                    await self._call(self._session.release)
                    log.debug("pcsc.reconnect_scheduled", device=self.name, attempt=attempt)
                    await sleep_backoff(
                        attempt,
                        self.settings.reconnect_seconds,
                        self.settings.reconnect_max_seconds,
                    )
                    attempt += 1
                except Exception as error:
                    # A bug or an unexpected pyscard error. Log it with the traceback, then
                    # recover as from a lost context instead of stopping the device.
                    log.exception("pcsc.driver_failed", device=self.name)
                    await self._set_health(sink, False, f"driver failed: {error!r}")
                    await self._call(self._session.release)
                    await sleep_backoff(
                        attempt,
                        self.settings.reconnect_seconds,
                        self.settings.reconnect_max_seconds,
                    )
                    attempt += 1
        finally:
            self._release_reader()
            self._stop_worker()

    def _stop_worker(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        # The pending SCardGetStatusChange ends at once; the release then runs on
        # the worker thread after it, and the thread exits on its own.
        self._session.stop()
        executor.submit(self._session.release)
        executor.shutdown(wait=False)
        feedback_executor, self._feedback_executor = self._feedback_executor, None
        if feedback_executor is not None:
            feedback_executor.shutdown(wait=False)

    async def _call(self, function: Callable[..., _T], *args: Any) -> _T:
        assert self._executor is not None, "run() owns the worker thread"
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def _set_health(
        self,
        sink: EventSink,
        available: bool,
        error: str | None = None,
        *,
        conflict: bool = False,
        **log_fields: object,
    ) -> None:
        """Send a health change and log it once per transition, never on repeats.

        A transition is a change of availability. While unavailable, a change of the error
        counts too when the old or the new error is a reader owned by another device
        (``conflict``), so the health names the owner for as long as it keeps the reader.
        ``log_fields`` go on the ``device.unavailable`` line only.
        """
        error_changed = error != self._error and (conflict or self._error_is_conflict)
        if available == self._available and (available or not error_changed):
            return
        self._available = available
        self._error = None if available else error
        self._error_is_conflict = conflict and not available
        if available:
            log.info("device.available", device=self.name, reader=self._reader)
        else:
            log.warning("device.unavailable", device=self.name, error=error, **log_fields)
        await sink(Health(device=self.name, available=available, error=error))

    async def _wait_for_reader(self, sink: EventSink) -> str:
        """Claim the first matching reader that no other device reads, and return its name.

        Waits for pcscd to list such a reader. A reader that another device owns is checked
        again at least every poll_interval, so it is taken soon after that device lets go.
        """
        pnp_state = scard.SCARD_STATE_UNAWARE
        while True:
            matches = await self._call(self._session.find_readers)
            owned_by_others = self._readers_owned_by_others(matches)
            free = [reader for reader in matches if reader not in owned_by_others]
            # Without a free reader, the device.unavailable warning below names the first
            # reader in use and its owner, so that reader gets no pcsc.reader_in_use line.
            named = None if free or not owned_by_others else next(iter(owned_by_others))
            self._log_conflicts(owned_by_others, named=named)
            if free:
                reader = free[0]
                if len(matches) > 1:
                    log.warning(
                        "pcsc.reader_ambiguous",
                        device=self.name,
                        glob=self.settings.reader,
                        matches=len(matches),
                        reader=reader,
                    )
                self._claim_reader(reader)
                await self._set_health(sink, True)
                return reader

            if owned_by_others:
                reader, owner = next(iter(owned_by_others.items()))
                await self._set_health(
                    sink,
                    False,
                    f"reader {reader!r} is read by device {owner.name!r}, whose reader glob"
                    f" {owner.settings.reader!r} matches it too; make the two globs disjoint",
                    conflict=True,
                    reader=reader,
                    owner=owner.name,
                )
            else:
                await self._set_health(
                    sink, False, f"no PC/SC reader matches {self.settings.reader!r}"
                )
            # pcscd wakes this wait when a hot-plugged (USB) reader arrives. Readers
            # from reader.conf never notify, so the poll timeout rechecks the list.
            changes = await self._call(
                self._session.wait_for_change,
                [(PNP_NOTIFICATION, pnp_state)],
                self.settings.poll_seconds,
            )
            if changes:
                pnp_state = changes[0][1] & ~scard.SCARD_STATE_CHANGED

    def _readers_owned_by_others(self, readers: list[str]) -> dict[str, PcscDriver]:
        """Return the readers among ``readers`` that another driver claimed, with that driver."""
        owned = {}
        for reader in readers:
            owner = _reader_owners.get(reader)
            if owner is not None and owner is not self:
                owned[reader] = owner
        return owned

    def _log_conflicts(
        self, owned_by_others: dict[str, PcscDriver], named: str | None = None
    ) -> None:
        """Warn once about each reader that another device owns, until that device lets go.

        The reader ``named`` gets no line, because the device.unavailable warning names it.
        """
        for reader, owner in owned_by_others.items():
            if reader != named and self._conflicts_logged.get(reader) is not owner:
                log.warning(
                    "pcsc.reader_in_use",
                    device=self.name,
                    reader=reader,
                    owner=owner.name,
                    detail="the reader globs of both devices match this reader, so only the"
                    " owner reads it; make the two globs disjoint",
                )
        self._conflicts_logged = dict(owned_by_others)

    def _claim_reader(self, reader: str) -> None:
        _reader_owners[reader] = self
        self._claimed = reader
        self._reader = reader

    def _release_reader(self) -> None:
        """Let other drivers take the claimed reader; ``_reader`` stays for messages."""
        reader, self._claimed = self._claimed, None
        if reader is not None and _reader_owners.get(reader) is self:
            del _reader_owners[reader]

    async def _watch_reader(self, reader: str, sink: EventSink) -> None:
        """Read each card presented on ``reader``; raises ReaderGone or PcscError to stop."""
        states = [
            (reader, scard.SCARD_STATE_UNAWARE),
            (PNP_NOTIFICATION, scard.SCARD_STATE_UNAWARE),
        ]
        # pcsc-lite counts insertions and removals in the upper 16 bits of the
        # event state, so a card swapped between two waits still shows as new.
        read_event_count: int | None = None

        while True:
            changes = await self._call(
                self._session.wait_for_change, states, self.settings.poll_seconds
            )
            if changes is None:
                continue
            states = [(name, state & ~scard.SCARD_STATE_CHANGED) for name, state in changes]
            reader_state = changes[0][1]
            pnp_changed = bool(changes[1][1] & scard.SCARD_STATE_CHANGED)

            gone_flags = scard.SCARD_STATE_UNKNOWN | scard.SCARD_STATE_IGNORE
            if reader_state & gone_flags:
                raise ReaderGone("the reader left pcscd's reader list")
            if pnp_changed and reader not in await self._call(self._session.list_readers):
                raise ReaderGone("the reader left pcscd's reader list")

            if not reader_state & scard.SCARD_STATE_PRESENT:
                read_event_count = None
                continue
            event_count = reader_state >> 16
            if event_count == read_event_count or reader_state & scard.SCARD_STATE_MUTE:
                continue
            reader_state = await self._read_card(reader, reader_state, sink)
            read_event_count = reader_state >> 16
            states[0] = (reader, reader_state & ~scard.SCARD_STATE_CHANGED)

    async def _read_card(self, reader: str, reader_state: int, sink: EventSink) -> int:
        """Read the presented card, retrying a failed transaction; return the last reader state."""
        captured_at = datetime.now(UTC)
        feedback_on_skip = self._feedback_mode(reader) == "acr122u"

        for attempt in range(1, READ_ATTEMPTS + 1):
            try:
                card = await self._call(self._session.read_card, reader, feedback_on_skip)
            except CardSkipped as skipped:
                failure = skipped
            else:
                await self._send_scan(card, captured_at, sink)
                return reader_state

            if failure.reason != "read_failed" or attempt == READ_ATTEMPTS:
                await self._skip(reader, failure, sink)
                return reader_state

            # The transaction failed while the card was still listed: it is either
            # leaving the field or already gone and pcscd has not polled yet.
            log.debug("card.read_retry", device=self.name, attempt=attempt, detail=failure.detail)
            current = [(reader, reader_state & ~scard.SCARD_STATE_CHANGED)]
            changes = await self._call(self._session.wait_for_change, current, READ_RETRY_DELAY)
            if changes is not None:
                reader_state = changes[0][1]
            if not reader_state & scard.SCARD_STATE_PRESENT:
                await self._skip(reader, CardSkipped("card_removed", failure.detail), sink)
                return reader_state
        return reader_state

    async def _send_scan(self, card: CardRead, captured_at: datetime, sink: EventSink) -> None:
        channel = self._channel(card.atr)
        log.info("card.read", device=self.name, channel=channel, uid_length=len(card.uid))
        value = format_uid(card.uid, self.settings.uid_byte_order)
        await sink(Scan(device=self.name, channel=channel, value=value, captured_at=captured_at))

    async def _skip(self, reader: str, skipped: CardSkipped, sink: EventSink) -> None:
        """Log a card that gave no scan, and report it for the dropped-reads counter."""
        log.warning(
            "card.skipped",
            device=self.name,
            reader=reader,
            reason=skipped.reason,
            detail=skipped.detail,
        )
        await sink(Dropped(self.name, skipped.reason))

    def _channel(self, atr: bytes) -> Channel:
        if self.settings.interface == "contactless":
            return "RADIO"
        if self.settings.interface == "contact":
            return "CONTACT"
        # NOTE: a contact card whose own ATR starts 3B 8n 80 01 is taken for a
        # contactless one; set interface = "contact" for such a reader.
        return "RADIO" if is_contactless_atr(atr) else "CONTACT"

    def _feedback_mode(self, reader: str) -> Literal["acr122u", "off"]:
        if self.settings.feedback == "auto":
            return "acr122u" if fnmatch.fnmatchcase(reader, ACR122U_NAME_GLOB) else "off"
        return self.settings.feedback

    async def feedback(self, accepted: bool) -> None:
        """Blink and beep for a verdict; a logged no-op on readers without a known command."""
        reader = self._reader
        if reader is None or self._feedback_mode(reader) == "off":
            log.debug("pcsc.feedback_skipped", device=self.name, reader=reader)
            return

        if self._feedback_executor is None:
            self._feedback_executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"pcsc-{self.name}-feedback"
            )
        apdu = ACR122U_ACCEPTED_APDU if accepted else ACR122U_REJECTED_APDU
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._feedback_executor, send_reader_command, reader, apdu)
        except PcscError as error:
            log.warning("pcsc.feedback_failed", device=self.name, reader=reader, error=str(error))


def send_reader_command(reader: str, apdu: Sequence[int]) -> None:
    """Send a reader pseudo-APDU on a context of its own, so the watcher's wait goes on.

    With a card on the reader the command goes through SCardTransmit; without
    one, through the CCID escape IOCTL on a direct connection. Raises PcscError.
    """
    hresult, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    if hresult != scard.SCARD_S_SUCCESS:
        raise PcscError(describe_result("SCardEstablishContext", hresult))
    try:
        _send_on_context(context, reader, apdu)
    finally:
        scard.SCardReleaseContext(context)


def _send_on_context(context: Any, reader: str, apdu: Sequence[int]) -> None:
    protocols = scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1
    hresult, card, protocol = scard.SCardConnect(
        context, reader, scard.SCARD_SHARE_SHARED, protocols
    )
    if hresult == scard.SCARD_S_SUCCESS:
        try:
            hresult, response = scard.SCardTransmit(card, protocol, list(apdu))
        finally:
            scard.SCardDisconnect(card, scard.SCARD_LEAVE_CARD)
        if hresult != scard.SCARD_S_SUCCESS:
            raise PcscError(describe_result("SCardTransmit", hresult))
        if len(response) < 2 or response[-2] != 0x90:
            status = bytes(response[-2:]).hex().upper()
            raise PcscError(f"reader rejected the LED/buzzer command with status {status}")
        return

    if hresult not in (scard.SCARD_E_NO_SMARTCARD, scard.SCARD_W_REMOVED_CARD):
        raise PcscError(describe_result("SCardConnect", hresult))

    # NOTE: the CCID driver passes escape commands only when its ifdDriverOptions
    # allow it (0x0001 in Info.plist); otherwise this fails and is logged.
    hresult, card, _protocol = scard.SCardConnect(context, reader, scard.SCARD_SHARE_DIRECT, 0)
    if hresult != scard.SCARD_S_SUCCESS:
        raise PcscError(describe_result("SCardConnect (direct)", hresult))
    try:
        escape = scard.SCARD_CTL_CODE(CCID_ESCAPE_FUNCTION)
        hresult, _response = scard.SCardControl(card, escape, list(apdu))
    finally:
        scard.SCardDisconnect(card, scard.SCARD_LEAVE_CARD)
    if hresult != scard.SCARD_S_SUCCESS:
        raise PcscError(describe_result("SCardControl (CCID escape)", hresult))
