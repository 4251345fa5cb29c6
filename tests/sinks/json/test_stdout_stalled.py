"""A stdout reader that stalls never stalls training: batch lines are dropped and counted, nothing
else, and checkpoints are taken as if stdout were read."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.helpers.children import popen
from tests.helpers.paths import ROOT
from traintel.run import checkpoint, layout

pytestmark = pytest.mark.slow

CONFIG = ROOT / "configs" / "default.yaml"
F_SETPIPE_SZ = 1031  # Linux fcntl: set a pipe's capacity


def test_training_finishes_while_stdout_is_not_read(tmp_path: Path) -> None:
    epochs = 4
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINTEL__")}
    proc = popen(
        [sys.executable, "-m", "traintel", "train", "--config", str(CONFIG),
         "--set", f"run.dir={tmp_path / 'run'}", "--set", f"trainer.max_epochs={epochs}",
         "--set", "telemetry.every=1", "--set", "sinks.prometheus.port=0",
         "--set", "sinks.json.queue_capacity=20", "--set", "sinks.json.close_timeout_seconds=60"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    fcntl.fcntl(proc.stdout.fileno(), F_SETPIPE_SZ, 4096)  # a few lines fill it
    diagnostic = tmp_path / "run" / "diagnostic.jsonl"
    deadline = time.monotonic() + 120
    while not (diagnostic.exists() and b'"event":"run.end"' in diagnostic.read_bytes()):
        assert time.monotonic() < deadline, "training did not finish while stdout was stalled"
        assert proc.poll() is None
        time.sleep(0.2)
    out, err = proc.communicate(timeout=90)  # now read: the queued lines drain and the process exits
    assert proc.returncode == 0, err.decode()

    lines = [json.loads(line) for line in out.decode().splitlines()]
    events = [x["event"] for x in lines]
    assert events[0] == "run.start" and events[-1] == "run.end"
    assert events.count("train.step") == 11 * epochs  # step records are never dropped
    assert events.count("train.epoch") == events.count("eval.epoch") == epochs
    dropped = sum(x.get("dropped", 0) for x in lines)
    assert dropped > 0
    assert events.count("train.batch") + dropped == 32 * epochs  # every batch record: written or counted
    diag_events = [json.loads(x)["event"] for x in diagnostic.read_text().splitlines()]
    assert diag_events.count("train.batch") == 32 * epochs  # the other sinks lost nothing


@pytest.mark.parametrize("diagnostic", [True, False], ids=["diagnostic-file", "no-diagnostic-file"])
def test_checkpoints_do_not_wait_for_a_stdout_that_is_not_read(tmp_path: Path, diagnostic: bool) -> None:
    """A checkpoint every 2 steps of 22 while stdout is never read: each is taken (its records are
    fsynced in the diagnostic file, or there is none to wait for), and training ends while the
    pipe is still full."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINTEL__")}
    env["OMP_NUM_THREADS"] = "1"
    run_dir = tmp_path / "run"
    proc = popen(
        [sys.executable, "-m", "traintel", "train", "--config", str(CONFIG),
         "--set", f"run.dir={run_dir}", "--set", "trainer.max_epochs=2", "--set", "telemetry.every=1",
         "--set", "sinks.prometheus.enabled=false", "--set", f"sinks.diagnostic.enabled={str(diagnostic).lower()}",
         "--set", "sinks.json.close_timeout_seconds=60",
         "--set", "checkpoint.every_steps=2", "--set", "checkpoint.keep=100"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    fcntl.fcntl(proc.stdout.fileno(), F_SETPIPE_SZ, 4096)  # a few lines fill it
    err: list[bytes] = []
    reader = threading.Thread(target=lambda: err.extend(proc.stderr or ()), daemon=True)
    reader.start()
    directory = run_dir / layout.CHECKPOINT_DIRECTORY
    deadline = time.monotonic() + 120
    while not any(c.step == 22 for c in checkpoint.complete(directory, 0)):  # the last step's
        assert proc.poll() is None, "the run ended without its last checkpoint"
        assert time.monotonic() < deadline, "the last checkpoint was not taken while stdout was stalled"
        time.sleep(0.05)
    assert proc.poll() is None  # stdout is still unread: the run cannot have ended
    out, _ = proc.communicate(timeout=90)
    reader.join(10)
    assert proc.returncode == 0, b"".join(err).decode()
    assert [c.step for c in checkpoint.complete(directory, 0)] == list(range(22, 0, -2))
    lines = [json.loads(line) for line in out.decode().splitlines()]
    assert [x["event"] for x in lines if x["event"].startswith("no checkpoint")] == []
    assert [x["event"] for x in lines][-1] == "run.end"
