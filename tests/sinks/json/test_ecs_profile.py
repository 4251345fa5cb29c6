"""The ``ecs`` profile (``sinks.json.profile: ecs``): lines Elasticsearch takes as they are.

Every stdout line of three real runs (the built-in config, a failing plug-in sink, a crash in
training) is checked three ways: against the published schema (``records-ecs.schema.json``),
against the field table ECS itself publishes (``traintel/schemas/ecs-fields.csv``, an excerpt of
ECS's ``generated/csv/fields.csv``: each ECS field the line uses exists there and its value has
the JSON type of the field's ECS type), and against the diagnostic file of the same run (always
in the default profile): each record line laid back into default names is that record's line.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.children import CRASH_MESSAGE, run_child, write_crashing_task
from tests.helpers.paths import ROOT
from traintel.records import RunStartRecord
from traintel.schema import (
    ECS_SCHEMA_PATH,
    RecordValidationError,
    derive_ecs_schema,
    load_schema,
    validate_line,
    validate_lines,
)
from traintel.sinks import JsonSink
from traintel.sinks.json.lines import ECS_VERSION
from traintel.testing import T0, end_record
from traintel.testing.records import checkpoint_record

jsonschema = pytest.importorskip("jsonschema")

CONFIG = ROOT / "configs" / "default.yaml"
FIELD_TABLE = ECS_SCHEMA_PATH.parent / "ecs-fields.csv"
DIAGNOSTIC_ONLY = frozenset(load_schema()["$defs"]["train.batch"]["x-diagnostic-only"])
PER_SINK = frozenset({"dropped"})
"""A sink's own count of the records it dropped (stdout's and the file's may differ)."""

_STRING_TYPES = frozenset({"keyword", "constant_keyword", "wildcard", "match_only_text", "text"})
_INTEGER_TYPES = frozenset({"long", "integer", "short", "byte", "unsigned_long"})
_NUMBER_TYPES = frozenset({"float", "double", "half_float", "scaled_float"})


def ecs_field_types() -> dict[str, str]:
    """ECS field name -> ECS type, from the vendored excerpt of ECS's field table."""
    rows = [line for line in FIELD_TABLE.read_text(encoding="utf-8").splitlines() if not line.startswith("#")]
    return {row["Field"]: row["Type"] for row in csv.DictReader(rows)}


def _is_date(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def _json_type_fits(ecs_type: str, value: Any) -> bool:
    """Whether a JSON value has the JSON type Elasticsearch maps to ``ecs_type``."""
    checks: dict[str, Callable[[Any], bool]] = {
        **dict.fromkeys(_STRING_TYPES, lambda v: isinstance(v, str)),
        **dict.fromkeys(_INTEGER_TYPES, lambda v: isinstance(v, int) and not isinstance(v, bool)),
        **dict.fromkeys(_NUMBER_TYPES, lambda v: isinstance(v, int | float) and not isinstance(v, bool)),
        "boolean": lambda v: isinstance(v, bool),
        "date": _is_date,
        "object": lambda v: isinstance(v, dict),
        "flattened": lambda v: isinstance(v, dict),
    }
    return checks[ecs_type](value)


def check_ecs_fields(line: dict[str, Any], types: dict[str, str]) -> None:
    """Every key outside ``traintel.*`` is an ECS field (of the excerpt) and its value has the JSON
    type of that field's ECS type; ``ecs.version`` is this profile's version."""
    for key, value in line.items():
        if key.startswith("traintel."):
            continue
        assert key in types, f"{key!r} is not an ECS field this profile uses"
        assert _json_type_fits(types[key], value), (
            f"{key}: {value!r} is not a JSON value of ECS type {types[key]}"
        )
    assert line["ecs.version"] == ECS_VERSION


def default_layout(ecs: dict[str, Any]) -> dict[str, Any]:
    """An ``ecs`` record line laid back into the default profile's names, in order."""
    out = {"timestamp": ecs["@timestamp"], "level": ecs["log.level"], "event": ecs["message"]}
    for key, value in ecs.items():
        if key.startswith("traintel."):
            out[key.removeprefix("traintel.")] = value
        elif key.startswith("error.") and ecs["message"] == "run.end":
            continue  # a failed run.end's reason, repeated
        elif key == "error.type":  # sink.error: "Type: message", as traintel.errors.one_line writes it
            message = ecs["error.message"]
            out["error"] = f"{value}: {message}" if message else value
    return out


def _record_lines(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line for line in lines if line["event.dataset"] == "traintel.records"]


# ----------------------------------------------------------------------------- the published schema


def test_the_published_ecs_schema_is_the_default_schema_with_ecs_names() -> None:
    ecs = load_schema("ecs")
    jsonschema.Draft202012Validator.check_schema(ecs)
    assert ecs == derive_ecs_schema(), (
        "records-ecs.schema.json is out of date: "
        "python -c 'from traintel.schema import write_ecs_schema; write_ecs_schema()'"
    )
    assert ecs["$id"] == load_schema()["$id"].replace(":records:", ":records-ecs:")
    assert ecs["$defs"]["ecs.version"]["const"] == ECS_VERSION == "8.11.0"
    batch = ecs["$defs"]["train.batch"]["properties"]
    assert not {f"traintel.{name}" for name in DIAGNOSTIC_ONLY} & set(batch), "stdout never carries them"
    with pytest.raises(ValueError, match="profile must be 'default' or 'ecs', got 'gelf'"):
        load_schema("gelf")


def _ecs_names(schema: Any) -> set[str]:
    """The names of every property the ECS schema defines that is not under ``traintel.``."""
    found: set[str] = set()
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key == "properties" and isinstance(value, dict):
                found |= {name for name in value if not name.startswith("traintel.")}
            elif key == "propertyNames" and "anyOf" in value and "traintel" in value["anyOf"][1]["pattern"]:
                found |= set(value["anyOf"][0]["enum"])  # a routed log line's ECS fields
            found |= _ecs_names(value)
    elif isinstance(schema, list):
        for item in schema:
            found |= _ecs_names(item)
    return found


def test_the_field_table_excerpt_is_exactly_the_ecs_fields_the_profile_writes() -> None:
    types = ecs_field_types()
    assert set(types) == _ecs_names(load_schema("ecs"))
    assert types == {
        "@timestamp": "date", "message": "match_only_text", "ecs.version": "keyword",
        "error.message": "match_only_text", "error.stack_trace": "wildcard", "error.type": "keyword",
        "event.action": "keyword", "event.dataset": "keyword", "log.level": "keyword", "log.logger": "keyword",
    }  # fmt: skip
    assert not any(name.split(".")[0] == "traintel" for name in types), "the namespace is no ECS field set"


_LINE = {
    "@timestamp": "2025-11-24T16:00:00.250000Z", "log.level": "warning", "message": "sink.error",
    "ecs.version": "8.11.0", "event.dataset": "traintel.records", "event.action": "sink.error",
    "traintel.run_id": "r1", "traintel.schema_version": "1.5.0", "traintel.rank": 0, "traintel.world_size": 1,
    "traintel.attempt": 0, "traintel.sink": "flaky", "error.type": "OSError", "error.message": "bucket full",
}  # fmt: skip


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"error": "OSError: bucket full"}, "Additional properties are not allowed ('error' was unexpected)"),
        ({"sink": "flaky"}, "Additional properties are not allowed ('sink' was unexpected)"),
        ({"event.action": "run.end"}, "'sink.error' was expected"),
        ({"event.dataset": "traintel.log"}, "'event.action' is not valid under any of the given schemas"),
        ({"ecs.version": "8.9.0"}, "'8.11.0' was expected"),
        ({"error.message": {"text": "bucket full"}}, "is not of type 'string'"),
        ({"@timestamp": 1764000000.25}, "is not of type 'string'"),
    ],
    ids=["error-as-text", "top-level-field", "action", "log-with-record-fields", "version", "error-object",
         "epoch"],
)  # fmt: skip
def test_the_ecs_schema_rejects_lines_elastic_would_not_take_as_ecs(
    change: dict[str, Any], message: str
) -> None:
    validate_line(_LINE, profile="ecs")
    line = {**_LINE, **change}
    with pytest.raises(RecordValidationError, match=re.escape(message)):
        validate_line(line, profile="ecs")


DROP = object()
"""In a change: remove the key."""


def _ecs_line(record: Any) -> dict[str, Any]:
    line: dict[str, Any] = json.loads(JsonSink(profile="ecs").render(record))
    return line


_FSDP_START = RunStartRecord(
    run_id="r1", time=T0, rank=1, world_size=2, name="demo", run_dir="runs/r1", device="cuda:1", config={},
    metrics_url=None, backend="nccl", strategy="fsdp", optimizer="torch.optim.adamw.AdamW",
)  # fmt: skip


@pytest.mark.parametrize(
    ("record", "change", "message"),
    [
        (checkpoint_record(), {}, None),
        (checkpoint_record(reason="max_steps", background=True), {}, None),
        (_FSDP_START, {}, None),
        (_FSDP_START, {"traintel.strategy": None}, None),
        (checkpoint_record(), {"traintel.reason": "manual"},
         "checkpoint $['traintel.reason']: 'manual' is not one of "
         "['every_steps', 'every_epochs', 'signal', 'max_steps', 'best']"),
        (checkpoint_record(), {"traintel.size_bytes": "4096"},
         "checkpoint $['traintel.size_bytes']: '4096' is not of type 'integer'"),
        (checkpoint_record(), {"traintel.background": None},
         "checkpoint $['traintel.background']: None is not of type 'boolean'"),
        (checkpoint_record(), {"traintel.stall_seconds": DROP},
         "checkpoint $: 'traintel.stall_seconds' is a required property"),
        (checkpoint_record(), {"traintel.schema_version": "1.4.0"},
         "checkpoint $['traintel.schema_version']: '1.4.0' should not be valid under"),
        (checkpoint_record(), {"reason": "signal"},
         "checkpoint $: Additional properties are not allowed ('reason' was unexpected)"),
        (_FSDP_START, {"traintel.strategy": "fsdp2"},
         "run.start $['traintel.strategy']: 'fsdp2' is not one of ['ddp', 'fsdp', None]"),
        (_FSDP_START, {"traintel.strategy": DROP}, "run.start $: 'traintel.strategy' is a required property"),
    ],
    ids=["checkpoint", "checkpoint-in-the-background", "run-start-fsdp", "run-start-single-process",
         "unknown-reason", "size-a-string", "background-null", "missing-stall-seconds", "checkpoint-of-1.4.0",
         "default-name", "unknown-strategy", "missing-strategy"],
)  # fmt: skip
def test_the_1_5_0_fields_and_record_in_the_ecs_profile(
    record: Any, change: dict[str, Any], message: str | None
) -> None:
    """``checkpoint`` and ``run.start``'s ``strategy`` (schema 1.5.0) as the ``ecs`` profile writes them,
    each a field under ``traintel.``: valid, and rejected with the exact path of a wrong value."""
    line = _ecs_line(record)
    validate_line(line, profile="ecs")
    check_ecs_fields(line, ecs_field_types())
    for key, value in change.items():
        if value is DROP:
            del line[key]
        else:
            line[key] = value
    if message is None:
        validate_line(line, profile="ecs")
        return
    with pytest.raises(RecordValidationError) as info:
        validate_line(line, profile="ecs")
    assert str(info.value).startswith(message), str(info.value)


# ----------------------------------------------------------------------------- real runs

_TASKS = """
class Flaky:
    name = "flaky"

    def open(self, context):
        pass

    def emit(self, record):
        raise OSError("bucket full: 507 Insufficient Storage")

    def close(self):
        pass


def flaky(**params):
    return Flaky()
"""

RUNS = {
    "run": ("--set", "trainer.max_epochs=2"),
    "sink-error": ("--set", "trainer.max_epochs=1", "--set", "sinks.extra=[{factory: 'ecs_tasks:flaky'}]"),
    "crash": ("--set", "task.factory=crashing:make_task", "--set", "task.params={}"),
}


def _train(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess[bytes]:
    (tmp_path / "ecs_tasks.py").write_text(textwrap.dedent(_TASKS), encoding="utf-8")
    write_crashing_task(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINTEL__")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    return run_child(
        [sys.executable, "-m", "traintel", "train", "--config", str(CONFIG), "--set", f"run.dir={tmp_path / 'run'}",
         "--set", "sinks.prometheus.port=0", "--set", "sinks.json.format=json", "--set", "sinks.json.profile=ecs",
         *overrides], text=False,
        cwd=tmp_path, env=env, timeout=300,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", list(RUNS))
def test_every_line_of_a_real_run_is_ecs_and_holds_the_default_profiles_values(
    tmp_path: Path, case: str
) -> None:
    proc = _train(tmp_path, *RUNS[case])
    assert proc.returncode == (1 if case == "crash" else 0), proc.stderr.decode()
    raw = proc.stdout.splitlines()
    assert validate_lines(raw, profile="ecs") == len(raw)
    lines = [json.loads(line) for line in raw]
    types = ecs_field_types()
    for line in lines:
        check_ecs_fields(line, types)
        if line["event.dataset"] == "traintel.records":
            assert line["event.action"] == line["message"]

    # the same records, in the same order, as the diagnostic file (default profile) has them
    diag = [json.loads(x) for x in (tmp_path / "run" / "diagnostic.jsonl").read_bytes().splitlines()]
    records = _record_lines(lines)
    assert len(records) == len(diag) > 3
    for ecs, default in zip(records, diag, strict=True):
        expected = [(k, v) for k, v in default.items() if k not in DIAGNOSTIC_ONLY | PER_SINK]
        got = [(k, v) for k, v in default_layout(ecs).items() if k not in PER_SINK]
        assert got == expected

    events = [line["message"] for line in records]
    assert events[0] == "run.start" and events[-1] == "run.end"
    if case == "run":
        assert {"train.batch", "train.step", "train.epoch", "eval.epoch"} <= set(events)
        assert len(records) == len(lines)  # no log line
    elif case == "sink-error":
        (error,) = [line for line in lines if line["message"] == "sink.error"]
        assert {k: v for k, v in error.items() if k.startswith(("error.", "traintel.sink", "log."))} == {
            "log.level": "warning", "traintel.sink": "flaky",
            "error.type": "OSError", "error.message": "bucket full: 507 Insufficient Storage",
        }  # fmt: skip
    else:
        (failed,) = [line for line in lines if line["message"] == "training failed"]
        assert {k: v for k, v in failed.items() if k not in {"@timestamp", "error.stack_trace"}} == {
            "log.level": "error", "message": "training failed", "ecs.version": ECS_VERSION,
            "event.dataset": "traintel.log", "log.logger": "traintel",
            "error.type": "RuntimeError", "error.message": CRASH_MESSAGE,
        }  # fmt: skip
        trace = failed["error.stack_trace"]
        assert trace.startswith("Traceback (most recent call last):\n")
        assert trace.endswith(f"    raise RuntimeError({CRASH_MESSAGE!r})\nRuntimeError: {CRASH_MESSAGE}\n")
        end = records[-1]
        assert (end["log.level"], end["traintel.status"], end["traintel.reason"]) == (
            "error", "failed", f"RuntimeError: {CRASH_MESSAGE}",
        )  # fmt: skip
        assert (end["error.type"], end["error.message"]) == ("RuntimeError", CRASH_MESSAGE)
    if case != "crash":
        assert "error.message" not in records[-1]


def test_a_deep_copy_of_a_valid_line_with_one_wrong_ecs_type_fails_the_field_check() -> None:
    types = ecs_field_types()
    check_ecs_fields(_LINE, types)
    for key, wrong in (("@timestamp", "yesterday"), ("error.type", 7), ("log.level", None)):
        line = copy.deepcopy(_LINE)
        line[key] = wrong
        with pytest.raises(AssertionError, match=f"{key}: "):
            check_ecs_fields(line, types)
    with pytest.raises(AssertionError, match="'run_id' is not an ECS field"):
        check_ecs_fields({**_LINE, "run_id": "r1"}, types)


def test_a_failed_run_end_has_its_reason_as_error_fields_and_only_a_failed_one() -> None:
    renderer = JsonSink(profile="ecs")
    failed = json.loads(renderer.render(end_record(status="failed", reason="rank 1: OSError: disk full")))
    assert (failed["traintel.reason"], failed["error.message"]) == ("rank 1: OSError: disk full",) * 2
    assert "error.type" not in failed  # the reason does not start with a class name
    crashed = json.loads(renderer.render(end_record(status="failed", reason="KeyError: 'x'")))
    assert (crashed["error.type"], crashed["error.message"]) == ("KeyError", "'x'")
    completed = json.loads(renderer.render(end_record()))
    assert not [key for key in completed if key.startswith("error.")]
    for line in (failed, crashed, completed):
        validate_line(line, profile="ecs")
    with pytest.raises(RecordValidationError):
        validate_line({k: v for k, v in crashed.items() if not k.startswith("error.")}, profile="ecs")
    with pytest.raises(RecordValidationError):
        validate_line({**completed, "error.message": "stale"}, profile="ecs")
