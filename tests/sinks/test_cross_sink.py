"""One real run, three sinks: stdout, the diagnostic file and a real HTTP scrape agree exactly."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.children import popen
from tests.helpers.lines import strict_object
from tests.helpers.paths import ROOT

pytestmark = pytest.mark.slow


def _exposition(text: str) -> dict[str, str]:
    """Sample name (with labels) -> the exported value text, exactly as served."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = value
    return samples


def test_stdout_diagnostic_file_and_scrape_hold_identical_values(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINTEL__")}
    proc = popen(
        [
            sys.executable, "-m", "traintel", "train",
            "--config", str(ROOT / "configs" / "default.yaml"),
            "--set", f"run.dir={run_dir}",
            "--set", "trainer.max_epochs=2",
            "--set", "task.params.train_samples=200",
            "--set", "task.params.val_samples=64",
            "--set", "telemetry.every=1",
            "--set", "sinks.prometheus.port=0",
            "--set", "sinks.prometheus.linger_seconds=4",
        ],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    scrape = ""
    for line in proc.stdout:
        lines.append(line)
        if strict_object(line)["event"] == "run.end":
            url = strict_object(lines[0])["metrics_url"]
            with urllib.request.urlopen(url, timeout=5) as resp:  # served while lingering
                scrape = resp.read().decode()
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert stderr == ""

    records = [strict_object(line) for line in lines]
    events = [r["event"] for r in records]
    # 200 samples / 32 = 7 micro-batches (the last of 8 items) -> windows 3,3,1 per epoch
    assert events[0] == "run.start" and events[-1] == "run.end"
    assert events.count("train.batch") == 14 and events.count("train.step") == 6
    assert events.count("train.epoch") == 2 and events.count("eval.epoch") == 2

    # The diagnostic file holds the same records, with the same values, plus diagnostics.
    diag = [strict_object(line) for line in (run_dir / "diagnostic.jsonl").read_text().splitlines()]
    assert len(diag) == len(records)
    for console, full in zip(records, diag, strict=True):
        assert {k: full[k] for k in console} == console
    batch_diag = [d for d in diag if d["event"] == "train.batch"]
    assert all(d["scale_ok"] is True for d in batch_diag)
    assert [d["accumulation_position"] for d in batch_diag] == [1, 2, 3, 1, 2, 3, 1] * 2
    assert [d["expected_loss_scale"] for d in batch_diag[:7]] == [1 / 3] * 6 + [1.0]
    assert [d["items"] for d in batch_diag[:7]] == [32] * 6 + [8]

    # The scrape exports the very floats that the JSON lines hold.
    def last(event: str) -> dict[str, Any]:
        return [r for r in records if r["event"] == event][-1]

    samples = _exposition(scrape)
    end = last("run.end")
    pairs = {
        "traintel_batch_loss": last("train.batch")["loss"],
        "traintel_batch_raw_loss": last("train.batch")["raw_loss"],
        "traintel_batch_loss_scale": last("train.batch")["loss_scale"],
        "traintel_step_loss": last("train.step")["loss"],
        "traintel_learning_rate": last("train.step")["lr"],
        "traintel_grad_norm": last("train.step")["grad_norm"],
        "traintel_epoch_loss": last("train.epoch")["loss"],
        'traintel_eval_loss{split="val"}': last("eval.epoch")["loss"],
        "traintel_optimizer_step": end["step"],
        "traintel_epoch": end["epoch"],
        "traintel_items_total": end["items_total"],
    }
    for name, json_value in pairs.items():
        assert float(samples[name]) == json_value, name
    assert (end["step"], end["epoch"], end["items_total"]) == (6, 2, 400)
    run_id = records[0]["run_id"]
    assert samples[f'traintel_run_info{{name="forecast-demo",run_id="{run_id}"}}'] == "1.0"
    assert all(r["run_id"] == run_id for r in records)
    # The step loss is the sum of its window's batch losses.
    steps = [r for r in records if r["event"] == "train.step"]
    batches = [r for r in records if r["event"] == "train.batch"]
    for step in steps:
        window = [b["loss"] for b in batches if b["step"] + 1 == step["step"]]
        assert sum(window) == pytest.approx(step["loss"], rel=1e-12)
