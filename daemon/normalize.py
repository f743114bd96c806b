"""Normalisation of scanned values and identity keys before they are hashed and compared."""

from __future__ import annotations

import base64
import binascii
import re
import unicodedata
from typing import Literal

CARD_CHANNELS = frozenset({"RADIO", "CONTACT"})

# Two hex digits per byte, optionally separated by ':', '-' or ' ' as readers print UIDs.
_HEX_UID = re.compile(r"^[0-9A-Fa-f]{2}(?:[:\- ]?[0-9A-Fa-f]{2})*$")
_BASE64 = re.compile(r"^[A-Za-z0-9+/]+={0,2}$|^[A-Za-z0-9\-_]+={0,2}$")

Encoding = Literal["raw", "base64", "auto"]


def strip_value(value: str) -> str:
    """Strip whitespace and control characters (a scanner's CR/LF suffix) from both ends."""
    if not value or not (_is_strippable(value[0]) or _is_strippable(value[-1])):
        return value
    start = 0
    end = len(value)
    while start < end and _is_strippable(value[start]):
        start += 1
    while end > start and _is_strippable(value[end - 1]):
        end -= 1
    return value[start:end]


def _is_strippable(char: str) -> bool:
    if " " < char < "\x7f":
        return False
    return char.isspace() or unicodedata.category(char) == "Cc"


def canonical_uid(value: str) -> str | None:
    """Return a card UID as uppercase hex without separators, or None if it is not hex."""
    if not _HEX_UID.match(value):
        return None
    return re.sub(r"[:\- ]", "", value).upper()


def decode_base64_text(value: str) -> str | None:
    """Decode standard or URL-safe base64 of printable UTF-8 text; None when it is not that."""
    if len(value) < 4 or not _BASE64.match(value):
        return None
    padded = value + "=" * (-len(value) % 4)
    try:
        if "-" in value or "_" in value:
            raw = base64.urlsafe_b64decode(padded)
        else:
            raw = base64.b64decode(padded, validate=True)
        text = raw.decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    if not text or not text.isprintable():
        return None
    return text


def normalize_key(key: str, channels: list[str] | None) -> str:
    """Normalise an identity record's key as import and sync store it.

    A key restricted to card channels is stored as a canonical UID, so "04:a2:..." in an
    HQ export matches the "04A2..." that a reader sends.
    """
    key = strip_value(key)
    if channels and set(channels) <= CARD_CHANNELS:
        return canonical_uid(key) or key
    return key


def candidate_keys(value: str, channel: str, encoding: Encoding) -> list[str]:
    """List the keys to look up for a scanned value, most specific first.

    Returns an empty list when ``encoding`` is base64 and the value is not valid base64.
    """
    stripped = strip_value(value)
    forms: list[str] = []
    if encoding in ("raw", "auto"):
        forms.append(stripped)
    if encoding in ("base64", "auto"):
        decoded = decode_base64_text(stripped)
        if decoded is not None:
            forms.append(strip_value(decoded))

    candidates: list[str] = []
    for form in forms:
        if channel in CARD_CHANNELS:
            uid = canonical_uid(form)
            if uid is not None and uid not in candidates:
                candidates.append(uid)
        if form and form not in candidates:
            candidates.append(form)
    return candidates
