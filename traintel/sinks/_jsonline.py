"""Strict JSON rendering shared by the JSON-lines sinks (RFC 8259: no NaN or Infinity)."""

from __future__ import annotations

import functools
import math
from datetime import datetime, timezone
from typing import Any

import orjson

_NONFINITE_NAMES = {math.inf: "inf", -math.inf: "-inf"}


@functools.lru_cache(maxsize=8)
def iso_utc(unix_seconds: float) -> str:
    """ISO-8601 UTC with microseconds and a ``Z`` suffix (cached: records of one emission share a time)."""
    stamp = datetime.fromtimestamp(unix_seconds, tz=timezone.utc)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def strict_fields(fields: dict[str, Any]) -> dict[str, Any]:
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
