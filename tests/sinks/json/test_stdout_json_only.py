"""stdout is JSON lines only: library warnings, Ignite's logs, exceptions and print() become JSON too."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers.children import run_child
from tests.helpers.lines import strict_object
from tests.helpers.paths import ROOT

pytestmark = pytest.mark.slow

CONFIG = ROOT / "configs" / "default.yaml"

_TASKS = """
import sys
import torch
from traintel.tasks.forecast import make_task as base

def broadcasting():
    # targets of shape (n,) against outputs (n, 1): torch warns about broadcasting in mse_loss
    task = base(train_samples=96, val_samples=0, horizon=1)
    task.train_loader = [(x, y[:, 0]) for x, y in task.train_loader]
    return task

def crashing():
    task = base(train_samples=96, val_samples=0)
    def loss_fn(out, y):
        raise ValueError("labels out of range\\nsecond line of the message")
    task.loss_fn = loss_fn
    return task

def failing_factory():
    raise RuntimeError("dataset shard 3 is missing")

def printing():
    print("loading the data")  # before the JSON sink owns stdout: to stderr
    task = base(train_samples=96, val_samples=0)
    calls = [0]
    def loss_fn(out, y):
        calls[0] += 1
        if calls[0] == 1:
            print("first loss", {"shape": list(out.shape)})
            print("half a line", end="")
            print(" and its end")
            print("no newline, flushed", end="", flush=True)
            sys.stdout.buffer.write(b"bytes \\xe2\\x9c\\x93\\n")
        return torch.nn.functional.mse_loss(out, y)
    task.loss_fn = loss_fn
    return task

class PrintingSink:
    name = "printing"

    def open(self, context):
        print("sink open")

    def emit(self, record):
        if record.event == "train.epoch":
            print(f"epoch {record.epoch} done")

    def close(self):
        print("sink closed")

def printing_sink():
    return PrintingSink()
"""


def _run(tmp_path: Path, factory: str, *sets: str, **env_vars: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "tasks.py").write_text(textwrap.dedent(_TASKS))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINTEL__")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    env.update(env_vars)
    more = [arg for s in sets for arg in ("--set", s)]
    return run_child(
        [sys.executable, "-m", "traintel", "train", "--config", str(CONFIG), "--set", f"run.dir={tmp_path / 'run'}",
         "--set", "trainer.max_epochs=1", "--set", "sinks.prometheus.port=0",
         "--set", f"task.factory=tasks:{factory}", "--set", "task.params={}", *more],
        cwd=tmp_path, env=env, timeout=120,
    )  # fmt: skip


def test_a_torch_warning_becomes_one_json_line(tmp_path: Path) -> None:
    proc = _run(tmp_path, "broadcasting")
    assert (proc.returncode, proc.stderr) == (0, "")
    lines = [strict_object(x) for x in proc.stdout.splitlines()]
    warnings = [x for x in lines if x.get("logger") == "py.warnings"]
    assert len(warnings) == 1
    (w,) = warnings
    assert w["level"] == "warning"
    assert "Using a target size (torch.Size([32])) that is different to the input size" in w["event"]
    assert lines[-1]["event"] == "run.end" and lines[-1]["status"] == "completed"


def test_a_crash_is_a_structured_exception_not_a_traceback(tmp_path: Path) -> None:
    proc = _run(tmp_path, "crashing")
    assert proc.returncode == 1
    assert proc.stderr == "traintel: error: training failed: ValueError: labels out of range\n"
    lines = [strict_object(x) for x in proc.stdout.splitlines()]  # every line is JSON: no raw traceback
    (failure,) = [x for x in lines if x["event"] == "training failed"]
    assert (failure["level"], failure["logger"]) == ("error", "traintel")
    (exc,) = failure["exception"]
    assert (exc["exc_type"], exc["exc_value"]) == (
        "ValueError",
        "labels out of range\nsecond line of the message",
    )
    assert exc["frames"][-1]["name"] == "loss_fn"
    assert "locals" not in exc["frames"][-1]
    end = lines[-1]
    assert (end["event"], end["status"], end["reason"]) == (
        "run.end",
        "failed",
        "ValueError: labels out of range",
    )


def test_a_failing_factory_writes_nothing_to_stdout(tmp_path: Path) -> None:
    proc = _run(tmp_path, "failing_factory")
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == (
        "traintel: error: task.factory: tasks:failing_factory raised RuntimeError: dataset shard 3 is missing\n"
    )


def test_print_in_a_task_and_a_plugin_sink_becomes_json_lines_from_the_stdout_logger(tmp_path: Path) -> None:
    proc = _run(
        tmp_path,
        "printing",
        "trainer.max_epochs=2",
        "sinks.extra=[{factory: 'tasks:printing_sink'}]",
        PYTHONUNBUFFERED="1",
    )
    assert (proc.returncode, proc.stderr) == (0, "loading the data\n")
    lines = [strict_object(x) for x in proc.stdout.splitlines()]  # every line is a JSON object
    printed = [x for x in lines if x.get("logger") == "stdout"]
    assert [x["event"] for x in printed] == [
        "sink open",
        "first loss {'shape': [32, 4]}",
        "half a line and its end",
        "no newline, flushed",
        "bytes \u2713",
        "epoch 1 done",
        "epoch 2 done",
        "sink closed",
    ]
    assert {x["level"] for x in printed} == {"info"}
    events = [x["event"] for x in lines]
    assert events.index("sink open") < events.index("run.start")  # opened with the sinks
    assert events.index("epoch 1 done") > events.index("train.epoch")
    assert events[-2:] == ["run.end", "sink closed"]  # the sinks close after run.end


def test_print_at_a_terminal_view_is_left_alone(tmp_path: Path) -> None:
    proc = _run(tmp_path, "printing", "sinks.json.format=console")
    assert proc.returncode == 0, proc.stderr
    assert "first loss {'shape': [32, 4]}\n" in proc.stdout
