"""A run stopped by SIGTERM at any moment and resumed logs the same bits as one never stopped.

A stop finishes the window being fetched or trained and checkpoints exactly what was trained
and logged: a window fetched when the signal came is trained first, never counted as read; an
evaluation the signal cut is run again on resume, drawing what it would have drawn, and the
epoch record logged before it is not logged twice.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers.children import CHILD_TIMEOUT, Child, child_env, popen
from tests.helpers.resume import (
    EPOCHS,
    ROOT,
    STEPS,
    config,
    final_state,
    lines,
    losses,
    same_tensors,
    traintel,
)
from traintel.run import checkpoint, layout

pytestmark = pytest.mark.slow

SAMPLES_PER_WINDOW = 64
"""Training samples read per full window: 4 micro-batches of 16."""
EVAL_CALLS = 3
"""Evaluation forward calls per epoch: 48 validation samples in batches of 16."""


def stop_config(*, plain: bool = False, delay: float = 0.0, every_steps: int | None = 3) -> dict[str, Any]:
    """The resume tests' task and settings; ``plain`` hides the loader behind a plain iterable (which
    has no length, so the cosine schedule is given its length), ``delay`` seconds per sample."""
    cfg = config(0)
    cfg["task"]["params"].update({"plain": plain, "delay": delay})
    if plain:
        cfg["trainer"]["scheduler"] = {"name": "cosine", "T_max": STEPS}
    cfg["checkpoint"] = {
        "every_epochs": 1,
        "keep": 2,
        **({"every_steps": every_steps} if every_steps else {}),
    }
    return cfg


def start(cwd: Path, cfg: dict[str, Any], at: str | None = None) -> Child:
    """``traintel train`` of ``cfg`` in ``cwd/run``, its streams piped."""
    (cwd / "config.yaml").write_text(yaml.safe_dump(cfg))
    extra = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **({"RESUME_TEST_AT": at} if at else {})}
    return popen(
        [sys.executable, "-m", "traintel", "train", "-c", "config.yaml", "--set", f"run.dir={cwd / 'run'}"],
        cwd=cwd, env=child_env(extra=extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def sigterm_at(cwd: Path, cfg: dict[str, Any], at: str, line: str) -> tuple[int, str]:
    """Run ``cfg`` paused by ``at``; once stderr says ``line`` (the pause began), SIGTERM. Returns
    the exit status and stdout."""
    proc = start(cwd, cfg, at)
    assert proc.stderr is not None
    for text in proc.stderr:
        if text.startswith(line):
            break
    else:
        raise AssertionError(f"the run ended before {line!r}: exit {proc.wait()}")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=CHILD_TIMEOUT)
    return proc.returncode, out


def reference_run(where: Path, cfg: dict[str, Any]) -> tuple[dict[Any, str], dict[str, Any]]:
    (where / "config.yaml").write_text(yaml.safe_dump(cfg))
    done = traintel(["-c", "config.yaml", "--set", f"run.dir={where / 'run'}"], where)
    assert done.returncode == 0, done.stderr
    found = losses(done.stdout)
    assert sorted(k for k in found if isinstance(k, int)) == list(range(1, STEPS + 1))
    assert {k for k in found if not isinstance(k, int)} == {
        (event, e) for event in ("train.epoch", "eval.epoch") for e in range(1, EPOCHS + 1)
    }
    return found, final_state(where / "run")


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, tuple[dict[Any, str], dict[str, Any]]]:
    """Per loader (a DataLoader, or a plain iterable over one): the uninterrupted run's losses and
    final state. The per-sample delay and the checkpoint cadence change neither."""
    return {
        plain: reference_run(tmp_path_factory.mktemp(f"plain{plain}"), stop_config(plain=plain))
        for plain in (False, True)
    }


def epoch_records(stdout: str, event: str) -> list[dict[str, Any]]:
    return [d for d in lines(stdout) if d["event"] == event]


def assert_continues(
    reference: tuple[dict[Any, str], dict[str, Any]], first: str, second: str, run_dir: Path
) -> None:
    """Both attempts' logged losses are the reference's bits; together they log every step and epoch;
    no step is logged by both; the final parameters and optimizer state are the reference's."""
    expected, final = reference
    one, two = losses(first), losses(second)
    assert {k: expected[k] for k in one} == one
    assert {k: expected[k] for k in two} == two
    assert one.keys() | two.keys() == expected.keys()
    assert {k for k in one.keys() & two.keys() if isinstance(k, int)} == set()
    assert same_tensors(final_state(run_dir), final) is True


@pytest.mark.parametrize("plain", [False, True], ids=["dataloader", "plain-iterable"])
def test_sigterm_while_a_window_is_fetched_trains_it_before_stopping(
    tmp_path: Path, references: dict[bool, Any], plain: bool
) -> None:
    read = 2 * SAMPLES_PER_WINDOW + 5  # inside the fetch of step 3's window
    code, stopped = sigterm_at(tmp_path, stop_config(plain=plain), f"fetch:{read}:1.5", f"fetching at {read}")
    assert code == 143
    end = list(lines(stopped))[-1]
    assert (end["event"], end["status"], end["reason"], end["step"]) == (
        "run.end",
        "terminated",
        "SIGTERM",
        3,
    )
    run_dir = tmp_path / "run"
    saved = checkpoint.newest(run_dir / layout.CHECKPOINT_DIRECTORY, 0)
    assert saved is not None and saved[0].step == 3
    assert (saved[1]["loader"]["yielded"], saved[1]["progress"]["windows"]) == (3, 3)

    resumed = traintel(["--resume", str(run_dir)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert next(lines(resumed.stdout))["resumed_from_step"] == 3
    steps = [d["step"] for d in lines(resumed.stdout) if d["event"] == "train.step"]
    assert steps == list(range(4, STEPS + 1))
    assert_continues(references[plain], stopped, resumed.stdout, run_dir)


def test_sigterm_during_an_evaluation_evaluates_that_epoch_again_on_resume(
    tmp_path: Path, references: dict[bool, Any]
) -> None:
    """Epoch 1 ends at step 4, which no every_steps checkpoint covers: the checkpoint of the signal
    says the epoch ended (its record was logged) and its evaluation is owed."""
    code, stopped = sigterm_at(tmp_path, stop_config(), "evalsleep:2:1.5", "evaluating at 2")
    assert code == 143
    assert [d["epoch"] for d in epoch_records(stopped, "train.epoch")] == [1]
    assert epoch_records(stopped, "eval.epoch") == []
    end = list(lines(stopped))[-1]
    assert (end["event"], end["status"], end["step"], end["epoch"]) == ("run.end", "terminated", 4, 1)
    run_dir = tmp_path / "run"
    saved = checkpoint.newest(run_dir / layout.CHECKPOINT_DIRECTORY, 0)
    assert saved is not None
    assert (saved[0].step, saved[1]["epoch_ended"], saved[1]["evaluation_owed"]) == (4, True, True)

    resumed = traintel(["--resume", str(run_dir)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    records = [d["event"] for d in lines(resumed.stdout)]
    assert records[:2] == ["run.start", "eval.epoch"]  # epoch 1's evaluation first, its record once
    assert [d["epoch"] for d in epoch_records(resumed.stdout, "train.epoch")] == [2, 3]
    assert [d["epoch"] for d in epoch_records(resumed.stdout, "eval.epoch")] == [1, 2, 3]
    assert_continues(references[False], stopped, resumed.stdout, run_dir)


def test_sigterm_during_an_evaluation_after_its_steps_checkpoint_evaluates_that_epoch_on_resume(
    tmp_path: Path, references: dict[bool, Any]
) -> None:
    """Epoch 3's last step (12) is due an every_steps checkpoint, which is taken after the epoch's
    end (its record logged, its evaluation cut): the resumed run only evaluates epoch 3."""
    at = 2 * EVAL_CALLS + 2
    code, stopped = sigterm_at(tmp_path, stop_config(), f"evalsleep:{at}:1.5", f"evaluating at {at}")
    assert code == 143
    end = list(lines(stopped))[-1]
    assert (end["event"], end["status"], end["step"], end["epoch"]) == (
        "run.end",
        "terminated",
        STEPS,
        EPOCHS,
    )
    run_dir = tmp_path / "run"

    resumed = traintel(["--resume", str(run_dir)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    records = list(lines(resumed.stdout))
    assert [d["event"] for d in records] == ["run.start", "eval.epoch", "checkpoint", "run.end"]
    assert (records[0]["resumed_from_step"], records[-1]["status"]) == (STEPS, "completed")
    assert (records[2]["step"], records[2]["reason"]) == (STEPS, "every_epochs")  # the end it owed, again
    expected, final = references[False]
    assert losses(resumed.stdout) == {("eval.epoch", EPOCHS): expected[("eval.epoch", EPOCHS)]}
    assert same_tensors(final_state(run_dir), final) is True


def test_sigterm_after_the_last_evaluation_stops_nothing_the_run_completes_with_0(
    tmp_path: Path, references: dict[bool, Any]
) -> None:
    """The signal comes once epoch 3 is trained and evaluated, before its checkpoint: the run ends
    completed with exit 0, its checkpoint and run.json say so, and resuming it asks for more epochs."""
    cfg = stop_config()
    cfg["sinks"]["extra"] = [{"factory": "tests.helpers.resume_task:EvaluatedPause"}]
    code, stopped = sigterm_at(tmp_path, cfg, f"evaluated:{EPOCHS}:1.5", f"evaluated at {EPOCHS}")
    assert code == 0
    end = list(lines(stopped))[-1]
    assert (end["event"], end["status"], end["reason"], end["step"]) == (
        "run.end",
        "completed",
        "max_epochs",
        STEPS,
    )
    expected, final = references[False]
    assert losses(stopped) == expected
    run_dir = tmp_path / "run"
    assert same_tensors(final_state(run_dir), final) is True

    resumed = traintel(["--resume", str(run_dir)], tmp_path)
    assert (resumed.returncode, resumed.stderr) == (
        2,
        f"traintel: error: trainer.max_epochs: the checkpoint at step {STEPS} has {EPOCHS} epochs done, "
        f"which reaches max_epochs {EPOCHS}; raise trainer.max_epochs to train on\n",
    )


ROUNDS = 4
"""SIGTERM moments per loader in the randomized test."""


@pytest.mark.parametrize("plain", [False, True], ids=["slow-dataloader", "slow-plain-iterable"])
def test_sigterm_at_random_moments_then_resume_logs_the_same_bits(
    tmp_path: Path, references: dict[bool, Any], plain: bool
) -> None:
    """A slow loader (2 ms a sample) and SIGTERM at moments drawn over the whole run, start-up
    included: the first attempt ends 143 (0 when the signal came after its end), the same command
    under ``run.resume: auto`` continues it, and together they log the reference's bits."""
    cfg = stop_config(plain=plain, delay=0.002)
    cfg["run"]["resume"] = "auto"
    draw = random.Random(20261205 + plain)
    for n in range(ROUNDS):
        where = tmp_path / f"round{n}"
        where.mkdir()
        proc = start(where, cfg)
        time.sleep(draw.uniform(0.2, 6.0))  # the moment under test, not a wait for a condition
        proc.send_signal(signal.SIGTERM)
        stopped, err = proc.communicate(timeout=CHILD_TIMEOUT)
        if proc.returncode == 0:  # the signal came after the run ended
            assert losses(stopped) == references[plain][0]
            continue
        assert proc.returncode == 143, err
        if not stopped:  # stopped in start-up, before anything was written
            assert err.splitlines()[-1] == "traintel: error: SIGTERM during start-up: stopped before training"
        resumed = traintel(["-c", "config.yaml", "--set", f"run.dir={where / 'run'}"], where)
        assert resumed.returncode == 0, resumed.stderr
        assert_continues(references[plain], stopped, resumed.stdout, where / "run")
        diagnostic = [
            json.loads(line) for line in (where / "run" / "diagnostic.jsonl").read_text().splitlines()
        ]
        assert [d["status"] for d in diagnostic if d["event"] == "run.end"][-1] == "completed"
