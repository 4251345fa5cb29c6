"""``checkpoint.best`` on real runs and real files: the best evaluation's step, value and model,
never pruned by ``keep`` and never resumed from; a resumed run compares with the best it holds; a
torn best or a kill -9 while one is written never leaves a best that is picked but broken; a write
error keeps the previous one; bad settings are exit 2 with one line, before training.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import random
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from ignite.engine import Events
from ignite.metrics import Metric

from tests.helpers.children import CHILD_TIMEOUT, child_env, popen, run_cli
from tests.helpers.fork_writer import ForkWriter
from tests.helpers.paths import DEFAULT_CONFIG, ROOT
from tests.helpers.resume import config as resume_config
from tests.helpers.resume import lines, same_tensors
from tests.helpers.runs import quiet_config
from tests.helpers.tasks import make_batches, make_model
from traintel.errors import ConfigError
from traintel.run import checkpoint
from traintel.run.api import build
from traintel.run.checkpoint import (
    FORMAT,
    Best,
    best,
    complete,
    load,
    model_and_optimizer,
    newest,
    prune,
    write,
    write_best,
)
from traintel.sinks.io import atomic
from traintel.sinks.memory import MemorySink
from traintel.task import Task

SIZES = [4, 3, 5, 2]
"""Micro-batches of an epoch; with ``accumulation_steps: 2``, two optimizer steps an epoch."""


class Scripted(Metric):
    """An Ignite metric whose n-th computation gives ``values[n]``: the evaluations' values, set by the test."""

    def __init__(self, values: list[float]) -> None:
        self.values, self.calls = list(values), 0
        super().__init__()

    def reset(self) -> None:
        pass

    def update(self, output: Any) -> None:
        pass

    def compute(self) -> float:
        self.calls += 1
        return self.values[self.calls - 1]


def _config(
    tmp_path: Path, max_epochs: int, checkpoint_cfg: dict[str, Any], **sections: Any
) -> dict[str, Any]:
    cfg = quiet_config(tmp_path, accumulation_steps=2, max_epochs=max_epochs)
    cfg["checkpoint"] = checkpoint_cfg
    cfg.update(sections)
    return cfg


def _run(
    cfg: dict[str, Any], values: list[float]
) -> tuple[MemorySink, Any, dict[int, dict[str, torch.Tensor]]]:
    """Train ``cfg``'s run with the metric ``score`` giving ``values``; returns its sink, the run and
    the model's parameters after each optimizer step (those its evaluations saw)."""
    batches = make_batches(SIZES)
    task = Task(
        model=make_model(), loss_fn=torch.nn.functional.mse_loss, train_loader=batches, val_loader=batches[:2],
        metrics={"score": Scripted(values)},
    )  # fmt: skip
    sink = MemorySink()
    run = build(cfg, task, sinks=[sink])
    params: dict[int, dict[str, torch.Tensor]] = {}

    def capture(engine: Any) -> None:
        params[engine.state.progress.run_steps] = {
            k: v.detach().clone() for k, v in run.model.state_dict().items()
        }

    run.trainer.add_event_handler(Events.ITERATION_COMPLETED, capture)
    run.run()
    return sink, run, params


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _best_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("new best checkpoint")]


# 1. what the best checkpoint holds


def test_the_best_checkpoint_holds_the_best_evaluation_s_step_value_and_model_and_keep_leaves_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = _config(
        tmp_path, 3, {"every_steps": 1, "keep": 1, "best": {"metric": "eval.score"}}, eval={"every_steps": 1}
    )
    values = [math.nan, 0.3, 0.5, 0.4, 0.9, 0.7]  # one evaluation after each of the 6 steps
    with caplog.at_level(logging.INFO, logger="traintel"):
        sink, _, params = _run(cfg, values)

    evaluated = [(r.step, r.epoch, r.metrics["score"]) for r in sink.of("eval.epoch")]  # type: ignore[attr-defined]
    assert [e[:2] for e in evaluated] == [(1, 1), (2, 1), (3, 2), (4, 2), (5, 3), (6, 3)]
    assert math.isnan(evaluated[0][2]) and [e[2] for e in evaluated[1:]] == values[1:]
    directory = tmp_path / "run" / "checkpoints"
    # keep: 1 pruned the periodic checkpoints down to the last; the best, of step 5, stays
    assert _names(directory) == ["best", "run.json", "step-000000006.json", "step-000000006.pt"]
    assert _names(directory / "best") == ["best-000000003.json", "best-000000003.pt"]

    found = best(directory)
    assert found is not None
    path = directory / "best" / "best-000000003.pt"
    data = path.read_bytes()
    assert found == Best(
        5, path, hashlib.sha256(data).hexdigest(), len(data), "eval.score", "val", "max", 0.9, 3, 3
    )
    assert json.loads((directory / "best" / "best-000000003.json").read_text(encoding="utf-8")) == {
        "format": FORMAT, "sequence": 3, "rank": 0, "world_size": 1, "metric": "eval.score", "split": "val", "mode": "max",
        "value": 0.9, "step": 5, "epoch": 3, "file": "best-000000003.pt", "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }  # fmt: skip
    state = load(found)
    assert (state["step"], state["progress"]["run_steps"]) == (5, 5)
    assert same_tensors(state["model"], params[5])
    assert not same_tensors(state["model"], params[6])  # not merely the newest
    assert same_tensors(torch.load(path, weights_only=True)["model"], params[5])
    # the NaN never counts; each strictly better value is written and logged once
    assert [line.split(", in ")[0] for line in _best_lines(caplog)] == [
        "new best checkpoint at step 2: eval.score = 0.3 on 'val' (max)",
        "new best checkpoint at step 3: eval.score = 0.5 on 'val' (max)",
        "new best checkpoint at step 5: eval.score = 0.9 on 'val' (max)",
    ]


def test_eval_loss_keeps_the_lowest_without_periodic_checkpoints_which_a_resume_needs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = _config(tmp_path, 3, {"best": {"metric": "eval.loss"}}, eval={"every_steps": 1})
    cfg["trainer"]["optimizer"]["lr"] = 0.65  # a loss that goes down, up, down and up: lowest at step 5
    with caplog.at_level(logging.INFO, logger="traintel"):
        sink, run, params = _run(cfg, [0.0] * 6)

    losses = [(r.step, r.loss) for r in sink.of("eval.epoch")]  # type: ignore[attr-defined]
    improved, low = [], math.inf
    for step, loss in losses:
        if loss < low:
            improved.append(step)
            low = loss
    step, value = min(losses, key=lambda s: s[1])
    assert (improved, step) == ([1, 3, 4, 5], 5)  # steps 2 and 6 were worse than an earlier one
    directory = tmp_path / "run" / "checkpoints"
    found = best(directory)
    assert found is not None
    assert (found.step, found.value, found.mode, found.metric, found.sequence) == (
        step, value, "min", "eval.loss", len(improved),
    )  # fmt: skip
    assert same_tensors(load(found)["model"], params[step])
    assert [int(re.search(r"at step (\d+):", line)[1]) for line in _best_lines(caplog)] == improved  # type: ignore[index]
    # no periodic checkpoint: nothing to resume from, and resuming is refused
    assert complete(directory, 0) == [] and newest(directory, 0) is None
    assert not run.config.checkpoint.enabled
    cfg["run"]["resume"] = "auto"
    with pytest.raises(ConfigError, match=r"^run\.resume: auto needs checkpoints"):
        _run(cfg, [0.0] * 6)
    with pytest.raises(ConfigError, match=r"^--resume: .* holds no complete checkpoint to resume from$"):
        build(
            cfg,
            Task(model=make_model(), loss_fn=torch.nn.functional.mse_loss, train_loader=[]),
            must_resume=True,
        )


# 2. resume


def test_a_resumed_run_keeps_its_best_against_a_worse_evaluation_and_replaces_it_with_a_better(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def attempt(
        max_epochs: int, values: list[float]
    ) -> tuple[MemorySink, dict[int, dict[str, torch.Tensor]]]:
        cfg = _config(tmp_path, max_epochs, {"every_epochs": 1, "keep": 1, "best": {"metric": "eval.score"}})
        cfg["run"]["resume"] = "auto"
        sink, _, params = _run(cfg, values)
        return sink, params

    directory = tmp_path / "run" / "checkpoints"
    _, params = attempt(2, [0.5, 0.8])  # evaluations at steps 2 and 4
    first = best(directory)
    assert first is not None and (first.step, first.value, first.sequence) == (4, 0.8, 2)
    assert same_tensors(load(first)["model"], params[4])

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="traintel"):
        sink, _ = attempt(3, [0.6])  # epoch 3, worse than the best the run holds
    start = sink.of("run.start")[0]
    assert (start.attempt, start.resumed_from_step) == (1, 4)  # type: ignore[attr-defined]
    assert [(r.step, r.metrics["score"]) for r in sink.of("eval.epoch")] == [(6, 0.6)]  # type: ignore[attr-defined]
    assert best(directory) == first
    assert _best_lines(caplog) == []

    sink, params = attempt(4, [0.95])  # epoch 4, better
    assert sink.of("run.start")[0].resumed_from_step == 6  # type: ignore[attr-defined]
    found = best(directory)
    assert found is not None and (found.step, found.epoch, found.value, found.sequence) == (8, 4, 0.95, 3)
    assert same_tensors(load(found)["model"], params[8])
    assert _names(directory / "best") == ["best-000000003.json", "best-000000003.pt"]


def test_resume_continues_from_the_newest_periodic_checkpoint_never_from_a_newer_best(tmp_path: Path) -> None:
    def attempt(max_epochs: int, values: list[float]) -> MemorySink:
        cfg = _config(tmp_path, max_epochs, {"every_epochs": 2, "best": {"metric": "eval.score"}})
        cfg["run"]["resume"] = "auto"
        return _run(cfg, values)[0]

    directory = tmp_path / "run" / "checkpoints"
    attempt(3, [0.1, 0.2, 0.9])  # the best at epoch 3 (step 6); the newest checkpoint at epoch 2 (step 4)
    assert [c.step for c in complete(directory, 0)] == [4]
    found = best(directory)
    assert found is not None and (found.step, found.value, found.sequence) == (6, 0.9, 3)

    sink = attempt(4, [0.9, 0.3])  # epoch 3 again, as good (not strictly better), then epoch 4
    assert sink.of("run.start")[0].resumed_from_step == 4  # type: ignore[attr-defined]
    assert [r.step for r in sink.of("eval.epoch")] == [6, 8]  # type: ignore[attr-defined]
    assert best(directory) == found


# 3. files: apart from the checkpoints, torn ones never picked, kill -9, a full disk


def _state(value: float, size: int = 16) -> dict[str, Any]:
    return {"format": FORMAT, "step": int(value), "weights": torch.arange(size, dtype=torch.float64) + value}


def _write(directory: Path, value: float, rank: int = 0) -> Best:
    return write_best(
        directory, rank, _state(value), metric="eval.loss", split="val", mode="min", value=value,
        step=int(value), epoch=1,
    )  # fmt: skip


def test_the_best_directory_is_apart_from_pruning_resume_and_temporary_files_of_other_ranks(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        write(directory, step, 0, _state(step))
    written = _write(directory, 9.0)
    leftovers = [".best-000000002.pt.x1.tmp", ".best-000000002.rank1.json.x2.tmp"]
    for name in leftovers:
        (directory / "best" / name).write_bytes(b"partial")

    assert [c.step for c in complete(directory, 0)] == [3, 2, 1]
    found = newest(directory, 0)
    assert found is not None and found[0].step == 3
    prune(directory, 0, 1)
    assert _names(directory) == ["best", "step-000000003.json", "step-000000003.pt"]
    assert checkpoint.remove_temporary(directory, 0) == 1  # rank 0's only
    assert _names(directory / "best") == [leftovers[1], "best-000000001.json", "best-000000001.pt"]
    assert best(directory) == written and best(directory, 1) is None
    assert best(tmp_path / "missing") is None


def _no_manifest(where: Path) -> None:
    (where / "best-000000002.json").unlink()


def _no_state(where: Path) -> None:
    (where / "best-000000002.pt").unlink()


def _truncated(where: Path) -> None:
    path = where / "best-000000002.pt"
    path.write_bytes(path.read_bytes()[:-1])


def _other_byte(where: Path) -> None:
    path = where / "best-000000002.pt"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))


def _manifest_text(text: str) -> Callable[[Path], None]:
    def damage(where: Path) -> None:
        (where / "best-000000002.json").write_text(text, encoding="utf-8")

    return damage


def _edit_manifest(**changes: Any) -> Callable[[Path], None]:
    def damage(where: Path) -> None:
        path = where / "best-000000002.json"
        path.write_text(
            json.dumps({**json.loads(path.read_text(encoding="utf-8")), **changes}), encoding="utf-8"
        )

    return damage


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(_no_manifest, id="state-file-without-manifest"),
        pytest.param(_no_state, id="manifest-without-state-file"),
        pytest.param(_truncated, id="state-file-truncated-by-one-byte"),
        pytest.param(_other_byte, id="state-file-of-the-same-size-other-bytes"),
        pytest.param(_manifest_text('{"format": 1, "sequence": 2, "ra'), id="manifest-cut-short"),
        pytest.param(_manifest_text(""), id="manifest-empty"),
        pytest.param(_edit_manifest(file="best-000000001.pt"), id="manifest-naming-another-file"),
        pytest.param(_edit_manifest(value="0.5"), id="manifest-value-not-a-number"),
        pytest.param(_edit_manifest(mode="lowest"), id="manifest-of-an-unknown-mode"),
    ],
)
def test_a_torn_best_is_never_returned_the_one_before_it_is(
    tmp_path: Path, damage: Callable[[Path], None]
) -> None:
    directory = tmp_path / "checkpoints"
    where = directory / "best"
    older = _write(directory, 1.0)
    kept = {name: (where / name).read_bytes() for name in _names(where)}
    newer = _write(directory, 0.5)
    assert _names(where) == ["best-000000002.json", "best-000000002.pt"]  # the older one removed
    assert best(directory) == newer
    for name, data in kept.items():  # as a crash between the new manifest and the removal leaves it
        (where / name).write_bytes(data)
    assert best(directory) == newer  # the newest written, whatever the values

    damage(where)

    assert best(directory) == older
    assert torch.equal(load(older)["weights"], _state(1.0)["weights"])
    for name in kept:
        (where / name).unlink()
    assert best(directory) is None


KILL_SIZE = 1 << 18
"""float32 elements: a 1 MiB state, so that a write (with its fsyncs) takes a while."""
KILL_ROUNDS = 12

BEST_WRITE = """
checkpoint.write_best(directory, 0, state, metric="eval.acc", split="val", mode="max", value=float(step),
                      step=step, epoch=1)
"""
"""Each writer's step: a best of ever better (max) values, each replacing the one before."""


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork and SIGKILL are POSIX")
def test_kill_9_while_a_best_is_written_leaves_the_previous_best_whole(tmp_path: Path) -> None:
    directory = tmp_path / "checkpoints"
    base = torch.arange(KILL_SIZE, dtype=torch.float32)
    write_best(directory, 0, {"format": FORMAT, "step": 1, "weights": base + 1}, metric="eval.acc", split="val",
               mode="max", value=1.0, step=1, epoch=1)  # fmt: skip
    server = ForkWriter(tmp_path, directory, KILL_SIZE, BEST_WRITE)
    rnd = random.Random(20240611)
    last, leftovers = 1, 0
    try:
        for _ in range(KILL_ROUNDS):
            reported = server.kill_writer(last + 1, rnd.uniform(0.0, 0.2))
            done = reported[-1] if reported else last

            found = best(directory)
            assert found is not None
            # the last best reported written, or the next one when its manifest was written before the kill
            assert found.value in (done, done + 1) and found.step == found.value
            assert torch.equal(load(found)["weights"], base + found.value)
            files = _names(directory / "best")
            manifests = [n for n in files if n.endswith(".json")]
            states = [n for n in files if n.endswith(".pt")]
            assert all(n.removesuffix(".json") + ".pt" in states for n in manifests), files
            leftovers += len(files) > 2
            last = int(found.value)
    finally:
        code = server.close()
    assert code == 0, server.stderr_path.read_text(errors="replace")
    # the next best removes whatever the kills left, temporary files included
    newer = _write(directory, 1000.0)
    assert best(directory) == newer
    assert _names(directory / "best") == [f"best-{newer.sequence:09d}.json", f"best-{newer.sequence:09d}.pt"]
    print(f"\n{KILL_ROUNDS} kills, {leftovers} rounds left files of an unfinished best")


def test_a_best_that_cannot_be_written_leaves_the_previous_one_and_training_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_write_atomic = atomic.write_atomic

    def full_disk(path: Path, data: bytes | str, *, mode: int | None = None) -> None:
        if path.name == "best-000000002.pt" and not full_disk.failed:  # type: ignore[attr-defined]
            full_disk.failed = True  # type: ignore[attr-defined]
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write_atomic(path, data, mode=mode)

    full_disk.failed = False  # type: ignore[attr-defined]
    monkeypatch.setattr("traintel.run.checkpoint.write_atomic", full_disk)
    cfg = _config(tmp_path, 3, {"best": {"metric": "eval.score"}})
    with caplog.at_level(logging.INFO, logger="traintel"):
        sink, _, params = _run(cfg, [0.1, 0.9, 0.5])

    assert sink.records[-1].status == "completed"  # type: ignore[attr-defined]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == ["best checkpoint at step 4 not written: OSError: [Errno 28] No space left on device"]
    # the best on disk is the one compared with: 0.5 beats it, though not the 0.9 that was lost
    found = best(tmp_path / "run" / "checkpoints")
    assert found is not None and (found.step, found.value, found.sequence) == (6, 0.5, 2)
    assert same_tensors(load(found)["model"], params[6])
    assert _names(tmp_path / "run" / "checkpoints" / "best") == ["best-000000002.json", "best-000000002.pt"]


@pytest.mark.slow
def test_under_torchrun_every_rank_keeps_the_same_evaluation_s_best_in_its_own_files(tmp_path: Path) -> None:
    cfg = resume_config(0)
    cfg["task"]["params"]["samples"] = 480  # 240 per rank
    cfg["trainer"]["distributed"] = {"backend": "gloo", "timeout_seconds": 30}
    cfg["checkpoint"] = {"every_epochs": 1, "keep": 1, "best": {"metric": "eval.loss"}}
    cfg["sinks"]["diagnostic"] = {"enabled": False}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    env = child_env(extra={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "traintel",
           "train", "-c", "config.yaml", "--set", f"run.dir={tmp_path / 'run'}"]  # fmt: skip
    proc = popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=CHILD_TIMEOUT)
    assert proc.returncode == 0, err

    evals = [(d["step"], d["loss"]) for d in lines(out) if d["event"] == "eval.epoch"]
    step, value = min(evals, key=lambda e: e[1])
    directory = tmp_path / "run" / "checkpoints"
    first, second = best(directory, 0), best(directory, 1)
    assert first is not None and second is not None
    found = [first, second]
    assert [(f.step, f.value, f.sequence, f.path.name) for f in found] == [
        (step, value, found[0].sequence, f"best-{found[0].sequence:09d}.pt"),
        (step, value, found[0].sequence, f"best-{found[0].sequence:09d}.rank1.pt"),
    ]
    states = [load(f) for f in found]
    assert (
        states[0]["shards"] == states[1]["shards"] == directory / "best" / f"best-{found[0].sequence:09d}.dcp"
    )
    model = model_and_optimizer(states[0])["model"]  # one copy of the ranks' one model, in one directory
    assert sorted(model) == ["net.0.bias", "net.0.weight", "net.3.bias", "net.3.weight"]
    assert states[0]["step"] == states[1]["step"] == step


# 4. bad input


WITH_METRICS = textwrap.dedent(
    """\
    from ignite.metrics import MeanAbsoluteError

    from traintel.tasks.forecast import make_task as base


    def make_task(**params):
        task = base(**params)
        task.metrics = {"mae": MeanAbsoluteError()}
        return task
    """
)

BAD = [
    ("checkpoint.best.metric=loss",
     "checkpoint.best.metric: must be 'eval.loss' or 'eval.<name>' of a metric in the task's metrics, got 'loss'"),
    ("checkpoint.best={metric: eval.loss, mode: lowest}",
     "checkpoint.best.mode: must be one of 'min' or 'max' (got 'lowest')"),
    ("checkpoint.best=eval.loss",
     "checkpoint.best: must be null or a mapping such as {metric: eval.loss}, got 'eval.loss'"),
    ("checkpoint.best={split: val}", "checkpoint.best.metric: field required"),
    ("checkpoint.best.metric=eval.acc",
     "checkpoint.best.metric: must be 'eval.loss' or one of the task's metrics ('eval.mae'), got 'eval.acc'"),
    ("checkpoint.best={metric: eval.loss, split: test}",
     "checkpoint.best.split: must be a split the task evaluates ('val'), got 'test'"),
]  # fmt: skip
"""(``--set`` override, the exact line after ``traintel: error: ``), with a task whose metric is ``mae``."""


@pytest.mark.parametrize(
    ("override", "error"), BAD, ids=[e.split(":")[0] + "-" + str(i) for i, (_, e) in enumerate(BAD)]
)
def test_bad_best_settings_exit_2_with_one_line_before_training(
    tmp_path: Path, override: str, error: str
) -> None:
    (tmp_path / "with_metrics.py").write_text(WITH_METRICS, encoding="utf-8")
    _bad(tmp_path, error, "task.factory=with_metrics:make_task", override)


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        (["checkpoint.best.metric=eval.mae"], "checkpoint.best.metric: must be 'eval.loss' (the task has no metrics), got 'eval.mae'"),
        (["checkpoint.best.metric=eval.loss", "task.params.val_samples=0"],
         "checkpoint.best.split: the task has no validation data (val_loader or val_loaders) to evaluate 'val' on"),
        (["checkpoint.best.metric=eval.loss", "eval.every_epochs=null"],
         "checkpoint.best: needs evaluations: set eval.every_epochs or eval.every_steps (both are null)"),
    ],
    ids=["no-metrics", "no-validation-data", "no-evaluations"],
)  # fmt: skip
def test_a_best_the_built_in_task_cannot_evaluate_exits_2(
    tmp_path: Path, overrides: list[str], error: str
) -> None:
    _bad(tmp_path, error, *overrides)


def _bad(tmp_path: Path, error: str, *overrides: str) -> None:
    args = ["train", "--config", str(DEFAULT_CONFIG), "--set", f"run.dir={tmp_path / 'run'}",
            "--set", "sinks.prometheus.port=0", "--set", "trainer.device=cpu"]  # fmt: skip
    proc = run_cli(tmp_path, *args, *[a for o in overrides for a in ("--set", o)])
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", f"traintel: error: {error}\n")
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written
