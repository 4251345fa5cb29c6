"""Strict JSON lines (RFC 8259: no NaN or Infinity) for the JSON sink and the diagnostic file.

A record's line is its event dict (``LineRenderer.event_dict``: timestamp, level, event, run_id,
schema_version, then the record's public fields) rendered by ``LineRenderer``, a structlog
processor: non-finite floats become null and are named in ``nonfinite``, and orjson writes the
keys in order, newline included. Text that is not valid Unicode (a lone surrogate, as
``os.fsdecode`` makes of a byte that is not UTF-8) is backslash-escaped rather than failing the
line (``escape_surrogates``).

The ``ecs`` profile (``ecs_layout``, ``ecs_log_layout``) lays the same values out as Elastic
Common Schema fields: every key is a field's full dotted name.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, MutableMapping
from datetime import datetime, timezone
from typing import Any

import orjson

from traintel.records import SCHEMA_VERSION, Record, layout

_NONFINITE_NAMES = {math.inf: "inf", -math.inf: "-inf"}


def iso_utc(unix_seconds: float) -> str:
    """ISO-8601 UTC with microseconds and a ``Z`` suffix, rounded as ``datetime.fromtimestamp`` rounds."""
    stamp = datetime.fromtimestamp(unix_seconds, tz=timezone.utc)
    return stamp.isoformat(timespec="microseconds").replace("+00:00", "Z")


def strict_fields(fields: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Replace non-finite floats by null, recording each in ``nonfinite`` (field -> nan/inf/-inf), the
    values of a ``metrics`` mapping too (as ``metrics.<name>``, in a new mapping).

    A field thus keeps one JSON type (number, or null when not finite) and the fact is kept.
    """
    bad: dict[str, str] | None = None
    for key, value in fields.items():
        if isinstance(value, float) and not math.isfinite(value):
            if bad is None:
                bad = {}
            bad[key] = _NONFINITE_NAMES.get(value, "nan")
    metrics: Any = fields.get("metrics")
    nested = _nonfinite_metrics(metrics) if metrics else None
    if nested:
        fields["metrics"] = {k: None if f"metrics.{k}" in nested else v for k, v in metrics.items()}
        bad = {**(bad or {}), **nested}
    if bad:
        for key in bad:
            if key in fields:
                fields[key] = None
        fields["nonfinite"] = bad
    return fields


def _nonfinite_metrics(metrics: Any) -> dict[str, str] | None:
    """The non-finite values of a ``metrics`` mapping, as ``nonfinite`` entries ``metrics.<name>``."""
    found = {
        f"metrics.{k}": _NONFINITE_NAMES.get(v, "nan")
        for k, v in metrics.items()
        if isinstance(v, float) and not math.isfinite(v)
    }
    return found or None


ECS_VERSION = "8.11.0"
"""Elastic Common Schema version the ``ecs`` profile follows."""

ECS_NAMESPACE = "traintel"
"""The custom field set that holds traintel's own fields in the ``ecs`` profile (``traintel.loss``)."""

RECORDS_DATASET = "traintel.records"
"""``event.dataset`` of a record line in the ``ecs`` profile."""

LOG_DATASET = "traintel.log"
"""``event.dataset`` of a routed stdlib log line in the ``ecs`` profile."""

_ECS_HEAD = ("timestamp", "level", "event")
_ECS_RENAMED = {"logger": "log.logger"}
_ERROR_TEXT = re.compile(r"([A-Za-z_][\w.]*)(?:: (.*))?", re.DOTALL)


def ecs_error(text: str) -> dict[str, str]:
    """An error's one-line text (``Type: message``, as ``traintel.errors.one_line`` writes it) as
    ECS ``error.type`` and ``error.message`` (empty when the exception had no message); text that
    does not start with a type name is all ``error.message``."""
    match = _ERROR_TEXT.fullmatch(text)
    if match is None:
        return {"error.message": text}
    return {"error.type": match[1], "error.message": match[2] or ""}


def _ecs_line(event_dict: MutableMapping[str, Any], dataset: str, *, action: bool) -> dict[str, Any]:
    """The ``ecs`` layout of an event dict: ``@timestamp``, ``log.level``, ``message`` (the event),
    ``ecs.version``, ``event.dataset`` (and ``event.action``, the event again, when ``action``),
    then the other keys in order: ``logger`` as ``log.logger``, a text ``error`` as ``error.type``
    and ``error.message``, a key that already has a dot (an ECS name such as ``error.stack_trace``
    or one a processor added) unchanged, and every other key, traintel's own, under
    ``traintel.``; a failed ``run.end``'s reason is also ``error.type`` and ``error.message``, so
    that queries on ``error.*`` find the run's end. Values are unchanged; non-finite floats are
    first made null and named in ``nonfinite`` (so ``traintel.nonfinite`` names them as the
    default profile does)."""
    strict_fields(event_dict)
    event = event_dict.get("event")
    out: dict[str, Any] = {
        "@timestamp": event_dict.get("timestamp"),
        "log.level": event_dict.get("level"),
        "message": event,
        "ecs.version": ECS_VERSION,
        "event.dataset": dataset,
    }
    if action:
        out["event.action"] = event
    for key, value in event_dict.items():
        if key in _ECS_HEAD:
            continue
        renamed = _ECS_RENAMED.get(key)
        if renamed is not None:
            out[renamed] = value
        elif key == "error" and isinstance(value, str):
            out.update(ecs_error(value))
        elif "." in key or key.startswith("@"):
            out[key] = value
        else:
            out[f"{ECS_NAMESPACE}.{key}"] = value
    if action and event == "run.end" and event_dict.get("status") == "failed":
        out.update(ecs_error(str(event_dict.get("reason", ""))))  # the reason stays in traintel.reason
    return out


def ecs_layout(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> dict[str, Any]:
    """A structlog processor for the ``ecs`` profile's record lines (``event.dataset``
    ``traintel.records``, ``event.action`` the record's event): see ``_ecs_line``. A
    ``sink.error``'s ``error`` becomes ``error.type`` and ``error.message``."""
    return _ecs_line(event_dict, RECORDS_DATASET, action=True)


def ecs_log_layout(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> dict[str, Any]:
    """A structlog processor for the ``ecs`` profile's routed log lines (``event.dataset``
    ``traintel.log``, ``log.logger``): see ``_ecs_line``."""
    return _ecs_line(event_dict, LOG_DATASET, action=False)


_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _escape_surrogate(match: re.Match[str]) -> str:
    code = ord(match[0])
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"


def escape_surrogates(value: Any) -> Any:
    """``value`` with every lone surrogate in its text (mapping keys included, at any depth)
    backslash-escaped, so it can be written as UTF-8: one that stands for an undecodable byte
    (U+DC80..U+DCFF, what ``os.fsdecode`` and the ``surrogateescape`` handler make of a byte that
    is not UTF-8) as ``\\xNN``, the byte, as decoding the original bytes with
    ``errors="backslashreplace"`` would have written it, and any other as ``\\uNNNN``. Mappings
    become dicts and sequences lists (their JSON is the same); other values are returned as they
    are."""
    if isinstance(value, str):
        return _SURROGATE.sub(_escape_surrogate, value)
    if isinstance(value, Mapping):
        return {escape_surrogates(k): escape_surrogates(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [escape_surrogates(v) for v in value]
    return value


def _default(value: Any) -> Any:
    """orjson's fallback for types it does not know: float-likes as floats, mappings as objects,
    anything else as its string."""
    if isinstance(value, float):  # numpy floats and the like
        return float(value)
    if hasattr(value, "items"):
        return dict(value.items())
    return str(value)


def _escaped_default(value: Any) -> Any:
    """``_default`` with lone surrogates escaped in what it returns (a string, a mapping's text)."""
    return escape_surrogates(_default(value))


class LineRenderer:
    """Render event dicts as strict JSON lines (the JSON sink's and the diagnostic file's).

    Called as a structlog processor (the last of the JSON sink's chain) it returns the line's
    bytes, newline included. It keeps no state: each sink renders its own lines from the record.
    """

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
        """One strict JSON line with its newline, keys in the event dict's order (``nonfinite`` last,
        from ``strict_fields``, which changes ``event_dict``); values orjson does not know go
        through ``_default``. Text with lone surrogates is escaped (``escape_surrogates``) instead
        of failing the line; valid text costs nothing extra."""
        strict_fields(event_dict)
        default = _default
        try:
            line = orjson.dumps(event_dict, default=default, option=orjson.OPT_APPEND_NEWLINE)
        except orjson.JSONEncodeError:
            # orjson refuses text that is not valid Unicode ("str is not valid UTF-8: surrogates
            # not allowed"); only then is the whole dict copied with its surrogates escaped. Any
            # other reason (an integer past 64 bits) raises again, as it did.
            event_dict, default = escape_surrogates(event_dict), _escaped_default
            line = orjson.dumps(event_dict, default=default, option=orjson.OPT_APPEND_NEWLINE)
        return line
