"""Plug-in sinks across a SIGKILL and resume, and under torchrun: the CSV example and a user's SQLite
sink (threaded) append on resume, keep one header, hold every step with identical duplicates, and
under two ranks are opened on rank 0 only unless ``ranks: all``."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.engine.test_ddp import WORLD
from tests.helpers import resume
from tests.helpers.children import popen
from tests.helpers.paths import ROOT
from tests.helpers.sqlite_sink import rows as sqlite_rows

pytestmark = pytest.mark.slow

PLUGINS = [{"name": "csv"}, {"factory": "tests.helpers.sqlite_sink:SqliteSink"}]


def _csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    text = path.read_text()
    with path.open(newline="") as f:
        return text.splitlines(), list(csv.DictReader(f))


def _steps(*texts: str) -> dict[int, dict[str, Any]]:
    """Each step's ``train.step`` line from JSON lines; a step logged by two attempts must be the same
    line but for ``attempt`` and ``timestamp``."""
    found: dict[int, dict[str, Any]] = {}
    for text in texts:
        for line in resume.lines(text):
            if line["event"] == "train.step":
                same = {k: v for k, v in line.items() if k not in ("attempt", "timestamp", "nonfinite")}
                assert found.setdefault(line["step"], same) == same
    return found


def _attempts(steps: list[tuple[int, int]], resumed_from: int) -> None:
    """``(step, attempt)`` in the order written: attempt 0's steps from 1 on, at least to the
    checkpoint's (a kill may leave out the last ones delivered after it), then attempt 1's from the
    checkpoint's next step to the last."""
    first = [s for s, a in steps if a == 0]
    assert first == list(range(1, len(first) + 1)) and len(first) >= resumed_from
    assert steps == [(s, 0) for s in first] + [(s, 1) for s in range(resumed_from + 1, resume.STEPS + 1)]


def test_a_killed_run_s_plug_ins_append_on_resume_with_identical_duplicates(tmp_path: Path) -> None:
    cfg = resume.config(0)
    cfg["sinks"]["extra"] = PLUGINS
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "run"
    killed = resume.traintel(["-c", "config.yaml", "--set", f"run.dir={run_dir}"], tmp_path, at="train:30")
    assert killed.returncode == -9, killed.stderr  # in step 8: the newest checkpoint is step 6's
    resumed = resume.traintel(["--resume", str(run_dir)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    start = next(line for line in resume.lines(resumed.stdout) if line["event"] == "run.start")
    assert (start["attempt"], start["resumed_from_step"]) == (1, 6)
    steps = _steps((run_dir / "diagnostic.jsonl").read_text())  # both attempts', duplicates identical
    assert sorted(steps) == list(range(1, resume.STEPS + 1))

    lines, table = _csv(run_dir / "steps.csv")
    assert lines[0] == "step,epoch,items,loss,lr" and lines.count(lines[0]) == 1
    got = [int(row["step"]) for row in table]
    first = len(got) - (resume.STEPS - 6)  # the resumed attempt's rows: steps 7 to 12
    _attempts([(s, int(i >= first)) for i, s in enumerate(got)], 6)
    for row in table:
        want = steps[int(row["step"])]
        assert (float(row["loss"]), float(row["lr"]), int(row["items"])) == (
            want["loss"],
            want["lr"],
            want["items"],
        )

    db = sqlite_rows(run_dir / "steps.sqlite")
    _attempts([(s, a) for s, a, *_ in db], 6)
    for step, _, rank, loss, lr in db:
        assert (rank, loss, lr) == (0, steps[step]["loss"], steps[step]["lr"])


def _torchrun(tmp_path: Path, extra: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The built-in task under ``torchrun --nproc-per-node=2``, 2 epochs, every step emitted, with
    ``sinks.extra`` = ``extra``; each step's ``train.step`` line (rank 0's stdout)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINTEL__")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    sets = [f"run.dir={tmp_path / 'run'}", "sinks.prometheus.port=0", "trainer.max_epochs=2", "telemetry.every=1",
            f"sinks.extra={json.dumps(extra)}"]  # fmt: skip
    proc = popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
         "-m", "traintel", "train", *[a for o in sets for a in ("--set", o)]],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    return _steps(out)


def test_under_torchrun_plug_ins_run_on_rank_0_only_by_default(tmp_path: Path) -> None:
    steps = _torchrun(tmp_path, PLUGINS)
    run_dir = tmp_path / "run"
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "config.yaml", "diagnostic.jsonl", "diagnostic.rank1.jsonl", "steps.csv", "steps.sqlite",
    ]  # fmt: skip
    _, table = _csv(run_dir / "steps.csv")
    assert [int(row["step"]) for row in table] == sorted(steps) == list(range(1, 13))
    assert [(s, a, r) for s, a, r, *_ in sqlite_rows(run_dir / "steps.sqlite")] == [
        (s, 0, 0) for s in range(1, 13)
    ]
    for row in table:
        assert float(row["loss"]) == steps[int(row["step"])]["loss"]


def test_under_torchrun_ranks_all_opens_one_per_rank_with_the_same_global_steps(tmp_path: Path) -> None:
    steps = _torchrun(tmp_path, [{**spec, "ranks": "all"} for spec in PLUGINS])
    run_dir = tmp_path / "run"
    rank0, rank1 = _csv(run_dir / "steps.csv")[1], _csv(run_dir / "steps.rank1.csv")[1]
    assert rank0 == rank1 and [int(row["step"]) for row in rank0] == list(range(1, 13))
    for row in rank0:
        assert float(row["loss"]) == steps[int(row["step"])]["loss"]
    written = sqlite_rows(run_dir / "steps.sqlite")  # both ranks into one database: 12 rows each
    assert sorted((r, s) for s, _, r, *_ in written) == [(r, s) for r in (0, 1) for s in range(1, 13)]
    by_step = {(s, r): loss for s, _, r, loss, _ in written}
    assert all(by_step[(s, 0)] == by_step[(s, 1)] == steps[s]["loss"] for s in range(1, 13))
