"""A run whose task was given in code records ``task.factory: null``; only code can resume it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from tests.helpers.children import Cli
from tests.helpers.runs import quiet_config
from tests.helpers.tasks import make_batches, make_model
from traintel.run.api import build
from traintel.sinks.memory import MemorySink
from traintel.task import Task

CODE_TASK = {"factory": None, "params": {}}
"""The config's task entry for a task given in code."""


def _task() -> Task:
    return Task(model=make_model(), loss_fn=torch.nn.functional.mse_loss, train_loader=make_batches([4] * 4))


def _config(tmp_path: Path, max_epochs: int) -> dict[str, Any]:
    """2 optimizer steps an epoch, a checkpoint after each, under ``run.resume: auto``."""
    cfg = quiet_config(tmp_path, accumulation_steps=2, max_epochs=max_epochs)
    cfg["run"]["resume"] = "auto"
    cfg["checkpoint"] = {"every_steps": 1}
    return cfg


def _first_attempt(tmp_path: Path) -> tuple[Path, MemorySink]:
    memory = MemorySink()
    end = build(_config(tmp_path, 1), _task(), sinks=[memory]).run()
    assert (end.status, end.step) == ("completed", 2)
    return tmp_path / "run", memory


def test_a_code_task_is_recorded_as_a_null_factory_and_resumes_from_python(tmp_path: Path) -> None:
    run_dir, first = _first_attempt(tmp_path)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    assert saved["task"] == CODE_TASK
    (start,) = first.of("run.start")
    assert dict(start.config["task"]) == CODE_TASK  # type: ignore[attr-defined]

    memory = MemorySink()
    end = build(_config(tmp_path, 2), _task(), sinks=[memory]).run()

    (start,) = memory.of("run.start")
    assert (start.attempt, start.resumed_from_step) == (1, 2)  # type: ignore[attr-defined]
    assert [r.step for r in memory.of("train.step")] == [3, 4]  # type: ignore[attr-defined]
    assert (end.status, end.reason, end.epoch, end.step) == ("completed", "max_epochs", 2, 4)


def test_a_command_line_resume_of_a_code_task_run_says_how_to_resume_it(tmp_path: Path, cli: Cli) -> None:
    run_dir, _ = _first_attempt(tmp_path)
    before = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    how = (
        f"the run in {str(run_dir)!r} was given its task in code (task.factory: null), which the "
        "command line cannot make; resume it from Python: traintel.build(config, task) with the same "
        f"task, run.resume: auto and run.dir {str(run_dir)!r}"
    )

    resumed = cli("train", "--resume", str(run_dir), "--set", "trainer.max_epochs=2")
    assert (resumed.returncode, resumed.stdout) == (2, "")
    assert resumed.stderr == f"traintel: error: --resume: {how}\n"

    auto = cli("train", "--config", str(run_dir / "config.yaml"), "--set", "trainer.max_epochs=2")
    assert (auto.returncode, auto.stdout) == (2, "")
    assert auto.stderr == f"traintel: error: task.factory: {how}\n"

    after = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert after == before


def test_a_null_factory_without_a_task_in_code_is_bad_input(tmp_path: Path, cli: Cli) -> None:
    proc = cli("train", "--set", "task.factory=null", "--set", f"run.dir={tmp_path / 'run'}")
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == (
        "traintel: error: task.factory: is null, which says the task is given in code: pass it to "
        "traintel.build(config, task), or set a 'module:function' factory\n"
    )
    assert not (tmp_path / "run").exists()
