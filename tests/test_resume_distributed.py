"""Two ranks under a real torchrun (gloo on CPU): a run restarted by torchrun, or stopped by SIGTERM
and resumed, logs the same bits as one never interrupted."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.children import CHILD_TIMEOUT, child_env
from tests.test_resume import ROOT, STEPS, config, lines, losses, same_tensors
from traintel import checkpoint

pytestmark = pytest.mark.slow


def world_config() -> dict[str, Any]:
    cfg = config(0)
    cfg["task"]["params"]["samples"] = 480  # 240 per rank: the same 12 steps as one process
    cfg["trainer"]["distributed"] = {"backend": "gloo", "timeout_seconds": 30}
    return cfg


def torchrun(args: list[str], cwd: Path, extra: dict[str, str] | None = None) -> subprocess.Popen[str]:
    env = child_env(extra={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(extra or {})})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=CHILD_TIMEOUT)
    return proc.returncode, out, err


def final_states(run_dir: Path) -> list[dict[str, Any]]:
    """Each rank's model, optimizer, scheduler and progress at the last checkpoint (step 12)."""
    states = []
    for rank in (0, 1):
        found = checkpoint.newest(run_dir / checkpoint.DIRECTORY, rank)
        assert found is not None and found[0].step == STEPS
        states.append({k: found[1][k] for k in ("model", "optimizer", "scheduler", "progress")})
    return states


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[Any, str], list[dict[str, Any]]]:
    where = tmp_path_factory.mktemp("world-reference")
    (where / "config.yaml").write_text(yaml.safe_dump(world_config()))
    code, out, err = finished(
        torchrun(["-m", "traintel", "train", "-c", "config.yaml", "--set", f"run.dir={where / 'run'}"], where)
    )
    assert code == 0, err
    found = losses(out)
    assert sorted(k for k in found if isinstance(k, int)) == list(range(1, STEPS + 1))
    return found, final_states(where / "run")


def test_workers_restarted_by_torchrun_resume_from_the_newest_common_checkpoint(
    tmp_path: Path, reference: tuple[dict[Any, str], list[dict[str, Any]]]
) -> None:
    expected, final = reference
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(world_config()))
    run_dir = tmp_path / "run"
    args = ["--max-restarts=1", "-m", "traintel", "train", "-c", "config.yaml",
            "--set", f"run.dir={run_dir}", "--set", "run.resume=auto"]  # fmt: skip
    # rank 1 is killed in step 7 (epoch 2's third window): its last checkpoint is step 6
    proc = torchrun(args, tmp_path, {"RESUME_TEST_AT": "train:25", "RESUME_TEST_RANK": "1"})
    code, out, err = finished(proc)
    assert code == 0, err
    starts = [d for d in lines(out) if d["event"] == "run.start"]
    assert [(s["attempt"], s["resumed_from_step"], s["restart_count"]) for s in starts] == [
        (0, None, 0),
        (1, 6, 1),
    ]
    assert starts[0]["run_id"] == starts[1]["run_id"]
    second = losses(out[out.index('"event":"run.start"', out.index('"event":"run.start"') + 1) :])
    assert sorted(k for k in second if isinstance(k, int)) == list(range(7, STEPS + 1))
    assert {k: expected[k] for k in losses(out)} == losses(out)
    assert {k: expected[k] for k in second} == second
    assert all(same_tensors(a, b) for a, b in zip(final_states(run_dir), final, strict=True))


def test_sigterm_stops_both_ranks_at_one_checkpoint_and_torchrun_resumes_it(
    tmp_path: Path, reference: tuple[dict[Any, str], list[dict[str, Any]]]
) -> None:
    expected, final = reference
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(world_config()))
    run_dir = tmp_path / "run"
    proc = torchrun(
        ["-m", "traintel", "train", "-c", "config.yaml", "--set", f"run.dir={run_dir}"],
        tmp_path,
        {"RESUME_TEST_AT": "sleep:10:1.5", "RESUME_TEST_RANK": "0"},  # rank 0 pauses in step 3
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if "sleeping at 10" in line:
            break
    proc.send_signal(signal.SIGTERM)
    code, out, _ = finished(proc)
    assert code != 0  # torchrun's own status; the workers end as terminated (143)
    end = list(lines(out))[-1]
    # the stop goes into the next step's agreement: both ranks end after step 4, the last of epoch 1,
    # before that epoch's end, which the resumed run then runs first
    assert (end["event"], end["status"], end["step"]) == ("run.end", "terminated", 4)
    assert ("train.epoch", 1) not in losses(out)
    for rank in (0, 1):
        assert checkpoint.complete(run_dir / checkpoint.DIRECTORY, rank)[0].step == 4
    time.sleep(0.5)  # torchrun's port is free again

    code, again, err = finished(torchrun(["-m", "traintel", "train", "--resume", str(run_dir)], tmp_path))
    assert code == 0, err
    first, second = losses(out), losses(again)
    assert sorted(k for k in first if isinstance(k, int)) == list(range(1, 5))
    assert sorted(k for k in second if isinstance(k, int)) == list(range(5, STEPS + 1))
    assert ("train.epoch", 1) in second and ("eval.epoch", 1) in second
    for logged in (first, second):
        assert {k: expected[k] for k in logged} == logged
    assert all(same_tensors(a, b) for a, b in zip(final_states(run_dir), final, strict=True))
