"""Runs killed or stopped part-way and resumed log the same bits as runs never interrupted."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers.children import CHILD_TIMEOUT, Cli, child_env, popen
from tests.helpers.paths import ROOT
from tests.helpers.resume import (
    EPOCHS,
    STEPS,
    WINDOWS,
    config,
    final_state,
    lines,
    losses,
    paused,
    same_tensors,
    traintel,
)
from traintel.run import checkpoint, layout
from traintel.schema import validate_line

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[int, tuple[str, dict[Any, str], dict[str, Any]]]:
    """Per worker count: the uninterrupted run's stdout, its losses and its final checkpoint."""
    made = {}
    for workers in (0, 2):
        where = tmp_path_factory.mktemp(f"reference{workers}")
        (where / "config.yaml").write_text(yaml.safe_dump(config(workers)))
        done = traintel(["-c", "config.yaml", "--set", f"run.dir={where / 'run'}"], where)
        assert done.returncode == 0, done.stderr
        found = losses(done.stdout)
        assert sorted(k for k in found if isinstance(k, int)) == list(range(1, STEPS + 1))
        made[workers] = (done.stdout, found, final_state(where / "run"))
    return made


def steps_done_before(call: int) -> int:
    """Optimizer steps finished before the ``call``-th training forward call (1-based)."""
    done, calls = 0, 0
    for _ in range(EPOCHS):
        for size in WINDOWS:
            if calls + size >= call:
                return done
            calls += size
            done += 1
    return done


def newest_checkpoint(done: int) -> int:
    """The newest checkpoint of a run killed after ``done`` steps, in a training forward call: every 3
    steps, and at each epoch's end once its last step is done (and the next epoch has begun)."""
    ends = [e * len(WINDOWS) for e in range(1, EPOCHS + 1) if e * len(WINDOWS) <= done]
    return max([0, *range(3, done + 1, 3), *ends])


def kill_points(workers: int) -> list[tuple[str, str]]:
    """(what, RESUME_TEST_AT): inside a window, right after a checkpoint, in an epoch's last step, and
    (one process) during the last epoch's evaluation, before its last step's checkpoint (which is
    taken after the epoch's end)."""
    rng = random.Random(1234 + workers)
    epoch_calls = sum(WINDOWS)
    inside = epoch_calls + 4 * rng.randrange(0, 3) + rng.randrange(2, 5)  # micro-batch 2-4 of step 5, 6 or 7
    after_checkpoint = epoch_calls + 4 + 4 + 1  # the first micro-batch after step 6's checkpoint
    last_of_epoch = 2 * epoch_calls - rng.randrange(0, 3)  # in step 8, epoch 2's last window
    points = [
        ("inside", f"train:{inside}"),
        ("after", f"train:{after_checkpoint}"),
        ("last", f"train:{last_of_epoch}"),
    ]
    if workers == 0:
        points.append(("eval", "eval:8"))  # epoch 3's evaluation: 3 calls per epoch
    return points


CASES = [(w, what, at) for w in (0, 2) for what, at in kill_points(w)]


@pytest.mark.parametrize(("workers", "what", "at"), CASES, ids=[f"workers{w}-{what}" for w, what, _ in CASES])
def test_sigkill_then_resume_logs_the_same_bits(
    tmp_path: Path, reference: dict[int, Any], workers: int, what: str, at: str
) -> None:
    _, expected, final = reference[workers]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config(workers)))
    run_dir = tmp_path / "run"
    killed = traintel(["-c", "config.yaml", "--set", f"run.dir={run_dir}"], tmp_path, at=at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr

    kind, _, number = at.partition(":")
    done = steps_done_before(int(number)) if kind == "train" else STEPS
    # killed in the last epoch's evaluation: its last step's checkpoint comes only after that end
    restart_at = newest_checkpoint(done if kind == "train" else STEPS - 1)

    resumed = traintel(["--resume", str(run_dir)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    start = next(lines(resumed.stdout))
    assert (start["event"], start["attempt"], start["resumed_from_step"]) == ("run.start", 1, restart_at)
    # the killed attempt's records are durable in the diagnostic file (a checkpoint waits for that,
    # not for stdout, whose last lines the kill may have cut off)
    killed_lines = [
        line for line in (run_dir / "diagnostic.jsonl").read_text().splitlines() if '"attempt":0' in line
    ]
    first, second = losses("\n".join(killed_lines)), losses(resumed.stdout)
    assert sorted(k for k in second if isinstance(k, int)) == list(range(restart_at + 1, STEPS + 1))
    for logged in (losses(killed.stdout), first, second):  # a step logged twice has the same bits each time
        assert {k: expected[k] for k in logged} == logged
    assert {k for k in first if isinstance(k, int)} >= set(range(1, restart_at + 1))
    assert {k for k in first.keys() | second.keys() if isinstance(k, int)} == set(range(1, STEPS + 1))
    assert ("train.epoch", EPOCHS) in second and ("eval.epoch", EPOCHS) in second
    assert same_tensors(final_state(run_dir), final) is True

    diagnostic = (run_dir / "diagnostic.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in diagnostic]  # no torn line: every one parses
    for record in records:
        validate_line(record)
    attempts = [r["attempt"] for r in records if "attempt" in r]
    assert attempts == sorted(attempts) and attempts[0] == 0 and attempts[-1] == 1
    assert records[-1]["event"] == "run.end" and records[-1]["status"] == "completed"


def test_sigterm_checkpoints_the_finished_step_and_the_resume_trains_no_step_twice(
    tmp_path: Path, reference: dict[int, Any]
) -> None:
    _, expected, final = reference[0]
    run_dir = tmp_path / "run"
    proc = paused(tmp_path, call=22, seconds=1.5)  # call 22: micro-batch 3 of step 6 (epoch 2)
    proc.send_signal(signal.SIGTERM)
    stopped, _ = proc.communicate(timeout=CHILD_TIMEOUT)
    assert proc.returncode == 143
    end = list(lines(stopped))[-1]
    assert (end["event"], end["status"], end["reason"], end["step"]) == (
        "run.end",
        "terminated",
        "SIGTERM",
        6,
    )
    assert [c.step for c in checkpoint.complete(run_dir / layout.CHECKPOINT_DIRECTORY, 0)] == [6, 4]

    resumed = traintel(["--resume", str(run_dir)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    first, second = losses(stopped), losses(resumed.stdout)
    assert sorted(k for k in first if isinstance(k, int)) == list(range(1, 7))
    assert sorted(k for k in second if isinstance(k, int)) == list(range(7, STEPS + 1))  # none twice
    for logged in (first, second):
        assert {k: expected[k] for k in logged} == logged
    assert same_tensors(final_state(run_dir), final) is True


def test_a_second_signal_while_stopping_exits_at_once(tmp_path: Path) -> None:
    """Two SIGTERMs sent close together may reach the run as one (the kernel keeps one pending
    SIGTERM, and Python calls its handler once for the signals that came before it ran), so the
    second is sent again every 0.1 s until the process has left: no more than 5 s in all."""
    proc = paused(tmp_path, call=5, seconds=30)
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    while True:
        proc.send_signal(signal.SIGTERM)  # nothing once the process has been waited for
        try:
            proc.wait(timeout=0.1)
            break
        except subprocess.TimeoutExpired:
            assert time.monotonic() - sent < 5, "still running 5 s after the second SIGTERM"
    _, err = proc.communicate(timeout=CHILD_TIMEOUT)
    assert time.monotonic() - sent < 5  # not the 30 s the step still had to sleep
    assert proc.returncode == 143
    assert err.splitlines()[-1] == "traintel: SIGTERM while stopping: exiting at once"


def test_sigterm_on_the_built_in_task_ends_within_10_s_with_a_checkpoint(tmp_path: Path, cli: Cli) -> None:
    run_dir = tmp_path / "run"
    args = ["-c", str(ROOT / "configs" / "default.yaml"), "--set", f"run.dir={run_dir}",
            "--set", "trainer.max_epochs=100000", "--set", "sinks.prometheus.port=0",
            "--set", "checkpoint.every_epochs=1"]  # fmt: skip
    proc = popen(
        [sys.executable, "-m", "traintel", "train", *args],
        cwd=tmp_path, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    out: list[str] = []
    for line in proc.stdout:
        out.append(line)
        if '"event":"eval.epoch"' in line and line.count('"epoch":2,') == 1:
            break
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=CHILD_TIMEOUT)
    took = time.monotonic() - sent
    assert proc.returncode == 143
    assert took < 10, took
    end = list(lines("".join(out) + rest))[-1]
    assert (end["event"], end["status"], end["reason"]) == ("run.end", "terminated", "SIGTERM")
    newest = checkpoint.complete(run_dir / layout.CHECKPOINT_DIRECTORY, 0)[0]
    assert newest.step == end["step"]

    resumed = traintel(
        ["--resume", str(run_dir), "--set", f"trainer.max_epochs={end['epoch'] + 1}"], tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr
    steps = [d["step"] for d in lines(resumed.stdout) if d["event"] == "train.step"]
    assert steps[0] == end["step"] + 1


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-epoch run with checkpoints (max_epochs=1 of 3 planned: resumable for more)."""
    where = tmp_path_factory.mktemp("checkpointed")
    cfg = config(0)
    cfg["trainer"]["max_epochs"] = 1
    (where / "config.yaml").write_text(yaml.safe_dump(cfg))
    done = traintel(["-c", "config.yaml", "--set", f"run.dir={where / 'run'}"], where)
    assert done.returncode == 0, done.stderr
    return where / "run"


def refused(cli: Cli, args: list[str], env: Mapping[str, str] | None = None) -> str:
    """The one stderr line of a refused start (exit 2), from ``traintel train ARGS`` in this process."""
    done = cli("train", *args, env=env)
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    assert len(done.stderr.splitlines()) == 1
    return done.stderr.strip()


def test_resuming_with_a_changed_accumulation_is_refused_naming_the_key(
    checkpointed: Path, tmp_path: Path, cli: Cli
) -> None:
    before = sorted(p.name for p in checkpointed.rglob("*"))
    assert refused(cli, ["--resume", str(checkpointed), "--set", "trainer.accumulation_steps=2"]) == (
        "traintel: error: trainer.accumulation_steps: cannot be changed when resuming; --set may change "
        "only trainer.max_epochs, trainer.max_steps, telemetry.*, sinks.* and checkpoint.*"
    )
    via_env = refused(
        cli,
        ["--resume", str(checkpointed), "--set", "trainer.max_epochs=2"],
        {"TRAINTEL__TRAINER__ACCUMULATION_STEPS": "2"},
    )
    assert via_env == (
        f"traintel: error: trainer.accumulation_steps: cannot change when resuming the run in "
        f"{str(checkpointed)!r}: its checkpoint has 4, this attempt 2"
    )
    assert sorted(p.name for p in checkpointed.rglob("*")) == before  # nothing written


def test_resuming_a_finished_run_asks_for_more_epochs(checkpointed: Path, tmp_path: Path, cli: Cli) -> None:
    assert refused(cli, ["--resume", str(checkpointed)]) == (
        "traintel: error: trainer.max_epochs: the checkpoint at step 4 has 1 epochs done, which reaches "
        "max_epochs 1; raise trainer.max_epochs to train on"
    )


def test_resume_needs_a_checkpoint(tmp_path: Path, cli: Cli) -> None:
    cfg = config(0)
    del cfg["checkpoint"]
    cfg["trainer"]["max_epochs"] = 1
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "run"
    assert traintel(["-c", "config.yaml", "--set", f"run.dir={run_dir}"], tmp_path).returncode == 0
    assert refused(cli, ["--resume", str(run_dir)]) == (
        f"traintel: error: --resume: {str(run_dir / 'checkpoints')!r} holds no complete checkpoint to resume from"
    )
    assert refused(cli, ["--resume", str(tmp_path / "nowhere")]) == (
        f"traintel: error: --resume: {str(tmp_path / 'nowhere')!r} is not a directory"
    )
    assert refused(cli, ["--set", "run.resume=auto"]) == (
        "traintel: error: run.resume: auto needs a fixed run.dir, where the checkpoints are kept"
    )
    assert refused(cli, ["--set", "run.resume=auto", "--set", f"run.dir={tmp_path / 'fresh'}"]) == (
        "traintel: error: run.resume: auto needs checkpoints: set checkpoint.every_steps or checkpoint.every_epochs"
    )
    assert not (tmp_path / "fresh").exists()


def test_a_fresh_run_never_reuses_a_directory_with_checkpoints(
    checkpointed: Path, tmp_path: Path, cli: Cli
) -> None:
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config(0)))
    line = refused(
        cli,
        ["-c", "config.yaml", "--set", f"run.dir={checkpointed}", "--set", "sinks.diagnostic.enabled=false"],
    )
    assert line == (
        f"traintel: error: run.dir: {str(checkpointed)!r} holds an earlier run's checkpoints; continue it with "
        "'traintel train --resume' or run.resume=auto, or choose another run.dir"
    )


def test_resume_auto_starts_fresh_then_continues(tmp_path: Path, reference: dict[int, Any]) -> None:
    _, expected, _ = reference[0]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config(0)))
    args = ["-c", "config.yaml", "--set", f"run.dir={tmp_path / 'run'}", "--set", "run.resume=auto"]
    killed = traintel(args, tmp_path, at="train:2")  # before the first checkpoint
    assert killed.returncode == -signal.SIGKILL
    # from run.json, written before training: kill -9 may take run.start with the stdout writer's queue
    run_id = json.loads((tmp_path / "run" / "checkpoints" / "run.json").read_text())["run_id"]
    again = traintel(
        args, tmp_path, at=f"train:{sum(WINDOWS) + 6}"
    )  # no checkpoint to continue: from the start
    assert again.returncode == -signal.SIGKILL
    start = next(lines(again.stdout))
    assert (start["attempt"], start["resumed_from_step"], start["run_id"]) == (
        1,
        None,
        run_id,
    )
    last = traintel(args, tmp_path)  # continues from step 4, the end of epoch 1
    assert last.returncode == 0, last.stderr
    start = next(lines(last.stdout))
    assert (start["attempt"], start["resumed_from_step"]) == (2, 4)
    second = losses(last.stdout)
    assert {k: expected[k] for k in second} == second


_KILLED_AFTER_BUILD = """
import os
import signal
import sys

import traintel

traintel.build(sys.argv[1])  # the sinks are open: the diagnostic file exists
print("built", file=sys.stderr, flush=True)  # stdout is the JSON sink's now
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_resume_auto_continues_a_run_killed_between_build_and_run(tmp_path: Path) -> None:
    """A pod killed while starting (sinks open, no step yet) leaves its run directory to the next
    attempt: with ``run.resume=auto`` that one trains from the start as attempt 1 and exits 0."""
    run_dir = tmp_path / "run"
    cfg = {
        "run": {"dir": str(run_dir), "resume": "auto", "id": "killed"},
        "task": {"params": {"train_samples": 96, "val_samples": 0}},
        "trainer": {"max_epochs": 1, "device": "cpu"},
        "sinks": {"prometheus": {"enabled": False}},
        "checkpoint": {"every_steps": 2},
    }
    path = tmp_path / "auto.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    (tmp_path / "killed.py").write_text(_KILLED_AFTER_BUILD, encoding="utf-8")
    env = child_env(extra={"OMP_NUM_THREADS": "1"})
    first = subprocess.run([sys.executable, str(tmp_path / "killed.py"), str(path)], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=CHILD_TIMEOUT, check=False)  # fmt: skip
    assert (first.returncode, first.stderr.splitlines()[-1:]) == (-signal.SIGKILL, ["built"]), first.stderr
    assert (run_dir / "diagnostic.jsonl").exists()
    second = traintel(["--config", str(path)], tmp_path)
    assert second.returncode == 0, second.stderr
    records = list(lines(second.stdout))
    start, end = records[0], records[-1]
    assert (start["event"], start["run_id"], start["attempt"]) == ("run.start", "killed", 1)
    assert (end["event"], end["status"], end["step"]) == ("run.end", "completed", 1)  # 96 items: one step


def files(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` and its bytes, to show that a refused start wrote nothing."""
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


def resume_auto_config(tmp_path: Path, run_dir: Path, **run: Any) -> str:
    """``auto.yaml`` in ``tmp_path``: the fixture's config for 2 epochs under ``run.resume: auto`` in
    ``run_dir``, with ``run`` settings changed; returns its name."""
    cfg = config(0)
    cfg["run"].update({"dir": str(run_dir), "resume": "auto", **run})
    cfg["trainer"]["max_epochs"] = 2
    (tmp_path / "auto.yaml").write_text(yaml.safe_dump(cfg))
    return "auto.yaml"


def test_resuming_with_another_seed_is_refused_naming_it(
    checkpointed: Path, tmp_path: Path, cli: Cli
) -> None:
    before = files(checkpointed)
    expected = (
        f"traintel: error: run.seed: cannot change when resuming the run in {str(checkpointed)!r}: "
        "its checkpoint has 7, this attempt 8"
    )

    via_env = refused(
        cli,
        ["--resume", str(checkpointed), "--set", "trainer.max_epochs=2"],
        {"TRAINTEL__RUN__SEED": "8"},
    )
    via_file = refused(cli, ["-c", resume_auto_config(tmp_path, checkpointed, seed=8)])

    assert (via_env, via_file) == (expected, expected)
    assert files(checkpointed) == before  # nothing written


def test_resuming_with_another_run_id_is_refused_naming_both(
    checkpointed: Path, tmp_path: Path, cli: Cli
) -> None:
    run_id = json.loads((checkpointed / layout.CHECKPOINT_DIRECTORY / "run.json").read_text())["run_id"]
    before = files(checkpointed)
    expected = (
        f"traintel: error: run.id: cannot change when resuming the run in {str(checkpointed)!r}: its id is "
        f"{run_id!r}, this attempt 'other'; leave run.id null or set it to {run_id!r}"
    )

    via_env = refused(
        cli,
        ["--resume", str(checkpointed), "--set", "trainer.max_epochs=2"],
        {"TRAINTEL__RUN__ID": "other"},
    )
    via_file = refused(cli, ["-c", resume_auto_config(tmp_path, checkpointed, id="other")])

    assert (via_env, via_file) == (expected, expected)
    assert files(checkpointed) == before  # nothing written


def test_a_checkpoint_without_the_run_settings_still_resumes(checkpointed: Path, tmp_path: Path) -> None:
    """A checkpoint written before ``run.seed`` was among its settings: the missing entry is no change."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(checkpointed, run_dir)
    directory = run_dir / layout.CHECKPOINT_DIRECTORY
    found = checkpoint.newest(directory, 0)
    assert found is not None
    step, state = found[0].step, found[1]
    assert state["settings"].pop("run") == {"seed": 7}
    checkpoint.write(directory, step, 0, state)
    run_id = json.loads((directory / "run.json").read_text())["run_id"]

    resumed = traintel(["-c", resume_auto_config(tmp_path, run_dir, id=run_id)], tmp_path)

    assert resumed.returncode == 0, resumed.stderr
    start = next(lines(resumed.stdout))
    assert (start["run_id"], start["attempt"], start["resumed_from_step"]) == (run_id, 1, 4)
    steps = [d["step"] for d in lines(resumed.stdout) if d["event"] == "train.step"]
    assert steps == [5, 6, 7, 8]
    newest = checkpoint.newest(directory, 0)
    assert newest is not None
    assert (newest[0].step, newest[1]["settings"]["run"]) == (8, {"seed": 7})
