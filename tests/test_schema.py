"""The published JSON Schema of traintel's JSON lines (traintel/schemas/records.schema.json).

Every line a real run writes to stdout and to diagnostic.jsonl validates; hand-edited lines are
accepted or rejected exactly as the table below says; the schema follows the record dataclasses
field for field, so adding a field to a record without a schema change fails here.

Decisions the table pins down:

* a float field is a number, or null only when its value was not finite, and then ``nonfinite``
  names it with ``nan``/``inf``/``-inf``: ``"loss": null`` without that entry is rejected, and so is
  a ``nonfinite`` entry for a field that holds a number. ``grad_norm`` and ``observed_loss_scale``
  are null by design too (not reported / not computable), so null without an entry is valid for them;
* integers must be JSON integers: ``"epoch": 1.0`` is rejected by ``traintel.schema.validate_line``
  (a stock draft 2020-12 validator would accept it);
* the diagnostic extras of ``train.batch`` are optional in the schema (one schema for both files)
  but all-or-nothing; stdout lines are checked here not to carry them;
* any event other than the record events is a routed log line: permissive, but
  ``timestamp``, ``level`` and ``event`` are required and typed;
* ``rank`` (integer >= 0) and ``world_size`` (integer >= 1), added in 1.1.0, are required on every
  record line except a 1.0.0 one: lines written by traintel 1.0.0 still validate. Routed log lines
  carry neither;
* ``attempt`` (integer >= 0), added in 1.2.0 right after ``world_size``, is required on every record
  line except a 1.0.0 or 1.1.0 one, and so are ``run.start``'s ``resumed_from_step`` (integer >= 0
  or null) and ``items_total``: older lines still validate, and a routed log line carries none;
* ``train.step``'s ``grad_scale`` (number, or null without a gradient scaler: null by design) and
  ``eval.epoch``'s ``split`` (string), added in 1.3.0, are required from 1.3.0 on;
* ``train.step``'s ``metrics`` (an object of numbers by name), added in 1.4.0, is required from
  1.4.0 on, and the ``metric`` record exists from 1.4.0 on; a non-finite metric value is null and
  named ``metrics.<name>`` in ``nonfinite``;
* ``run.start``'s ``strategy`` (``ddp``, ``fsdp`` or null), added in 1.5.0, is required from 1.5.0 on,
  and the ``checkpoint`` record exists from 1.5.0 on: closed, every field required, its ``reason``
  one of the five ways a checkpoint is taken, its seconds null only when not finite.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import sys
import types
import typing
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from ignite.engine import Events

from tests.helpers.children import run_child
from tests.helpers.paths import ROOT
from tests.helpers.runs import quiet_config
from tests.helpers.tasks import loss_failing_at, make_batches, make_model
from traintel.records import RECORD_TYPES, SCHEMA_VERSION, Record
from traintel.run.api import build
from traintel.schema import SCHEMA_PATH, RecordValidationError, load_schema, validate_line, validate_lines
from traintel.sinks.memory import MemorySink
from traintel.task import Task

jsonschema = pytest.importorskip("jsonschema")

REPO = ROOT
RECORD_EVENTS = [cls.event for cls in RECORD_TYPES]
ENVELOPE = {"timestamp", "level", "event", "run_id", "schema_version"}
SINCE_1_1 = {"rank", "world_size"}
"""Record fields required unless the line's schema_version is 1.0.0 (``$defs/record``)."""
RUN_START_SINCE_1_1 = {"backend", "restart_count"}
"""run.start's fields added in 1.1.0 (required from 1.1.0 on, absent from 1.0.0 lines)."""
SINCE_1_2 = {"attempt"}
"""Record fields required unless the line's schema_version is 1.0.0 or 1.1.0 (``$defs/record``)."""
RUN_START_SINCE_1_2 = {"resumed_from_step", "items_total"}
"""run.start's fields added in 1.2.0 (required from 1.2.0 on, absent from older lines)."""
RUN_START_SINCE_1_3 = ["optimizer", "scheduler"]
"""run.start's fields added in 1.3.0, last and in this order (required from 1.3.0 on)."""
SINCE_1_3 = {"train.step": ["grad_scale"], "eval.epoch": ["split", "metrics"]}
"""The field each event gained in 1.3.0 (required from 1.3.0 on, absent from older lines)."""
SINCE_1_4 = {"train.step": ["metrics"]}
"""The field each event gained in 1.4.0 (required from 1.4.0 on, absent from older lines)."""
NEW_IN_1_4 = "metric"
"""The record event added in 1.4.0: a line of an older version is none."""
RUN_START_SINCE_1_5 = ["strategy"]
"""run.start's field added in 1.5.0, right after ``backend`` (required from 1.5.0 on)."""
NEW_IN_1_5 = "checkpoint"
"""The record event added in 1.5.0: a line of an older version is none."""
NEW_EVENTS = (NEW_IN_1_4, NEW_IN_1_5)
"""The record events added after 1.3.0: a 1.0.0 to 1.3.0 line is none of them."""
_BEFORE_1_1 = {"if": {"properties": {"schema_version": {"const": "1.0.0"}}, "required": ["schema_version"]}}
_BEFORE_1_2 = {
    "if": {"properties": {"schema_version": {"enum": ["1.0.0", "1.1.0"]}}, "required": ["schema_version"]}
}
_BEFORE_1_3 = {
    "if": {
        "properties": {"schema_version": {"enum": ["1.0.0", "1.1.0", "1.2.0"]}},
        "required": ["schema_version"],
    }
}
_BEFORE_1_4 = {
    "if": {
        "properties": {"schema_version": {"enum": ["1.0.0", "1.1.0", "1.2.0", "1.3.0"]}},
        "required": ["schema_version"],
    }
}
_BEFORE_1_5 = {
    "if": {
        "properties": {"schema_version": {"enum": ["1.0.0", "1.1.0", "1.2.0", "1.3.0", "1.4.0"]}},
        "required": ["schema_version"],
    }
}
_OLDER_THAN = {NEW_IN_1_4: _BEFORE_1_4, NEW_IN_1_5: _BEFORE_1_5}
"""Each record event added after 1.3.0, and the rule of the versions before it."""
_CHILD_TIMEOUT = 240


def _defs() -> dict[str, Any]:
    defs: dict[str, Any] = load_schema()["$defs"]
    return defs


def _diagnostic_only() -> set[str]:
    return set(_defs()["train.batch"]["x-diagnostic-only"])


def _lines(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.splitlines()]


# ----------------------------------------------------------------------------- the schema itself


def test_schema_is_a_valid_draft_2020_12_schema_of_this_version() -> None:
    schema = load_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert SCHEMA_PATH.is_file() and SCHEMA_PATH.parent.name == "schemas"
    assert schema["$id"].endswith(f":{SCHEMA_VERSION}")
    older = ["1.0.0", "1.1.0", "1.2.0", "1.3.0", "1.4.0"]
    assert schema["$defs"]["schema_version"]["enum"] == [*older, SCHEMA_VERSION]
    assert SCHEMA_VERSION == "1.5.0"
    assert set(RECORD_EVENTS) <= set(schema["$defs"]), "every record event has a definition"
    assert load_schema() is not load_schema(), "callers get their own copy"


def _json_types(annotation: Any) -> set[str]:
    """The JSON types a field of this Python type may take once rendered (floats may be null)."""
    args = set(typing.get_args(annotation)) if isinstance(annotation, types.UnionType) else {annotation}
    out = {"null"} if type(None) in args else set()
    for arg in args - {type(None)}:
        origin = typing.get_origin(arg) or arg
        if arg is bool:
            out.add("boolean")
        elif arg is int:
            out.add("integer")
        elif arg is float:
            out |= {"number", "null"}  # non-finite -> null + nonfinite
        elif arg is str:
            out.add("string")
        elif isinstance(origin, type) and issubclass(origin, Mapping):
            out.add("object")
        else:  # pragma: no cover - a new field type needs a mapping here and in the schema
            pytest.fail(f"no JSON type for {arg!r}")
    return out


def _schema_types(prop: Mapping[str, Any], defs: Mapping[str, Any]) -> set[str]:
    if "$ref" in prop:
        merged = {**defs[prop["$ref"].removeprefix("#/$defs/")], **prop}
        merged.pop("$ref")
        return _schema_types(merged, defs)
    if "type" in prop:
        return {prop["type"]} if isinstance(prop["type"], str) else set(prop["type"])
    values = prop["enum"] if "enum" in prop else [prop["const"]]
    names = {str: "string", bool: "boolean", int: "integer", float: "number", type(None): "null"}
    return {names[type(v)] for v in values}


@pytest.mark.parametrize("cls", RECORD_TYPES, ids=RECORD_EVENTS)
def test_each_record_definition_follows_its_dataclass(cls: type[Record]) -> None:
    """Same field names, JSON types from the Python types; closed to anything else."""
    defs = _defs()
    definition = defs[cls.event]
    props = definition["properties"]
    hints = typing.get_type_hints(cls)
    names = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in {"run_id", "time", "diagnostics"} and not f.name.startswith("_")
    ]
    extras = _diagnostic_only() if cls.event == "train.batch" else set()

    assert definition["additionalProperties"] is False
    assert names[:3] == ["rank", "world_size", "attempt"], "base fields first: right after schema_version"
    since = SINCE_1_1 | SINCE_1_2
    if cls.event == "run.start":
        since |= RUN_START_SINCE_1_1 | RUN_START_SINCE_1_2 | set(RUN_START_SINCE_1_3 + RUN_START_SINCE_1_5)
        assert names[-2:] == RUN_START_SINCE_1_3, "fields added in a minor version come last"
        assert names[names.index("backend") + 1 :][:1] == RUN_START_SINCE_1_5, "strategy: right after backend"
    later = SINCE_1_4.get(cls.event, [])
    if cls.event in SINCE_1_3:
        added = SINCE_1_3[cls.event]
        since |= set(added)
        assert names[len(names) - len(later) - len(added) :][: len(added)] == added, "added fields come last"
        assert definition["allOf"][0] == {**_BEFORE_1_3, "else": {"required": added}}
    if later:
        since |= set(later)
        assert names[-len(later) :] == later, "fields added in a minor version come last"
        assert definition["allOf"][1] == {**_BEFORE_1_4, "else": {"required": later}}
    if cls.event in _OLDER_THAN:  # a record event added after 1.3.0: no line of an older version
        assert props["schema_version"] == {
            "$ref": "#/$defs/schema_version",
            "not": _OLDER_THAN[cls.event]["if"]["properties"]["schema_version"],
        }
    assert set(definition["required"]) == ENVELOPE | set(names) - since
    if cls.event == "run.start":
        assert definition["allOf"] == [
            {**_BEFORE_1_1, "else": {"required": sorted(RUN_START_SINCE_1_1)}},
            {**_BEFORE_1_2, "else": {"required": sorted(RUN_START_SINCE_1_2)}},
            {**_BEFORE_1_3, "else": {"required": RUN_START_SINCE_1_3}},
            {**_BEFORE_1_5, "else": {"required": RUN_START_SINCE_1_5}},
        ]
    assert defs["record"]["allOf"] == [
        {**_BEFORE_1_1, "else": {"required": sorted(SINCE_1_1)}},
        {**_BEFORE_1_2, "else": {"required": sorted(SINCE_1_2)}},
    ]
    optional = {"dropped"} | extras | ({"nonfinite"} if "nonfinite" in props else set())
    assert set(props) == ENVELOPE | set(names) | optional
    assert props["event"] == {"const": cls.event}
    if cls.event != "run.end":  # run.end: info, or error when failed (see the table)
        assert props["level"] == {"const": cls.level}
    for name in names:
        assert _schema_types(props[name], defs) == _json_types(hints[name]), name
    floats = [n for n in names if "number" in _json_types(hints[n])]
    floats += [n for n in extras if "number" in _schema_types(props[n], defs)]
    nested = {"pattern": "^metrics\\.[A-Za-z_][A-Za-z0-9_]{0,63}$"}  # a metric's value: metrics.<name>
    if floats:
        keys = props["nonfinite"]["propertyNames"]
        if "metrics" in names:
            assert keys["anyOf"][1] == nested
            keys = keys["anyOf"][0]
        assert set(keys["enum"]) == set(floats)
    elif "metrics" in names:
        assert props["nonfinite"]["propertyNames"] == nested
    else:
        assert "nonfinite" not in props


def test_units_are_in_the_names() -> None:
    """Durations end in _seconds (numbers), byte counts in _bytes (integers), as in the Prometheus names."""
    defs = _defs()
    names: set[str] = set()
    for event in RECORD_EVENTS:
        for name, prop in defs[event]["properties"].items():
            names.add(name)
            if name.endswith("_seconds"):
                assert _schema_types(prop, defs) <= {"number", "null"}, name
            if name.endswith("_bytes"):
                assert _schema_types(prop, defs) <= {"integer", "null"}, name
    for name in names:
        if any(word in name for word in ("duration", "elapsed", "latency")):
            assert name.endswith("_seconds"), name
        if any(word in name for word in ("rss", "memory", "allocated")):
            assert name.endswith("_bytes"), name
    assert {"duration_seconds", "rss_bytes", "cuda_allocated_bytes"} <= names


# ----------------------------------------------------------------------------- a real run, end to end


@pytest.mark.slow
def test_every_line_of_a_real_cli_run_validates(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINTEL__")}
    proc = run_child(
        [
            sys.executable, "-m", "traintel", "train",
            "--config", str(REPO / "configs" / "default.yaml"),
            "--set", f"run.dir={run_dir}",
            "--set", "trainer.max_epochs=2",
            "--set", "telemetry.every=1",
            "--set", "sinks.prometheus.port=0",
        ], text=False,
        cwd=tmp_path, env=env, timeout=_CHILD_TIMEOUT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    stdout = proc.stdout.splitlines()
    diagnostic = (run_dir / "diagnostic.jsonl").read_bytes().splitlines()

    assert validate_lines(stdout) == len(stdout) > 0
    assert validate_lines(diagnostic) == len(diagnostic) > 0

    out_rows, diag_rows = _lines(proc.stdout), _lines((run_dir / "diagnostic.jsonl").read_bytes())
    out_events = Counter(r["event"] for r in out_rows if r["event"] in RECORD_EVENTS)
    diag_events = Counter(r["event"] for r in diag_rows)
    for event in ("train.batch", "train.step", "train.epoch", "eval.epoch", "run.start", "run.end"):
        assert out_events[event] >= 1 and diag_events[event] >= 1, event
    assert out_events == diag_events
    assert (out_events["run.start"], out_events["run.end"], out_events["train.epoch"]) == (1, 1, 2)

    extras = _diagnostic_only()
    for row in out_rows:
        if row["event"] == "train.batch":
            assert not extras & row.keys(), row
    for row in diag_rows:
        if row["event"] == "train.batch":
            core = {"expected_loss_scale", "observed_loss_scale", "scale_ok", "accumulation_position"}
            assert core <= row.keys() and row["scale_ok"] is True, row


# ----------------------------------------------------------------------------- hand-edited lines

TS = "2025-11-24T16:00:00.250000Z"
_HEAD = {"timestamp": TS, "level": "info"}
_RUN = {"run_id": "r1", "schema_version": "1.5.0", "rank": 0, "world_size": 1, "attempt": 0}
VALID: dict[str, dict[str, Any]] = {
    "train.batch": {**_HEAD, "event": "train.batch", **_RUN, "epoch": 1, "batch": 2, "batches": 10,
                    "step": 0, "items": 4, "raw_loss": 0.75, "loss": 0.25, "loss_scale": 0.3333333333333333,
                    "window_size": 3},
    "train.step": {**_HEAD, "event": "train.step", **_RUN, "epoch": 1, "step": 1, "items": 12,
                   "items_total": 12, "window_size": 3, "loss": 0.7, "lr": 0.001, "grad_norm": None,
                   "skipped": False, "grad_scale": None, "metrics": {}},
    "train.epoch": {**_HEAD, "event": "train.epoch", **_RUN, "epoch": 1, "step": 11, "loss": 0.86,
                    "items": 1000, "batches": 32, "duration_seconds": 0.037, "items_per_second": 26692.7,
                    "items_total": 1000, "steps": 11},
    "eval.epoch": {**_HEAD, "event": "eval.epoch", **_RUN, "epoch": 1, "step": 11, "loss": 0.52,
                   "items": 250, "batches": 8, "duration_seconds": 0.003, "items_per_second": 83412.5,
                   "split": "val", "metrics": {}},
    "run.start": {**_HEAD, "event": "run.start", **_RUN, "name": "demo", "run_dir": "runs/r1",
                  "device": "cpu", "config": {"run": {"name": "demo"}}, "metrics_url": None, "backend": None,
                  "strategy": None, "restart_count": 0,
                  "resumed_from_step": None, "items_total": 0, "optimizer": "torch.optim.adamw.AdamW",
                  "scheduler": None},
    "run.end": {**_HEAD, "event": "run.end", **_RUN, "status": "completed", "reason": "max_epochs",
                "epoch": 2, "step": 22, "items_total": 2000, "duration_seconds": 0.07},
    "metric": {**_HEAD, "event": "metric", **_RUN, "epoch": 1, "step": 11, "metrics": {"val_bleu": 31.25}},
    "checkpoint": {**_HEAD, "event": "checkpoint", **_RUN, "step": 11, "epoch": 1, "reason": "every_steps",
                   "size_bytes": 1048576, "write_seconds": 0.125, "stall_seconds": 0.125, "background": False},
    "sink.error": {**_HEAD, "level": "warning", "event": "sink.error", **_RUN, "sink": "flaky",
                   "error": "OSError: remote store unavailable"},
    "log": {"timestamp": TS, "level": "warning", "event": "Attach a handler", "logger": "ignite.engine"},
}  # fmt: skip
DIAG_EXTRAS = {"expected_loss_scale": 0.3333333333333333, "observed_loss_scale": 0.3333333333333333,
               "scale_ok": True, "accumulation_position": 2, "window_items": 12, "loss_dtype": "float32",
               "rss_bytes": 353501184}  # fmt: skip
DROP = object()
"""In ``Case.changes``: remove the key."""
NOT_YET = {"grad_scale": DROP, "split": DROP, "metrics": DROP, "strategy": DROP}
"""In ``Case.changes``: remove the fields added in 1.3.0 and later, as a line of an older version has none."""


@dataclass(frozen=True)
class Case:
    """One hand-edited line: ``base`` with ``changes`` applied (or ``raw`` text), and the verdict.

    ``error`` is None when the line must validate, else a fragment of the expected message.
    """

    id: str
    base: str
    changes: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    raw: str | None = None

    def text(self) -> str:
        if self.raw is not None:
            return self.raw
        line = dict(VALID[self.base])
        for key, value in self.changes.items():
            if value is DROP:
                line.pop(key, None)
            else:
                line[key] = value
        return json.dumps(line)


NONFINITE_NULL = {"loss": None, "nonfinite": {"loss": "nan"}}
CASES = [
    *(Case(f"valid-{event}", event) for event in VALID),
    Case("diagnostic-batch-with-extras", "train.batch", DIAG_EXTRAS),
    Case("diagnostic-batch-on-cuda", "train.batch",
         {**DIAG_EXTRAS, "cuda_allocated_bytes": 1024, "cuda_max_allocated_bytes": 2048}),
    Case("extras-are-all-or-nothing", "train.batch", {"scale_ok": True}, "'expected_loss_scale' is a dependency"),
    Case("cuda-extras-come-in-pairs", "train.batch", {**DIAG_EXTRAS, "cuda_allocated_bytes": 1},
         "'cuda_max_allocated_bytes' is a dependency"),
    Case("loss-dtype-enum", "train.batch", {**DIAG_EXTRAS, "loss_dtype": "torch.float32"}, "is not one of"),
    Case("rss-unreadable-is-null", "train.batch", {**DIAG_EXTRAS, "rss_bytes": None}),
    Case("scale-check-not-computable", "train.batch",
         {**DIAG_EXTRAS, "observed_loss_scale": None, "scale_ok": None}),
    Case("loss-wrong-type", "train.step", {"loss": "0.7"}, "'0.7' is not of type 'number', 'null'"),
    Case("integer-written-as-float", "train.step", {"epoch": 1.0}, "1.0 is not of type 'integer'"),
    Case("bool-is-not-an-integer", "train.batch", {"items": True}, "True is not of type 'integer'"),
    Case("negative-count", "train.step", {"items": -1}, "-1 is less than the minimum of 0"),
    Case("epoch-is-1-based", "train.batch", {"epoch": 0}, "0 is less than the minimum of 1"),
    Case("missing-required-field", "train.step", {"items": DROP}, "'items' is a required property"),
    Case("missing-schema-version", "run.end", {"schema_version": DROP}, "'schema_version' is a required"),
    Case("wrong-schema-version", "train.epoch", {"schema_version": "1.0.1"},
         "train.epoch $.schema_version: '1.0.1' is not one of ['1.0.0', '1.1.0', '1.2.0', '1.3.0', '1.4.0', '1.5.0']"),
    Case("future-minor-version", "train.step", {"schema_version": "1.6.0"},
         "train.step $.schema_version: '1.6.0' is not one of ['1.0.0', '1.1.0', '1.2.0', '1.3.0', '1.4.0', '1.5.0']"),
    *(Case(f"version-1.0.0-without-rank-{event}", event,
           {"schema_version": "1.0.0", "rank": DROP, "world_size": DROP, "attempt": DROP, **NOT_YET})
      for event in RECORD_EVENTS if event not in NEW_EVENTS),
    *(Case(f"version-1.1.0-without-attempt-{event}", event,
           {"schema_version": "1.1.0", "attempt": DROP, **NOT_YET})
      for event in RECORD_EVENTS if event not in ("run.start", *NEW_EVENTS)),
    *(Case(f"version-1.2.0-without-1.3.0-fields-{event}", event, {"schema_version": "1.2.0", **NOT_YET})
      for event in RECORD_EVENTS if event not in NEW_EVENTS),
    *(Case(f"version-1.3.0-without-1.4.0-fields-{event}", event, {"schema_version": "1.3.0", "metrics": DROP})
      for event in SINCE_1_4),
    Case("version-1.3.0-run-start-without-strategy", "run.start", {"schema_version": "1.3.0", "strategy": DROP}),
    Case("version-1.4.0-run-start-without-strategy", "run.start", {"schema_version": "1.4.0", "strategy": DROP}),
    Case("version-1.4.0-run-start-may-carry-strategy", "run.start", {"schema_version": "1.4.0", "strategy": "ddp"}),
    Case("version-1.4.0-strategy-still-typed", "run.start", {"schema_version": "1.4.0", "strategy": "zero3"},
         "run.start $.strategy: 'zero3' is not one of ['ddp', 'fsdp', None]"),
    Case("missing-run-start-strategy", "run.start", {"strategy": DROP},
         "run.start $: 'strategy' is a required property"),
    Case("run-start-strategy-ddp", "run.start", {"world_size": 2, "backend": "gloo", "strategy": "ddp"}),
    Case("run-start-strategy-fsdp", "run.start", {"world_size": 8, "backend": "nccl", "strategy": "fsdp"}),
    Case("run-start-strategy-unknown", "run.start", {"strategy": "deepspeed"},
         "run.start $.strategy: 'deepspeed' is not one of ['ddp', 'fsdp', None]"),
    Case("run-start-strategy-upper-case", "run.start", {"strategy": "FSDP"},
         "run.start $.strategy: 'FSDP' is not one of ['ddp', 'fsdp', None]"),
    Case("run-start-strategy-a-bool", "run.start", {"strategy": True},
         "run.start $.strategy: True is not one of ['ddp', 'fsdp', None]"),
    Case("checkpoint-of-version-1.4.0", "checkpoint", {"schema_version": "1.4.0"},
         "checkpoint $.schema_version: '1.4.0' should not be valid under"),
    Case("checkpoint-in-the-background", "checkpoint",
         {"rank": 3, "world_size": 4, "attempt": 1, "background": True, "write_seconds": 2.5, "stall_seconds": 0.0625}),
    *(Case(f"checkpoint-reason-{reason}", "checkpoint", {"reason": reason})
      for reason in ("every_steps", "every_epochs", "signal", "max_steps", "best")),
    Case("checkpoint-before-the-first-epoch", "checkpoint", {"step": 0, "epoch": 0}),
    Case("checkpoint-of-nothing", "checkpoint", {"size_bytes": 0, "write_seconds": 0, "stall_seconds": 0}),
    Case("checkpoint-reason-unknown", "checkpoint", {"reason": "manual"},
         "checkpoint $.reason: 'manual' is not one of ['every_steps', 'every_epochs', 'signal', 'max_steps', 'best']"),
    Case("checkpoint-reason-a-config-key", "checkpoint", {"reason": "on_signal"},
         "checkpoint $.reason: 'on_signal' is not one of ['every_steps', 'every_epochs', 'signal', 'max_steps', 'best']"),
    *(Case(f"checkpoint-missing-{name}", "checkpoint", {name: DROP}, f"checkpoint $: '{name}' is a required property")
      for name in ("step", "epoch", "reason", "size_bytes", "write_seconds", "stall_seconds", "background")),
    Case("checkpoint-size-a-string", "checkpoint", {"size_bytes": "1048576"},
         "checkpoint $.size_bytes: '1048576' is not of type 'integer'"),
    Case("checkpoint-size-a-float", "checkpoint", {"size_bytes": 1048576.0},
         "checkpoint $.size_bytes: 1048576.0 is not of type 'integer'"),
    Case("checkpoint-size-negative", "checkpoint", {"size_bytes": -1},
         "checkpoint $.size_bytes: -1 is less than the minimum of 0"),
    Case("checkpoint-step-a-float", "checkpoint", {"step": 11.0}, "checkpoint $.step: 11.0 is not of type 'integer'"),
    Case("checkpoint-epoch-negative", "checkpoint", {"epoch": -1},
         "checkpoint $.epoch: -1 is less than the minimum of 0"),
    Case("checkpoint-background-an-integer", "checkpoint", {"background": 1},
         "checkpoint $.background: 1 is not of type 'boolean'"),
    Case("checkpoint-write-seconds-a-string", "checkpoint", {"write_seconds": "0.125"},
         "checkpoint $.write_seconds: '0.125' is not of type 'number', 'null'"),
    Case("checkpoint-stall-seconds-negative", "checkpoint", {"stall_seconds": -0.5},
         "checkpoint $.stall_seconds: -0.5 is less than the minimum of 0"),
    Case("checkpoint-write-seconds-nonfinite", "checkpoint",
         {"write_seconds": None, "nonfinite": {"write_seconds": "inf"}}),
    Case("checkpoint-stall-seconds-null-without-nonfinite", "checkpoint", {"stall_seconds": None},
         "checkpoint $: 'nonfinite' is a required property"),
    Case("checkpoint-nonfinite-names-a-count", "checkpoint", {"nonfinite": {"size_bytes": "nan"}},
         "checkpoint $.nonfinite: 'size_bytes' is not one of ['write_seconds', 'stall_seconds']"),
    Case("checkpoint-level-warning", "checkpoint", {"level": "warning"}, "checkpoint $.level: 'info' was expected"),
    Case("checkpoint-unknown-field", "checkpoint", {"path": "checkpoints/step-11"},
         "checkpoint $: Additional properties are not allowed ('path' was unexpected)"),
    Case("version-1.3.0-eval-still-has-metrics", "eval.epoch", {"schema_version": "1.3.0"}),
    Case("missing-step-metrics", "train.step", {"metrics": DROP}, "train.step $: 'metrics' is a required property"),
    Case("step-metrics", "train.step", {"metrics": {"accuracy": 0.5, "ppl": 12.0}}),
    Case("step-metric-nonfinite", "train.step", {"metrics": {"accuracy": None}, "nonfinite": {"metrics.accuracy": "nan"}}),
    Case("step-metric-a-string", "train.step", {"metrics": {"accuracy": "0.5"}},
         "train.step $.metrics.accuracy: '0.5' is not of type 'number', 'null'"),
    Case("nonfinite-names-a-metric-badly", "train.step", {"nonfinite": {"metrics.top-1": "nan"}},
         "train.step $.nonfinite: 'metrics.top-1' is not valid under any of the given schemas"),
    Case("eval-metric-nonfinite", "eval.epoch", {"metrics": {"mae": None}, "nonfinite": {"metrics.mae": "inf"}}),
    Case("metric-of-version-1.3.0", "metric", {"schema_version": "1.3.0"},
         "metric $.schema_version: '1.3.0' should not be valid under"),
    Case("metric-without-values", "metric", {"metrics": {}}, "metric $.metrics: {} should be non-empty"),
    Case("metric-before-the-first-epoch", "metric", {"epoch": 0, "step": 0}),
    Case("metric-nonfinite", "metric", {"metrics": {"val_bleu": None}, "nonfinite": {"metrics.val_bleu": "nan"}}),
    Case("metric-nonfinite-names-a-field", "metric", {"nonfinite": {"step": "nan"}},
         "metric $.nonfinite: 'step' does not match"),
    Case("metric-missing-step", "metric", {"step": DROP}, "metric $: 'step' is a required property"),
    Case("version-1.2.0-step-without-grad-scale", "train.step", {"schema_version": "1.2.0", "grad_scale": DROP}),
    Case("version-1.2.0-eval-without-split", "eval.epoch", {"schema_version": "1.2.0", "split": DROP}),
    Case("version-1.2.0-may-carry-grad-scale", "train.step", {"schema_version": "1.2.0", "grad_scale": 1024.0}),
    Case("version-1.2.0-grad-scale-still-typed", "train.step", {"schema_version": "1.2.0", "grad_scale": "1024"},
         "train.step $.grad_scale: '1024' is not of type 'number', 'null'"),
    Case("version-1.2.0-split-still-typed", "eval.epoch", {"schema_version": "1.2.0", "split": None},
         "eval.epoch $.split: None is not of type 'string'"),
    Case("missing-grad-scale", "train.step", {"grad_scale": DROP},
         "train.step $: 'grad_scale' is a required property"),
    Case("missing-split", "eval.epoch", {"split": DROP}, "eval.epoch $: 'split' is a required property"),
    Case("grad-scale-of-fp16", "train.step", {"grad_scale": 65536.0}),
    Case("grad-scale-an-integer", "train.step", {"grad_scale": 65536}),
    Case("grad-scale-a-string", "train.step", {"grad_scale": "65536.0"},
         "train.step $.grad_scale: '65536.0' is not of type 'number', 'null'"),
    Case("grad-scale-a-bool", "train.step", {"grad_scale": True},
         "train.step $.grad_scale: True is not of type 'number', 'null'"),
    Case("grad-scale-nonfinite-names-a-number", "train.step",
         {"grad_scale": 1024.0, "nonfinite": {"grad_scale": "inf"}}, "train.step $.grad_scale: None was expected"),
    Case("split-of-another-loader", "eval.epoch", {"split": "test"}),
    Case("eval-metrics", "eval.epoch", {"metrics": {"accuracy": 0.75, "mae": None}}),
    Case("missing-eval-metrics", "eval.epoch", {"metrics": DROP}, "eval.epoch $: 'metrics' is a required property"),
    Case("version-1.2.0-eval-without-metrics", "eval.epoch", {"schema_version": "1.2.0", "split": DROP, "metrics": DROP}),
    Case("eval-metric-a-string", "eval.epoch", {"metrics": {"accuracy": "0.75"}},
         "eval.epoch $.metrics.accuracy: '0.75' is not of type 'number', 'null'"),
    Case("eval-metric-name-with-a-dash", "eval.epoch", {"metrics": {"top-1": 0.5}},
         "eval.epoch $.metrics: 'top-1' does not match '^[A-Za-z_][A-Za-z0-9_]{0,63}$'"),
    Case("split-a-number", "eval.epoch", {"split": 1}, "eval.epoch $.split: 1 is not of type 'string'"),
    Case("split-empty", "eval.epoch", {"split": ""}, "eval.epoch $.split: '' should be non-empty"),
    Case("split-on-a-step", "train.step", {"split": "val"}, "('split' was unexpected)"),
    Case("grad-scale-on-an-eval", "eval.epoch", {"grad_scale": None}, "('grad_scale' was unexpected)"),
    Case("version-1.1.0-run-start-without-1.2.0-fields", "run.start",
         {"schema_version": "1.1.0", "attempt": DROP, "resumed_from_step": DROP, "items_total": DROP,
          "optimizer": DROP, "scheduler": DROP}),
    Case("version-1.2.0-run-start-without-its-classes", "run.start",
         {"schema_version": "1.2.0", "optimizer": DROP, "scheduler": DROP}),
    Case("missing-run-start-optimizer", "run.start", {"optimizer": DROP},
         "run.start $: 'optimizer' is a required property"),
    Case("missing-run-start-scheduler", "run.start", {"scheduler": DROP},
         "run.start $: 'scheduler' is a required property"),
    Case("run-start-scheduler", "run.start", {"scheduler": "torch.optim.lr_scheduler.CosineAnnealingLR"}),
    Case("run-start-optimizer-empty", "run.start", {"optimizer": ""}, "run.start $.optimizer: '' should be non-empty"),
    Case("run-start-optimizer-null", "run.start", {"optimizer": None},
         "run.start $.optimizer: None is not of type 'string'"),
    Case("version-1.1.0-still-needs-rank", "train.step", {"schema_version": "1.1.0", "rank": DROP},
         "train.step $: 'rank' is a required property"),
    Case("version-1.1.0-attempt-still-typed", "train.batch", {"schema_version": "1.1.0", "attempt": -1},
         "train.batch $.attempt: -1 is less than the minimum of 0"),
    *(Case(f"missing-attempt-{event}", event, {"attempt": DROP}, f"{event} $: 'attempt' is a required property")
      for event in RECORD_EVENTS),
    Case("attempt-of-a-resumption", "train.step", {"attempt": 2}),
    Case("attempt-negative", "train.epoch", {"attempt": -1}, "train.epoch $.attempt: -1 is less than the minimum of 0"),
    Case("attempt-a-float", "eval.epoch", {"attempt": 1.0}, "eval.epoch $.attempt: 1.0 is not of type 'integer'"),
    Case("attempt-a-bool", "run.end", {"attempt": False}, "run.end $.attempt: False is not of type 'integer'"),
    Case("attempt-null", "sink.error", {"attempt": None}, "sink.error $.attempt: None is not of type 'integer'"),
    Case("run-start-of-a-resumption", "run.start", {"attempt": 1, "resumed_from_step": 120, "items_total": 1440}),
    Case("missing-resumed-from-step", "run.start", {"resumed_from_step": DROP},
         "run.start $: 'resumed_from_step' is a required property"),
    Case("missing-run-start-items-total", "run.start", {"items_total": DROP},
         "run.start $: 'items_total' is a required property"),
    Case("negative-resumed-from-step", "run.start", {"resumed_from_step": -1},
         "run.start $.resumed_from_step: -1 is less than the minimum of 0"),
    Case("resumed-from-step-a-string", "run.start", {"resumed_from_step": "120"},
         "run.start $.resumed_from_step: '120' is not of type 'integer', 'null'"),
    Case("negative-run-start-items-total", "run.start", {"items_total": -5},
         "run.start $.items_total: -5 is less than the minimum of 0"),
    Case("version-1.0.0-with-rank", "train.batch", {"schema_version": "1.0.0"}),
    Case("version-1.0.0-rank-still-typed", "train.batch", {"schema_version": "1.0.0", "rank": -1},
         "train.batch $.rank: -1 is less than the minimum of 0"),
    Case("rank-of-a-worker", "train.batch", {"rank": 3, "world_size": 4}),
    Case("rank-negative", "train.batch", {"rank": -1}, "train.batch $.rank: -1 is less than the minimum of 0"),
    Case("world-size-zero", "train.step", {"world_size": 0},
         "train.step $.world_size: 0 is less than the minimum of 1"),
    Case("rank-a-string", "run.end", {"rank": "0"}, "run.end $.rank: '0' is not of type 'integer'"),
    Case("rank-a-float", "train.epoch", {"rank": 1.0}, "train.epoch $.rank: 1.0 is not of type 'integer'"),
    Case("world-size-a-bool", "eval.epoch", {"world_size": True},
         "eval.epoch $.world_size: True is not of type 'integer'"),
    Case("rank-null", "sink.error", {"rank": None}, "sink.error $.rank: None is not of type 'integer'"),
    *(Case(f"missing-rank-{event}", event, {"rank": DROP}, f"{event} $: 'rank' is a required property")
      for event in RECORD_EVENTS),
    Case("missing-backend", "run.start", {"backend": DROP}, "run.start $: 'backend' is a required property"),
    Case("missing-restart-count", "run.start", {"restart_count": DROP},
         "run.start $: 'restart_count' is a required property"),
    Case("negative-restart-count", "run.start", {"restart_count": -1},
         "run.start $.restart_count: -1 is less than the minimum of 0"),
    Case("missing-world-size", "run.start", {"world_size": DROP},
         "run.start $: 'world_size' is a required property"),
    Case("log-line-needs-no-rank", "log", {"schema_version": "1.1.0"}),
    Case("log-line-needs-no-attempt", "log", {"schema_version": "1.2.0"}),
    Case("unknown-field-on-step", "train.step", {"momentum": 0.9}, "('momentum' was unexpected)"),
    Case("diagnostic-extras-only-on-batch", "train.step", {"rss_bytes": 1}, "('rss_bytes' was unexpected)"),
    Case("time-is-not-a-field", "run.end", {"time": 1.5}, "('time' was unexpected)"),
    Case("empty-run-id", "train.step", {"run_id": ""}, "should be non-empty"),
    Case("nan-literal", "train.step", raw=json.dumps({**VALID["train.step"], "loss": float("nan")}),
         error="NaN is not JSON"),
    Case("infinity-literal", "train.epoch",
         raw=json.dumps({**VALID["train.epoch"], "duration_seconds": float("-inf")}), error="-Infinity is not JSON"),
    Case("duplicate-key", "train.step", raw=f'{{"timestamp": "{TS}", "level": "info", "level": "info"}}',
         error="duplicate key 'level'"),
    Case("not-json", "train.step", raw='{"timestamp": ', error="not a JSON line"),
    Case("not-an-object", "train.step", raw="[1, 2]", error="is not of type 'object'"),
    Case("blank-line", "train.step", raw="", error="not a JSON line"),
    Case("timestamp-without-z", "train.step", {"timestamp": "2025-11-24T16:00:00.250000"}, "does not match"),
    Case("timestamp-with-offset", "train.step", {"timestamp": "2025-11-24T16:00:00.250000+00:00"}, "does not match"),
    Case("timestamp-milliseconds", "train.step", {"timestamp": "2025-11-24T16:00:00.250Z"}, "does not match"),
    Case("timestamp-no-fraction", "run.end", {"timestamp": "2025-11-24T16:00:00Z"}, "does not match"),
    Case("timestamp-bad-month", "run.end", {"timestamp": "2025-13-24T16:00:00.250000Z"}, "does not match"),
    Case("timestamp-unix-seconds", "run.end", {"timestamp": 1764000000.25}, "is not of type 'string'"),
    Case("level-enum", "log", {"level": "WARN"}, "is not one of"),
    Case("level-of-the-event", "train.step", {"level": "warning"}, "'info' was expected"),
    Case("run-end-failed-is-error", "run.end", {"status": "failed", "reason": "ValueError: x", "level": "error"}),
    Case("run-end-failed-as-info", "run.end", {"status": "failed", "level": "info"}, "'error' was expected"),
    Case("run-end-completed-as-error", "run.end", {"level": "error"}, "'info' was expected"),
    Case("run-end-status-enum", "run.end", {"status": "done"}, "is not one of"),
    Case("sink-error-is-a-warning", "sink.error", {"level": "error"}, "'warning' was expected"),
    Case("non-finite-loss-null-with-nonfinite", "train.step", NONFINITE_NULL),
    Case("non-finite-inf-and-minus-inf", "train.epoch", {"loss": None, "duration_seconds": None,
         "nonfinite": {"loss": "inf", "duration_seconds": "-inf"}}),
    Case("non-finite-loss-null-without-nonfinite", "train.step", {"loss": None}, "'nonfinite' is a required property"),
    Case("null-not-the-field-named", "train.batch", {"raw_loss": None, "nonfinite": {"loss": "nan"}},
         "'raw_loss' is a required property"),
    Case("nonfinite-names-a-finite-field", "train.step", {"nonfinite": {"loss": "nan"}}, "None was expected"),
    Case("nonfinite-bad-kind", "train.step", {**NONFINITE_NULL, "nonfinite": {"loss": "NaN"}}, "is not one of"),
    Case("nonfinite-names-an-integer-field", "train.step", {"nonfinite": {"items": "nan"}},
         "train.step $.nonfinite: 'items' is not valid under any of the given schemas"),
    Case("nonfinite-names-an-eval-count", "eval.epoch", {"nonfinite": {"items": "nan"}},
         "eval.epoch $.nonfinite: 'items' is not valid under any of the given schemas"),
    Case("nonfinite-names-a-run-end-float", "run.end", {"nonfinite": {"step": "nan"}}, "is not one of"),
    Case("nonfinite-empty", "train.step", {"nonfinite": {}}, "should be non-empty"),
    Case("nonfinite-on-a-record-without-floats", "run.start", {"nonfinite": {"config": "nan"}}, "was unexpected"),
    Case("grad-norm-not-reported-is-null", "train.step", {"grad_norm": None}),
    Case("grad-norm-non-finite", "train.step", {"grad_norm": None, "nonfinite": {"grad_norm": "inf"}}),
    Case("skipped-window-raw-loss-nan", "train.batch",
         {"items": 0, "raw_loss": None, "loss": 0.0, "loss_scale": 0.0, "nonfinite": {"raw_loss": "nan"}}),
    Case("no-length-loader", "train.batch", {"batches": None}),
    Case("metrics-url-when-enabled", "run.start", {"metrics_url": "http://127.0.0.1:9400/metrics"}),
    Case("dropped-count", "train.step", {"dropped": 5}),
    Case("dropped-zero-is-never-written", "train.step", {"dropped": 0}, "0 is less than the minimum of 1"),
    Case("log-with-exception-list", "log", {"level": "error", "exception": [{"exc_type": "ValueError"}]}),
    Case("log-with-exception-object", "log", {"level": "error", "exception": {"type": "ValueError"}}),
    Case("log-exception-must-be-structured", "log", {"exception": "Traceback ..."}, "is not of type 'object', 'array'"),
    Case("log-is-permissive", "log", {"logger": DROP, "anything": [1, {"x": None}]}),
    Case("log-needs-a-timestamp", "log", {"timestamp": DROP}, "'timestamp' is a required property"),
    Case("log-logger-is-a-string", "log", {"logger": 3}, "3 is not of type 'string'"),
    Case("log-custom-level-name", "log", {"level": "level 35"}, "'level 35' is not one of"),
    Case("event-missing", "log", {"event": DROP}, "'event' is a required property"),
    Case("event-not-a-string", "log", {"event": 3}, "3 is not of type 'string'"),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hand_edited_lines(case: Case) -> None:
    if case.error is None:
        assert validate_lines([case.text()]) == 1
        return
    with pytest.raises(RecordValidationError) as info:
        validate_lines([case.text()])
    assert case.error in str(info.value)
    assert str(info.value).startswith("line 1: "), str(info.value)
    assert info.value.line_number == 1


def test_errors_name_the_event_the_path_and_the_line() -> None:
    good = json.dumps(VALID["train.step"])
    bad = json.dumps({**VALID["train.step"], "loss": "x"})
    with pytest.raises(RecordValidationError) as info:
        validate_lines([good, good, bad])
    assert str(info.value) == "line 3: train.step $.loss: 'x' is not of type 'number', 'null'"
    assert (info.value.line_number, info.value.event, info.value.path) == (3, "train.step", "$.loss")
    validate_line(VALID["train.step"])  # no error
    with pytest.raises(RecordValidationError, match=r"^train.batch \$.nonfinite.loss: 'NaN' is not one of"):
        validate_line({**VALID["train.batch"], "loss": None, "nonfinite": {"loss": "NaN"}})


def test_validation_without_jsonschema_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import traintel.schema

    monkeypatch.setitem(sys.modules, "jsonschema", None)
    traintel.schema._validator.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"needs the 'jsonschema' package .*pip install"):
            validate_line(VALID["train.step"])
    finally:
        traintel.schema._validator.cache_clear()


# ----------------------------------------------------------------------------- in process, with a failing sink


class _FailsOnSteps(MemorySink):
    def emit(self, record: Record) -> None:
        if record.event == "train.step":
            raise OSError("remote store unavailable")
        super().emit(record)


def test_a_run_with_a_sink_error_and_non_finite_values_validates(tmp_path: Path) -> None:
    """json and diagnostic sinks with a failing plugin, a window with no items (raw_loss NaN) and a
    validation pass with no items (loss NaN); a warning logged during the run may be routed to stdout."""
    weights = [1, 1, 0, 0]
    train = [(x, y, w) for (x, y), w in zip(make_batches([4] * 4), weights, strict=True)]
    val = [(x, y, 0) for x, y in make_batches([3, 3], seed=1)]
    cfg = quiet_config(tmp_path, accumulation_steps=2, max_epochs=2, grad_clip_norm=1.0)
    cfg["sinks"]["json"] = {"enabled": True}
    cfg["sinks"]["diagnostic"] = {"enabled": True}
    stream = io.BytesIO()
    memory = MemorySink()
    task = Task(
        model=make_model(),
        loss_fn=torch.nn.functional.mse_loss,
        train_loader=train,
        val_loader=val,
        count_items=lambda b: len(b[1]) * b[2],
        prepare=lambda b, device: (b[0].to(device), b[1].to(device)),
    )
    run = build(cfg, task, sinks=[_FailsOnSteps("flaky"), memory], json_stream=stream)

    def warn(_: Any) -> None:
        logging.getLogger("tests.schema").warning("epoch done")

    run.trainer.add_event_handler(Events.EPOCH_COMPLETED, warn)
    end = run.run()
    run.close()

    assert end.status == "completed"
    stdout = stream.getvalue().splitlines()
    diagnostic = (tmp_path / "run" / "diagnostic.jsonl").read_bytes().splitlines()
    assert validate_lines(stdout) == len(stdout)
    assert validate_lines(diagnostic) == len(diagnostic)

    for rows in (_lines(stream.getvalue()), _lines(b"\n".join(diagnostic))):
        (error,) = [r for r in rows if r["event"] == "sink.error"]
        assert (error["sink"], error["error"], error["level"]) == (
            "flaky", "OSError: remote store unavailable", "warning"
        )  # fmt: skip
        skipped = [r for r in rows if r["event"] == "train.batch" and r["items"] == 0]
        assert skipped and all(
            r["raw_loss"] is None and r["nonfinite"] == {"raw_loss": "nan"} for r in skipped
        )
        evals = [r for r in rows if r["event"] == "eval.epoch"]
        assert len(evals) == 2 and all(r["loss"] is None and r["nonfinite"] == {"loss": "nan"} for r in evals)
        steps = [r for r in rows if r["event"] == "train.step"]
        assert [s["skipped"] for s in steps] == [False, True] * 2 and steps[1]["grad_norm"] is None
    assert [r.event for r in memory.records].count("sink.error") == 1


def test_a_failed_run_validates(tmp_path: Path) -> None:
    """run.end with status failed (level error) and, when stdlib logging is routed to stdout, the
    traceback as a structured log line: every line validates."""
    loss_fn = loss_failing_at(3, "diverged\nsecond line")
    cfg = quiet_config(tmp_path, accumulation_steps=2)
    cfg["sinks"]["json"] = {"enabled": True}
    cfg["sinks"]["diagnostic"] = {"enabled": True}
    stream = io.BytesIO()
    task = Task(model=make_model(), loss_fn=loss_fn, train_loader=make_batches([4] * 4))
    run = build(cfg, task, json_stream=stream)
    with pytest.raises(RuntimeError, match="diverged"):
        run.run()

    stdout = stream.getvalue().splitlines()
    diagnostic = (tmp_path / "run" / "diagnostic.jsonl").read_bytes().splitlines()
    assert validate_lines(stdout) == len(stdout)
    assert validate_lines(diagnostic) == len(diagnostic)
    for rows in (_lines(stream.getvalue()), _lines(b"\n".join(diagnostic))):
        end = rows[-1]
        assert (end["event"], end["status"], end["level"]) == ("run.end", "failed", "error")
        assert end["reason"].startswith("RuntimeError: diverged") and "\n" not in end["reason"]
