"""Two ranks under a real torchrun (gloo on CPU): a run restarted by torchrun, or stopped by SIGTERM
and resumed, logs the same bits as one never interrupted."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers.children import CHILD_TIMEOUT, Child, child_env, popen
from tests.helpers.paths import ROOT
from tests.helpers.resume import STEPS, config, lines, losses, same_tensors
from tests.helpers.servers import wait_until
from traintel.errors import ConfigError
from traintel.run import checkpoint, layout, rundir

pytestmark = pytest.mark.slow


STRATEGIES = {"ddp": {}, "fsdp": {"strategy": "fsdp", "fsdp": {"shard_modules": ["Linear"]}}}
"""Each strategy's ``trainer.distributed`` settings."""


def world_config(strategy: str, background: bool = False) -> dict[str, Any]:
    """The resume test's run on two ranks; ``background``: checkpoints written in the background
    (``checkpoint.async``), which changes nothing trained or logged."""
    cfg = config(0)
    cfg["task"]["params"]["samples"] = 480  # 240 per rank: the same 12 steps as one process
    cfg["trainer"]["distributed"] = {"backend": "gloo", "timeout_seconds": 30, **STRATEGIES[strategy]}
    cfg["checkpoint"]["async"] = background
    return cfg


Reference = tuple[dict[Any, str], list[dict[str, Any]]]
"""An uninterrupted run's logged losses and its final states (``final_states``)."""
Killed = tuple[Path, str, str]
"""A job whose rank 1 was killed: its run directory, stdout and stderr."""
BOTH = pytest.mark.parametrize("strategy", list(STRATEGIES))


def torchrun(args: list[str], cwd: Path, extra: dict[str, str] | None = None) -> Child:
    env = child_env(extra={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(extra or {})})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *args]
    return popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(proc: Child) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=CHILD_TIMEOUT)
    return proc.returncode, out, err


def unlocked(run_dir: Path) -> bool:
    """Whether no process holds ``run_dir``'s lock (``rundir.lock``, taken and released here)."""
    held = rundir.lock(run_dir)
    if isinstance(held, rundir.RunDirLock):
        held.release()
    return not isinstance(held, ConfigError)


def final_states(run_dir: Path) -> list[dict[str, Any]]:
    """Each rank's model, optimizer, scheduler and progress at the last checkpoint (step 12)."""
    states = []
    for rank in (0, 1):
        found = checkpoint.newest(run_dir / layout.CHECKPOINT_DIRECTORY, rank)
        assert found is not None and found[0].step == STEPS
        assert found[1]["format"] == checkpoint.FORMAT and "model" not in found[1]  # in the DCP directory
        whole = checkpoint.model_and_optimizer(found[1])
        states.append({**whole, **{k: found[1][k] for k in ("scheduler", "progress")}})
    return states


def _memo(make: Callable[[str], Any]) -> Callable[[str], Any]:
    """``make(strategy)``, made once per strategy for the module's tests."""
    made: dict[str, Any] = {}

    def get(strategy: str) -> Any:
        if strategy not in made:
            made[strategy] = make(strategy)
        return made[strategy]

    return get


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Reference]:
    """Each strategy's uninterrupted run, made once."""
    return _memo(lambda strategy: _reference(tmp_path_factory, strategy))


def _reference(tmp_path_factory: pytest.TempPathFactory, strategy: str) -> Reference:
    where = tmp_path_factory.mktemp("world-reference")
    (where / "config.yaml").write_text(yaml.safe_dump(world_config(strategy)))
    code, out, err = finished(
        torchrun(["-m", "traintel", "train", "-c", "config.yaml", "--set", f"run.dir={where / 'run'}"], where)
    )
    assert code == 0, err
    found = losses(out)
    assert sorted(k for k in found if isinstance(k, int)) == list(range(1, STEPS + 1))
    return found, final_states(where / "run")


@BOTH
def test_workers_restarted_by_torchrun_resume_from_the_newest_common_checkpoint(
    tmp_path: Path, references: Callable[[str], Reference], strategy: str
) -> None:
    """Rank 1 is killed with SIGKILL and torchrun restarts both: under DDP in step 7 (its newest
    checkpoint is step 6); under FSDP, writing checkpoints in the background, while its third
    checkpoint's DCP file (step 6) is torn part-way, which no rank picks: they resume from step 4."""
    expected, final = references(strategy)
    background = strategy == "fsdp"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(world_config(strategy, background)))
    run_dir = tmp_path / "run"
    args = ["--max-restarts=1", "-m", "traintel", "train", "-c", "config.yaml",
            "--set", f"run.dir={run_dir}", "--set", "run.resume=auto"]  # fmt: skip
    at, resumed = ("dcp:3", 4) if background else ("train:25", 6)
    proc = torchrun(args, tmp_path, {"RESUME_TEST_AT": at, "RESUME_TEST_RANK": "1"})
    code, out, err = finished(proc)
    assert code == 0, err
    starts = [d for d in lines(out) if d["event"] == "run.start"]
    assert [(s["attempt"], s["resumed_from_step"], s["restart_count"]) for s in starts] == [
        (0, None, 0),
        (1, resumed, 1),
    ]
    assert starts[0]["run_id"] == starts[1]["run_id"]
    second = losses(out[out.index('"event":"run.start"', out.index('"event":"run.start"') + 1) :])
    assert sorted(k for k in second if isinstance(k, int)) == list(range(resumed + 1, STEPS + 1))
    assert {k: expected[k] for k in losses(out)} == losses(out)
    assert {k: expected[k] for k in second} == second
    assert all(same_tensors(a, b) for a, b in zip(final_states(run_dir), final, strict=True))


@BOTH
def test_sigterm_stops_both_ranks_at_one_checkpoint_and_torchrun_resumes_it(
    tmp_path: Path, references: Callable[[str], Reference], strategy: str
) -> None:
    """Under DDP its checkpoints are written in the foreground, under FSDP in the background
    (``checkpoint.async``), which the stop's checkpoint waits for before ``run.end``."""
    expected, final = references(strategy)
    background = strategy == "fsdp"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(world_config(strategy, background)))
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
    # and so after that epoch's end (its record, its evaluation, its checkpoint), never between them
    assert (end["event"], end["status"], end["step"]) == ("run.end", "terminated", 4)
    assert ("train.epoch", 1) in losses(out) and ("eval.epoch", 1) in losses(out)
    for rank in (0, 1):
        assert checkpoint.complete(run_dir / layout.CHECKPOINT_DIRECTORY, rank)[0].step == 4
    # every rank of the stopped job has let go of the run directory (torchrun picks a new free port
    # for each job: --standalone)
    wait_until(lambda: unlocked(run_dir), f"the stopped job never released {run_dir}'s lock")

    code, again, err = finished(torchrun(["-m", "traintel", "train", "--resume", str(run_dir)], tmp_path))
    assert code == 0, err
    first, second = losses(out), losses(again)
    assert sorted(k for k in first if isinstance(k, int)) == list(range(1, 5))
    assert sorted(k for k in second if isinstance(k, int)) == list(range(5, STEPS + 1))
    assert ("train.epoch", 1) not in second and ("eval.epoch", 1) not in second
    assert ("train.epoch", 2) in second and ("eval.epoch", 2) in second
    for logged in (first, second):
        assert {k: expected[k] for k in logged} == logged
    assert all(same_tensors(a, b) for a, b in zip(final_states(run_dir), final, strict=True))


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Killed]:
    """Each strategy's job whose rank 1 was killed with SIGKILL in step 7 (no restarts), made once:
    its run directory (both ranks hold checkpoints 4 and 6), stdout and stderr."""
    return _memo(lambda strategy: _killed(tmp_path_factory, strategy))


def _killed(tmp_path_factory: pytest.TempPathFactory, strategy: str) -> Killed:
    where = tmp_path_factory.mktemp("world-killed")
    (where / "config.yaml").write_text(yaml.safe_dump(world_config(strategy)))
    args = ["-m", "traintel", "train", "-c", "config.yaml", "--set", f"run.dir={where / 'run'}"]
    code, out, err = finished(torchrun(args, where, {"RESUME_TEST_AT": "train:25", "RESUME_TEST_RANK": "1"}))
    assert code == 1, err
    for rank in (0, 1):
        assert [c.step for c in checkpoint.complete(where / "run" / layout.CHECKPOINT_DIRECTORY, rank)] == [
            6,
            4,
        ]
    return where / "run", out, err


@BOTH
def test_a_rank_killed_with_sigkill_is_named_lost_in_rank_0s_reason(
    killed_runs: Callable[[str], Killed], strategy: str
) -> None:
    _, out, err = killed_runs(strategy)
    end = list(lines(out))[-1]
    assert (end["event"], end["status"], end["rank"], end["step"]) == ("run.end", "failed", 0, 6)
    prefix = "traintel: error: training failed: "
    here = [line[len(prefix) :] for line in err.splitlines() if line.startswith(prefix)]
    assert len(here) == 1  # rank 0's own error; rank 1 said nothing
    assert any(m in here[0] for m in ("Connection reset by peer", "Connection closed by peer", "Broken pipe"))
    assert end["reason"] == f"rank 1 was lost: it ended without reporting an error (here: {here[0]})"


@BOTH
def test_a_damaged_newest_checkpoint_on_one_rank_resumes_every_rank_from_the_older_one(
    tmp_path: Path,
    references: Callable[[str], Reference],
    killed_runs: Callable[[str], Killed],
    strategy: str,
) -> None:
    """Rank 1's step 6 (under DDP its state file, under FSDP its file in the DCP directory) is
    bit-flipped in place (same size, another SHA-256): it is skipped with a warning, and both ranks
    continue from step 4, the newest that every rank holds and loads."""
    expected, final = references(strategy)
    killed = killed_runs(strategy)
    part = "state" if strategy == "ddp" else "shard"
    run_dir = tmp_path / "run"
    shutil.copytree(killed[0], run_dir)
    where = run_dir / layout.CHECKPOINT_DIRECTORY
    damaged = where / (
        layout.state_name(6, 1) if part == "state" else f"{layout.shards_name(6)}/__1_0.distcp"
    )
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x01
    damaged.write_bytes(bytes(data))

    code, out, err = finished(torchrun(["-m", "traintel", "train", "--resume", str(run_dir)], tmp_path))
    assert code == 0, err
    name = layout.state_name(6, 1)
    what = name if part == "state" else f"{layout.shards_name(6)}/__1_0.distcp"
    assert (
        err.splitlines().count(
            f"skipping checkpoint {name}: {what} does not match its manifest (size or SHA-256)"
        )
        == 1
    )
    start = next(lines(out))
    assert (start["event"], start["attempt"], start["resumed_from_step"]) == ("run.start", 1, 4)
    rank1 = [json.loads(line) for line in (run_dir / "diagnostic.rank1.jsonl").read_text().splitlines()]
    starts = [(r["attempt"], r["resumed_from_step"]) for r in rank1 if r["event"] == "run.start"]
    assert starts == [(0, None), (1, 4)]
    resumed = losses(out)
    assert sorted(k for k in resumed if isinstance(k, int)) == list(range(5, STEPS + 1))
    assert {k: expected[k] for k in resumed} == resumed
    assert all(same_tensors(a, b) for a, b in zip(final_states(run_dir), final, strict=True))


@BOTH
def test_resuming_under_another_world_size_is_refused_with_exit_2(
    tmp_path: Path, killed_runs: Callable[[str], Killed], strategy: str
) -> None:
    """The windows would change: one process (the DDP run), or three ranks (the FSDP run), resuming
    the two ranks' run is exit 2 with one line, and nothing in the run directory changes."""
    ranks = 1 if strategy == "ddp" else 3
    killed = killed_runs(strategy)
    run_dir = tmp_path / "run"
    shutil.copytree(killed[0], run_dir)
    before = sorted((p.relative_to(run_dir), p.stat().st_size) for p in run_dir.rglob("*") if p.is_file())
    if ranks == 1:
        proc = popen([sys.executable, "-m", "traintel", "train", "--resume", str(run_dir)], cwd=tmp_path,
                     env=child_env(extra={"OMP_NUM_THREADS": "1"}), stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, text=True)  # fmt: skip
    else:
        env = child_env(extra={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
        cmd = [sys.executable, "-m", "traintel.cli.torchrun", "--standalone", "--nproc-per-node=3",
               "-m", "traintel", "train", "--resume", str(run_dir)]  # fmt: skip
        proc = popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    code, _, err = finished(proc)
    line = (
        f"traintel: error: world_size: cannot change when resuming the run in {str(run_dir)!r}: its "
        f"checkpoint has 2, this attempt {ranks}"
    )
    assert err.splitlines().count(line) == ranks, err[-3000:]
    assert "Traceback" not in err.split("ChildFailedError")[0]  # torchrun's own summary comes after
    assert code == 2  # traintel.cli.torchrun exits with the workers' status
    after = sorted((p.relative_to(run_dir), p.stat().st_size) for p in run_dir.rglob("*") if p.is_file())
    assert after == before


def test_a_rank_killed_before_its_manifest_leaves_no_checkpoint_picked_that_is_incomplete(
    tmp_path: Path, references: Callable[[str], Reference]
) -> None:
    """Under DDP, rank 1 is killed with SIGKILL writing its third checkpoint (step 6), its DCP files
    whole but no state file or manifest. Step 6 is never picked: the resumed run continues from step
    4 and logs the same bits. (A DCP file torn part-way in the background under FSDP: the restart
    test.)"""
    strategy, at, background = "ddp", "manifest", False
    expected, final = references(strategy)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(world_config(strategy, background)))
    run_dir = tmp_path / "run"
    args = ["-m", "traintel", "train", "-c", "config.yaml", "--set", f"run.dir={run_dir}"]
    code, _, err = finished(torchrun(args, tmp_path, {"RESUME_TEST_AT": f"{at}:3", "RESUME_TEST_RANK": "1"}))
    assert code == 1, err
    directory = run_dir / layout.CHECKPOINT_DIRECTORY
    assert [c.step for c in checkpoint.complete(directory, 1)] == [4, 3]
    torn = directory / layout.shards_name(6) / "__1_0.distcp"
    if at == "dcp":  # a file rank 1 had begun
        assert torn.exists() and not (directory / layout.manifest_name(6, 1)).exists()
    else:  # every DCP file of rank 1's part, no state file
        assert torn.stat().st_size > 0 and not (directory / layout.state_name(6, 1)).exists()

    code, again, err = finished(torchrun(["-m", "traintel", "train", "--resume", str(run_dir)], tmp_path))
    assert code == 0, err
    start = next(lines(again))
    assert (start["event"], start["resumed_from_step"]) == ("run.start", 4)
    resumed = losses(again)
    assert sorted(k for k in resumed if isinstance(k, int)) == list(range(5, STEPS + 1))
    assert {k: expected[k] for k in resumed} == resumed
    assert all(same_tensors(a, b) for a, b in zip(final_states(run_dir), final, strict=True))
