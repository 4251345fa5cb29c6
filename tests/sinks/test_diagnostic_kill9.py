"""After kill -9 at most the last diagnostic line is cut short, and the project's readers cope."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.children import popen, run_child
from tests.helpers.paths import ROOT
from traintel.schema import validate_line

pytestmark = pytest.mark.slow

CONFIG = ROOT / "configs" / "default.yaml"


def test_a_killed_run_leaves_whole_lines_and_a_readable_report(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINTEL__")}
    proc = popen(
        [sys.executable, "-m", "traintel", "train", "--config", str(CONFIG), "--set", f"run.dir={run_dir}",
         "--set", "trainer.max_epochs=100000", "--set", "sinks.prometheus.port=0"],
        env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    diagnostic = run_dir / "diagnostic.jsonl"
    deadline = time.monotonic() + 60
    while not (diagnostic.exists() and diagnostic.read_bytes().count(b'"event":"eval.epoch"') >= 2):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)

    lines = diagnostic.read_bytes().split(b"\n")
    complete, tail = lines[:-1], lines[-1]  # tail: b"" or a line cut short
    for line in complete:
        validate_line(json.loads(line))
    events = [json.loads(line)["event"] for line in complete]
    assert events[0] == "run.start" and events.count("eval.epoch") >= 2
    assert "run.end" not in events

    report = run_child(
        [sys.executable, "-m", "traintel", "report", str(run_dir)],
        env=env,
    )  # fmt: skip
    assert report.returncode == 0, report.stderr
    assert "status: unfinished (no run.end record)" in report.stdout
    assert f"truncated lines: {1 if tail else 0}" in report.stdout
    assert (run_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
