"""Resuming where it must not: a directory another process is running in, a run that completed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers.children import CHILD_TIMEOUT, Cli, child_env, popen
from tests.helpers.paths import ROOT
from tests.helpers.resume import config, lines, traintel
from traintel.run import checkpoint, layout

pytestmark = pytest.mark.slow


def first_attempt(where: Path, cfg: dict[str, Any]) -> Path:
    """A finished run of ``cfg`` in ``where/run``."""
    (where / "config.yaml").write_text(yaml.safe_dump(cfg))
    done = traintel(["-c", "config.yaml", "--set", f"run.dir={where / 'run'}"], where)
    assert done.returncode == 0, done.stderr
    return where / "run"


def test_a_second_resume_of_a_running_directory_is_refused_and_a_killed_one_frees_it(
    tmp_path: Path, cli: Cli
) -> None:
    cfg = config(0)
    cfg["trainer"]["max_epochs"] = 1
    run_dir = first_attempt(tmp_path, cfg)
    extra = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "RESUME_TEST_AT": "sleep:3:600"}
    running = popen(
        [sys.executable, "-m", "traintel", "train", "--resume", str(run_dir), "--set", "trainer.max_epochs=2"],
        cwd=tmp_path, env=child_env(extra=extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert running.stderr is not None
        for line in running.stderr:
            if line.startswith("sleeping at 3"):
                break
        else:
            raise AssertionError(f"the first resume ended early: exit {running.wait()}")
        diagnostic = (run_dir / "diagnostic.jsonl").read_bytes()

        second = cli("train", "--resume", str(run_dir), "--set", "trainer.max_epochs=2")

        assert (second.returncode, second.stdout) == (2, "")
        assert second.stderr == (
            f"traintel: error: run.dir: {str(run_dir)!r} is in use by another traintel process; one run "
            "directory takes one run at a time: wait for it to end, or choose another run.dir\n"
        )
        assert json.loads((run_dir / "checkpoints" / "run.json").read_text())["attempt"] == 1
        assert (run_dir / "diagnostic.jsonl").read_bytes().startswith(diagnostic)
        assert b'"attempt":2' not in (run_dir / "diagnostic.jsonl").read_bytes()
    finally:
        running.send_signal(signal.SIGKILL)
        running.wait(timeout=CHILD_TIMEOUT)

    third = traintel(
        ["--resume", str(run_dir), "--set", "trainer.max_epochs=2"], tmp_path
    )  # the kernel freed it
    assert third.returncode == 0, third.stderr
    start = next(lines(third.stdout))
    assert (start["attempt"], start["resumed_from_step"]) == (2, 4)


@pytest.mark.parametrize(
    "every_steps", [4, 3], ids=["checkpoint-at-the-last-step", "checkpoint-before-the-end"]
)
def test_resuming_a_completed_run_asks_for_more_epochs_whatever_its_last_checkpoint(
    tmp_path: Path, cli: Cli, every_steps: int
) -> None:
    """The run's 2 epochs end at step 8. Its last checkpoint is that step's, taken after the
    epoch's end (every 4 steps), or step 6's (every 3 steps): either way it completed."""
    cfg = config(0)
    cfg["trainer"]["max_epochs"] = 2
    cfg["checkpoint"] = {"every_steps": every_steps, "keep": 1}
    run_dir = first_attempt(tmp_path, cfg)
    newest = checkpoint.complete(run_dir / layout.CHECKPOINT_DIRECTORY, 0)[0]
    assert newest.step == (8 if every_steps == 4 else 6)
    before = sorted((p.name, p.stat().st_size) for p in run_dir.rglob("*"))

    again = cli("train", "--resume", str(run_dir))

    assert (again.returncode, again.stdout) == (2, "")
    says = (  # the checkpoint itself when it is the end's, else run.json
        "the checkpoint at step 8 has 2 epochs done"
        if every_steps == 4
        else "the run completed its 2 epochs at step 8"
    )
    assert again.stderr == (
        f"traintel: error: trainer.max_epochs: {says}, which reaches max_epochs 2; raise trainer.max_epochs to train on\n"
    )
    assert sorted((p.name, p.stat().st_size) for p in run_dir.rglob("*")) == before

    more = traintel(["--resume", str(run_dir), "--set", "trainer.max_epochs=3"], tmp_path)
    assert more.returncode == 0, more.stderr
    records = list(lines(more.stdout))
    assert records[0]["resumed_from_step"] == newest.step
    assert [d["step"] for d in records if d["event"] == "train.step"] == list(range(newest.step + 1, 13))
    assert (records[-1]["status"], records[-1]["step"]) == ("completed", 12)


def test_a_completed_run_without_a_checkpoint_is_not_trained_again_under_resume_auto(
    tmp_path: Path, cli: Cli
) -> None:
    cfg = config(0)
    cfg["trainer"]["max_epochs"] = 1
    cfg["run"]["resume"] = "auto"
    cfg["checkpoint"] = {"every_steps": 100}  # never reached: the run keeps no checkpoint
    run_dir = first_attempt(tmp_path, cfg)
    assert checkpoint.complete(run_dir / layout.CHECKPOINT_DIRECTORY, 0) == []

    again = cli("train", "-c", "config.yaml", "--set", f"run.dir={run_dir}")

    assert (again.returncode, again.stdout) == (2, "")
    assert again.stderr == (
        "traintel: error: trainer.max_epochs: the run completed its 1 epochs at step 4, which reaches "
        "max_epochs 1; raise trainer.max_epochs to train on\n"
    )
