"""Keyboard layouts for HID keyboard-wedge scanners: evdev key codes to characters.

A wedge scanner types each character as the key that produces it on the
host's layout, so the driver must decode with the layout the scanner was set
up for. The tables follow xkeyboard-config ("us" and "de(basic)" in
/usr/share/X11/xkb/symbols, version 2.35.1 in Debian 12) for the characters a
scanner can type. Key codes come from ``evdev.ecodes``, which mirrors the
kernel's ``input-event-codes.h``.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

from evdev import ecodes


@dataclass(frozen=True, slots=True)
class DeadKey:
    """A key that types nothing itself but changes the next character.

    Followed by a space, it types ``spacing``. Followed by a letter, it
    composes the letter with ``combining`` where Unicode has a precomposed
    character, and types ``spacing`` and the letter otherwise.
    """

    spacing: str
    combining: str


Symbol = str | DeadKey
_Value = TypeVar("_Value")


@dataclass(frozen=True, slots=True)
class KeyLevels:
    """Symbols of one key at its plain, Shift and AltGr levels; an empty string types nothing."""

    plain: Symbol
    shift: Symbol
    altgr: Symbol = ""

    @property
    def follows_caps_lock(self) -> bool:
        """Whether Caps Lock swaps the plain and shifted letter, as for a-z and umlauts."""
        return (
            isinstance(self.plain, str)
            and isinstance(self.shift, str)
            and self.plain.isalpha()
            and self.plain.upper() == self.shift
        )


@dataclass(frozen=True, slots=True)
class Layout:
    """One keyboard layout: main keys, keypad keys, and whether Right Alt is AltGr."""

    name: str
    keys: Mapping[int, KeyLevels]
    keypad: Mapping[int, str]
    has_altgr: bool


def _codes(table: Mapping[str, _Value]) -> dict[int, _Value]:
    """Key the table by evdev code; an unknown key name raises KeyError at import."""
    return {ecodes.ecodes[name]: levels for name, levels in table.items()}


def _letters(*skip: str) -> dict[str, KeyLevels]:
    return {
        f"KEY_{letter.upper()}": KeyLevels(letter, letter.upper())
        for letter in string.ascii_lowercase
        if letter not in skip
    }


# With Num Lock on, as scanners that type on the keypad expect. Shift does
# not change these keys here.
_KEYPAD_DIGITS = {f"KEY_KP{digit}": str(digit) for digit in range(10)}
_KEYPAD_OPERATORS = {
    "KEY_KPASTERISK": "*",
    "KEY_KPMINUS": "-",
    "KEY_KPPLUS": "+",
    "KEY_KPSLASH": "/",
}

US = Layout(
    name="us",
    keys=_codes(
        {
            **_letters(),
            "KEY_1": KeyLevels("1", "!"),
            "KEY_2": KeyLevels("2", "@"),
            "KEY_3": KeyLevels("3", "#"),
            "KEY_4": KeyLevels("4", "$"),
            "KEY_5": KeyLevels("5", "%"),
            "KEY_6": KeyLevels("6", "^"),
            "KEY_7": KeyLevels("7", "&"),
            "KEY_8": KeyLevels("8", "*"),
            "KEY_9": KeyLevels("9", "("),
            "KEY_0": KeyLevels("0", ")"),
            "KEY_MINUS": KeyLevels("-", "_"),
            "KEY_EQUAL": KeyLevels("=", "+"),
            "KEY_LEFTBRACE": KeyLevels("[", "{"),
            "KEY_RIGHTBRACE": KeyLevels("]", "}"),
            "KEY_BACKSLASH": KeyLevels("\\", "|"),
            "KEY_SEMICOLON": KeyLevels(";", ":"),
            "KEY_APOSTROPHE": KeyLevels("'", '"'),
            "KEY_GRAVE": KeyLevels("`", "~"),
            "KEY_COMMA": KeyLevels(",", "<"),
            "KEY_DOT": KeyLevels(".", ">"),
            "KEY_SLASH": KeyLevels("/", "?"),
            "KEY_SPACE": KeyLevels(" ", " "),
        }
    ),
    keypad=_codes({**_KEYPAD_DIGITS, **_KEYPAD_OPERATORS, "KEY_KPDOT": "."}),
    has_altgr=False,
)

_DEAD_CIRCUMFLEX = DeadKey("^", "\u0302")
_DEAD_ACUTE = DeadKey("´", "\u0301")
_DEAD_GRAVE = DeadKey("`", "\u0300")

# German layout as in xkeyboard-config de(basic): Y and Z swapped, umlauts on
# the keys right of P, L and Ö, and @ { [ ] } \ | ~ on AltGr. The circumflex,
# acute and grave keys are dead keys, so a scanner types "^" as circumflex
# followed by space.
DE = Layout(
    name="de",
    keys=_codes(
        {
            **_letters("y", "z"),
            "KEY_Y": KeyLevels("z", "Z"),
            "KEY_Z": KeyLevels("y", "Y"),
            "KEY_Q": KeyLevels("q", "Q", "@"),
            "KEY_E": KeyLevels("e", "E", "€"),
            "KEY_M": KeyLevels("m", "M", "µ"),
            "KEY_GRAVE": KeyLevels(_DEAD_CIRCUMFLEX, "°"),
            "KEY_1": KeyLevels("1", "!"),
            "KEY_2": KeyLevels("2", '"', "²"),
            "KEY_3": KeyLevels("3", "§", "³"),
            "KEY_4": KeyLevels("4", "$"),
            "KEY_5": KeyLevels("5", "%"),
            "KEY_6": KeyLevels("6", "&"),
            "KEY_7": KeyLevels("7", "/", "{"),
            "KEY_8": KeyLevels("8", "(", "["),
            "KEY_9": KeyLevels("9", ")", "]"),
            "KEY_0": KeyLevels("0", "=", "}"),
            "KEY_MINUS": KeyLevels("ß", "?", "\\"),
            "KEY_EQUAL": KeyLevels(_DEAD_ACUTE, _DEAD_GRAVE),
            "KEY_LEFTBRACE": KeyLevels("ü", "Ü"),
            "KEY_RIGHTBRACE": KeyLevels("+", "*", "~"),
            "KEY_SEMICOLON": KeyLevels("ö", "Ö"),
            "KEY_APOSTROPHE": KeyLevels("ä", "Ä"),
            "KEY_BACKSLASH": KeyLevels("#", "'"),
            "KEY_102ND": KeyLevels("<", ">", "|"),
            "KEY_COMMA": KeyLevels(",", ";"),
            "KEY_DOT": KeyLevels(".", ":"),
            "KEY_SLASH": KeyLevels("-", "_"),
            "KEY_SPACE": KeyLevels(" ", " "),
        }
    ),
    # xkb "kpdl(comma)": the keypad decimal key types a comma on German layouts.
    keypad=_codes({**_KEYPAD_DIGITS, **_KEYPAD_OPERATORS, "KEY_KPDOT": ","}),
    has_altgr=True,
)

LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (US, DE)}
