"""``trainer.on_nonfinite``: a NaN loss at a known step under ``warn`` (report it, train on), ``stop``
(fail the run naming the step, when its records are delivered) and ``skip_step`` (do not take that
window's optimizer step)."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from ignite.engine import Events

from tests.helpers.children import run_child, run_cli
from tests.helpers.lines import strict_object
from tests.helpers.runs import quiet_config
from tests.helpers.tasks import make_batches, make_model
from traintel.engine.coordination import Coordinator
from traintel.engine.progress import Progress
from traintel.errors import NonFiniteLoss
from traintel.run import layout
from traintel.run.api import Run, build
from traintel.task import Task

SIZES = [4, 3, 5, 2, 4, 1, 3, 2]
"""Micro-batch sizes; in windows of 2 the steps hold 7, 7, 5 and 5 items."""


def nan_batches(nan_batch: int | None, sizes: list[int] = SIZES) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``make_batches(sizes)`` with one NaN input in the ``nan_batch``-th micro-batch (1-based)."""
    data = make_batches(sizes)
    if nan_batch is not None:
        data[nan_batch - 1][0][0, 0] = math.nan
    return data


def train(
    tmp_path: Path,
    data: list[Any],
    *,
    every: int = 1,
    attach: Callable[[Run], None] | None = None,
    **trainer: Any,
) -> tuple[list[dict[str, Any]], Run, NonFiniteLoss | None]:
    """One epoch of ``data`` with the JSON sink on a buffer, every emitted step delivered at once;
    returns the parsed lines, the run and the ``NonFiniteLoss`` it raised, if any."""
    cfg = quiet_config(tmp_path, **trainer)
    cfg["telemetry"] = {"every": every, "max_delay_seconds": 0}
    cfg["sinks"]["json"] = {"enabled": True}
    stream = io.BytesIO()
    task = Task(model=make_model(), loss_fn=torch.nn.functional.mse_loss, train_loader=data)
    run = build(cfg, task, json_stream=stream)
    if attach is not None:
        attach(run)
    raised: NonFiniteLoss | None = None
    try:
        run.run()
    except NonFiniteLoss as exc:
        raised = exc
    return [strict_object(line) for line in stream.getvalue().splitlines()], run, raised


def records(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The record lines (a log line names its ``logger``)."""
    return [r for r in rows if "logger" not in r]


def steps(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["event"] == "train.step"]


# --------------------------------------------------------------------------- warn


def test_warn_is_the_default_and_reports_the_nan_and_trains_on(tmp_path: Path) -> None:
    rows, run, raised = train(tmp_path, nan_batches(5), accumulation_steps=2)
    assert raised is None and run.config.trainer.on_nonfinite == "warn"
    assert [(s["step"], s["skipped"], s["loss"] is None, s.get("nonfinite")) for s in steps(rows)] == [
        (1, False, False, None),
        (2, False, False, None),
        (3, False, True, {"loss": "nan"}),
        (4, False, True, {"loss": "nan"}),  # the NaN reached the parameters
    ]
    bad = [r for r in rows if r["event"] == "train.batch" and r["batch"] == 5]
    assert [(b["raw_loss"], b["loss"], b["nonfinite"]) for b in bad] == [
        (None, None, {"raw_loss": "nan", "loss": "nan"})
    ]
    (epoch,) = [r for r in rows if r["event"] == "train.epoch"]
    assert (epoch["loss"], epoch["nonfinite"], epoch["items"], epoch["steps"]) == (
        None,
        {"loss": "nan"},
        24,
        4,
    )
    end = rows[-1]
    assert (end["event"], end["status"], end["reason"], end["step"]) == (
        "run.end",
        "completed",
        "max_epochs",
        4,
    )
    assert not [r for r in rows if r.get("level") == "warning"]


# --------------------------------------------------------------------------- stop

STOP_REASON = "NonFiniteLoss: non-finite loss at step {} (trainer.on_nonfinite=stop)"


def test_stop_delivers_the_bad_step_then_fails_the_run_naming_it(tmp_path: Path) -> None:
    rows, _run, raised = train(tmp_path, nan_batches(5), accumulation_steps=2, on_nonfinite="stop")
    assert raised is not None and raised.step == 3
    assert str(raised) == "non-finite loss at step 3 (trainer.on_nonfinite=stop)"
    assert [(r["event"], r.get("step")) for r in records(rows)] == [
        ("run.start", None),
        ("train.batch", 0), ("train.batch", 0), ("train.step", 1),
        ("train.batch", 1), ("train.batch", 1), ("train.step", 2),
        ("train.batch", 2), ("train.batch", 2), ("train.step", 3),
        ("run.end", 3),
    ]  # fmt: skip
    bad = steps(rows)[-1]
    assert (bad["loss"], bad["nonfinite"], bad["skipped"]) == (None, {"loss": "nan"}, False)
    end = rows[-1]
    assert (end["event"], end["level"], end["status"], end["reason"]) == (
        "run.end", "error", "failed", STOP_REASON.format(3)
    )  # fmt: skip
    assert rows[-2]["event"] == "training failed"


@pytest.mark.parametrize(
    ("nan_step", "windows", "delivered", "end_step"),
    [
        pytest.param(5, 7, [3, 6], 6, id="between-two-emitted-steps"),
        pytest.param(4, 5, [3], 5, id="after-the-last-emitted-step"),
        pytest.param(6, 7, [3, 6], 6, id="at-an-emitted-step"),
    ],
)
def test_stop_checks_the_steps_that_are_not_emitted(
    tmp_path: Path, nan_step: int, windows: int, delivered: list[int], end_step: int
) -> None:
    """Every third step is emitted; a NaN at a step in between is still named exactly."""
    data = nan_batches(nan_step, [3] * windows)
    rows, _run, raised = train(tmp_path, data, every=3, accumulation_steps=1, on_nonfinite="stop")
    assert raised is not None and raised.step == nan_step
    assert [s["step"] for s in steps(rows)] == delivered
    end = rows[-1]
    assert (end["event"], end["status"], end["reason"], end["step"]) == (
        "run.end", "failed", STOP_REASON.format(nan_step), end_step
    )  # fmt: skip
    assert "train.epoch" not in [r["event"] for r in rows]


def test_stop_checks_unemitted_steps_at_most_max_pending_apart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without an emitted step, the kept steps are checked once ``MAX_PENDING`` of them wait."""
    monkeypatch.setattr("traintel.handlers.telemetry.MAX_PENDING", 2)
    data = nan_batches(3, [3] * 8)
    rows, _run, raised = train(tmp_path, data, every=100, accumulation_steps=1, on_nonfinite="stop")
    assert raised is not None and raised.step == 3
    assert [(r["event"], r.get("step")) for r in records(rows)] == [("run.start", None), ("run.end", 4)]


def test_stop_passes_a_finite_run_unchanged(tmp_path: Path) -> None:
    """Under ``stop`` a finite run's lines equal those under ``warn`` (apart from times and paths)."""

    def view(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        drop = {"timestamp", "duration_seconds", "items_per_second", "config", "run_dir"}
        return [{k: v for k, v in r.items() if k not in drop} for r in rows]

    warn, _, _ = train(tmp_path / "warn", nan_batches(None), every=3, accumulation_steps=1)
    stop, _, raised = train(
        tmp_path / "stop", nan_batches(None), every=3, accumulation_steps=1, on_nonfinite="stop"
    )
    assert raised is None
    assert view(stop) == view(warn)
    assert stop[-1]["status"] == "completed"


# --------------------------------------------------------------------------- skip_step


def params_after_each_step(run: Run, into: list[list[torch.Tensor]]) -> None:
    run.trainer.add_event_handler(
        Events.ITERATION_COMPLETED,
        lambda _: into.append([p.detach().clone() for p in run.task.model.parameters()]),
    )


def test_skip_step_does_not_take_the_step_of_a_nan_window(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trainer: dict[str, Any] = {
        "accumulation_steps": 2,
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
        "scheduler": {"name": "exponential", "gamma": 0.5},
        "report_grad_norm": True,
    }
    params: list[list[torch.Tensor]] = []
    caplog.set_level(logging.WARNING, logger="traintel")
    rows, run, raised = train(
        tmp_path / "skip",
        nan_batches(5),
        attach=lambda r: params_after_each_step(r, params),
        on_nonfinite="skip_step",
        **trainer,
    )
    assert raised is None
    got = steps(rows)
    assert [(s["step"], s["skipped"], s["items"], s["items_total"]) for s in got] == [
        (1, False, 7, 7),
        (2, False, 7, 14),
        (2, True, 5, 14),  # not a step: the counter stays, its items are not counted
        (3, False, 5, 19),  # the next step takes the number the NaN window would have had
    ]
    skipped = got[2]
    assert (skipped["loss"], skipped["nonfinite"], skipped["grad_norm"]) == (None, {"loss": "nan"}, None)
    assert all(s["grad_norm"] is not None for s in (got[0], got[1], got[3]))
    assert [s["lr"] for s in got] == [0.1, 0.05, 0.025, 0.025]  # the scheduler did not step either
    before, after = params[1], params[2]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert all(torch.isfinite(p).all() for p in params[-1])
    (epoch,) = [r for r in rows if r["event"] == "train.epoch"]
    assert (epoch["items"], epoch["steps"], epoch["batches"], epoch["step"]) == (19, 3, 8, 3)
    kept = [s for s in got if not s["skipped"]]
    mean = math.fsum(s["loss"] * s["items"] for s in kept) / sum(s["items"] for s in kept)
    assert math.isfinite(epoch["loss"]) and epoch["loss"] == pytest.approx(mean, rel=1e-12, abs=0)
    assert [(r.name, r.getMessage()) for r in caplog.records if r.levelno == logging.WARNING] == [
        (
            "traintel",
            "non-finite loss at step 3 in epoch 1: optimizer step not taken (trainer.on_nonfinite=skip_step)",
        )
    ]
    end = rows[-1]
    assert (end["event"], end["status"], end["step"], end["items_total"]) == ("run.end", "completed", 3, 19)

    # The same as a run without that window: same steps, losses, epoch loss and parameters, bit for bit.
    clean_data = nan_batches(None)
    del clean_data[4:6]
    clean, clean_run, _ = train(tmp_path / "clean", clean_data, **trainer)
    same = ("step", "items", "items_total", "loss", "lr", "grad_norm")
    assert [[s[k] for k in same] for s in kept] == [[s[k] for k in same] for s in steps(clean)]
    (clean_epoch,) = [r for r in clean if r["event"] == "train.epoch"]
    assert epoch["loss"] == clean_epoch["loss"]
    final = [p.detach() for p in run.task.model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(final, clean_run.task.model.parameters(), strict=True))


def test_skip_step_leaves_a_finite_run_unchanged(tmp_path: Path) -> None:
    warn, _, _ = train(tmp_path / "warn", nan_batches(None), accumulation_steps=2)
    skip, _, _ = train(tmp_path / "skip", nan_batches(None), accumulation_steps=2, on_nonfinite="skip_step")
    same = ("step", "skipped", "loss", "items_total")
    assert [[s[k] for k in same] for s in steps(skip)] == [[s[k] for k in same] for s in steps(warn)]


def test_progress_counts_a_window_not_stepped_without_its_step_items_or_loss() -> None:
    progress = Progress()
    progress.start_epoch(1)
    progress.add_window((torch.tensor(0.5), torch.tensor(0.25)), 2, 6)
    progress.add_window((torch.tensor(math.nan),), 1, 3, stepped=False)
    assert (progress.windows, progress.batches, progress.steps, progress.items) == (2, 3, 1, 6)
    assert (progress.run_steps, progress.run_items) == (1, 6)
    assert progress.loss_sum.item() == 6 * 0.75


def test_a_single_process_coordinator_agrees_with_itself_on_finiteness() -> None:
    assert (Coordinator().all_true(True), Coordinator().all_true(False)) == (True, False)


# --------------------------------------------------------------------------- command line and ranks

NAN_TASK = textwrap.dedent(
    """\
    import math
    import os

    import torch

    from traintel.tasks.forecast import make_task as base


    def make_task(rank=0, call=7, **params):
        \"\"\"The built-in task whose loss is NaN at its ``call``-th micro-batch on ``rank``.\"\"\"
        task = base(**params)
        here = int(os.environ.get("RANK", "0"))
        calls = 0

        def loss_fn(out, target):
            nonlocal calls
            calls += 1
            loss = torch.nn.functional.mse_loss(out, target)
            return loss * math.nan if here == rank and calls == call else loss

        task.loss_fn = loss_fn
        return task
    """
)
SMALL_TASK = "{train_samples: 96, val_samples: 0, batch_size: 8, hidden: 8, call: 7}"
"""12 micro-batches: 4 windows of 3; the 7th micro-batch is in the 3rd."""


@pytest.mark.slow
def test_cli_stop_exits_1_with_run_end_last(tmp_path: Path) -> None:
    (tmp_path / "nan_task.py").write_text(NAN_TASK)
    proc = run_cli(
        tmp_path, "train",
        "--set", "task.factory=nan_task:make_task", "--set", f"task.params={SMALL_TASK}",
        "--set", "trainer.max_epochs=2", "--set", "trainer.device=cpu", "--set", "trainer.on_nonfinite=stop",
        "--set", "telemetry.every=2", "--set", "sinks.prometheus.enabled=false", "--set", f"run.dir={tmp_path / 'run'}",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == f"traintel: error: training failed: {STOP_REASON.format(3)}\n"
    rows = [strict_object(line) for line in proc.stdout.splitlines()]
    assert [s["step"] for s in steps(rows)] == [2, 4]  # step 3 is not emitted, yet it is the one named
    end = rows[-1]
    assert (end["event"], end["status"], end["reason"], end["epoch"], end["step"]) == (
        "run.end", "failed", STOP_REASON.format(3), 1, 4
    )  # fmt: skip
    assert "train.epoch" not in [r["event"] for r in rows]


def _torchrun(tmp_path: Path, *overrides: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    """Two gloo ranks of ``traintel train`` with the NaN task; rank 0's stdout lines, rank 1's
    diagnostic file lines, and stderr."""
    (tmp_path / "nan_task.py").write_text(NAN_TASK)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINTEL__")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(tmp_path))
    params = "{train_samples: 96, val_samples: 0, batch_size: 8, hidden: 8, rank: 1, call: 3}"
    sets = [
        arg
        for o in (
            "task.factory=nan_task:make_task",
            f"task.params={params}",
            "trainer.max_epochs=1",
            "trainer.accumulation_steps=1",
            "trainer.device=cpu",
            "sinks.prometheus.enabled=false",
            f"run.dir={tmp_path / 'run'}",
            *overrides,
        )
        for arg in ("--set", o)
    ]
    proc = run_child(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "traintel",
         "train", *sets],
        tmp_path, env, timeout=120,
    )  # fmt: skip
    rank0 = [strict_object(line) for line in proc.stdout.splitlines()]
    rank1 = [
        json.loads(line) for line in (tmp_path / "run" / "diagnostic.rank1.jsonl").read_text().splitlines()
    ]
    return rank0, rank1, proc.stderr


@pytest.mark.slow
def test_two_ranks_stop_at_the_same_step_when_one_rank_has_the_nan(tmp_path: Path) -> None:
    """Step 3 is not emitted and rank 0's own loss there is finite: only the summed loss (the same
    collective as the emitted steps') shows the NaN, and both ranks end after step 3, which rank 0's
    clock had asked to deliver at."""
    rank0, rank1, stderr = _torchrun(tmp_path, "trainer.on_nonfinite=stop", "telemetry.every=2")
    for rows in (rank0, rank1):
        end = rows[-1]
        assert (end["event"], end["status"], end["step"]) == ("run.end", "failed", 3), stderr[-3000:]
        assert "non-finite loss at step 3 (trainer.on_nonfinite=stop)" in end["reason"]
        assert [s["step"] for s in steps(rows)] == [2]
        # either rank may be named first ("rank r: ... (here: ...)"): both fail for the same reason
        assert end["reason"].replace(STOP_REASON.format(3), "X") in (
            "X",
            "rank 0: X (here: X)",
            "rank 1: X (here: X)",
        )


@pytest.mark.slow
def test_two_ranks_skip_the_same_step_when_one_rank_has_the_nan(tmp_path: Path) -> None:
    rank0, rank1, stderr = _torchrun(tmp_path, "trainer.on_nonfinite=skip_step", "telemetry.every=1")
    expected = [(1, False), (2, False), (2, True), (3, False), (4, False), (5, False)]
    for rows in (rank0, rank1):
        assert [(s["step"], s["skipped"]) for s in steps(rows)] == expected, stderr[-3000:]
        end = rows[-1]
        assert (end["event"], end["status"], end["step"]) == ("run.end", "completed", 5)
    (epoch0,) = [r for r in rank0 if r["event"] == "train.epoch"]
    (epoch1,) = [r for r in rank1 if r["event"] == "train.epoch"]
    assert math.isfinite(epoch0["loss"]) and epoch0["loss"] == epoch1["loss"]
    assert (epoch0["items"], epoch0["steps"]) == (80, 5)  # 96 items less the skipped window's 16
    message = (
        "non-finite loss at step 3 in epoch 1: optimizer step not taken (trainer.on_nonfinite=skip_step)"
    )
    assert [r["event"] for r in rank0 if r.get("logger") == "traintel"] == [message]
    assert message in stderr  # rank 1's warnings go to stderr


def test_stop_keeps_the_last_checkpoint_taken_before_the_bad_step(tmp_path: Path) -> None:
    """Every step is checkpointed, but a checkpoint is committed only after its step's records are
    delivered, and delivering step 3's records is where the NaN is found: step 2's stays the newest."""
    from traintel.run import checkpoint

    cfg = quiet_config(tmp_path, accumulation_steps=1, on_nonfinite="stop")
    cfg["telemetry"] = {"every": 1, "max_delay_seconds": 60}  # delivered only when a checkpoint asks
    cfg["checkpoint"] = {"every_steps": 1, "keep": 5}
    task = Task(model=make_model(), loss_fn=torch.nn.functional.mse_loss, train_loader=nan_batches(3))
    run = build(cfg, task)
    with pytest.raises(NonFiniteLoss, match=r"^non-finite loss at step 3 \(trainer.on_nonfinite=stop\)$"):
        run.run()
    directory = tmp_path / "run" / layout.CHECKPOINT_DIRECTORY
    assert [c.step for c in checkpoint.complete(directory, 0)] == [2, 1]
