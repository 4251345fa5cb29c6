"""No record or log line is lost to text that is not valid Unicode.

A byte that is not UTF-8 reaches Python as a lone surrogate (``os.fsdecode``, ``os.environ``:
``b"\\xff"`` becomes ``"\\udcff"``), which orjson refuses ("str is not valid UTF-8: surrogates not
allowed"). Such text is written backslash-escaped: a surrogate that stands for a byte as ``\\xNN``,
any other lone surrogate as ``\\uNNNN``; valid text, non-ASCII included, is written as it is. The
subprocess tests run ``python -m traintel train`` for real.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import MappingProxyType

import orjson
import pytest

from tests.helpers.children import run_child
from traintel.schema import validate_lines
from traintel.sinks import JsonSink, LineRenderer
from traintel.sinks.json.lines import escape_surrogates
from traintel.testing import end_record

pytestmark = pytest.mark.slow

_TASKS = """
import logging
import os
import warnings

from traintel.tasks.forecast import make_task as base

FILE = os.fsdecode(b"/data/caf" + bytes([0xE9]) + b".csv")  # Latin-1, not UTF-8: "caf\\udce9"
NAME = os.fsdecode(b"x" + bytes([0xFF]) + b"y")


def small(**params):
    return base(train_samples=96, val_samples=32)


def warns(**params):
    task = base(train_samples=96, val_samples=32)
    loss_fn, calls = task.loss_fn, []

    def warning_loss(out, y):
        if not calls:
            warnings.warn("cannot read " + FILE)
            logging.getLogger("mytask").error("bad name %s", NAME)
        calls.append(1)
        return loss_fn(out, y)

    task.loss_fn = warning_loss
    return task
"""


def _train(
    tmp_path: Path, *overrides: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    (tmp_path / "nonutf8_tasks.py").write_text(textwrap.dedent(_TASKS), encoding="utf-8")
    base = {k: v for k, v in os.environ.items() if not k.startswith("TRAINTEL__")}
    base["PYTHONPATH"] = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    return run_child(
        [sys.executable, "-m", "traintel", "train", "--set", f"run.dir={tmp_path / 'run'}",
         "--set", "sinks.prometheus.port=0", "--set", "sinks.json.format=json",
         "--set", "trainer.max_epochs=1", *overrides], text=False,
        cwd=tmp_path, env={**base, **(env or {})}, timeout=120,
    )  # fmt: skip


@pytest.mark.parametrize("profile", ["default", "ecs"])
def test_a_task_param_that_is_not_utf8_reaches_stdout_and_the_diagnostic_file(
    tmp_path: Path, profile: str
) -> None:
    proc = _train(
        tmp_path, "--set", "task.factory=nonutf8_tasks:small", "--set", f"sinks.json.profile={profile}",
        env={"TRAINTEL__TASK__PARAMS__NAME": os.fsdecode(b"\xff")},  # the byte 0xff in the environment
    )  # fmt: skip
    assert (proc.returncode, proc.stderr) == (0, b"")
    stdout = proc.stdout.splitlines(keepends=True)
    diag = (tmp_path / "run" / "diagnostic.jsonl").read_bytes().splitlines(keepends=True)
    event = "message" if profile == "ecs" else "event"
    assert [json.loads(line)[event] for line in stdout] == [
        "run.start",
        "train.epoch",
        "eval.epoch",
        "run.end",
    ]
    assert [json.loads(line)["event"] for line in diag] == [
        "run.start",
        "train.epoch",
        "eval.epoch",
        "run.end",
    ]
    config = "traintel.config" if profile == "ecs" else "config"
    assert json.loads(stdout[0])[config]["task"]["params"] == {"name": "\\xff"}
    assert json.loads(diag[0])["config"]["task"]["params"] == {"name": "\\xff"}
    assert b'"params":{"name":"\\\\xff"}' in stdout[0]
    if profile == "default":
        assert stdout[0] == diag[0]  # the very bytes: the file appends nothing to run.start
    assert validate_lines(stdout, profile=profile) == 4
    assert validate_lines(diag) == 4


def test_a_warning_and_a_log_message_with_undecodable_bytes_are_written_escaped(tmp_path: Path) -> None:
    proc = _train(tmp_path, "--set", "task.factory=nonutf8_tasks:warns")
    assert (proc.returncode, proc.stderr) == (0, b"")  # no "--- Logging error ---" traceback
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    logs = [{k: v for k, v in line.items() if k != "timestamp"} for line in lines if "logger" in line]
    source = tmp_path / "nonutf8_tasks.py"
    lineno = (
        textwrap.dedent(_TASKS).splitlines().index('            warnings.warn("cannot read " + FILE)') + 1
    )
    assert logs == [
        {
            "level": "warning",
            "event": f'{source}:{lineno}: UserWarning: cannot read /data/caf\\xe9.csv\n  warnings.warn("cannot read " + FILE)',
            "logger": "py.warnings",
        },
        {"level": "error", "event": "bad name x\\xffy", "logger": "mytask"},
    ]
    assert [x["event"] for x in lines if "logger" not in x] == [
        "run.start",
        "train.epoch",
        "eval.epoch",
        "run.end",
    ]
    assert validate_lines(proc.stdout.splitlines()) == 6


class _Named:
    """An object orjson does not know, written as its string (a path, say)."""

    def __str__(self) -> str:
        return os.fsdecode(b"/runs/\xfe")


def test_escaping_is_exact_and_leaves_valid_text_alone() -> None:
    render = LineRenderer()
    fields = {
        "event": "x",
        "config": MappingProxyType(
            {"task": MappingProxyType({"na\udcffme": ("a\udc80", "caf\u00e9 \U0001f600")})}
        ),
        "path": _Named(),
        "lone": "\ud800",
        "loss": math.nan,
    }
    assert render(None, "info", fields) == (
        b'{"event":"x","config":{"task":{"na\\\\xffme":["a\\\\x80","caf\xc3\xa9 \xf0\x9f\x98\x80"]}},'
        b'"path":"/runs/\\\\xfe","lone":"\\\\ud800","loss":null,"nonfinite":{"loss":"nan"}}\n'
    )
    valid = {"event": "x", "name": "caf\u00e9", "config": MappingProxyType({"a": 1})}
    assert render(None, "info", dict(valid)) == orjson.dumps(
        {"event": "x", "name": "caf\u00e9", "config": {"a": 1}}, option=orjson.OPT_APPEND_NEWLINE
    )
    assert escape_surrogates("caf\u00e9") == "caf\u00e9"
    with pytest.raises(TypeError, match="Integer exceeds 64-bit range"):  # other refusals are unchanged
        render(None, "info", {"event": "x", "big": 2**70})
    assert render(None, "info", {"a": 1, "b": "\udcff"}) == b'{"a":1,"b":"\\\\xff"}\n'


def test_the_console_view_writes_undecodable_text_escaped() -> None:
    """At a terminal the records are console lines; one carrying a lone surrogate is written with it
    escaped as in the JSON lines, not turned into a ``sink.error``."""
    name = os.fsdecode(b"caf" + bytes([0xE9]))  # "caf\udce9"
    line = JsonSink(console=True).render(end_record(reason=name, status="failed"))
    text = line.decode("utf-8")
    assert text.endswith("\n") and text.count("\n") == 1
    assert "reason\x1b[0m=\x1b[35mcaf\\xe9\x1b[0m" in text
    assert "\udce9" not in text
