"""Strict JSON rendering shared by the JSON-lines sinks (RFC 8259: no NaN or Infinity)."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import orjson

from traintel.records import SCHEMA_VERSION, Record, layout

_NONFINITE_NAMES = {math.inf: "inf", -math.inf: "-inf"}
_isfinite = math.isfinite


@functools.lru_cache(maxsize=8)
def iso_utc(unix_seconds: float) -> str:
    """ISO-8601 UTC with microseconds and a ``Z`` suffix, exactly as ``datetime.fromtimestamp``
    rounds (half to even). Cached, as records of one step share a time, and the whole-second
    part is cached apart, as consecutive steps share their second."""
    if not unix_seconds >= 0:
        stamp = datetime.fromtimestamp(unix_seconds, tz=timezone.utc)
        return stamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    fraction, whole = math.modf(unix_seconds)
    micros = round(fraction * 1e6)
    second = int(whole)
    if micros >= 1_000_000:
        second, micros = second + 1, micros - 1_000_000
    return f"{_utc_second(second)}.{micros:06d}Z"


@functools.lru_cache(maxsize=4)
def _utc_second(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def strict_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """Replace non-finite floats by null, recording each in ``nonfinite`` (field -> nan/inf/-inf).

    A field thus keeps one JSON type (number, or null when not finite) and the fact is kept.
    """
    bad: dict[str, str] | None = None
    for key, value in fields.items():
        if isinstance(value, float) and not _isfinite(value):
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

_ECS_KEYS = {"timestamp": "@timestamp", "level": "log.level", "event": "message", "logger": "log.logger"}


def head(timestamp: str | None, level: str, event: str, rest: dict[str, Any], profile: str) -> dict[str, Any]:
    """One line's fields in order: timestamp, level, event, then ``rest``; the ``ecs`` profile
    renames them to ``@timestamp``, ``log.level``, ``message`` (``logger`` to ``log.logger``) and
    adds ``ecs.version``. Values are the same in both profiles."""
    line = {"timestamp": timestamp, "level": level, "event": event}
    line.update(rest)
    if profile != "ecs":
        return line
    out: dict[str, Any] = {
        "@timestamp": timestamp,
        "log.level": level,
        "message": event,
        "ecs.version": ECS_VERSION,
    }
    out.update((_ECS_KEYS.get(k, k), v) for k, v in line.items() if k not in ("timestamp", "level", "event"))
    return out


def record_dict(record: Record) -> dict[str, Any]:
    """A record's line fields in order: timestamp (from the record's time), level, event, run_id,
    schema_version, then its public fields."""
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


def record_line(line: dict[str, Any], profile: str = "default") -> bytes:
    """One strict JSON line with its newline, from ``record_dict`` output (plus any extra keys)."""
    if profile != "default":
        rest = dict(line)
        return line_bytes(rest.pop("timestamp"), rest.pop("level"), rest.pop("event"), rest, profile) + b"\n"
    out = orjson.dumps(line, default=_default, option=orjson.OPT_APPEND_NEWLINE)
    if _may_be_nonfinite(out, line):
        out = orjson.dumps(strict_fields(line), default=_default, option=orjson.OPT_APPEND_NEWLINE)
    return out


def _may_be_nonfinite(dumped: bytes, values: Mapping[str, Any]) -> bool:
    """Whether ``dumped`` (orjson's rendering of ``values``) may hold a non-finite float.

    orjson writes a non-finite float as null, so only a rendering with more nulls than None
    values (or a string holding "null") needs the field-by-field check of ``strict_fields``.
    """
    return b"null" in dumped and dumped.count(b"null") != [*values.values()].count(None)


def public_line(record: Record) -> bytes:
    """``record_line(record_dict(record))``, rendered once per record and kept on it: the JSON
    sink and the diagnostic file write these same bytes (the latter with its extras appended)."""
    line = record._line
    if line is None:
        line = record_line(record_dict(record))
        object.__setattr__(record, "_line", line)  # a formatting cache on the frozen record
    return line


def with_extras(line: bytes, extras: Mapping[str, Any]) -> bytes | None:
    """``line`` with ``extras`` appended as further keys, or None when that cannot be done by
    splicing (a non-finite value on either side needs the full ``nonfinite`` rendering)."""
    if not extras:
        return line
    if b'"nonfinite"' in line:
        return None
    more = orjson.dumps(dict(extras), default=_default)
    if _may_be_nonfinite(more, extras):
        return None
    if len(more) == 2:  # {}
        return line
    return b"".join((memoryview(line)[:-2], b",", memoryview(more)[1:], b"\n"))  # one allocation


def line_bytes(
    timestamp: str | None, level: str, event: str, rest: dict[str, Any], profile: str = "default"
) -> bytes:
    """One strict JSON line (no newline): ``head`` order and names, non-finite floats as null."""
    return dumps(strict_fields(head(timestamp, level, event, rest, profile)))


def _default(value: Any) -> Any:
    if isinstance(value, float):  # numpy floats and the like
        return float(value)
    if hasattr(value, "items"):
        return dict(value.items())
    return str(value)


def dumps(data: dict[str, Any]) -> bytes:
    """One JSON object as bytes, no trailing newline; unknown types become strings."""
    return orjson.dumps(data, default=_default)
