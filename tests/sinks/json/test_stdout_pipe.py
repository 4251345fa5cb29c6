"""stdout into a pipe whose reader stalls: memory stays bounded, and only whole JSON lines arrive.

Each test trains the built-in task in a real subprocess at ``telemetry.every=1`` with stdout
a pipe that the test does not read for a while.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.children import Child, popen
from tests.helpers.lines import strict_object
from tests.helpers.paths import ROOT
from tests.helpers.servers import wait_until

pytestmark = pytest.mark.slow

CONFIG = ROOT / "configs" / "default.yaml"
F_SETPIPE_SZ = 1031  # Linux fcntl: set a pipe's capacity
WARM_RECORDS = 1_000
"""Records in the diagnostic file before the first RSS sample: some 20 epochs (evaluations
included), and far more lines than stdout's 64 KiB pipe holds, so it has long been full."""
WINDOW_SECONDS = 25.0
WINDOW_RECORDS = 1_000
"""The second RSS sample comes at least this long and this many records after the first."""


def _train(tmp_path: Path, *sets: str) -> Child:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINTEL__")}
    env["OMP_NUM_THREADS"] = "1"  # more steps per second on a shared machine
    args = [sys.executable, "-m", "traintel", "train", "--config", str(CONFIG),
            "--set", f"run.dir={tmp_path / 'run'}", "--set", "telemetry.every=1",
            "--set", "sinks.prometheus.port=0"]  # fmt: skip
    for s in sets:
        args += ["--set", s]
    return popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _vm_rss(pid: int) -> int:
    """VmRSS of ``pid`` in bytes, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _diagnostic_has(path: Path, event: str) -> bool:
    return path.exists() and f'"event":"{event}"'.encode() in path.read_bytes()


def _lines(out: bytes) -> list[dict[str, Any]]:
    """Every line of ``out`` as a strict JSON object; ``out`` ends with a newline (no torn line)."""
    assert out.endswith(b"\n"), out[-200:]
    return [strict_object(line) for line in out.splitlines()]


def _line_count(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_rss_stays_flat_while_nobody_reads_stdout(tmp_path: Path) -> None:
    proc = _train(tmp_path, "trainer.max_epochs=100000")
    diagnostic = tmp_path / "run" / "diagnostic.jsonl"

    def records(at_least: int, after: float = 0.0) -> bool:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        return time.monotonic() >= after and _line_count(diagnostic) >= at_least

    try:
        # warmed up (torch imported, the first epochs and evaluations done) with stdout long full
        wait_until(
            lambda: records(WARM_RECORDS), f"the run never wrote {WARM_RECORDS} records", 120, interval=0.2
        )
        early, early_lines, early_at = _vm_rss(proc.pid), _line_count(diagnostic), time.monotonic()
        wait_until(
            lambda: records(early_lines + WINDOW_RECORDS, early_at + WINDOW_SECONDS),
            f"the run never wrote {WINDOW_RECORDS} more records while stdout was not read", 120, 0.2,
        )  # fmt: skip
        late, late_lines = _vm_rss(proc.pid), _line_count(diagnostic)
        assert proc.poll() is None  # still training: stdout's reader never blocked it
    finally:
        proc.kill()
        proc.wait()
    growth, lines = late - early, late_lines - early_lines
    report = f"RSS grew {growth / 2**20:.1f} MiB ({early >> 20} -> {late >> 20} MiB) over {lines} records"
    assert lines >= WINDOW_RECORDS, report  # the diagnostic file has every record: training went on
    assert growth < 50 * 2**20, report
    # On a busy machine a slow run makes too few records in 25 s to reach 50 MB even unbounded
    # (each queued line used to pin about 8 KiB), so also: at most 2 KiB per record made, beyond
    # the allocator's few MB of noise.
    assert growth < max(8 * 2**20, 2048 * lines), report


def test_a_reader_that_pauses_then_reads_gets_whole_lines_ending_with_run_end(tmp_path: Path) -> None:
    epochs = 6
    proc = _train(
        tmp_path,
        f"trainer.max_epochs={epochs}",
        "sinks.json.queue_capacity=20",
        "sinks.json.close_timeout_seconds=60",
    )
    assert proc.stdout is not None
    fcntl.fcntl(proc.stdout.fileno(), F_SETPIPE_SZ, 4096)
    diagnostic = tmp_path / "run" / "diagnostic.jsonl"
    deadline = time.monotonic() + 120
    while not _diagnostic_has(diagnostic, "run.end"):  # the reader pauses until training is over
        assert time.monotonic() < deadline, "training did not finish while stdout was stalled"
        assert proc.poll() is None
        time.sleep(0.2)
    time.sleep(1.0)  # the process now waits (up to close_timeout_seconds) for stdout
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, err.decode()
    lines = _lines(out)
    events = [x["event"] for x in lines]
    assert events[0] == "run.start" and events[-1] == "run.end"
    dropped = sum(x.get("dropped", 0) for x in lines)
    assert dropped > 0
    assert events.count("train.batch") + dropped == 32 * epochs
    assert events.count("train.step") == 11 * epochs
    assert events.count("train.epoch") == events.count("eval.epoch") == epochs


def test_a_reader_that_pauses_past_the_close_timeout_gets_only_whole_lines(tmp_path: Path) -> None:
    proc = _train(
        tmp_path,
        "trainer.max_epochs=4",
        "sinks.json.close_timeout_seconds=1",
    )
    assert proc.stdout is not None
    fcntl.fcntl(proc.stdout.fileno(), F_SETPIPE_SZ, 4096)
    try:
        proc.wait(timeout=120)  # not read at all until the process has given up on stdout and exited
    finally:
        proc.kill()
    out = proc.stdout.read()
    assert proc.returncode == 0
    lines = _lines(out)
    assert lines[0]["event"] == "run.start"
    assert len(out) <= 4096  # what the pipe held: the rest was given up at the close timeout
    json.dumps(lines)
