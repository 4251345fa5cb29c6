"""Real subprocesses: a signal ends the run after the current step; a crash ends it as failed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.children import CRASH_MESSAGE, write_crashing_task

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).parent.parent / "configs" / "default.yaml"


RUN_END_KEYS = frozenset(
    {"timestamp", "level", "event", "run_id", "schema_version", "rank", "world_size", "attempt", "status", "reason", "epoch", "step",
     "items_total", "duration_seconds"}
)  # fmt: skip
"""The fields of a run.end line (the schema's required ones; ``nonfinite`` only for a non-finite duration)."""
PER_SINK_KEYS = frozenset({"dropped"})
"""Fields each sink writes for itself: the records *it* dropped since its previous line."""


def assert_same_run_end(stdout_end: dict[str, Any], diag_end: dict[str, Any]) -> None:
    """The diagnostic file's run.end line holds exactly the fields and values of stdout's, apart
    from each sink's own ``dropped`` count."""
    assert (stdout_end["event"], diag_end["event"]) == ("run.end", "run.end")
    assert set(stdout_end) - PER_SINK_KEYS == RUN_END_KEYS
    assert set(diag_end) - PER_SINK_KEYS == RUN_END_KEYS
    assert {k: diag_end[k] for k in RUN_END_KEYS} == {k: stdout_end[k] for k in RUN_END_KEYS}


def _start(tmp_path: Path, *extra: str, pythonpath: str | None = None) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINTEL__")}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.Popen(
        [sys.executable, "-m", "traintel", "train", "--config", str(CONFIG),
         "--set", f"run.dir={tmp_path / 'run'}", "--set", "sinks.prometheus.port=0", *extra],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("sig", "code", "name"), [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "SIGINT")]
)
def test_signal_finishes_the_step_and_ends_the_run(tmp_path: Path, sig: int, code: int, name: str) -> None:
    proc = _start(tmp_path, "--set", "trainer.max_epochs=100000")
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(json.loads(line))
        if lines[-1]["event"] == "train.step" and lines[-1]["step"] >= 3:
            proc.send_signal(sig)
            break
    rest = proc.stdout.read()  # through the same buffered reader as the loop above
    proc.wait(timeout=10)
    assert proc.stderr is not None
    stderr = proc.stderr.read()
    lines += [json.loads(x) for x in rest.splitlines()]
    assert proc.returncode == code, stderr
    end = lines[-1]
    assert (end["event"], end["status"], end["reason"]) == ("run.end", "terminated", name)
    steps = [x for x in lines if x["event"] == "train.step"]
    assert end["step"] == steps[-1]["step"]  # every finished step was reported: every=1 in the config
    diag = [json.loads(x) for x in (tmp_path / "run" / "diagnostic.jsonl").read_text().splitlines()]
    assert [x["event"] for x in diag].count("run.end") == 1
    assert_same_run_end(end, diag[-1])


def test_a_crash_in_training_ends_the_run_as_failed(tmp_path: Path) -> None:
    write_crashing_task(tmp_path)
    proc = _start(
        tmp_path,
        "--set",
        "task.factory=crashing:make_task",
        "--set",
        "task.params={}",
        pythonpath=str(tmp_path),
    )
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert err == f"traintel: error: training failed: RuntimeError: {CRASH_MESSAGE}\n"
    lines = [json.loads(x) for x in out.splitlines()]
    end = lines[-1]
    assert (end["event"], end["level"], end["status"], end["reason"], end["step"]) == (
        "run.end", "error", "failed", f"RuntimeError: {CRASH_MESSAGE}", 2,
    )  # fmt: skip
    diag_end = json.loads((tmp_path / "run" / "diagnostic.jsonl").read_text().splitlines()[-1])
    assert diag_end == end


def test_sigterm_while_lingering_stops_serving_and_exits_0(tmp_path: Path) -> None:
    proc = _start(tmp_path, "--set", "trainer.max_epochs=1", "--set", "sinks.prometheus.linger_seconds=600")
    assert proc.stdout is not None
    for line in proc.stdout:
        if json.loads(line)["event"] == "run.end":
            break
    proc.send_signal(signal.SIGTERM)
    proc.stdout.read()
    proc.wait(timeout=10)  # far less than the 600 s linger
    assert proc.stderr is not None
    stderr = proc.stderr.read()
    assert proc.returncode == 0, stderr


_SLOW_EVAL = """
import time
from traintel.tasks.forecast import make_task as base

class Slow:
    def __init__(self, loader):
        self.loader = loader
    def __iter__(self):
        for batch in self.loader:
            time.sleep(0.2)
            yield batch

def make_task():
    task = base(train_samples=96)
    task.val_loader = Slow(task.val_loader)
    return task
"""


def test_sigterm_during_evaluation_stops_it_and_ends_the_run(tmp_path: Path) -> None:
    (tmp_path / "slow_eval.py").write_text(_SLOW_EVAL)
    proc = _start(
        tmp_path, "--set", "task.factory=slow_eval:make_task", "--set", "task.params={}",
        "--set", "trainer.max_epochs=50", pythonpath=str(tmp_path),
    )  # fmt: skip
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(json.loads(line))
        if seen[-1]["event"] == "train.epoch" and seen[-1]["epoch"] == 2:
            time.sleep(0.3)  # inside epoch 2's evaluation (8 batches of 0.2 s)
            proc.send_signal(signal.SIGTERM)
            break
    seen += [json.loads(x) for x in proc.stdout.read().splitlines()]
    assert proc.wait(timeout=10) == 143
    events = [(x["event"], x.get("epoch")) for x in seen]
    assert events[-2:] == [("train.epoch", 2), ("run.end", 2)]
    assert ("eval.epoch", 2) not in events  # a partial evaluation is not reported as a mean
    assert (seen[-1]["status"], seen[-1]["reason"]) == ("terminated", "SIGTERM")
