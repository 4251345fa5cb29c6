"""The documentation's reference pages, generated from the code they describe.

Each ``*_page`` function returns one Markdown page built from the live objects: the settings' models
(``traintel.config.model``), the published record schema, a real Prometheus exporter fed one record of
each kind, the command line's parser, the exit status table (``traintel.errors.EXIT_STATUSES``) and
the public API's export table. ``docs/hooks.py`` adds ``PAGES`` to the site when it is built, so no
reference page is written by hand and none can drift from the code.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import types
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union, cast, get_args, get_origin

from pydantic import BaseModel, Discriminator, SecretStr
from pydantic.fields import FieldInfo

from traintel.errors import EXIT_STATUSES

_CODE = re.compile(r"(`+)(.+?)\1", re.DOTALL)
_SPECIAL = {
    "\\": "\\\\",
    "*": "\\*",
    "_": "\\_",
    "[": "\\[",
    "]": "\\]",
    "|": "\\|",
    "<": "&lt;",
    ">": "&gt;",
}


def md_text(text: str | None) -> str:
    """``text`` (a docstring or a description, its code in double or single backticks) as one line of
    Markdown: whitespace collapsed, code spans kept as single-backtick spans, and the characters that
    Markdown or a table cell would take as syntax escaped outside them."""
    if not text:
        return ""
    text = " ".join(text.split())
    out: list[str] = []
    pos = 0
    for match in _CODE.finditer(text):
        out.append(_escape(text[pos : match.start()]))
        out.append(f"`{match.group(2)}`")
        pos = match.end()
    out.append(_escape(text[pos:]))
    return "".join(out)


def _escape(text: str) -> str:
    return "".join(_SPECIAL.get(char, char) for char in text)


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _page(lines: Iterable[str]) -> str:
    return "\n".join(lines).rstrip("\n") + "\n"


# --- configuration ------------------------------------------------------------------------------

_TYPE_NAMES: dict[Any, str] = {
    int: "integer",
    float: "number",
    bool: "boolean",
    str: "string",
    type(None): "null",
    SecretStr: "string (secret)",
    Any: "any",
}


def _type_name(tp: Any) -> str:
    """A settings annotation in words: ``integer or null``, ``mapping``, ``list of entries``."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        return _type_name(args[0])
    if origin in (Union, types.UnionType, Literal):
        kinds = [type(arg) for arg in args] if origin is Literal else args  # a choice: its value's type
        return " or ".join(dict.fromkeys(_type_name(kind) for kind in kinds))
    if origin is list:
        return "list of entries" if _models(args[0]) else f"list of {_type_name(args[0])}"
    if origin in (dict, Mapping) or (isinstance(tp, type) and issubclass(tp, BaseModel)):
        return "mapping"
    return _TYPE_NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def _models(tp: Any) -> list[type[BaseModel]]:
    """The models an annotation may hold (one for a section, several for a union told apart by name)."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    if get_origin(tp) in (Annotated, Union, types.UnionType):
        return [model for arg in get_args(tp) for model in _models(arg)]
    return []


def _metadata(info: FieldInfo) -> list[Any]:
    """The field's constraints, those of the annotation's ``Annotated`` parts included."""

    def walk(tp: Any) -> Iterator[Any]:
        origin, args = get_origin(tp), get_args(tp)
        if origin is Annotated:
            yield from walk(args[0])
            for item in tp.__metadata__:
                yield from (item, *item.metadata) if isinstance(item, FieldInfo) else (item,)
        elif origin in (Union, types.UnionType):
            for arg in args:
                yield from walk(arg)

    return [*info.metadata, *walk(info.annotation)]


def _literal(value: Any) -> str:
    """A value as YAML writes it, in a code span: ``null``, ``true``, ``0.001``, ``traintel``, ``{}``."""
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    return f"`{json.dumps(value)}`"


def _choices(tp: Any) -> list[Any]:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return list(args)
    if origin in (Annotated, Union, types.UnionType):
        return [choice for arg in args for choice in _choices(arg)]
    return []


def _discriminator(info: FieldInfo) -> str | None:
    """The key that tells a union's models apart (``name`` for the scheduler), if it is one."""
    for item in _metadata(info):
        if isinstance(item, FieldInfo) and isinstance(item.discriminator, str):
            return item.discriminator
        if isinstance(item, Discriminator):  # a function of the value: traintel's unions go by name
            return "name"
    return info.discriminator if isinstance(info.discriminator, str) else None


def _names(model: type[BaseModel], key: str) -> list[str]:
    """The values of ``key`` that select ``model`` in a union: its choices, or ``module:function``
    for a model whose ``key`` is free text (a factory)."""
    return [_literal(c) for c in _choices(model.model_fields[key].annotation)] or ["`module:function`"]


def _allowed(info: FieldInfo) -> str:
    """The field's range in words: bounds, lengths, pattern, choices, finiteness."""
    parts: list[str] = []
    choices = _choices(info.annotation)
    if len(choices) == 1:
        parts.append(_literal(choices[0]))
    elif choices:
        parts.append("one of " + ", ".join(_literal(choice) for choice in choices))
    key = _discriminator(info)
    if key is not None:
        names = [name for model in _models(info.annotation) for name in _names(model, key)]
        parts.append(f"`{key}` one of " + ", ".join(names) + " (below)")
    # annotated_types' Ge, Gt, ..., MinLen and pydantic's pattern and allow_inf_nan, by their attribute
    signs = {
        "ge": ">=",
        "gt": ">",
        "le": "<=",
        "lt": "<",
        "min_length": "length >=",
        "max_length": "length <=",
    }
    for item in _metadata(info):
        if isinstance(item, FieldInfo):
            continue  # its constraints are in the metadata too
        for attribute, sign in signs.items():
            if getattr(item, attribute, None) is not None:
                parts.append(f"{sign} {json.dumps(getattr(item, attribute))}")
        if getattr(item, "pattern", None) is not None:
            parts.append(f"matches `{item.pattern}`")
        if getattr(item, "allow_inf_nan", None) is False:
            parts.append("finite")
    return ", ".join(parts)


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    if info.default_factory is not None:
        return _literal(info.default_factory())  # type: ignore[call-arg]
    return _literal(info.default)


def _section_lines(
    model: type[BaseModel], key: str, title: str, intro: Sequence[str | None], level: int
) -> list[str]:
    """One heading per section: its description, its settings' table, then its subsections."""
    lines = [f"{'#' * level} {title}", ""]
    lines += [md_text(text) + "\n" for text in dict.fromkeys(intro) if text]
    rows: list[list[str]] = []
    subsections: list[str] = []
    for name, info in model.model_fields.items():
        field_key = f"{key}.{info.alias or name}" if key else (info.alias or name)
        models = _models(info.annotation)
        described = md_text(info.description)
        if len(models) == 1 and get_origin(info.annotation) is not list:
            sub = models[0]
            subsections += _section_lines(
                sub, field_key, f"`{field_key}`", [sub.__doc__, info.description], level + 1
            )
            continue
        rows.append(
            [f"`{field_key}`", _type_name(info.annotation), _default(info), _allowed(info), described]
        )
        entries = _models(get_args(info.annotation)[0]) if get_origin(info.annotation) is list else []
        if entries:
            item = f"{field_key}[]"
            subsections += _section_lines(entries[0], item, f"`{item}`", [entries[0].__doc__], level + 1)
        elif models:
            key_name = _discriminator(info) or "name"
            for member in models:
                value = ", ".join(_names(member, key_name))
                title = f"`{field_key}` with `{key_name}: {value.strip('`')}`"
                subsections += _section_lines(member, field_key, title, [member.__doc__], level + 1)
    if rows:
        lines += [*_table(("key", "type", "default", "allowed", "meaning"), rows), ""]
    return lines + subsections


def config_page(model: type[BaseModel] | None = None) -> str:
    """Every setting of ``model`` (default: ``traintel.config.Config``), section by section: its
    dotted key, type, default, allowed range and the field's docstring."""
    if model is None:
        from traintel.config.model import Config

        model = Config
    lines = [
        "# Configuration",
        "",
        md_text(model.__doc__),
        "",
        "Generated from the settings' models (`traintel.config.model`). Each key is set in the YAML file "
        "(`--config`), in the environment (`TRAINTEL__SECTION__KEY`) or with `--set section.key=value`, "
        "in that order of precedence; unknown keys are errors.",
        "",
    ]
    for name, info in model.model_fields.items():
        key = info.alias or name
        sub = _models(info.annotation)
        if len(sub) == 1 and get_origin(info.annotation) is not list:
            lines += _section_lines(sub[0], key, f"`{key}`", [sub[0].__doc__, info.description], 2)
        else:
            lines += [
                *_table(
                    ("key", "type", "default", "allowed", "meaning"),
                    [[f"`{key}`", _type_name(info.annotation), _default(info), _allowed(info),
                      md_text(info.description)]],
                ),
                "",
            ]  # fmt: skip
    return _page(lines)


# --- records ------------------------------------------------------------------------------------


def _events(schema: Mapping[str, Any]) -> list[str]:
    """The record events in the schema's order: the ``const`` each top-level rule selects on."""
    events = []
    for rule in schema.get("allOf", []):
        event = rule.get("if", {}).get("properties", {}).get("event", {})
        if "const" in event:
            events.append(event["const"])
    return events


def _resolved(schema: Mapping[str, Any], prop: Mapping[str, Any]) -> dict[str, Any]:
    """``prop`` merged over the definition its ``$ref`` names (its own keys win)."""
    ref = prop.get("$ref")
    if ref is None:
        return dict(prop)
    base = _resolved(schema, schema["$defs"][ref.rsplit("/", 1)[1]])
    return {**base, **{k: v for k, v in prop.items() if k != "$ref"}}


def _schema_type(prop: Mapping[str, Any]) -> str:
    """A property's JSON type and constraints in words."""
    if "const" in prop:
        return f"always {_literal(prop['const'])}"
    if "enum" in prop:
        return "one of " + ", ".join(_literal(value) for value in prop["enum"])
    kinds = prop.get("type", "any")
    text = " or ".join([kinds] if isinstance(kinds, str) else kinds)
    if "minimum" in prop:
        text += f", >= {prop['minimum']}"
    if "minLength" in prop:
        text += f", length >= {prop['minLength']}"
    if "pattern" in prop:
        text += f", matching `{prop['pattern']}`"
    values = prop.get("additionalProperties")
    if isinstance(values, Mapping) and "enum" in values:
        keys = prop.get("propertyNames", {})
        names = [f"`{name}`" for name in keys.get("enum", keys.get("anyOf", [{}])[0].get("enum", ()))]
        if "anyOf" in keys:  # nonfinite's: a metric's value too
            names.append("`metrics.<name>`")
        keyed = ("keys " + ", ".join(names)) if names else "field names as keys"
        text += f": {keyed}, values " + ", ".join(_literal(value) for value in values["enum"])
    return text


def _version_rules(schema: Mapping[str, Any], definition: Mapping[str, Any]) -> dict[str, list[str]]:
    """Fields required on every line except those of the listed older ``schema_version``s."""
    rules = [*definition.get("allOf", []), *schema["$defs"]["record"].get("allOf", [])]
    older: dict[str, list[str]] = {}
    for rule in rules:
        version = rule.get("if", {}).get("properties", {}).get("schema_version")
        if version is None:
            continue
        versions = [version["const"]] if "const" in version else list(version["enum"])
        for name in rule.get("else", {}).get("required", []):
            older[name] = versions
    return older


def _record_lines(schema: Mapping[str, Any], event: str, *, is_record: bool) -> list[str]:
    definition = schema["$defs"][event]
    required = set(definition.get("required", []))
    older = _version_rules(schema, definition) if is_record else {}
    diagnostic_only = set(definition.get("x-diagnostic-only", []))
    rows = []
    for name, raw in definition["properties"].items():
        prop = _resolved(schema, raw)
        if name in required:
            need = "yes"
        elif name in older:
            versions = [f"`{v}`" for v in older[name]]
            listed = " and ".join([", ".join(versions[:-1]), versions[-1]] if len(versions) > 1 else versions)
            need = f"yes, except on {listed} lines"
        elif name in diagnostic_only:
            need = "diagnostic file only"
        else:
            need = "no"
        rows.append([f"`{name}`", _schema_type(prop), need, md_text(prop.get("description"))])
    title = f"`{event}`" if is_record else "Log lines (any other `event`)"
    lines = [f"## {title}", "", md_text(definition.get("description")), ""]
    if definition.get("additionalProperties") is False:
        lines += ["No other field is allowed.", ""]
    return [*lines, *_table(("field", "type", "required", "meaning"), rows), ""]


def records_page(schema: Mapping[str, Any] | None = None) -> str:
    """Every record event and its fields, from the published JSON Schema (default: the shipped
    ``traintel/schemas/records.schema.json``)."""
    if schema is None:
        from traintel.schema import load_schema

        schema = load_schema()
    lines = [
        "# Records",
        "",
        md_text(schema.get("description")),
        "",
        f"Generated from the published JSON Schema `traintel/schemas/records.schema.json` "
        f"(`{schema.get('$id', '')}`); `traintel.schema.validate_line` checks a line against it. "
        "The `ecs` profile (`sinks.json.profile: ecs`) writes the same fields under Elastic Common "
        "Schema names, described by `traintel/schemas/records-ecs.schema.json`.",
        "",
        "## Every record",
        "",
        md_text(schema["$defs"]["record"].get("description")),
        "",
    ]
    for event in _events(schema):
        lines += _record_lines(schema, event, is_record=True)
    if "log" in schema["$defs"]:
        lines += _record_lines(schema, "log", is_record=False)
    return _page(lines)


# --- metrics ------------------------------------------------------------------------------------


def _exporter_families(*, per_rank: bool) -> tuple[list[Any], set[str]]:
    """The families a real exporter serves once it has one record of each kind, and the names of
    those it pushes to a Pushgateway."""
    from traintel.records import RunStartRecord
    from traintel.sinks.health import SinkHealthCollector
    from traintel.sinks.prometheus.sink import PrometheusSink
    from traintel.testing.records import (
        T0,
        batch_record,
        checkpoint_record,
        end_record,
        epoch_record,
        eval_record,
        metric_record,
        run_context,
        step_record,
    )

    sink = PrometheusSink(host="127.0.0.1", port=0, per_rank=per_rank)
    sink.register(SinkHealthCollector({"json": 0}, lambda: {"json": 0}))  # the fan-out's, as a run does
    sink.open(run_context(Path("runs/r1")))
    try:
        start = RunStartRecord(
            run_id="r1",
            time=T0,
            name="demo",
            run_dir="runs/r1",
            device="cpu",
            config={},
            metrics_url=sink.url,
            optimizer="torch.optim.adamw.AdamW",
        )
        step = step_record(grad_norm=0.5, grad_scale=65536.0, metrics={"accuracy": 0.5})
        records = [start, batch_record(), step, epoch_record(), eval_record(metrics={"accuracy": 0.75})]
        records += [metric_record(), checkpoint_record()]
        sink.emit_many([*records, end_record()])
        families = list(sink.registry.collect())
        pushed = {family.name for collector in sink.pushed for family in collector.collect()}
    finally:
        sink.close()
    return families, pushed


def _labels(family: Any) -> list[str]:
    return list(dict.fromkeys(label for sample in family.samples for label in sample.labels))


def metrics_page() -> str:
    """Every metric family the Prometheus exporter serves, read from a real exporter (bound to a free
    port on 127.0.0.1) that has received one record of each kind."""
    from traintel.sinks.prometheus.server import CLOSE_REASONS

    families, pushed = _exporter_families(per_rank=False)
    ranked, _ = _exporter_families(per_rank=True)
    plain_labels = {family.name: set(_labels(family)) for family in families}
    added = sorted({label for f in ranked for label in _labels(f)} - set().union(*plain_labels.values()))

    def rows(own: bool) -> list[list[str]]:
        return [
            [
                " ".join(f"`{name}`" for name in dict.fromkeys(s.name for s in family.samples)),
                family.type,
                ", ".join(f"`{label}`" for label in _labels(family)),
                "yes" if family.name in pushed else "no",
                md_text(family.documentation),
            ]
            for family in families
            if family.name.startswith("traintel_") == own
        ]

    header = ("metric", "type", "labels", "pushed", "meaning")
    lines = [
        "# Prometheus metrics",
        "",
        "Generated from a real exporter (`traintel.sinks.prometheus`) that has received one record of "
        "each kind. A family appears once a record carrying its value has arrived; a value that is "
        "null in its record (`grad_norm` without clipping or `trainer.report_grad_norm`, `grad_scale` "
        "without `trainer.precision: fp16`, a non-finite loss) leaves its gauge out. *pushed*: also "
        "sent to the Pushgateway at run end (`sinks.prometheus.pushgateway.url`).",
        "",
        "With `sinks.prometheus.per_rank: true` every family also carries "
        + ", ".join(f"`{label}`" for label in added)
        + ", and the push is grouped by it too.",
        "",
        "## traintel's families",
        "",
        *_table(header, rows(own=True)),
        "",
        "`traintel_exporter_connections_closed_total`'s `reason` is one of "
        + ", ".join(f"`{reason}`" for reason in CLOSE_REASONS)
        + "; a checkpoint family's is the `checkpoint` record's `reason` (`every_steps`, `every_epochs`, "
        "`signal`, `max_steps`, `best`).",
        "",
        "## Process metrics",
        "",
        "prometheus_client's process collector, read from `/proc` at scrape time.",
        "",
        *_table(header, rows(own=False)),
    ]
    return _page(lines)


# --- command line -------------------------------------------------------------------------------


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """``parser`` and each of its subcommands' parsers, depth first, in their order."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                yield from _parsers(sub)


def cli_page(parser: argparse.ArgumentParser | None = None, width: int = 100) -> str:
    """The help of the ``traintel`` command and of each subcommand, from its argparse parser (default:
    ``traintel.cli.main.make_parser()``), wrapped at ``width`` columns whatever the terminal."""
    import inspect

    from traintel.cli import torchrun

    if parser is None:
        from traintel.cli.main import make_parser

        parser = make_parser()
    lines = [
        "# Command line",
        "",
        "Generated from the command's parser (`traintel.cli.main.make_parser`). `python -m traintel` "
        "is the same command.",
        "",
    ]
    for each in _parsers(parser):
        formatter = cast("type[argparse.HelpFormatter]", each.formatter_class)
        each.formatter_class = functools.partial(formatter, width=width)
        lines += [f"## `{each.prog}`", "", "```text", each.format_help().rstrip(), "```", ""]
    lines += ["## `traintel-torchrun`", "", inspect.getdoc(torchrun) or "", ""]
    return _page(lines)


# --- exit statuses ------------------------------------------------------------------------------


def exit_statuses_page(statuses: Mapping[int, str] = EXIT_STATUSES) -> str:
    """The ``traintel`` command's exit statuses and their meanings (``traintel.errors.EXIT_STATUSES``)."""
    lines = [
        "# Exit statuses",
        "",
        "Generated from `traintel.errors.EXIT_STATUSES`, the statuses the `traintel` command exits with. "
        "`traintel-torchrun` passes its workers' statuses through (see the command line reference).",
        "",
        *_table(
            ("status", "meaning"), ([str(code), md_text(text)] for code, text in sorted(statuses.items()))
        ),
    ]
    return _page(lines)


# --- Python API ---------------------------------------------------------------------------------

API_MODULES = ("traintel.testing", "traintel.schema")
"""Public modules documented after ``traintel``'s own names: the sink author's test kit and the
record schema's validators."""


def api_page() -> str:
    """mkdocstrings entries for every name ``traintel`` exports (``traintel.__all__``), grouped by the
    module that defines it, then for the names of ``API_MODULES`` not documented already."""
    import importlib

    import traintel

    lines = [
        "# Python API",
        "",
        md_text(traintel.__doc__),
        "",
        "Generated from `traintel.__all__` and the public modules "
        + ", ".join(f"`{name}`" for name in API_MODULES)
        + ". Each name of the first sections is importable from `traintel` itself "
        "(`from traintel import build`); it is shown where it is defined.",
        "",
    ]
    by_module: dict[str, list[str]] = {}
    for name, module in traintel._EXPORTS.items():  # where each is defined: constants carry no __module__
        if name in traintel.__all__:
            by_module.setdefault(module, []).append(name)
    documented = {name for names in by_module.values() for name in names}
    for module, names in by_module.items():
        lines += [f"## `{module}`", ""]
        lines += [f"::: {module}.{name}\n" for name in names]
    for module in API_MODULES:
        names = [name for name in importlib.import_module(module).__all__ if name not in documented]
        lines += [f"## `{module}`", "", f"::: {module}", "    options:", "      members:"]
        lines += [f"        - {name}" for name in names]
        lines += [""]
    return _page(lines)


PAGES: Mapping[str, Callable[[], str]] = types.MappingProxyType(
    {
        "reference/config.md": config_page,
        "reference/records.md": records_page,
        "reference/metrics.md": metrics_page,
        "reference/cli.md": cli_page,
        "reference/exit-statuses.md": exit_statuses_page,
        "reference/api.md": api_page,
    }
)
"""Each generated page's path inside the documentation and the function that writes it."""
