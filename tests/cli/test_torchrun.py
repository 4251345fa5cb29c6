"""``python -m traintel.cli.torchrun``: torch's torchrun, exiting with its workers' status.

Real launches (two gloo ranks on CPU): a bad config exits 2 where torchrun exits 1, a worker failing
in training exits 1 (and torchrun's own failure summary shows each rank's one-line reason), and a
SIGTERM to the launcher exits 143 once both ranks ended the run as terminated and checkpointed it.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.children import CHILD_TIMEOUT, CRASH_MESSAGE, Child, child_env, popen, write_crashing_task
from tests.helpers.paths import ROOT
from traintel.cli.torchrun import exit_status
from traintel.run import checkpoint, layout

CONFIG = ROOT / "configs" / "default.yaml"
LAUNCHERS = {"traintel": "traintel.cli.torchrun", "torch": "torch.distributed.run"}


def _launch(tmp_path: Path, launcher: str, *overrides: str) -> Child:
    """``python -m LAUNCHER --standalone --nproc-per-node=2 -m traintel train`` on the demo config."""
    cmd = [sys.executable, "-m", LAUNCHERS[launcher], "--standalone", "--nproc-per-node=2",
           "-m", "traintel", "train", "--config", str(CONFIG), "--set", f"run.dir={tmp_path / 'run'}",
           "--set", "sinks.prometheus.port=0", *[a for o in overrides for a in ("--set", o)]]  # fmt: skip
    env = child_env(tmp_path, {"OMP_NUM_THREADS": "1"})
    return popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _records(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _summary(err: str) -> tuple[dict[int, dict[str, str]], int]:
    """torchrun's failure summary on stderr: each failed worker's fields (``exitcode``,
    ``error_file``, ``traceback``...) by global rank, and the rank of its root cause."""
    failures: dict[int, dict[str, str]] = {}
    fields: dict[str, str] | None = None
    root, in_root = -1, False
    for line in err.splitlines():
        if line.startswith("Root Cause (first observed failure):"):
            in_root = True
        elif re.fullmatch(r"\[\d+\]:", line):
            fields = {}
        elif fields is not None and (field := re.fullmatch(r"  (\w+)\s*: (.*)", line)):
            fields[field[1]] = field[2].rstrip()
            if field[1] == "rank":
                rank = int(field[2].split()[0])
                failures[rank] = fields
                root = rank if in_root else root
    return failures, root


@pytest.mark.parametrize(
    ("exitcodes", "status"),
    [
        ([2], 2),
        ([2, 2], 2),
        ([2, 143], 2),  # the agent stopped the other rank after the first exited 2
        ([2, -15], 2),  # ... before that rank's own handler was in place
        ([1, 143], 1),
        ([1, 2], 1),
        ([-9, 143], 1),  # killed (out of memory): a failure, retried
        ([139], 1),
        ([143, -15], 143),  # every rank stopped by SIGTERM
        ([130, 143], 130),
        ([-2], 130),
        ([2, 130], 2),
    ],
)
def test_the_status_of_the_failed_workers(exitcodes: list[int], status: int) -> None:
    assert exit_status(exitcodes) == status


@pytest.mark.slow
@pytest.mark.parametrize(("launcher", "status"), [("traintel", 2), ("torch", 1)])
def test_a_bad_config_exits_2_where_torchrun_exits_1(tmp_path: Path, launcher: str, status: int) -> None:
    proc = _launch(tmp_path, launcher, "trainer.max_epochs=0")
    out, err = proc.communicate(timeout=CHILD_TIMEOUT)
    assert proc.returncode == status, err[-3000:]
    assert "traintel: error: trainer.max_epochs: input should be greater than or equal to 1 (got 0)" in err
    assert "ChildFailedError" in err and "Root Cause (first observed failure)" in err  # torchrun's summary
    assert _records(out) == []


@pytest.mark.slow
def test_a_worker_failing_in_training_exits_1(tmp_path: Path) -> None:
    write_crashing_task(tmp_path, rank=1)
    proc = _launch(tmp_path, "traintel", "task.factory=crashing:make_task", "task.params={}")
    out, err = proc.communicate(timeout=CHILD_TIMEOUT)
    assert proc.returncode == 1, err[-3000:]
    assert f"training failed: RuntimeError: {CRASH_MESSAGE}" in err
    assert "traintel.cli.torchrun: exit 1 (a worker failed)" in err
    # rank 0 ends the run as failed on rank 1's error; torch's agent then stops it with SIGTERM
    end = _records(out)[-1]
    assert (end["event"], end["status"]) == ("run.end", "failed")
    assert end["reason"].startswith(f"rank 1: RuntimeError: {CRASH_MESSAGE}"), end


@pytest.mark.slow
def test_torchruns_failure_summary_shows_each_ranks_one_line_reason(tmp_path: Path) -> None:
    """Each worker leaves its ``run.end`` reason in torchelastic's error file: torchrun's summary
    shows it for rank 1, which failed, and for rank 0, which lost it and names it. The root cause
    is the earliest error file by the second, a tie going to the worker torchrun saw end first:
    rank 1, or rank 0 that names it."""
    write_crashing_task(tmp_path, rank=1)
    proc = _launch(tmp_path, "torch", "task.factory=crashing:make_task", "task.params={}")
    _, err = proc.communicate(timeout=CHILD_TIMEOUT)
    assert proc.returncode == 1, err[-3000:]
    failures, root = _summary(err)
    reason = f"RuntimeError: {CRASH_MESSAGE}"
    failed = failures[1]
    assert (failed["rank"], failed["exitcode"].split(" (pid")[0]) == ("1 (local_rank: 1)", "1")
    assert Path(failed["error_file"]).parts[-2:] == ("1", "error.json")
    assert failed["traceback"] == f"traintel.run.distributed.RunFailed: {reason}"
    assert failures[0]["traceback"].startswith(
        f"traintel.run.distributed.RunFailed: rank 1: {reason} (here: "
    )
    assert root == 1 or failures[root]["traceback"].startswith(
        f"traintel.run.distributed.RunFailed: rank 1: {reason}"
    )
    # each line once: the worker's own, and the summary's
    assert err.count(f"traintel: error: training failed: {reason}\n") == 1
    assert err.count(f"  traceback : traintel.run.distributed.RunFailed: {reason}\n") == 1


@pytest.mark.slow
def test_sigterm_to_the_launcher_exits_143_after_the_ranks_end_the_run(tmp_path: Path) -> None:
    proc = _launch(tmp_path, "traintel", "trainer.max_epochs=100000", "checkpoint.every_steps=100000")
    assert proc.stdout is not None
    for line in proc.stdout:
        if json.loads(line)["event"] == "train.step":
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=CHILD_TIMEOUT)
    assert proc.returncode == 143, err[-3000:]
    end = _records(out)[-1]
    assert (end["event"], end["status"], end["reason"]) == ("run.end", "terminated", "SIGTERM")
    assert "SignalException" in err and "traintel.cli.torchrun: exit 143 (terminated)" in err
    for rank in (0, 1):  # both ranks checkpointed the step they finished: a new pod resumes from it
        assert (
            checkpoint.complete(tmp_path / "run" / layout.CHECKPOINT_DIRECTORY, rank)[0].step == end["step"]
        )
