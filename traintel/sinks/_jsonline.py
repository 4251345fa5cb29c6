"""Strict JSON lines (RFC 8259: no NaN or Infinity) for the JSON sink and the diagnostic file.

A record's line is its event dict (``LineRenderer.event_dict``: timestamp, level, event, run_id,
schema_version, then the record's public fields) rendered by ``LineRenderer``, a structlog
processor: non-finite floats become null and are named in ``nonfinite``, and orjson writes the
keys in order, newline included.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, MutableMapping
from datetime import datetime, timezone
from typing import Any

import orjson

from traintel.records import SCHEMA_VERSION, Record, layout

_NONFINITE_NAMES = {math.inf: "inf", -math.inf: "-inf"}


@functools.lru_cache(maxsize=8)
def iso_utc(unix_seconds: float) -> str:
    """ISO-8601 UTC with microseconds and a ``Z`` suffix, rounded as ``datetime.fromtimestamp`` rounds.

    Cached: the records of one step share its time, so a step's four records format it once
    (about 1.8 us a record, 1.2% of a small model's step at ``telemetry.every=1``)."""
    stamp = datetime.fromtimestamp(unix_seconds, tz=timezone.utc)
    return stamp.isoformat(timespec="microseconds").replace("+00:00", "Z")


def strict_fields(fields: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Replace non-finite floats by null, recording each in ``nonfinite`` (field -> nan/inf/-inf).

    A field thus keeps one JSON type (number, or null when not finite) and the fact is kept.
    """
    bad: dict[str, str] | None = None
    for key, value in fields.items():
        if isinstance(value, float) and not math.isfinite(value):
            if bad is None:
                bad = {}
            bad[key] = _NONFINITE_NAMES.get(value, "nan")
    if bad:
        for key in bad:
            fields[key] = None
        fields["nonfinite"] = bad
    return fields


ECS_VERSION = "8.11.0"
"""Elastic Common Schema version the ``ecs`` profile follows."""

_ECS_HEAD = {"timestamp": "@timestamp", "level": "log.level", "event": "message"}
_ECS_KEYS = {**_ECS_HEAD, "logger": "log.logger"}


def ecs_layout(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> dict[str, Any]:
    """A structlog processor for the ``ecs`` profile: the event dict (timestamp, level and event
    first) with ``@timestamp``, ``log.level``, ``message``, then ``ecs.version``, then the rest
    (``logger`` as ``log.logger``). Values are unchanged."""
    out: dict[str, Any] = {_ECS_HEAD[key]: event_dict.get(key) for key in _ECS_HEAD}
    out["ecs.version"] = ECS_VERSION
    out.update((_ECS_KEYS.get(k, k), v) for k, v in event_dict.items() if k not in _ECS_HEAD)
    return out


def _default(value: Any) -> Any:
    """orjson's fallback for types it does not know: float-likes as floats, mappings as objects,
    anything else as its string."""
    if isinstance(value, float):  # numpy floats and the like
        return float(value)
    if hasattr(value, "items"):
        return dict(value.items())
    return str(value)


class LineRenderer:
    """Render event dicts as strict JSON lines; one instance serves the JSON sink and the diagnostic file.

    Called as a structlog processor (the last of the JSON sink's chain) it returns the line's
    bytes, newline included. It keeps the lines the JSON sink wrote for the records of the current
    delivery (``remember``; each sink builds its own renderer when built alone, and ``build_sinks``
    gives both the same one), so the diagnostic file can append its extras to those very bytes
    rather than render the record again. The memo holds one delivery: each ``remember`` after a
    ``forget`` starts afresh, and an entry is used only for the very record object it was made
    from.
    """

    def __init__(self) -> None:
        self._memo: dict[int, tuple[Record, bytes]] = {}

    @staticmethod
    def event_dict(record: Record) -> dict[str, Any]:
        """A record's line fields in order: timestamp (from the record's time), level, event, run_id,
        schema_version, then its public fields. A new dict, which the caller may change."""
        names, values = layout(type(record))
        line: dict[str, Any] = {
            "timestamp": iso_utc(record.time),
            "level": record.level,
            "event": record.event,
            "run_id": record.run_id,
            "schema_version": SCHEMA_VERSION,
        }
        line.update(zip(names, values(record), strict=True))
        return line

    def __call__(self, _logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> bytes:
        """One strict JSON line with its newline, keys in the event dict's order (``nonfinite`` last);
        values orjson does not know go through ``_default``."""
        line = orjson.dumps(event_dict, default=_default, option=orjson.OPT_APPEND_NEWLINE)
        if _may_hold_nonfinite(line, event_dict):
            line = orjson.dumps(strict_fields(event_dict), default=_default, option=orjson.OPT_APPEND_NEWLINE)
        return line

    def remember(self, record: Record, line: bytes) -> None:
        """Keep ``line`` as ``record``'s public line until the next ``forget``."""
        self._memo[id(record)] = (record, line)

    def remembered(self, record: Record) -> bytes | None:
        """The public line kept for this very record in the current delivery, if any."""
        kept = self._memo.get(id(record))
        return kept[1] if kept is not None and kept[0] is record else None

    def forget(self) -> None:
        """Drop the kept lines (a new delivery begins)."""
        self._memo.clear()


def _may_hold_nonfinite(rendered: bytes, values: Mapping[str, Any]) -> bool:
    """Whether orjson's rendering of ``values`` may hold a non-finite float, which it writes as null.

    Only a rendering with more nulls than None values (or a string holding "null") needs the
    field-by-field ``strict_fields``: skipping it otherwise saves about 1.2 us a rendering, and a
    record is rendered twice (stdout, the diagnostic file's extras): 2% of a small model's step
    at ``telemetry.every=1``.
    """
    return b"null" in rendered and rendered.count(b"null") != sum(v is None for v in values.values())


def with_extras(line: bytes, extras: Mapping[str, Any]) -> bytes | None:
    """``line`` (a rendered object and its newline) with ``extras`` appended as further keys, or
    None when a non-finite value on either side needs the full rendering (one ``nonfinite``)."""
    if not extras:
        return line
    if b'"nonfinite"' in line:
        return None
    tail = orjson.dumps(dict(extras), default=_default)
    if _may_hold_nonfinite(tail, extras):
        return None
    return b"".join((line[:-2], b",", tail[1:], b"\n"))
