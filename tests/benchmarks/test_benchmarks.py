"""The benchmarks run end to end on tiny sizes, and every case trains exactly the weights its plain
loop trains (the comparison is like for like). No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.children import run_child
from tests.helpers.paths import ROOT

pytestmark = pytest.mark.slow

CASES = [
    "1. plain PyTorch loop (k=3)",
    "2. bare Ignite Engine, no handlers",
    "3. traintel, 3 sinks, every=10",
    "4. traintel, 3 sinks, every=1",
    "5a. plain PyTorch loop, large model",
    "5b. traintel, 3 sinks, every=10, large model",
    "6a. plain PyTorch loop, realistic model (k=4)",
    "6b. traintel, 3 sinks, every=10, realistic model",
    "6c. traintel, 3 sinks, every=1, realistic model",
    "6d. traintel, 3 sinks, every=10, 2 training metrics, realistic model",
]
KEYS = ["plain", "ignite", "traintel", "traintel_every1", "plain_large", "traintel_large", "plain_realistic",
        "traintel_realistic", "traintel_realistic_every1", "traintel_realistic_metrics"]  # fmt: skip
SMALL = ["--repeats", "2", "--epochs", "2", "--batches", "30", "--large-batches", "6", "--large-hidden", "64",
         "--large-layers", "1", "--realistic-batches", "8", "--realistic-hidden", "32", "--realistic-layers", "1"]  # fmt: skip


def overhead(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "overhead.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_overhead_benchmark_compares_like_for_like(tmp_path: Path) -> None:
    """Every case and its plain-loop shadow end with the same weights; the windows are paired."""
    out = tmp_path / "overhead.json"
    proc = overhead(*SMALL, "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    keys = KEYS
    assert data["warmup_max_weight_diff"] == dict.fromkeys(keys, 0.0)
    assert [c["case"] for c in data["cases"]] == CASES
    assert data["k"] == dict.fromkeys(keys[:6], 3) | dict.fromkeys(keys[6:], 4)
    assert [c["steps_per_run"] for c in data["cases"]] == [20, 20, 20, 20, 2, 2, 2, 2, 2, 2]
    # tiny runs: 2 windows of 10 steps, the first left out; large and realistic runs: one window of
    # 2 steps, kept
    assert [c["windows"] for c in data["cases"]] == [2] * 10
    assert len(data["rounds"]) == 2
    for timed in data["rounds"]:
        assert [timed[k]["steps"] for k in keys] == [[10, 10]] * 4 + [[2]] * 6
        for k in keys:
            assert len(timed[k]["own_s"]) == len(timed[k]["shadow_s"]) == len(timed[k]["steps"])
            assert min(timed[k]["own_s"]) > 0 and min(timed[k]["shadow_s"]) > 0
    # the shadow stretches a run's wall time, so the delivery delay is stretched with it
    assert sorted(data["max_delay_seconds"]) == [
        "traintel", "traintel_every1", "traintel_large", "traintel_realistic", "traintel_realistic_every1",
        "traintel_realistic_metrics",
    ]  # fmt: skip
    assert all(delay > 0.05 for delay in data["max_delay_seconds"].values())
    # the plain loop and bare Ignite start no Python thread: nothing of theirs is counted as one
    python_cpu = {c["key"]: c["python_threads_cpu_us_per_step"] for c in data["cases"]}
    assert [python_cpu[k] for k in ("plain", "ignite", "plain_large", "plain_realistic")] == [0.0] * 4
    assert all(c["native_threads_cpu_us_per_step"] >= 0 for c in data["cases"])
    lines = proc.stdout.splitlines()
    header = (
        "| case | windows | us/step | plain us/step | ratio to plain | quartiles of the ratio "
        "| typical window | overhead us/step |"
    )
    assert lines.count(header) == 1
    rows = [line for line in lines if line.startswith("| ") and line[2].isdigit()]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows[:10]] == CASES
    assert [row.split(" | ")[1] for row in rows[:10]] == ["2"] * 10
    budgets = [
        line.split(": ")[0] for line in lines if line.startswith("- ") and line.endswith(("within", "OVER"))
    ]
    assert budgets == ["- " + CASES[i] for i in (2, 3, 7, 8, 9)]
    assert (
        "warm-up check: max |weight difference| to the plain loop (its shadow), any case: 0.00e+00" in lines
    )


def test_overhead_benchmark_runs_only_the_cases_asked_for(tmp_path: Path) -> None:
    """``--cases`` runs the named cases alone, in the table's order; an unknown name is refused."""
    out = tmp_path / "overhead.json"
    proc = overhead(*SMALL, "--cases", "traintel_realistic,plain", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert [c["key"] for c in data["cases"]] == ["plain", "traintel_realistic"]
    assert [sorted(timed) for timed in data["rounds"]] == [["plain", "traintel_realistic"]] * 2
    assert data["warmup_max_weight_diff"] == {"plain": 0.0, "traintel_realistic": 0.0}
    assert data["model_parameters"] == {"tiny": 2177, "realistic": 32 * 32 + 32 + 32 * 32 + 32 + 32 + 1}
    rows = [line.split(" | ")[0] for line in proc.stdout.splitlines() if line.startswith(("| 1.", "| 6b."))]
    assert rows == ["| " + CASES[0], "| " + CASES[7]] * 2  # the main table, then the per-run one
    refused = overhead("--cases", "traintel,tiny")
    assert refused.returncode == 2
    assert "--cases: unknown tiny; choose from plain, ignite," in refused.stderr


def test_distributed_benchmark_compares_like_for_like(tmp_path: Path) -> None:
    """Two ranks under a real torchrun: the plain DDP loop and traintel train the same weights."""
    out = tmp_path / "distributed.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env = {k: v for k, v in env.items() if not k.startswith("TRAINTEL__")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(ROOT / "benchmarks" / "distributed.py"), "--repeats", "2", "--batches", "24", "--epochs", "2",
           "--json", str(out)]  # fmt: skip
    proc = run_child(cmd, tmp_path, env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert data["warmup_max_weight_diff"] == 0.0
    assert [c["steps_per_run"] for c in data["cases"]] == [8, 8]
    assert data["cases"][0]["ratio_to_plain"] == 1.0
    lines = proc.stdout.splitlines()
    header = "| case | us/step | fastest run us/step | ratio to plain DDP | quartiles of the ratio | overhead us/step |"
    assert lines.count(header) == 1
    rows = [line.split(" | ")[0] for line in lines if line.startswith(("| A. ", "| B. "))]
    assert rows == ["| A. plain DDP loop (k=3, no_sync, summing hook)", "| B. traintel, 3 sinks, every=10"]
    assert "warm-up check: max |weight difference| between the cases, any rank: 0.00e+00" in lines


def test_slow_sink_benchmark_runs_the_three_cases(tmp_path: Path) -> None:
    """No plug-in, a slow one on the training thread, the same threaded: every run completes and
    the slow plug-in takes deliveries in both."""
    out = tmp_path / "slow_sink.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "slow_sink.py"), "--rounds", "2", "--steps", "12",
         "--hidden", "16", "--delay-ms", "5", "--json", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert [row["case"] for row in data["cases"]] == ["none", "slow", "slow_threaded"]
    assert [sorted(timed) for timed in data["rounds"]] == [["none", "slow", "slow_threaded"]] * 2
    assert [timed["none"]["deliveries"] for timed in data["rounds"]] == [0, 0]
    assert all(timed[c]["deliveries"] >= 1 for timed in data["rounds"] for c in ("slow", "slow_threaded"))
    assert data["cases"][0]["ratio"] == 1.0
    lines = proc.stdout.splitlines()
    assert lines[2] == "| case | steps/s | ratio to no plug-in | deliveries per run |"
    assert [line.split(" | ")[0] for line in lines[4:7]] == [
        "| no plug-in", "| slow plug-in on the training thread", "| slow plug-in, threaded",
    ]  # fmt: skip
    assert lines[-1].startswith("threaded: ratio ") and lines[-1].endswith(("within", "BELOW"))


def test_fsdp_benchmark_compares_like_for_like(tmp_path: Path) -> None:
    """Two FSDP2 ranks under a real torchrun: the plain FSDP2 loop and traintel's ``strategy: fsdp``
    train the same weights (gathered whole)."""
    out = tmp_path / "fsdp.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env = {k: v for k, v in env.items() if not k.startswith("TRAINTEL__")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(ROOT / "benchmarks" / "fsdp.py"), "--repeats", "2", "--batches", "24", "--epochs", "2",
           "--json", str(out)]  # fmt: skip
    proc = run_child(cmd, tmp_path, env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert data["warmup_max_weight_diff"] == 0.0
    assert data["shard_modules"] == ["Linear"]
    assert [c["steps_per_run"] for c in data["cases"]] == [8, 8]
    assert [len(c["samples_us_per_step"]) for c in data["cases"]] == [2, 2]
    assert data["cases"][0]["ratio_to_plain"] == 1.0
    lines = proc.stdout.splitlines()
    header = "| case | us/step | fastest run us/step | ratio to plain FSDP2 | quartiles of the ratio | overhead us/step |"
    assert lines.count(header) == 1
    rows = [line.split(" | ")[0] for line in lines if line.startswith(("| A. ", "| B. "))]
    assert rows == [
        "| A. plain FSDP2 loop (k=3, sync on the last pass, summed reduce-scatter)",
        "| B. traintel, strategy fsdp, 3 sinks, every=10",
    ]
    assert any(line.startswith("target: B. ") and line.endswith(("within", "OVER")) for line in lines)
    assert "warm-up check: max |weight difference| between the cases, any rank: 0.00e+00" in lines


def test_checkpoints_benchmark_compares_like_for_like(tmp_path: Path) -> None:
    """Two ranks under a real torchrun, a 2 MB model: per-rank copies take two copies of the model and
    optimizer on disk, DCP one in all under DDP and FSDP2; every checkpoint reads back as the live state;
    a background save returns before its checkpoint is durable; nothing is left on disk."""
    out = tmp_path / "checkpoints.json"
    base = tmp_path / "disk"
    base.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env = {k: v for k, v in env.items() if not k.startswith("TRAINTEL__")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(ROOT / "benchmarks" / "checkpoints.py"), "--megabytes", "2", "--repeats", "1",
           "--dir", str(base), "--json", str(out)]  # fmt: skip
    proc = run_child(cmd, tmp_path, env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert data["world_size"] == 2
    assert data["model_parameters"] * 4 == pytest.approx(2e6, rel=0.01)
    assert data["warmup_max_state_diff"] == {"A": 0.0, "B": 0.0, "C": 0.0, "D": 0.0}
    cases = {c["key"]: c for c in data["cases"]}
    assert list(cases) == ["A", "B", "C", "D"]
    a, b, c, d = (cases[k] for k in "ABCD")
    assert 1.8 <= a["bytes"] / b["bytes"] <= 2.2  # one copy per rank against one copy in all
    assert a["copies"] == pytest.approx(2.0, rel=0.05)
    for dcp in (b, c, d):
        assert dcp["bytes"] == pytest.approx(b["bytes"], rel=0.1)
        assert dcp["copies"] == pytest.approx(1.0, rel=0.05)
        assert dcp["dcp_bytes"] > 0.99 * dcp["bytes"]  # the state files hold no tensor of size
        assert dcp["files"] == 7  # 2 state files, 2 manifests, 2 ranks' .distcp, .metadata
    assert a["dcp_bytes"] == 0 and a["files"] == 4
    assert c["bytes"] == d["bytes"]  # the same sharded state, in the foreground or the background
    for sync in (a, b, c):
        assert sync["stall_s"] == sync["durable_s"] > 0
    assert 0 < d["stall_s"] < d["durable_s"]
    assert a["stall_ratio_to_A"] == 1.0
    assert list(base.iterdir()) == []  # every round's files removed, the shared directory too
    lines = proc.stdout.splitlines()
    header = "| case | on disk MB | copies | files | training stall s | stall vs A | durable after s |"
    assert lines.count(header) == 1
    rows = [line.split(" | ")[0] for line in lines if line.startswith(("| A. ", "| B. ", "| C. ", "| D. "))]
    assert rows == [
        "| A. per-rank copies, DDP (checkpoint.write of the whole state on each rank)",
        "| B. DCP, DDP (replicated, sync)",
        "| C. DCP, FSDP2 (sharded, sync)",
        "| D. DCP, FSDP2 (sharded, background)",
    ]
    assert (
        "warm-up check: max |difference| of any checkpoint read back from the live state: 0.00e+00" in lines
    )
