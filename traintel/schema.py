"""The published JSON Schema (draft 2020-12) of every line traintel writes to stdout and the diagnostic file.

``traintel/schemas/records.schema.json`` is the contract: one definition per record event
(``train.batch``, ``train.step``, ``train.epoch``, ``eval.epoch``, ``run.start``, ``run.end``,
``sink.error``) chosen by ``event``, each closed (``additionalProperties: false``: a new field
needs a schema change), and a permissive ``log`` definition for any other event (stdlib and
third-party log messages routed onto stdout). ``train.batch`` allows the diagnostic file's
extras as optional properties (listed in its ``x-diagnostic-only`` annotation); stdout lines
never carry them.

Versions: the schema accepts record lines of ``schema_version`` 1.0.0, 1.1.0 and 1.2.0 (this
version, ``traintel.records.SCHEMA_VERSION``). 1.1.0 added ``rank`` (integer >= 0) and
``world_size`` (integer >= 1) to every record, right after ``schema_version``: they are
required on a record line unless it says 1.0.0, so files written by traintel 1.0.0 still
validate (such a line comes from rank 0 of a one-process job). 1.2.0 added ``attempt``
(integer >= 0, right after ``world_size``) to every record, required unless the line says
1.0.0 or 1.1.0 (such a line comes from a run's first attempt), and ``resumed_from_step``
(integer or null) and ``items_total`` to ``run.start``, required there on the same terms.
Routed log lines carry none of these. A later minor version is rejected here, as its new
fields would be anyway.

A float field is a number, or null when its value was not finite, and then ``nonfinite``
names it (``{"loss": "nan"}``); null without that entry is invalid, except for the fields
that are null by design (``grad_norm``, ``observed_loss_scale``).

Validating needs the ``jsonschema`` package (a dev dependency), imported only when used.
:func:`validate_line` is slightly stricter than a stock draft 2020-12 validator: an integer
field must be a JSON integer (``3``), not a float with no fraction (``3.0``).
"""

from __future__ import annotations

import functools
import importlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final, NoReturn

SCHEMA_PATH: Final = Path(__file__).parent / "schemas" / "records.schema.json"
"""The schema file, shipped as package data."""

__all__ = [
    "SCHEMA_PATH",
    "RecordValidationError",
    "load_schema",
    "parse_line",
    "validate_line",
    "validate_lines",
]


class RecordValidationError(ValueError):
    """A line that is not valid JSON or does not match the schema.

    ``line_number`` is 1-based (set by :func:`validate_lines`), ``path`` the JSON path of the
    offending value (``$.loss``), ``event`` the line's event when it has one.
    """

    def __init__(
        self, message: str, *, path: str = "$", event: str | None = None, line_number: int | None = None
    ) -> None:
        self.reason = message
        self.path = path
        self.event = event
        self.line_number = line_number
        super().__init__(self._text())

    def _text(self) -> str:
        where = f"line {self.line_number}: " if self.line_number is not None else ""
        what = f"{self.event} " if self.event is not None else ""
        return f"{where}{what}{self.path}: {self.reason}"

    def at_line(self, line_number: int) -> RecordValidationError:
        """The same error, located at ``line_number``."""
        return RecordValidationError(self.reason, path=self.path, event=self.event, line_number=line_number)


def load_schema() -> dict[str, Any]:
    """The schema as a new dict (read from :data:`SCHEMA_PATH`)."""
    schema: dict[str, Any] = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return schema


def _jsonschema(module: str = "jsonschema") -> Any:
    """Import ``jsonschema`` (or one of its modules) on first use, with an actionable error."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        msg = (
            "validating traintel's JSON lines needs the 'jsonschema' package (>= 4.18), a dev "
            "dependency: pip install 'traintel[dev]' or pip install 'jsonschema>=4.18'"
        )
        raise ImportError(msg) from exc


def _is_json_integer(_checker: Any, instance: object) -> bool:
    return isinstance(instance, int) and not isinstance(instance, bool)


@functools.lru_cache(maxsize=1)
def _validator() -> Any:
    jsonschema = _jsonschema()
    base = jsonschema.Draft202012Validator
    strict = jsonschema.validators.extend(
        base, type_checker=base.TYPE_CHECKER.redefine("integer", _is_json_integer)
    )
    schema = load_schema()
    base.check_schema(schema)
    return strict(schema)


def validate_line(obj: Any) -> None:
    """Raise :class:`RecordValidationError` unless ``obj`` (one parsed JSON line) matches the schema.

    The message names the event, the JSON path of the offending value and the problem,
    e.g. ``train.step $.loss: 'x' is not of type 'number', 'null'``.
    """
    validator = _validator()
    error = _jsonschema("jsonschema.exceptions").best_match(validator.iter_errors(obj))
    if error is None:
        return
    event = obj.get("event") if isinstance(obj, dict) else None
    raise RecordValidationError(
        str(error.message), path=str(error.json_path), event=event if isinstance(event, str) else None
    )


def _reject_constant(name: str) -> NoReturn:
    msg = f"{name} is not JSON (RFC 8259); a non-finite float must be written as null and named in nonfinite"
    raise RecordValidationError(msg)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            msg = f"duplicate key {key!r}"
            raise RecordValidationError(msg)
        out[key] = value
    return out


def parse_line(line: str | bytes) -> Any:
    """Parse one JSON line strictly: no NaN/Infinity literals, no duplicate keys."""
    try:
        return json.loads(line, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except RecordValidationError:
        raise
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        msg = f"not a JSON line: {exc}"
        raise RecordValidationError(msg) from None


def validate_lines(lines: Iterable[str | bytes]) -> int:
    """Parse (strictly) and validate every line; returns how many there were.

    Each item is one JSON object (a trailing newline is fine; a blank line is an error). The
    first bad line raises :class:`RecordValidationError` with its 1-based ``line_number``.
    """
    count = 0
    for count, line in enumerate(lines, start=1):
        try:
            validate_line(parse_line(line))
        except RecordValidationError as exc:
            raise exc.at_line(count) from None
    return count
