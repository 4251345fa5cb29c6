"""Reading YAML safely: config files and override values, with size and depth limits, and no
anchors, aliases, merge keys or duplicate keys; each refusal one line naming the place."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from traintel.errors import ConfigError

MAX_CONFIG_BYTES = 1024 * 1024
"""A config file larger than this (1 MiB) is refused before it is parsed."""
MAX_DEPTH = 64
"""Mappings and lists nested deeper than this are refused (a config needs a handful of levels)."""

_BaseLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""libyaml's safe loader when PyYAML was built with it, else the pure-Python one."""


_MERGE_TAG = "tag:yaml.org,2002:merge"
_MERGE_PROBLEM = "YAML merge keys are not supported; write the keys out"


class Refused(Exception):
    """YAML that parses but is not accepted: an anchor or alias, a merge key, a duplicate key, too deep.

    ``key`` is a merge key's place in the document (``("trainer", "<<")``), None for the others."""

    def __init__(self, mark: Any, problem: str, key: tuple[str | int, ...] | None = None) -> None:
        super().__init__(problem)
        self.line = None if mark is None else int(mark.line) + 1
        self.problem = problem
        self.key = key

    def place(self, prefix: str) -> str:
        """The merge key's dotted place below ``prefix`` (``trainer.<<``); ``prefix`` for the others."""
        place = prefix
        for part in self.key or ():
            place += f"[{part}]" if isinstance(part, int) else f".{part}" if place else part
        return place

    def at(self, prefix: str) -> str:
        """The problem, after the merge key's place below ``prefix`` (``trainer.<<: ...``)."""
        return self.problem if self.key is None else f"{self.place(prefix)}: {self.problem}"


class _Loader(_BaseLoader):  # type: ignore[valid-type,misc]
    """The safe loader (libyaml's when present) refusing duplicate keys; ``1e-3`` is a float (YAML
    1.2) rather than the string YAML 1.1 makes of it. Merge keys never reach it (``_check_events``)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable: the base class says so, with its place
                break
            if duplicate:
                raise Refused(key_node.start_mark, f"duplicate key {key!r}")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _is_merge_key(event: yaml.NodeEvent) -> bool:
    """A key the safe loader would merge: a plain ``<<`` or one tagged ``!!merge``."""
    if not isinstance(event, yaml.ScalarEvent):
        return False
    return event.tag == _MERGE_TAG or (event.tag is None and event.implicit[0] and event.value == "<<")


def _enter(open_: list[list[Any]], event: yaml.NodeEvent) -> None:
    """Note a node starting inside the open collections (``[is a mapping, next node is a key, key or
    index]`` each); a merge key is refused, named by its place."""
    if open_ and open_[-1][0] and open_[-1][1]:  # a mapping's key
        key = event.value if isinstance(event, yaml.ScalarEvent) else "?"
        if _is_merge_key(event):
            raise Refused(event.start_mark, _MERGE_PROBLEM, (*(c[2] for c in open_[:-1]), key))
        open_[-1][2] = key


def _leave(open_: list[list[Any]]) -> None:
    """Note that a node ended: its mapping expects a key or a value next, its list the next index."""
    if open_:
        top = open_[-1]
        if top[0]:
            top[1] = not top[1]
        else:
            top[2] += 1


def _check_events(text: str) -> None:
    """Refuse merge keys, anchors, aliases and deep nesting from the event stream, before anything
    is built: a "billion laughs" document is refused at its first anchor, whatever it would expand
    to. A merge key (``<<: {...}``, ``<<: *base``) is named with its place even after the anchor it
    merges, since writing its keys out is the fix for both."""
    too_deep = f"nesting deeper than {MAX_DEPTH} levels is not allowed"
    anchor: Refused | None = None
    open_: list[list[Any]] = []
    try:
        for event in yaml.parse(text, Loader=_BaseLoader):
            if anchor is None and (
                isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None
            ):
                anchor = Refused(event.start_mark, "YAML anchors and aliases are not allowed")
            if isinstance(event, yaml.NodeEvent):
                _enter(open_, event)
                if not isinstance(event, yaml.CollectionStartEvent):
                    _leave(open_)
                elif len(open_) == MAX_DEPTH:
                    raise Refused(event.start_mark, too_deep)
                else:
                    open_.append([isinstance(event, yaml.MappingStartEvent), True, 0])
            elif isinstance(event, yaml.CollectionEndEvent):
                open_.pop()
                _leave(open_)
    except yaml.MarkedYAMLError as exc:
        if anchor is not None:
            raise anchor from None
        # libyaml's scanner reads flow brackets ahead of the events and stops at 1000 levels itself
        if exc.problem and "nesting depth" in exc.problem:
            raise Refused(exc.problem_mark, too_deep) from None
        raise
    if anchor is not None:
        raise anchor


def _load(text: str) -> Any:
    """Parse one YAML document: raises ``Refused`` or ``yaml.YAMLError``."""
    _check_events(text)
    loader = _Loader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _error_line(exc: yaml.YAMLError, text: str) -> int | None:
    mark = getattr(exc, "problem_mark", None)
    if mark is not None:
        return int(mark.line) + 1
    position = getattr(exc, "position", None)  # a ReaderError: a character YAML does not allow
    return None if position is None else text.count("\n", 0, position) + 1


def parse_scalar(text: str) -> Any:
    """Parse an override value as YAML: ``3`` -> int, ``null`` -> None, ``1e-3`` -> float; text that
    is not valid YAML (``*.csv``) is that string. Anchors, aliases, duplicate keys and deep nesting
    are a ConfigError."""
    try:
        return parse_value(text)
    except Refused as exc:
        raise ConfigError("--set", exc.at("")) from None


def parse_value(text: str) -> Any:
    if not text.strip():
        return ""
    try:
        return _load(text)
    except (yaml.YAMLError, UnicodeEncodeError):  # not YAML, or not Unicode (a byte from os.environ)
        return text


def _read_text(p: Path, origin: str) -> str:
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
            if len(raw) > MAX_CONFIG_BYTES:
                size = os.fstat(f.fileno()).st_size
                what = f"has {size} bytes" if size > MAX_CONFIG_BYTES else "has more than 1048576 bytes"
                raise ConfigError(
                    origin, f"{str(p)!r} {what}; config files are limited to 1 MiB (1048576 bytes)"
                )
    except FileNotFoundError:
        raise ConfigError(origin, f"file {str(p)!r} does not exist") from None
    except (IsADirectoryError, PermissionError) as exc:
        raise ConfigError(origin, f"cannot read {str(p)!r}: {exc.__class__.__name__}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        problem = f"{str(p)!r} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at line {line})"
        raise ConfigError(origin, problem) from None


def read_yaml(path: str | os.PathLike[str], origin: str = "--config") -> dict[str, Any]:
    """Read a YAML mapping; a missing, unreadable, oversized or non-UTF-8 file, bad YAML, anchors and
    aliases, duplicate keys and deep nesting become one-line ConfigErrors naming ``origin``."""
    p = Path(path)
    text = _read_text(p, origin)
    try:
        data = _load(text)
    except Refused as exc:
        raise ConfigError(origin, f"{str(p)!r} line {exc.line}: {exc.at('')}") from None
    except yaml.YAMLError as exc:
        line = _error_line(exc, text)
        where = f" at line {line}" if line is not None else ""
        raise ConfigError(origin, f"{str(p)!r} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(origin, f"{str(p)!r} must hold a mapping of sections, got {type(data).__name__}")
    return data
