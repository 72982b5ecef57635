"""Reading the text files users write: sheets (CSV, TSV, JSON lines) and YAML.

One place decides what is accepted, so every sheet behaves alike:

- UTF-8, with or without the byte-order mark Excel writes for "CSV UTF-8";
- any other encoding (Latin-1, UTF-16) is refused in one line naming the file, the line
  and what to do, never read as mojibake;
- a field may be as long as the file (reports of any length);
- YAML mappings with a key written twice are refused (a later key would silently replace
  the earlier one).
"""

from __future__ import annotations

import csv
import json
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

__all__ = ["Row", "decode_text", "read_rows", "read_yaml", "strict_yaml"]

#: (where, row): ``where`` names the line, for messages
Row = tuple[str, dict[str, str]]

_BOMS = {b"\xff\xfe": "UTF-16", b"\xfe\xff": "UTF-16", b"\xff\xfe\x00\x00": "UTF-32"}

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # the default, 128 KiB, is one long report


def decode_text(path: Path, *, what: str = "file") -> str:
    """The file's text; a UTF-8 byte-order mark is dropped, any other encoding refused;
    anything but a regular file (``/dev/zero``, a FIFO, a socket) is refused unread."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError as exc:
        raise ConfigError(f"{what} {str(path)!r} does not exist") from exc
    except PermissionError as exc:
        raise ConfigError(f"{what} {str(path)!r} cannot be read (permission denied)") from exc
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        raise ConfigError(f"{what} {str(path)!r} is not a regular file (a device, a FIFO or a socket)")
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"{what} {str(path)!r} does not exist") from exc
    except IsADirectoryError as exc:
        raise ConfigError(f"{what} {str(path)!r} is a directory, not a file") from exc
    except PermissionError as exc:
        raise ConfigError(f"{what} {str(path)!r} cannot be read (permission denied)") from exc
    for bom, name in sorted(_BOMS.items(), key=lambda kv: -len(kv[0])):
        if raw.startswith(bom):
            raise ConfigError(f"{what} {str(path)!r} is {name} text; save it as UTF-8")
    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a byte-order mark, as spreadsheets write
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{what} {str(path)!r} is not UTF-8 text (byte {exc.start}, line {line}); save it as UTF-8"
        ) from exc


def read_rows(path: Path, what: str) -> tuple[list[str], list[Row]]:
    """(column names, rows) of a CSV/TSV (by suffix) or JSON-lines file; cells are
    stripped, a missing cell is ``""``."""
    text = decode_text(path, what=what)
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        rows: list[Row] = []
        names: dict[str, None] = {}
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{what} {str(path)!r} line {i}: not JSON ({exc.msg})") from exc
            if not isinstance(obj, dict):
                raise ConfigError(f"{what} {str(path)!r} line {i}: expected an object with keys")
            row = {str(k).strip(): "" if v is None else str(v).strip() for k, v in obj.items()}
            names.update(dict.fromkeys(row))
            rows.append((f"line {i}", row))
        return list(names), rows
    delim = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    reader = csv.DictReader(text.splitlines(keepends=True), delimiter=delim)
    try:
        fields = [f.strip() for f in reader.fieldnames or [] if f]
        out = []
        end = reader.line_num
        for r in reader:
            # a quoted cell may span lines: name them all
            start, end = end + 1, reader.line_num
            where = f"line {end}" if start == end else f"lines {start}-{end}"
            out.append((where, {k.strip(): (v or "").strip() for k, v in r.items() if k}))
    except csv.Error as exc:
        raise ConfigError(f"{what} {str(path)!r} line {reader.line_num}: {exc}") from exc
    return fields, out


#: how deep a user's YAML may nest (a config is a few levels; 20,000 would overflow)
MAX_DEPTH = 64


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping key written twice, aliases (``*name``:
    a dozen lines of them expand to billions of values) and nesting deeper than
    :data:`MAX_DEPTH`."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None,
                None,
                f"aliases (*{event.anchor}) are not accepted: write the value out",
                event.start_mark,
            )
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nests deeper than {MAX_DEPTH} levels", self.peek_event().start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: construct_mapping says so itself
            continue
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"key {key!r} is written twice (first on line {first}); the second would replace the first",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def strict_yaml(text: str) -> Any:
    """Parse YAML safely (no tags that run code), refusing duplicate keys."""
    return yaml.load(text, Loader=_StrictLoader)


def read_yaml(path: Path, *, what: str, error: Callable[[str], Exception] = ConfigError) -> Any:
    """A user's YAML file, decoded as :func:`decode_text` does; errors in one line, raised
    as ``error`` (the caller's error type)."""
    try:
        text = decode_text(path, what=what)
    except ConfigError as exc:
        raise error(str(exc)) from exc
    try:
        return strict_yaml(text)
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise error(f"{what} {str(path)!r} is not valid YAML: {detail}") from exc
