"""Validation errors as the one line a user reads: the dotted key, the problem, where it was set,
and the offending value with its secrets hidden."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from traintel.config.model import SCHEDULES, URL_KEYS
from traintel.errors import ConfigError
from traintel.redaction import REDACTED, is_secret_key, redact_url, redact_url_value


def format_key(loc: Sequence[int | str]) -> str:
    """``("sinks", "extra", 0, "name")`` -> ``sinks.extra[0].name``."""
    key = ""
    for part in loc:
        if isinstance(part, int):
            key += f"[{part}]"
        else:
            key += f".{part}" if key else str(part)
    return key.replace("json_", "json").replace("async_", "async") or "config"


_TYPE_ERRORS = frozenset({"int_type", "float_type", "bool_type", "string_type"})


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {int: "an integer", float: "a float", str: "a string"}.get(type(value), type(value).__name__)


def _is_secret_path(key: str) -> bool:
    return any(is_secret_key(part) for part in re.split(r"[.\[\]]+", key))


def shown(key: str, value: Any) -> str:
    """``repr(value)`` for a message about ``key``: ``'***'`` when the key names a secret, and URL
    credentials redacted (whatever their shape for a key of ``URL_KEYS``)."""
    if _is_secret_path(key):
        return repr(REDACTED)
    if key in URL_KEYS and isinstance(value, str):
        return repr(redact_url_value(value))
    return redact_url(repr(value))


def _problem(err: Mapping[str, Any], key: str) -> str:
    """A pydantic error as ``<problem> (got <input>)``, the input redacted."""
    kind = err["type"]
    msg = err["msg"]
    if kind == "literal_error":
        msg = msg.replace("Input should be", "must be one of")
    got = err.get("input")
    if kind in _TYPE_ERRORS and _kind(got) not in msg.lower():
        msg = f"{msg}, not {_kind(got)}"
    got_text = f" (got {shown(key, got)})" if not isinstance(got, dict | list) else ""
    return redact_url(f"{msg[0].lower()}{msg[1:]}{got_text}")


_SCHEDULER = ("trainer", "scheduler")
_SCHEDULER_NAMES = ", ".join(repr(n) for n in SCHEDULES) + " or a 'module:function' factory"


def _scheduler_error(err: Mapping[str, Any]) -> tuple[str, str] | None:
    """The key and problem of an error inside ``trainer.scheduler``, a union told apart by ``name``:
    its location carries the scheduler's name (``trainer.scheduler.step.step_size``), which the
    message leaves out, and an unknown or absent name is a problem of ``name``."""
    loc, kind = tuple(err["loc"]), err["type"]
    if loc[:2] != _SCHEDULER:
        return None
    if kind == "model_attributes_type" or (
        kind == "union_tag_not_found" and not isinstance(err["input"], dict)
    ):
        got = shown("trainer.scheduler", err["input"])
        return "trainer.scheduler", f"must be null or a mapping such as {{name: cosine}} (got {got})"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        got = f"(got {shown('name', err['ctx']['tag'])})" if kind == "union_tag_invalid" else "(got none)"
        return "trainer.scheduler.name", f"must be one of {_SCHEDULER_NAMES} {got}"
    if len(loc) >= 4 and loc[2] == "factory":  # a module:function scheduler's own keys are its arguments
        key = format_key((*_SCHEDULER, *loc[3:]))
        return key, _problem(err, key) if kind != "value_error" else str(err["ctx"]["error"])
    if len(loc) < 4 or loc[2] not in SCHEDULES:
        return None
    name, key = str(loc[2]), format_key((*_SCHEDULER, *loc[3:]))
    problem = {
        "missing": f"is required by the {name} scheduler",
        "extra_forbidden": f"unknown key for the {name} scheduler (it takes "
        + ", ".join(f for f in SCHEDULES[name].model_fields if f != "name")
        + ")",
    }.get(kind)
    return key, problem if problem is not None else _problem(err, key)


def format_validation_error(exc: ValidationError, sources: Mapping[str, str]) -> ConfigError:
    """The first of pydantic's errors as one ConfigError, naming where the key was set (an
    environment variable) when ``sources`` knows it."""
    err = exc.errors()[0]
    key = format_key(err["loc"])
    kind = err["type"]
    problem: str | None = None
    scheduler = _scheduler_error(err)
    if scheduler is not None:
        key, problem = scheduler
    elif kind == "value_error":
        problem = str(err["ctx"]["error"])
    source = sources.get(key)
    origin = f" (set by {source})" if source else ""
    if kind == "extra_forbidden" and problem is None:
        return ConfigError(key, f"unknown key{origin}")
    if problem is None:
        problem = _problem(err, key)
    return ConfigError(key, f"{redact_url(problem)}{origin}")
