"""The resume tests' run: its config, a child that trains it, and what to compare between runs."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from tests.helpers.children import CHILD_TIMEOUT, Child, child_env, popen, run_child
from tests.helpers.paths import ROOT
from traintel.run import checkpoint, layout

WINDOWS = (4, 4, 4, 3)
"""Micro-batches of each window of an epoch: 240 samples in batches of 16 are 15 micro-batches, k=4."""
EPOCHS = 3
STEPS = len(WINDOWS) * EPOCHS


def config(workers: int) -> dict[str, Any]:
    """Shuffled noisy data, dropout, SGD with momentum, a cosine schedule; a checkpoint every 3 steps
    and at every epoch's end."""
    return {
        "run": {"name": "resume", "seed": 7},
        "task": {"factory": "tests.helpers.resume_task:make_task", "params": {"num_workers": workers}},
        "trainer": {
            "max_epochs": EPOCHS,
            "accumulation_steps": 4,
            "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
            "scheduler": {"name": "cosine"},
            "grad_clip_norm": 5.0,
            "device": "cpu",
        },
        "telemetry": {"every": 1},
        "sinks": {"prometheus": {"enabled": False}},
        "checkpoint": {"every_steps": 3, "every_epochs": 1, "keep": 2},
    }


def traintel(args: list[str], cwd: Path, at: str | None = None) -> subprocess.CompletedProcess[str]:
    extra = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if at is not None:
        extra["RESUME_TEST_AT"] = at
    return run_child(
        [sys.executable, "-m", "traintel", "train", *args],
        cwd=cwd, env=child_env(extra=extra), timeout=CHILD_TIMEOUT,
    )  # fmt: skip


def lines(text: str) -> Iterator[dict[str, Any]]:
    """The whole JSON lines of a stdout (a kill may cut the last one short)."""
    for line in text.splitlines():
        try:
            yield json.loads(line)
        except ValueError:
            continue


def losses(text: str) -> dict[Any, str]:
    """Each step's loss, epoch loss and evaluation loss, as ``float.hex``."""
    found: dict[Any, str] = {}
    for d in lines(text):
        if d["event"] == "train.step":
            found[d["step"]] = float(d["loss"]).hex()
        elif d["event"] in ("train.epoch", "eval.epoch"):
            found[(d["event"], d["epoch"])] = float(d["loss"]).hex()
    return found


def same_tensors(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, Mapping):
        return isinstance(b, Mapping) and a.keys() == b.keys() and all(same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same_tensors(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def final_state(run_dir: Path) -> dict[str, Any]:
    """The model, optimizer, scheduler and progress of the run's last checkpoint (step 12)."""
    found = checkpoint.newest(run_dir / layout.CHECKPOINT_DIRECTORY, 0)
    assert found is not None
    assert found[0].step == STEPS
    return {k: found[1][k] for k in ("model", "optimizer", "scheduler", "progress")}


def paused(tmp_path: Path, *, call: int, seconds: float) -> Child:
    """A run (one process, no workers) in ``tmp_path/run`` whose ``call``-th training forward call
    pauses ``seconds``; returned once the pause has begun."""
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config(0)))
    extra = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "RESUME_TEST_AT": f"sleep:{call}:{seconds}"}
    proc = popen(
        [sys.executable, "-m", "traintel", "train", "-c", "config.yaml", "--set", f"run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, env=child_env(extra=extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith(f"sleeping at {call}"):
            return proc
    raise AssertionError(f"the run ended before call {call}: exit {proc.wait()}")
