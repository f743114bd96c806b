"""Serial barcode and QR scanners (RS-232 or USB CDC-ACM), read with pyserial.

A frame on the wire has the layout

    [prefix][AIM identifier][length digits][payload][suffix][terminator]

where every part but the payload is optional and set in ``SerialSettings``.
``FrameDecoder`` cuts the byte stream into frames, and ``SerialDriver`` owns
the port: it opens it, reads it on the event loop, reconnects after a loss and
writes good-read and bad-read feedback bytes.
"""

from __future__ import annotations

import asyncio
import codecs
import errno
import functools
import os
import stat
import termios
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Annotated, Literal

import msgspec
import serial
import structlog

from drivers.base import (
    DeviceSettings,
    Dropped,
    Duration,
    EventSink,
    HealthReporter,
    LogThrottle,
    Scan,
    deliver_in_order,
    parse_duration,
    parse_duration_setting,
    parse_positive_duration_setting,
    sleep_backoff,
    wait_readable,
)

log = structlog.get_logger(__name__)

TERMINATORS: dict[str, bytes] = {
    "CR": b"\r",
    "LF": b"\n",
    "CRLF": b"\r\n",
    "TAB": b"\t",
    "ETX": b"\x03",
    "none": b"",
}

PARITIES: dict[str, str] = {
    "none": serial.PARITY_NONE,
    "even": serial.PARITY_EVEN,
    "odd": serial.PARITY_ODD,
    "mark": serial.PARITY_MARK,
    "space": serial.PARITY_SPACE,
}

STOP_BITS = (1.0, 1.5, 2.0)

# AIM symbology identifier: "]", a symbology code character, a modifier character.
AIM_ID_LENGTH = 3
AIM_FLAG = ord("]")

# 2D symbologies whose payload may contain CR or LF: QR Code, Data Matrix,
# Aztec, PDF417 and MaxiCode (AIM code characters Q, d, z, L, U).
MULTILINE_SYMBOLOGIES = ["Q", "d", "z", "L", "U"]

READ_CHUNK = 4096

# A feedback write waits at most this long, in seconds, for hardware or
# software flow control to let it through.
FEEDBACK_WRITE_TIMEOUT = 1.0

# Seconds between two warnings about dropped frames of the same reason.
DROP_LOG_INTERVAL = 60.0

# Maximum wait, in seconds, between two opens of a path that does not exist. Checking for
# a missing device node is cheap, so a scanner plugged in after a long absence is found
# within this time. Other open errors keep the reconnect backoff.
MISSING_PATH_RETRY = 2.0

# Upper bound of max_frame_length, in bytes. A QR Code symbol stores at most 7,089 digits
# or 2,953 bytes, and a scanner that joins a structured-append sequence sends up to 16
# symbols, at most 113,424 digits. 128 KiB fits that with its framing, and still bounds
# the memory that a line sending noise without a terminator can take.
MAX_FRAME_LENGTH_LIMIT = 131072

# Range of baudrate: Linux's lowest and highest standard rates (B50 and B4000000), which
# are also the ends of pyserial 3.5's Serial.BAUDRATES. pyserial sets a rate in between that
# has no B constant as a custom rate (BOTHER), and raises OverflowError at every open for a
# rate above 2**31 - 1. A USB CDC-ACM scanner gets the rate as the 32-bit dwDTERate of
# SET_LINE_CODING and most ignore it. No barcode scanner runs faster than 4,000,000 baud.
MIN_BAUDRATE = 50
MAX_BAUDRATE = 4_000_000

# Minimum silence_timeout, in seconds. Each silence this long closes and reopens the port,
# and the open discards input that arrived meanwhile, so a scan sent during a reopen is
# lost. The floor limits that to 10 reopens a second on an idle line; at 0 the driver
# reopens the port in a loop. A link that died without an error needs no faster check.
MIN_SILENCE_TIMEOUT = 0.1


class SerialSettings(DeviceSettings, tag="serial"):
    """One ``[[devices]]`` table with ``kind = "serial"``."""

    path: Annotated[str, msgspec.Meta(min_length=1)]
    baudrate: Annotated[int, msgspec.Meta(ge=MIN_BAUDRATE, le=MAX_BAUDRATE)] = 9600
    bytesize: Literal[5, 6, 7, 8] = 8
    parity: Literal["none", "even", "odd", "mark", "space"] = "none"
    stopbits: float = 1.0
    rtscts: bool = False
    xonxoff: bool = False
    encoding: str = "utf-8"
    terminator: Literal["CR", "LF", "CRLF", "TAB", "ETX", "none"] = "CR"
    idle_gap: Duration = 0.1
    partial_timeout: Duration = 1.0
    prefix: str = ""
    suffix: str = ""
    aim_ids: bool = False
    multiline_symbologies: list[str] = msgspec.field(
        default_factory=lambda: list(MULTILINE_SYMBOLOGIES)
    )
    length_digits: Annotated[int, msgspec.Meta(ge=0, le=6)] = 0
    max_frame_length: Annotated[int, msgspec.Meta(gt=0, le=MAX_FRAME_LENGTH_LIMIT)] = 2048
    silence_timeout: Duration | None = None
    reconnect_delay: Duration = 0.5
    reconnect_delay_max: Duration = 30.0
    good_read_feedback: str | None = None
    bad_read_feedback: str | None = None

    def __post_init__(self) -> None:
        idle_gap = parse_positive_duration_setting(
            "idle_gap", self.idle_gap, "a frame would end at every pause between two reads"
        )
        partial_timeout = parse_positive_duration_setting(
            "partial_timeout", self.partial_timeout, "every frame would be dropped as incomplete"
        )
        reconnect_delay = parse_positive_duration_setting(
            "reconnect_delay",
            self.reconnect_delay,
            "the wait doubles from this value, so 0 reopens a lost port without pause",
        )
        reconnect_delay_max = parse_duration_setting(
            "reconnect_delay_max", self.reconnect_delay_max
        )
        self.idle_gap = idle_gap
        self.partial_timeout = partial_timeout
        self.reconnect_delay = reconnect_delay
        self.reconnect_delay_max = reconnect_delay_max
        if self.silence_timeout is not None:
            self.silence_timeout = _check_silence_timeout(self.silence_timeout, idle_gap)

        if not os.path.isabs(self.path):
            raise ValueError(
                f"path: invalid relative path {self.path!r}; use the absolute path of the"
                " device, such as /dev/ttyACM0 or /dev/serial/by-id/..."
            )
        if float(self.stopbits) not in STOP_BITS:
            raise ValueError(f"stopbits: invalid value {self.stopbits!r}, expected 1, 1.5 or 2")
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise ValueError(f"encoding: unknown codec {self.encoding!r}") from None
        for key in ("prefix", "suffix"):
            try:
                getattr(self, key).encode(self.encoding)
            except UnicodeEncodeError:
                raise ValueError(f"{key}: cannot be encoded as {self.encoding}") from None
        for code in self.multiline_symbologies:
            if len(code) != 1 or not code.isascii():
                raise ValueError(
                    f"multiline_symbologies: invalid AIM code character {code!r}, "
                    "expected one ASCII character such as 'Q'"
                )
        for key in ("good_read_feedback", "bad_read_feedback"):
            _parse_hex(key, getattr(self, key))

        if partial_timeout <= idle_gap:
            raise ValueError(
                f"partial_timeout: invalid duration {partial_timeout:g}s: use more than"
                f" idle_gap ({idle_gap:g}s)"
            )
        if reconnect_delay_max < reconnect_delay:
            raise ValueError(
                f"reconnect_delay_max: invalid duration {reconnect_delay_max:g}s: must not"
                f" be shorter than reconnect_delay ({reconnect_delay:g}s)"
            )


def _check_silence_timeout(value: float | str, idle_gap: float) -> float:
    """Convert silence_timeout to seconds, raising ValueError when its reopens would lose scans."""
    seconds = parse_duration_setting("silence_timeout", value)
    if seconds < MIN_SILENCE_TIMEOUT:
        raise ValueError(
            f"silence_timeout: invalid duration {value!r}: use"
            f" {MIN_SILENCE_TIMEOUT * 1000:g}ms or more, because each"
            " silence this long closes and reopens the port, and a scan that arrives during"
            " a reopen is lost"
        )
    if seconds < idle_gap:
        # A frame that ends on idle_gap of silence would still be in the decoder when the
        # reopen resets it.
        raise ValueError(
            f"silence_timeout: invalid duration {value!r}: use idle_gap ({idle_gap:g}s) or"
            " more, because a frame that ends after idle_gap of silence is lost when the port"
            " is reopened before then"
        )
    return seconds


def _parse_hex(key: str, value: str | None) -> bytes:
    if value is None:
        return b""
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise ValueError(
            f"{key}: invalid hex string {value!r}, expected bytes like '07' or '1b 42 30'"
        ) from None


@dataclass(frozen=True, slots=True)
class Frame:
    """A complete frame with prefix, AIM identifier, length and suffix removed."""

    value: str
    ended_at: float  # loop time of the frame's last byte


@dataclass(frozen=True, slots=True)
class DroppedFrame:
    """A frame thrown away; ``reason`` is too_long, malformed, undecodable or incomplete."""

    reason: str
    # Bytes received for the frame, not counting its terminator. None for a frame that
    # grew past max_frame_length before its end arrived, because the rest is not counted.
    size: int | None


FrameResult = Frame | DroppedFrame


class _Framing(Enum):
    TERMINATOR = "terminator"  # the frame ends at the first terminator
    IDLE = "idle"  # the frame ends when the line falls silent for idle_gap
    LENGTH = "length"  # the frame ends after the length its header declares


class FrameDecoder:
    """Cut a serial byte stream into frames.

    Framing rules, in order:

    - ``terminator = "none"``: a frame ends after ``idle_gap`` of silence.
    - ``length_digits > 0``: after the prefix and the AIM identifier come that
      many ASCII digits with the payload length in bytes, so the payload may
      contain the terminator byte.
    - ``aim_ids`` and a symbology in ``multiline_symbologies``: the frame ends
      at a terminator followed by ``idle_gap`` of silence, so a QR payload may
      contain CR. It also ends at a terminator that follows the suffix (when
      one is set) and is followed by the start of the next frame: the prefix,
      or without a prefix an AIM identifier's ``]`` and an ASCII letter.
    - Otherwise the frame ends at the first terminator.

    With CR or LF as terminator, a CRLF pair counts as one terminator. A
    configured prefix, suffix, AIM identifier or length that is missing or
    wrong makes the frame malformed. Bad frames are dropped, and decoding
    resumes after the next terminator. Bytes without a terminator are dropped
    after ``partial_timeout`` of silence, so line noise does not stick to the
    front of the next scan.
    """

    def __init__(self, settings: SerialSettings) -> None:
        self._terminator = TERMINATORS[settings.terminator]
        self._encoding = settings.encoding
        self._prefix = settings.prefix.encode(settings.encoding)
        self._suffix = settings.suffix.encode(settings.encoding)
        self._aim_ids = settings.aim_ids
        self._multiline = {ord(code) for code in settings.multiline_symbologies}
        self._length_digits = settings.length_digits
        self._max_frame_length = settings.max_frame_length
        self._idle_gap = parse_duration(settings.idle_gap)
        self._partial_timeout = parse_duration(settings.partial_timeout)

        self._buffer = bytearray()
        self._last_data_at = 0.0
        self._discarding = False  # dropping the rest of a bad frame up to the next terminator
        self._skip_lf = False  # a CR terminator just ended a frame, so a leading LF is its pair

    def reset(self) -> None:
        """Forget buffered bytes, as after reopening the port."""
        self._buffer.clear()
        self._discarding = False
        self._skip_lf = False

    def drop_pending(self) -> list[FrameResult]:
        """Reset the decoder, and report the bytes of an unfinished frame as ``incomplete``.

        The rest of a frame that is being discarded was reported when it was dropped, so it
        is not reported again.
        """
        size = len(self._buffer)
        discarding = self._discarding
        self.reset()
        if discarding or not size:
            return []
        return [DroppedFrame("incomplete", size)]

    def feed(self, data: bytes, now: float) -> list[FrameResult]:
        """Add bytes received at loop time ``now`` and return the frames they complete."""
        if not data:
            return []
        self._last_data_at = now

        if self._skip_lf:
            self._skip_lf = False
            if data.startswith(b"\n"):
                data = data[1:]
        self._buffer += data

        return self._split(now)

    def deadline(self) -> float | None:
        """Return the loop time at which ``expire`` has work, or None while idle."""
        if not self._buffer and not self._discarding:
            return None
        if self._terminator == b"":
            return self._last_data_at + self._idle_gap
        if (
            not self._discarding
            and self._framing(self._buffer)[0] is _Framing.IDLE
            and self._ends_with_terminator(self._buffer)
        ):
            return self._last_data_at + self._idle_gap
        return self._last_data_at + self._partial_timeout

    def expire(self, now: float) -> list[FrameResult]:
        """Close frames that silence ends, and drop stale partial frames."""
        deadline = self.deadline()
        if deadline is None or now < deadline:
            return []

        data = bytes(self._buffer)
        self._buffer.clear()
        if self._discarding:
            self._discarding = False
            return []

        if self._terminator == b"":
            return self._parsed(data, self._last_data_at)

        if self._framing(data)[0] is _Framing.IDLE and self._ends_with_terminator(data):
            return self._parsed(self._strip_terminator(data), self._last_data_at)

        return [DroppedFrame("incomplete", len(data))]

    def _split(self, now: float) -> list[FrameResult]:
        results: list[FrameResult] = []
        terminator = self._terminator

        while self._buffer:
            if self._discarding:
                if not self._skip_to_terminator():
                    break
                continue

            framing, frame_end = self._framing(self._buffer)
            if framing is _Framing.IDLE:
                boundary = self._next_frame_boundary(self._buffer)
                if boundary is not None:
                    frame_end, next_start = boundary
                    frame = bytes(self._buffer[:frame_end])
                    del self._buffer[:next_start]
                    results.extend(self._parsed(frame, now))
                    continue
                if len(self._buffer) > self._max_frame_length + len(terminator):
                    results.append(self._overflow())
                break

            if framing is _Framing.LENGTH:
                total = frame_end + len(terminator)
                if len(self._buffer) < total:
                    break
                frame = bytes(self._buffer[:frame_end])
                found = bytes(self._buffer[frame_end:total])
                del self._buffer[:total]
                if found != terminator:
                    results.append(DroppedFrame("malformed", len(frame)))
                    self._buffer[:0] = found
                    self._discarding = True
                    continue
                self._after_terminator()
                results.extend(self._parsed(frame, now))
                continue

            end = self._buffer.find(terminator)
            if end < 0:
                if len(self._buffer) >= self._max_frame_length + len(terminator):
                    results.append(self._overflow())
                break
            frame = bytes(self._buffer[:end])
            del self._buffer[: end + len(terminator)]
            if terminator == b"\n" and frame.endswith(b"\r"):
                frame = frame[:-1]
            self._after_terminator()
            results.extend(self._parsed(frame, now))

        return results

    def _framing(self, data: bytes | bytearray) -> tuple[_Framing, int]:
        """Pick the framing rule for a frame that starts at ``data[0]``.

        Returns the rule and, for LENGTH, the offset just past the suffix. A
        header that is still incomplete, or invalid, falls back to the
        terminator rule. An invalid one then makes ``_parse`` report the frame
        as malformed.
        """
        if self._terminator == b"":
            return _Framing.IDLE, 0

        position = 0
        if self._prefix:
            if not data.startswith(self._prefix):
                return _Framing.TERMINATOR, 0
            position = len(self._prefix)

        symbology = None
        if self._aim_ids:
            if len(data) < position + AIM_ID_LENGTH or data[position] != AIM_FLAG:
                return _Framing.TERMINATOR, 0
            symbology = data[position + 1]
            position += AIM_ID_LENGTH

        if self._length_digits:
            digits = bytes(data[position : position + self._length_digits])
            if len(digits) < self._length_digits or not digits.isdigit():
                return _Framing.TERMINATOR, 0
            declared = int(digits)
            if declared > self._max_frame_length:
                return _Framing.TERMINATOR, 0
            return _Framing.LENGTH, position + self._length_digits + declared + len(self._suffix)

        if symbology in self._multiline:
            return _Framing.IDLE, 0
        return _Framing.TERMINATOR, 0

    def _next_frame_boundary(self, data: bytes | bytearray) -> tuple[int, int] | None:
        """Find where a second frame starts inside an idle-framed one, such as two QR scans.

        Returns the end of the first frame (before its terminator) and the start of the
        next, or None when no terminator in ``data`` follows the suffix and precedes the
        start of a frame. A terminator at the end of ``data`` waits for more bytes.
        """
        terminator = self._terminator
        if not terminator:
            return None

        search_from = len(self._prefix) + AIM_ID_LENGTH
        while True:
            index = data.find(terminator, search_from)
            if index < 0:
                return None
            search_from = index + 1

            # With CR or LF as terminator, a CRLF pair counts as one terminator.
            frame_end = index
            if terminator == b"\n" and data.endswith(b"\r", 0, index):
                frame_end -= 1
            next_start = index + len(terminator)
            if terminator == b"\r" and data.startswith(b"\n", next_start):
                next_start += 1

            if self._suffix and not data.endswith(self._suffix, 0, frame_end):
                continue
            if self._starts_frame(data, next_start):
                return frame_end, next_start

    def _starts_frame(self, data: bytes | bytearray, start: int) -> bool:
        """Tell whether the bytes at ``start`` begin a frame, as far as the header shows it.

        With a prefix, the prefix must be there in full. Without one, the AIM flag and
        an ASCII letter must be there.
        """
        if self._prefix:
            return data.startswith(self._prefix, start)
        # NOTE: without a prefix, a payload line that starts with "]" and a letter,
        # as in "]Q1A\r]Bx\r", is taken for a new scan and the frame is cut there.
        # With a suffix the cut also needs the suffix right before the CR, which such a
        # payload rarely has.
        code = data[start + 1 : start + 2]
        return data[start : start + 1] == b"]" and code.isalpha() and code.isascii()

    def _parse(self, frame: bytes, ended_at: float) -> FrameResult | None:
        """Strip the configured parts of a frame and decode its payload."""
        size = len(frame)
        if size > self._max_frame_length:
            return DroppedFrame("too_long", size)
        if not frame:
            return None

        payload = frame
        if self._prefix:
            if not payload.startswith(self._prefix):
                return DroppedFrame("malformed", size)
            payload = payload[len(self._prefix) :]
        if self._suffix:
            if not payload.endswith(self._suffix):
                return DroppedFrame("malformed", size)
            payload = payload[: -len(self._suffix)]
        if self._aim_ids:
            if len(payload) < AIM_ID_LENGTH or payload[0] != AIM_FLAG:
                return DroppedFrame("malformed", size)
            payload = payload[AIM_ID_LENGTH:]
        if self._length_digits:
            digits = payload[: self._length_digits]
            payload = payload[self._length_digits :]
            if not digits.isdigit() or len(digits) < self._length_digits:
                return DroppedFrame("malformed", size)
            if int(digits) != len(payload):
                return DroppedFrame("malformed", size)

        try:
            value = payload.decode(self._encoding)
        except UnicodeDecodeError:
            return DroppedFrame("undecodable", size)
        if not value:
            return None
        return Frame(value, ended_at)

    def _parsed(self, frame: bytes, ended_at: float) -> list[FrameResult]:
        result = self._parse(frame, ended_at)
        return [] if result is None else [result]

    def _overflow(self) -> DroppedFrame:
        """Drop a frame that grew past the maximum before its end arrived."""
        dropped = DroppedFrame("too_long", None)
        self._discarding = True

        # Keep a trailing CR, which may be the first half of a CRLF terminator.
        keep = len(self._terminator) - 1
        if keep and self._buffer.endswith(self._terminator[:keep]):
            del self._buffer[:-keep]
        else:
            self._buffer.clear()
        return dropped

    def _skip_to_terminator(self) -> bool:
        """Drop bytes through the next terminator; return False when none has arrived."""
        if self._terminator == b"":
            self._buffer.clear()
            return False

        end = self._buffer.find(self._terminator)
        if end < 0:
            keep = len(self._terminator) - 1
            if keep and self._buffer.endswith(self._terminator[:keep]):
                del self._buffer[:-keep]
            else:
                self._buffer.clear()
            return False

        del self._buffer[: end + len(self._terminator)]
        self._discarding = False
        self._after_terminator()
        return True

    def _after_terminator(self) -> None:
        if self._terminator != b"\r":
            return
        if self._buffer.startswith(b"\n"):
            del self._buffer[0]
        elif not self._buffer:
            self._skip_lf = True

    def _is_cr_lf(self) -> bool:
        return self._terminator in (b"\r", b"\n")

    def _ends_with_terminator(self, data: bytes | bytearray) -> bool:
        if self._is_cr_lf() and data.endswith(b"\r\n"):
            return True
        return data.endswith(self._terminator)

    def _strip_terminator(self, data: bytes) -> bytes:
        """Remove the terminator at the end, with the other half of a CRLF pair."""
        if self._is_cr_lf() and data.endswith(b"\r\n"):
            return data[:-2]
        return data[: -len(self._terminator)]


@dataclass(slots=True)
class SerialStats:
    """Counters of one serial driver, for metrics and tests."""

    opens: int = 0
    failed_opens: int = 0
    scans: int = 0
    silence_reopens: int = 0
    dropped: Counter[str] = field(default_factory=Counter)


class _LinkEnd(Enum):
    LOST = "lost"
    SILENT = "silent"


@dataclass(frozen=True, slots=True)
class _Lost:
    kind: _LinkEnd
    error: str = ""


class SerialDriver:
    """Read scans from one serial scanner and keep its link up.

    The port is opened with an exclusive lock, and the configured path is
    resolved again on every reconnect, so a ``/dev/serial/by-id`` symlink
    follows a device that came back under another tty name. Reads run on the
    event loop with a non-blocking descriptor; opening, closing and feedback
    writes run in worker threads.
    """

    def __init__(self, settings: SerialSettings) -> None:
        self.name = settings.name
        self.settings = settings
        self.stats = SerialStats()

        self._decoder = FrameDecoder(settings)
        self._good_read = _parse_hex("good_read_feedback", settings.good_read_feedback)
        self._bad_read = _parse_hex("bad_read_feedback", settings.bad_read_feedback)
        self._reconnect_delay = parse_duration(settings.reconnect_delay)
        self._reconnect_delay_max = parse_duration(settings.reconnect_delay_max)
        self._silence_timeout = (
            None if settings.silence_timeout is None else parse_duration(settings.silence_timeout)
        )
        self._drop_log = LogThrottle(DROP_LOG_INTERVAL)
        self._feedback_log = LogThrottle(DROP_LOG_INTERVAL)
        self._feedback_failures = 0
        """Failed feedback writes since the last serial.feedback_failed line."""

        # The lock keeps a feedback write in a worker thread from using a
        # descriptor that the run loop has closed and the kernel has reused.
        self._port_lock = threading.Lock()
        self._port: serial.Serial | None = None

    async def run(self, sink: EventSink) -> None:
        """Open, read and reopen the port until cancelled."""
        health = HealthReporter(self.name, sink)
        attempt = 0

        while True:
            try:
                port, resolved = await asyncio.to_thread(self._open_port)
            except (serial.SerialException, OSError) as error:
                self.stats.failed_opens += 1
                await health.unavailable(str(error), path=self.settings.path)
                delay_max = self._reconnect_delay_max
                if not os.path.exists(self.settings.path):
                    delay_max = min(delay_max, MISSING_PATH_RETRY)
                await sleep_backoff(attempt, self._reconnect_delay, delay_max)
                attempt += 1
                continue

            attempt = 0
            self.stats.opens += 1
            await health.available(path=self.settings.path, resolved=resolved)

            try:
                end = await self._read_until_lost(port, sink)
            finally:
                await asyncio.to_thread(self._close_port)

            if end.kind is _LinkEnd.SILENT:
                # The link may have died without an error (a stale tty after a
                # replug), so reopen at once and let the open decide.
                self.stats.silence_reopens += 1
                log.debug("serial.silence_reopen", device=self.name, path=self.settings.path)
                continue

            await health.unavailable(end.error, path=self.settings.path)
            await sleep_backoff(attempt, self._reconnect_delay, self._reconnect_delay_max)
            attempt += 1

    async def feedback(self, accepted: bool) -> None:
        """Write the good-read or bad-read bytes to the scanner, when configured."""
        data = self._good_read if accepted else self._bad_read
        if not data:
            return

        try:
            written = await asyncio.to_thread(self._write_feedback, data)
        except (serial.SerialException, OSError) as error:
            self._feedback_failures += 1
            # A scanner that never takes its feedback bytes fails every write the same way.
            if self._feedback_log.allow("feedback_failed", time.monotonic()):
                log.warning(
                    "serial.feedback_failed",
                    device=self.name,
                    accepted=accepted,
                    error=str(error),
                    failures_since_last_line=self._feedback_failures,
                )
                self._feedback_failures = 0
            return
        if not written:
            log.debug("serial.feedback_skipped", device=self.name, reason="port not open")

    def _open_port(self) -> tuple[serial.Serial, str]:
        resolved = os.path.realpath(self.settings.path)
        try:
            port = serial.Serial(
                resolved,
                baudrate=self.settings.baudrate,
                bytesize=self.settings.bytesize,
                parity=PARITIES[self.settings.parity],
                stopbits=float(self.settings.stopbits),
                rtscts=self.settings.rtscts,
                xonxoff=self.settings.xonxoff,
                timeout=0,
                write_timeout=FEEDBACK_WRITE_TIMEOUT,
                exclusive=True,
            )
        except serial.SerialException as error:
            if _is_not_a_tty(error, resolved):
                target = self.settings.path
                if resolved != target:
                    target += f" (resolved to {resolved})"
                raise serial.SerialException(
                    f"{target} is not a serial device: set path to the scanner's tty, such"
                    " as /dev/ttyACM0 or /dev/serial/by-id/...",
                ) from error
            raise
        with self._port_lock:
            self._port = port
        return port, resolved

    def _close_port(self) -> None:
        with self._port_lock:
            port, self._port = self._port, None
        if port is not None:
            port.close()

    def _write_feedback(self, data: bytes) -> bool:
        with self._port_lock:
            if self._port is None:
                return False
            self._port.write(data)
            return True

    async def _read_until_lost(self, port: serial.Serial, sink: EventSink) -> _Lost:
        self._decoder.reset()
        try:
            return await self._read_frames(port, sink)
        except asyncio.CancelledError:
            # The driver stops (the daemon stops, or a reload removes or changes the device's
            # table), so a frame still in the decoder can never end. It is counted as
            # incomplete, like a frame that a lost link cuts off.
            await self._drop_pending(sink)
            raise

    async def _read_frames(self, port: serial.Serial, sink: EventSink) -> _Lost:
        """Read and frame scans until the link is lost or falls silent for silence_timeout."""
        loop = asyncio.get_running_loop()
        fd = port.fileno()
        last_data_at = loop.time()

        while True:
            timeout = self._next_timeout(loop.time(), last_data_at)
            readable = await wait_readable(fd, timeout)
            now = loop.time()

            if readable:
                try:
                    data = os.read(fd, READ_CHUNK)
                except BlockingIOError:
                    continue
                except OSError as error:
                    await self._drop_pending(sink)
                    return _Lost(_LinkEnd.LOST, f"read failed: {error}")
                if not data:
                    await self._drop_pending(sink)
                    return _Lost(_LinkEnd.LOST, "device disconnected: read returned no data")
                last_data_at = now
                results = self._decoder.feed(data, now)
            else:
                results = self._decoder.expire(now)
                silent_for = now - last_data_at
                if self._silence_timeout is not None and silent_for >= self._silence_timeout:
                    # The reopen clears the decoder. A silence_timeout shorter than
                    # partial_timeout ends a partial frame here, so it is counted as
                    # incomplete, like a frame that partial_timeout ends.
                    await self._deliver(results, sink)
                    await self._drop_pending(sink)
                    return _Lost(_LinkEnd.SILENT)

            await self._deliver(results, sink)

    async def _drop_pending(self, sink: EventSink) -> None:
        """Count and log the unfinished frame in the decoder as ``incomplete``, and reset it.

        The read loop calls this when the driver is cancelled, and before it returns for a
        reopen or a lost link. ``run`` therefore reports the device unavailable after the drop.
        A frame that idle_gap framing has not closed yet counts as incomplete too, because
        the read ended before the silence that would close it.
        """
        await self._deliver(self._decoder.drop_pending(), sink)

    def _next_timeout(self, now: float, last_data_at: float) -> float | None:
        deadlines = []
        decoder_deadline = self._decoder.deadline()
        if decoder_deadline is not None:
            deadlines.append(decoder_deadline)
        if self._silence_timeout is not None:
            deadlines.append(last_data_at + self._silence_timeout)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - now)

    async def _deliver(self, results: list[FrameResult], sink: EventSink) -> None:
        """Deliver frame results in order, dropping the rest if the driver stops."""
        await deliver_in_order(
            results,
            functools.partial(self._deliver_one, sink=sink),
            functools.partial(self._drop_undelivered, sink=sink),
        )

    async def _deliver_one(self, result: FrameResult, sink: EventSink) -> None:
        loop = asyncio.get_running_loop()
        if isinstance(result, DroppedFrame):
            self._report_drop(result, loop.time())
            await sink(Dropped(self.name, result.reason))
            return

        self.stats.scans += 1
        age = timedelta(seconds=max(0.0, loop.time() - result.ended_at))
        scan = Scan(self.name, "OPTICAL", result.value, datetime.now(UTC) - age)
        await sink(scan)

    async def _drop_undelivered(self, results: list[FrameResult], sink: EventSink) -> None:
        """Count the frames of one read that a stop cut off before their delivery.

        Each complete frame is dropped as ``stopped``, with one warning line for all of them
        that gives their count and no content. A dropped frame keeps its own reason.
        """
        stopped = sum(isinstance(result, Frame) for result in results)
        if stopped:
            self.stats.dropped["stopped"] += stopped
            log.warning(
                "serial.frame_dropped",
                device=self.name,
                reason="stopped",
                count=stopped,
                dropped_total=self.stats.dropped["stopped"],
            )

        for result in results:
            if isinstance(result, Frame):
                await sink(Dropped(self.name, "stopped"))
            else:
                await self._deliver_one(result, sink)

    def _report_drop(self, dropped: DroppedFrame, now: float) -> None:
        self.stats.dropped[dropped.reason] += 1
        fields: dict[str, object] = {"device": self.name, "reason": dropped.reason}
        if dropped.size is not None:
            fields["size"] = dropped.size
        if dropped.reason == "too_long":
            fields["max_frame_length"] = self.settings.max_frame_length
            if dropped.size is None:
                fields["detail"] = (
                    "longer than max_frame_length; the rest up to the next terminator was discarded"
                )
        fields["dropped_total"] = self.stats.dropped[dropped.reason]
        if self._drop_log.allow(dropped.reason, now):
            log.warning("serial.frame_dropped", **fields)
        else:
            log.debug("serial.frame_dropped", **fields)


def _is_not_a_tty(error: serial.SerialException, path: str) -> bool:
    """Tell whether opening ``path`` failed because it is no terminal device.

    pyserial 3.5 opens a regular file or a character device such as /dev/null, then
    fails on its first termios call with ENOTTY and reports only "Could not configure
    port". A path that exists but is no character device, such as a folder, counts too.
    """
    cause = error.__context__
    if isinstance(cause, termios.error) and cause.args and cause.args[0] == errno.ENOTTY:
        return True
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not stat.S_ISCHR(mode)
