"""``trainer.max_steps``: the run ends after that optimizer step, mid-epoch if need be, with a record
of the part-epoch, ``run.end`` reason ``max_steps``, a schedule as long as the run, and a checkpoint
that a longer run continues from, bit for bit."""

from __future__ import annotations

import math
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tests.helpers import resume
from tests.helpers.plain import plain_loop
from tests.helpers.runs import quiet_config
from tests.helpers.tasks import make_batches, make_model
from traintel.errors import ConfigError
from traintel.run.api import build
from traintel.sinks.memory import MemorySink
from traintel.task import Task

SIZES = [4, 3, 5, 2, 4, 1, 3, 2]  # k=3: windows of 3, 3 and 2 micro-batches, 3 steps an epoch


def _run(tmp_path: Path, *, checkpoints: bool = False, **trainer: Any) -> tuple[MemorySink, Any]:
    cfg = quiet_config(tmp_path, accumulation_steps=3, **{"max_epochs": 5, **trainer})
    if checkpoints:
        cfg["run"]["resume"] = "auto"
        cfg["checkpoint"] = {"every_steps": 2}
    sink = MemorySink()
    batches = make_batches(SIZES)
    task = Task(
        model=make_model(), loss_fn=torch.nn.functional.mse_loss, train_loader=batches, val_loader=batches[:2]
    )
    run = build(cfg, task, sinks=[sink])
    run.run()
    return sink, run


def plain(steps: int) -> tuple[list[float], torch.nn.Module]:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses, _ = plain_loop(model, make_batches(SIZES), 3, opt, epochs=steps, max_steps=steps)
    return losses, model


def test_max_steps_ends_mid_epoch_with_a_record_of_the_part_epoch(tmp_path: Path) -> None:
    sink, run = _run(tmp_path, max_steps=4)
    want, theirs = plain(4)
    assert [r.loss for r in sink.of("train.step")] == want  # type: ignore[attr-defined]
    for p, q in zip(run.model.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(p, q)
    epochs = [(r.epoch, r.step, r.steps, r.items, r.batches) for r in sink.of("train.epoch")]  # type: ignore[attr-defined]
    assert epochs == [(1, 3, 3, 24, 8), (2, 4, 1, 12, 3)]
    assert [(r.epoch, r.step) for r in sink.of("eval.epoch")] == [(1, 3)]  # type: ignore[attr-defined]
    end = sink.records[-1]
    assert (end.event, end.status, end.reason, end.epoch, end.step) == (
        "run.end",
        "completed",
        "max_steps",
        2,
        4,
    )  # type: ignore[attr-defined]
    assert [e.event for e in sink.records[-3:]] == ["train.step", "train.epoch", "run.end"]


def test_max_steps_at_an_epochs_last_step_ends_after_the_epochs_end(tmp_path: Path) -> None:
    sink, _ = _run(tmp_path, max_steps=6)
    assert [(r.epoch, r.steps) for r in sink.of("train.epoch")] == [(1, 3), (2, 3)]  # type: ignore[attr-defined]
    assert [(r.epoch, r.step) for r in sink.of("eval.epoch")] == [(1, 3), (2, 6)]  # type: ignore[attr-defined]
    assert sink.records[-1].reason == "max_steps"  # type: ignore[attr-defined]


def test_a_schedule_defaults_to_the_runs_steps_and_an_unreachable_limit_is_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sink, run = _run(tmp_path / "a", max_steps=4, scheduler={"name": "cosine"})
    assert run.scheduler.T_max == 4
    assert [r.lr for r in sink.of("train.step")] == pytest.approx(  # type: ignore[attr-defined]
        [0.05 * (1 + math.cos(math.pi * t / 4)) for t in range(4)], rel=1e-14
    )
    caplog.clear()
    sink, run = _run(tmp_path / "b", max_steps=100, max_epochs=2, scheduler={"name": "cosine"})
    assert run.scheduler.T_max == 6
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        "trainer.max_steps: 100 steps are more than trainer.max_epochs holds (2 epochs of 3): the run ends "
        "at step 6 unless trainer.max_epochs is raised"
    ]
    assert sink.records[-1].reason == "max_epochs"  # type: ignore[attr-defined]


def test_a_longer_run_continues_the_cut_epoch_from_its_last_checkpoint_bit_for_bit(tmp_path: Path) -> None:
    whole, _ = _run(tmp_path / "whole", max_steps=8)
    first, _ = _run(tmp_path / "split", checkpoints=True, max_steps=4)
    with pytest.raises(ConfigError) as caught:
        _run(tmp_path / "split", checkpoints=True, max_steps=4)
    assert str(caught.value) == (
        "trainer.max_steps: the checkpoint at step 4 reaches max_steps 4; raise trainer.max_steps to train on"
    )
    rest, run = _run(tmp_path / "split", checkpoints=True, max_steps=8)
    assert run.resumed_from_step == 4
    losses = [r.loss for r in first.of("train.step") + rest.of("train.step")]  # type: ignore[attr-defined]
    assert losses == [r.loss for r in whole.of("train.step")]  # type: ignore[attr-defined]
    # the cut epoch 2 has a record of its part in the first attempt, and its whole in the second
    assert [(r.epoch, r.steps, r.items) for r in rest.of("train.epoch")] == [(2, 3, 24), (3, 2, 19)]  # type: ignore[attr-defined]
    assert [(r.epoch, r.steps) for r in whole.of("train.epoch")] == [(1, 3), (2, 3), (3, 2)]  # type: ignore[attr-defined]
    assert [r.loss for r in rest.of("train.epoch")] == [r.loss for r in whole.of("train.epoch")][1:]  # type: ignore[attr-defined]
    for p, q in zip(run.model.parameters(), plain(8)[1].parameters(), strict=True):
        assert torch.equal(p, q)


def _records(text: str, event: str) -> list[tuple[int, str]]:
    """(step, loss as float.hex) of each ``event`` line."""
    return [(d["step"], float(d["loss"]).hex()) for d in resume.lines(text) if d["event"] == event]


@pytest.mark.slow
def test_sigkill_then_resume_with_max_steps_and_evaluations_after_steps_logs_the_same_bits(
    tmp_path: Path,
) -> None:
    cfg = resume.config(0)  # 4 steps an epoch, shuffled data, dropout, a cosine schedule
    cfg["trainer"]["max_steps"] = 10  # mid-epoch 3
    cfg["eval"] = {"every_steps": 5, "every_epochs": None}  # at step 5 (mid-epoch 2) and 10
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    whole = resume.traintel(["-c", "config.yaml", "--set", f"run.dir={tmp_path / 'whole'}"], tmp_path)
    assert whole.returncode == 0, whole.stderr
    assert [s for s, _ in _records(whole.stdout, "eval.epoch")] == [5, 10]
    assert [s for s, _ in _records(whole.stdout, "train.step")] == list(range(1, 11))

    run_dir = tmp_path / "run"
    killed = resume.traintel(["-c", "config.yaml", "--set", f"run.dir={run_dir}"], tmp_path, at="train:25")
    assert killed.returncode == -signal.SIGKILL, killed.stderr  # inside step 7, after step 6's checkpoint
    resumed = resume.traintel(["--resume", str(run_dir)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    start = next(resume.lines(resumed.stdout))
    assert (start["attempt"], start["resumed_from_step"]) == (1, 6)
    end = list(resume.lines(resumed.stdout))[-1]
    assert (end["event"], end["status"], end["reason"], end["step"]) == (
        "run.end",
        "completed",
        "max_steps",
        10,
    )
    first = [
        line for line in (run_dir / "diagnostic.jsonl").read_text().splitlines() if '"attempt":0' in line
    ]
    for event in ("train.step", "eval.epoch"):
        logged = _records("\n".join(first), event) + _records(resumed.stdout, event)
        assert sorted(set(logged)) == _records(whole.stdout, event), event  # a step logged twice: same bits
