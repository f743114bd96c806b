"""The configuration reference in README.md and the template systemd/config.toml.

Both must list every key that daemon/config.py accepts, so a new setting cannot ship
undocumented. The keys come from walking the configuration Structs, and the README
defaults are compared with the defaults in the code.
"""

from __future__ import annotations

import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

import msgspec
import pytest

from daemon import config

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
TEMPLATE = REPO / "systemd" / "config.toml"
REFERENCE_HEADING = "## Configuration reference"

# A README table row: | `key` | default | meaning |
ROW = re.compile(r"^\| `([^`]+)` \| (.+?) \| (.+?) \|$")
# A default cell written as one TOML value in backticks, such as `"5m"` or `8080`.
LITERAL_DEFAULT = re.compile(r"^`(.+)`$")

# Keys that have a default in their Struct but that parse_config still requires.
REQUIRED_WITH_DEFAULT = {"stores.ids"}  # an empty list is rejected: one store id at least


def struct_type_of(annotation: Any) -> type[msgspec.Struct] | None:
    """Return the Struct type of a section field, taking it out of `X | None`."""
    candidates = [annotation]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        candidates = list(typing.get_args(annotation))
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, msgspec.Struct):
            return candidate
    return None


def walk_keys(
    struct_type: type[msgspec.Struct], prefix: str = ""
) -> list[tuple[str, msgspec.structs.FieldInfo]]:
    """List (dotted key, field) for every setting, recursing into section Structs."""
    keys: list[tuple[str, msgspec.structs.FieldInfo]] = []
    for field in msgspec.structs.fields(struct_type):
        section_type = struct_type_of(field.type)
        if section_type is None:
            keys.append((prefix + field.name, field))
        else:
            keys.extend(walk_keys(section_type, f"{prefix}{field.name}."))
    return keys


def is_table_array(field: msgspec.structs.FieldInfo) -> bool:
    """Tell whether a top-level field is an array of tables, such as [[devices]]."""
    return (
        typing.get_origin(field.type) is list
        and typing.get_origin(typing.get_args(field.type)[0]) is dict
    )


def readme_name(key: str, field: msgspec.structs.FieldInfo) -> str:
    """Return the first cell of the key's README row: `[[devices]]` for arrays of tables."""
    return f"[[{key}]]" if is_table_array(field) else key


def code_default(field: msgspec.structs.FieldInfo) -> Any:
    if field.default_factory is not msgspec.NODEFAULT:
        return field.default_factory()
    return field.default


def decode_duration(kind: type, value: Any) -> Any:
    if kind is config.Duration:
        return config.parse_duration(value)
    raise NotImplementedError(kind)


def reference_rows() -> dict[str, tuple[str, str]]:
    """Read the reference table of README.md: first cell -> (default cell, meaning)."""
    text = README.read_text(encoding="utf-8")
    start = text.index(REFERENCE_HEADING) + len(REFERENCE_HEADING)
    end = text.find("\n## ", start)
    section = text[start:] if end == -1 else text[start:end]
    rows: dict[str, tuple[str, str]] = {}
    for line in section.splitlines():
        match = ROW.match(line.strip())
        if match:
            rows[match.group(1)] = (match.group(2).strip(), match.group(3).strip())
    return rows


def uncommented_template() -> dict[str, Any]:
    """Parse the template with every "#key = value" and "#[section]" line switched on."""
    lines = TEMPLATE.read_text(encoding="utf-8").splitlines()
    return tomllib.loads("\n".join(re.sub(r"^#(?=[\[A-Za-z])", "", line) for line in lines))


KEYS = walk_keys(config.Config)
KEY_IDS = [key for key, _ in KEYS]
SETTINGS = [(key, field) for key, field in KEYS if not is_table_array(field)]
SETTING_IDS = [key for key, _ in SETTINGS]
SECTION_NAMES = {field.name for field in msgspec.structs.fields(config.Config)}


@pytest.fixture(scope="module")
def rows() -> dict[str, tuple[str, str]]:
    return reference_rows()


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return uncommented_template()


@pytest.mark.parametrize(
    "key",
    [
        "server.host",
        "stores.ids",
        "tls.min_version",
        "auth.rate_limit",
        "hq.url",
        "local.debounce",
        "devices",
    ],
)
def test_walk_finds_key(key: str) -> None:
    # Guards the walk itself: an empty walk would let every test below pass.
    assert key in KEY_IDS


@pytest.mark.parametrize(("key", "field"), KEYS, ids=KEY_IDS)
def test_readme_lists_key(
    rows: dict[str, tuple[str, str]], key: str, field: msgspec.structs.FieldInfo
) -> None:
    assert readme_name(key, field) in rows


@pytest.mark.parametrize(("key", "field"), KEYS, ids=KEY_IDS)
def test_template_lists_key(
    template: dict[str, Any], key: str, field: msgspec.structs.FieldInfo
) -> None:
    table: Any = template
    for part in key.split("."):
        assert isinstance(table, dict), f"{key}: {part!r} is not inside a table"
        assert part in table, f"{key} is missing from {TEMPLATE.name}"
        table = table[part]


@pytest.mark.parametrize(("key", "field"), SETTINGS, ids=SETTING_IDS)
def test_readme_default_matches_code(
    rows: dict[str, tuple[str, str]], key: str, field: msgspec.structs.FieldInfo
) -> None:
    if key not in rows:
        pytest.skip("the row is missing, which test_readme_lists_key reports")
    cell, _ = rows[key]

    if field.required or key in REQUIRED_WITH_DEFAULT:
        assert cell == "required", f"{key}: write 'required' as its default"
        return
    literal = LITERAL_DEFAULT.match(cell)
    assert literal is not None, f"{key}: write the default {code_default(field)!r} in backticks"
    written = tomllib.loads(f"value = {literal.group(1)}")["value"]
    documented = msgspec.convert(written, type=field.type, dec_hook=decode_duration)
    assert documented == code_default(field)


def test_readme_rows_name_known_keys(rows: dict[str, tuple[str, str]]) -> None:
    known = {readme_name(key, field) for key, field in KEYS}
    sections = {f"[{name}]" for name in SECTION_NAMES}

    assert sorted(set(rows) - known - sections) == []


def test_readme_devices_row_links_devices_doc(rows: dict[str, tuple[str, str]]) -> None:
    _, meaning = rows["[[devices]]"]

    assert "(docs/devices.md)" in meaning
