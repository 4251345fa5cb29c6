"""The published JSON Schema (draft 2020-12) of every line traintel writes to stdout and the diagnostic file.

``traintel/schemas/records.schema.json`` is the contract: one definition per record event
(``train.batch``, ``train.step``, ``train.epoch``, ``eval.epoch``, ``run.start``, ``run.end``,
``metric``, ``checkpoint``, ``sink.error``) chosen by ``event``, each closed
(``additionalProperties: false``: a new field needs a schema change), and a permissive ``log``
definition for any other event (stdlib and third-party log messages routed onto stdout).
``train.batch`` allows the diagnostic file's extras as optional properties (listed in its
``x-diagnostic-only`` annotation); stdout lines never carry them.

Versions: the schema accepts record lines of ``schema_version`` 1.0.0, 1.1.0, 1.2.0, 1.3.0, 1.4.0 and
1.5.0 (this version, ``traintel.records.SCHEMA_VERSION``). 1.1.0 added ``rank`` (integer >= 0) and
``world_size`` (integer >= 1) to every record, right after ``schema_version``: they are
required on a record line unless it says 1.0.0, so files written by traintel 1.0.0 still
validate (such a line comes from rank 0 of a one-process job). 1.2.0 added ``attempt``
(integer >= 0, right after ``world_size``) to every record, required unless the line says
1.0.0 or 1.1.0 (such a line comes from a run's first attempt), and ``resumed_from_step``
(integer or null) and ``items_total`` to ``run.start``, required there on the same terms. 1.3.0
added ``grad_scale`` (number or null, the gradient scaler's factor under fp16) to ``train.step``,
after ``skipped``, and ``split`` (string, the validation loader's name: ``val``) to ``eval.epoch``,
after ``items_per_second``, and ``optimizer`` (string) and ``scheduler`` (string or null), the
classes the run steps, to ``run.start``, each required unless the line says 1.0.0, 1.1.0 or 1.2.0
(such a line comes from a run without a scaler, and from the task's ``val_loader``). 1.4.0 added
``metrics`` (the task's training metrics by name) to ``train.step``, after ``grad_scale``, required
unless the line is older, and the ``metric`` record (values logged with ``Run.log``). 1.5.0 added
``strategy`` (``ddp``, ``fsdp`` or null: how the ranks hold the model) to ``run.start``, after
``backend``, required unless the line is older (such a line has none: ``ddp`` under torchrun, else
null), and the ``checkpoint`` record (a checkpoint complete on every rank: its step, epoch, reason,
size and write and stall seconds). Routed log lines carry none of these. A later minor version is
rejected here, as its new fields would be anyway.

A float field is a number, or null when its value was not finite, and then ``nonfinite``
names it (``{"loss": "nan"}``); null without that entry is invalid, except for the fields
that are null by design (``grad_norm``, ``grad_scale``, ``observed_loss_scale``). A value in a
``metrics`` object is named ``metrics.<name>`` (``{"metrics.accuracy": "nan"}``).

The ``ecs`` profile (``sinks.json.profile: ecs``, stdout only) has its own schema,
``traintel/schemas/records-ecs.schema.json``: the same definitions with Elastic Common Schema
names (``@timestamp``, ``log.level``, ``message`` = the event, ``ecs.version``,
``event.dataset``, ``event.action`` = the record's event, ``log.logger``, ``error.type``,
``error.message``, ``error.stack_trace``) and every traintel field under ``traintel.``
(``traintel.loss``). It is derived from the default schema by :func:`derive_ecs_schema` (the
tests check that the shipped file is that derivation; :func:`write_ecs_schema` rewrites it), so
the two never disagree on a field. Pass ``profile="ecs"`` to the validating functions.

Validating needs the ``jsonschema`` package (a dev dependency), imported only when used.
:func:`validate_line` is slightly stricter than a stock draft 2020-12 validator: an integer
field must be a JSON integer (``3``), not a float with no fraction (``3.0``).
"""

from __future__ import annotations

import functools
import importlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final, NoReturn

SCHEMA_PATH: Final = Path(__file__).parent / "schemas" / "records.schema.json"
"""The schema file, shipped as package data."""

ECS_SCHEMA_PATH: Final = Path(__file__).parent / "schemas" / "records-ecs.schema.json"
"""The ``ecs`` profile's schema file, shipped as package data (derived: :func:`derive_ecs_schema`)."""

PROFILES: Final = ("default", "ecs")
"""The line layouts a schema is published for (``sinks.json.profile``)."""

__all__ = [
    "ECS_SCHEMA_PATH",
    "PROFILES",
    "SCHEMA_PATH",
    "RecordValidationError",
    "derive_ecs_schema",
    "load_schema",
    "parse_line",
    "validate_line",
    "validate_lines",
    "write_ecs_schema",
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


def _schema_path(profile: str) -> Path:
    if profile not in PROFILES:
        msg = f"profile must be 'default' or 'ecs', got {profile!r}"
        raise ValueError(msg)
    return ECS_SCHEMA_PATH if profile == "ecs" else SCHEMA_PATH


def load_schema(profile: str = "default") -> dict[str, Any]:
    """The profile's schema as a new dict (read from :data:`SCHEMA_PATH` or :data:`ECS_SCHEMA_PATH`)."""
    schema: dict[str, Any] = json.loads(_schema_path(profile).read_text(encoding="utf-8"))
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


@functools.lru_cache(maxsize=len(PROFILES))
def _validator(profile: str = "default") -> Any:
    jsonschema = _jsonschema()
    base = jsonschema.Draft202012Validator
    strict = jsonschema.validators.extend(
        base, type_checker=base.TYPE_CHECKER.redefine("integer", _is_json_integer)
    )
    schema = load_schema(profile)
    base.check_schema(schema)
    return strict(schema)


def validate_line(obj: Any, *, profile: str = "default") -> None:
    """Raise :class:`RecordValidationError` unless ``obj`` (one parsed JSON line) matches the
    schema of ``profile`` (``default`` or ``ecs``).

    The message names the event, the JSON path of the offending value and the problem,
    e.g. ``train.step $.loss: 'x' is not of type 'number', 'null'`` (in the ``ecs`` profile
    ``train.step $['traintel.loss']: ...``).
    """
    validator = _validator(profile)
    error = _jsonschema("jsonschema.exceptions").best_match(validator.iter_errors(obj))
    if error is None:
        return
    event = obj.get("message" if profile == "ecs" else "event") if isinstance(obj, dict) else None
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


def validate_lines(lines: Iterable[str | bytes], *, profile: str = "default") -> int:
    """Parse (strictly) and validate every line against the schema of ``profile``; returns how
    many there were.

    Each item is one JSON object (a trailing newline is fine; a blank line is an error). The
    first bad line raises :class:`RecordValidationError` with its 1-based ``line_number``.
    """
    count = 0
    for count, line in enumerate(lines, start=1):
        try:
            validate_line(parse_line(line), profile=profile)
        except RecordValidationError as exc:
            raise exc.at_line(count) from None
    return count


# ----------------------------------------------------------------------------- the ecs profile's schema

_ECS_HEAD: Final = {"timestamp": "@timestamp", "level": "log.level", "event": "message"}
_ECS_LOG_FIELDS: Final = (
    "@timestamp", "log.level", "message", "ecs.version", "event.dataset", "log.logger",
    "error.type", "error.message", "error.stack_trace",
)  # fmt: skip


def _ecs_name(name: str, namespace: str) -> str:
    return _ECS_HEAD.get(name, f"{namespace}.{name}")


def _mentions(schema: Any, names: Iterable[str]) -> bool:
    text = json.dumps(schema)
    return any(json.dumps(name) in text for name in names)


def _ecs_object(schema: Mapping[str, Any], namespace: str, leave_out: frozenset[str]) -> dict[str, Any]:
    """A record-level (sub)schema with ECS names: its ``properties``, ``required`` and
    ``dependentRequired`` names renamed, recursively through ``allOf``/``if``/``then``/``else``
    (which describe the same object), but not inside a property's own schema (``nonfinite``'s
    keys keep the default names, as its values do). Properties in ``leave_out`` (the diagnostic
    file's extras, which stdout never carries) are left out, with every rule that names them."""
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "properties":
            props = {}
            for name, prop in value.items():
                if name in leave_out:
                    continue
                names = prop.get("propertyNames", {}).get("enum") if isinstance(prop, dict) else None
                if names is not None:  # nonfinite's propertyNames: the fields it may name, stdout's
                    enum = [n for n in names if n not in leave_out]
                    props[_ecs_name(name, namespace)] = {**prop, "propertyNames": {"enum": enum}}
                else:
                    props[_ecs_name(name, namespace)] = prop
            out[key] = props
        elif key == "required":
            out[key] = [_ecs_name(n, namespace) for n in value if n not in leave_out]
        elif key == "dependentRequired":
            needs = {
                _ecs_name(k, namespace): [_ecs_name(n, namespace) for n in v]
                for k, v in value.items()
                if k not in leave_out and not leave_out & set(v)
            }
            if needs:
                out[key] = needs
        elif key == "allOf":
            out[key] = [_ecs_object(s, namespace, leave_out) for s in value if not _mentions(s, leave_out)]
        elif key in ("if", "then", "else"):
            out[key] = _ecs_object(value, namespace, leave_out)
        elif key != "x-diagnostic-only":
            out[key] = value
    return out


def derive_ecs_schema(schema: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``ecs`` profile's schema, derived from the default one (``schema``, by default
    :func:`load_schema`): the same record definitions, closed as they are, with ECS names (see
    the module's docstring and ``traintel.sinks.json.lines.ecs_layout``), ``ecs.version``,
    ``event.dataset`` and ``event.action`` added, ``sink.error``'s ``error`` as ECS
    ``error.type`` and ``error.message``, the diagnostic file's extras left out, and a routed
    log line (``event.dataset`` ``traintel.log``) whose keys are ECS fields or ``traintel.*``."""
    from traintel.sinks.json.lines import (  # orjson and the sinks only when deriving
        ECS_NAMESPACE,
        ECS_VERSION,
        LOG_DATASET,
        RECORDS_DATASET,
    )

    default = dict(schema) if schema is not None else load_schema()
    defs: dict[str, Any] = default["$defs"]
    events = [n for n, d in defs.items() if d.get("properties", {}).get("event", {}).get("const") == n]
    leave_out = frozenset(defs["train.batch"].get("x-diagnostic-only", ()))
    ns = ECS_NAMESPACE
    ecs_defs: dict[str, Any] = {}
    for name, definition in defs.items():
        if name in events:
            ecs_defs[name] = _ecs_event(definition, name, ns, leave_out, RECORDS_DATASET)
        elif name == "record":
            ecs_defs[name] = _ecs_object(definition, ns, leave_out)
        elif name != "log":
            ecs_defs[name] = definition
    ecs_defs["ecs.version"] = {
        "const": ECS_VERSION,
        "description": "The Elastic Common Schema version the line follows (_jsonline.ECS_VERSION).",
    }
    ecs_defs["log"] = _ecs_log(ns, LOG_DATASET)
    version = str(default["$id"]).rsplit(":", 1)[-1]
    on_record = {"properties": {"event.dataset": {"const": RECORDS_DATASET}}, "required": ["event.dataset"]}
    return {
        "$schema": default["$schema"],
        "$id": f"urn:traintel:schema:records-ecs:{version}",
        "title": "traintel JSON lines, ecs profile",
        "description": (
            "One line of traintel's stdout under sinks.json.profile: ecs (Elastic Common Schema "
            f"{ECS_VERSION}; the diagnostic file is always in the default profile). Derived from "
            "records.schema.json by traintel.schema.derive_ecs_schema: the same definitions, where "
            "timestamp, level and event are @timestamp, log.level and message, and every other "
            f"traintel field is under the custom namespace {ns} (nonfinite's values name the "
            f'fields without it, as in the default profile: {ns}.nonfinite = {{"loss": "nan"}}). '
            "Every key is a field's full dotted name. A record line has event.dataset "
            f"{RECORDS_DATASET} and event.action = its event (= message); sink.error's error, and a "
            "failed run.end's reason, are error.type and error.message. A routed log line has "
            f"event.dataset {LOG_DATASET}, "
            "log.logger, and an exception as error.type, error.message and error.stack_trace."
        ),
        "type": "object",
        "required": ["@timestamp", "log.level", "message", "ecs.version", "event.dataset"],
        "properties": {
            "@timestamp": {"$ref": "#/$defs/timestamp"},
            "log.level": {"$ref": "#/$defs/level"},
            "message": {"type": "string"},
            "ecs.version": {"$ref": "#/$defs/ecs.version"},
            "event.dataset": {"enum": [RECORDS_DATASET, LOG_DATASET]},
        },
        "allOf": [
            *(
                {
                    "if": {
                        "properties": {"event.dataset": {"const": RECORDS_DATASET}, "message": {"const": e}},
                        "required": ["event.dataset", "message"],
                    },
                    "then": {"$ref": f"#/$defs/{e}"},
                }
                for e in events
            ),
            {
                "if": on_record,
                "then": {"properties": {"message": {"enum": events}}, "$ref": "#/$defs/record"},
                "else": {"$ref": "#/$defs/log"},
            },
        ],
        "$defs": ecs_defs,
    }


def _ecs_event(
    definition: Mapping[str, Any], event: str, ns: str, leave_out: frozenset[str], dataset: str
) -> dict[str, Any]:
    """One record event's definition with ECS names, the ECS fields after the head, and
    ``sink.error``'s ``error`` as ``error.type`` and ``error.message``."""
    renamed = _ecs_object(definition, ns, leave_out)
    if "x-diagnostic-only" in definition:  # its description is of those extras, left out here
        renamed["description"] = str(definition.get("description", "")).split(". ", 1)[0] + "."
    head = ("@timestamp", "log.level", "message")
    ecs = {
        "ecs.version": {"$ref": "#/$defs/ecs.version"},
        "event.dataset": {"const": dataset},
        "event.action": {"const": event, "description": "The record's event, as message."},
    }
    props: dict[str, Any] = {k: v for k, v in renamed["properties"].items() if k in head}
    props.update(ecs)
    error_name = f"{ns}.error"
    for name, prop in renamed["properties"].items():
        if name in head:
            continue
        if name == error_name:
            props.update(
                _error_fields(
                    "The exception's class name (before ': ' in the default profile's error).",
                    "The exception's message, its first line (empty when it has none).",
                )
            )
        else:
            props[name] = prop
    required = [n for n in renamed["required"] if n in head] + list(ecs)
    required += ["error.message" if n == error_name else n for n in renamed["required"] if n not in head]
    rules = list(renamed.get("allOf", ()))
    if event == "run.end":  # a failed run's reason is also its error.*
        props.update(
            _error_fields(
                "When status is failed: the exception's class name, from reason.",
                "When status is failed: the rest of reason (all of it when it names no class).",
            )
        )
        status = f"{ns}.status"
        rules.append(
            {
                "if": {"properties": {status: {"const": "failed"}}, "required": [status]},
                "then": {"required": ["error.message"]},
                "else": {"not": {"anyOf": [{"required": ["error.type"]}, {"required": ["error.message"]}]}},
            }
        )
    return {**renamed, "properties": props, "required": required, **({"allOf": rules} if rules else {})}


def _error_fields(type_description: str, message_description: str) -> dict[str, Any]:
    """ECS ``error.type`` and ``error.message`` properties (strings), described."""
    return {
        "error.type": {"type": "string", "description": type_description},
        "error.message": {"type": "string", "description": message_description},
    }


def _ecs_log(ns: str, dataset: str) -> dict[str, Any]:
    return {
        "description": (
            "A stdlib/third-party log message routed onto stdout (ignite, warnings, torch). Every "
            f"key is one of the ECS fields below or under {ns}."
        ),
        "type": "object",
        "properties": {
            "@timestamp": {"$ref": "#/$defs/timestamp"},
            "log.level": {"$ref": "#/$defs/level"},
            "message": {"type": "string", "description": "The formatted log message."},
            "ecs.version": {"$ref": "#/$defs/ecs.version"},
            "event.dataset": {"const": dataset},
            "log.logger": {"type": "string", "description": "The logger name (py.warnings for warnings)."},
            "error.type": {"type": "string", "description": "The logged exception's class name."},
            "error.message": {"type": "string", "description": "The logged exception's message."},
            "error.stack_trace": {
                "type": "string",
                "description": "The logged exception's traceback as Python prints it (chained ones too).",
            },
            f"{ns}.nonfinite": {"$ref": "#/$defs/nonfinite"},
        },
        "required": ["@timestamp", "log.level", "message", "ecs.version", "event.dataset"],
        "dependentRequired": {"error.stack_trace": ["error.type", "error.message"]},
        "propertyNames": {"anyOf": [{"enum": list(_ECS_LOG_FIELDS)}, {"pattern": f"^{ns}\\."}]},
    }


def write_ecs_schema(path: Path = ECS_SCHEMA_PATH) -> None:
    """Write :func:`derive_ecs_schema` to ``path`` (the shipped file), after a change to the
    default schema: ``python -c 'from traintel.schema import write_ecs_schema; write_ecs_schema()'``."""
    path.write_text(json.dumps(derive_ecs_schema(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
