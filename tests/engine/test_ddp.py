"""Two ranks under a real torchrun (gloo on CPU): gradients, parameters and every logged loss equal
a single process that trains the union of the ranks' windows, with one gradient reduction per
optimizer step and one telemetry collective per delivery."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers.children import Child, child_env, popen, run_child
from tests.helpers.paths import ROOT
from tests.helpers.ranks.train_rank import batches, masked_mse, model
from tests.helpers.servers import free_port

pytestmark = pytest.mark.slow

RANKS = ROOT / "tests" / "helpers" / "ranks"
SCRIPT = RANKS / "train_rank.py"
WORLD = 2


def torchrun(spec: dict[str, Any], out: Path, *extra: str) -> subprocess.CompletedProcess[Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env = {k: v for k, v in env.items() if not k.startswith("TRAINTEL__")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
           *extra, str(SCRIPT), json.dumps(spec), str(out)]  # fmt: skip
    return run_child(cmd, Path.cwd(), env, timeout=120)


def reference(spec: dict[str, Any]) -> dict[str, Any]:
    """One process, one optimizer step per global window: the union, in rank order, of the ranks'
    windows (rank r trains micro-batches r, r+W, ... in windows of k), each micro-batch's mean loss
    scaled by its items over the window's items on all ranks."""
    data, k = batches(spec), spec["k"]
    shards = [data[r::WORLD] for r in range(WORLD)]
    windows = [[s[i : i + k] for i in range(0, len(s), k)] for s in shards]
    steps = max(len(w) for w in windows)
    net = model(spec)
    if "optimizer" in spec:  # AdamW with weight decay, none on the biases (the spec's no_decay)
        biases = [p for n, p in net.named_parameters() if n.endswith("bias")]
        others = [p for n, p in net.named_parameters() if not n.endswith("bias")]
        opt: torch.optim.Optimizer = torch.optim.AdamW(
            [{"params": others}, {"params": biases, "weight_decay": 0.0}], lr=0.01, weight_decay=0.1
        )
    else:
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    grads, losses, epochs, epoch_items, evals, train_mae, norms = [], [], [], [], [], [], []
    every = spec.get("eval_every_steps")
    limit = spec.get("max_steps")  # the run ends after this many optimizer steps, mid-epoch if need be
    for _ in range(spec.get("epochs", 1)):
        total_loss, total_items = 0.0, 0
        for t in range(steps):
            if len(losses) == limit:
                break
            union = [b for w in windows if t < len(w) for b in w[t]]
            n_total = sum(int(m.sum()) for _, _, m in union)
            step_loss, step_errors = 0.0, 0.0
            for x, y, m in union:
                n = int(m.sum())
                if n:
                    out = net(x)
                    raw = masked_mse(out, (y, m))
                    (raw * (n / n_total)).backward()
                    step_loss += float(raw.detach()) * n / n_total
                    total_loss += float(raw.detach()) * n
                    step_errors += float((out.detach() - y).squeeze(1)[m].abs().sum())
            total_items += n_total
            if n_total:
                if spec.get("clip"):  # the norm before clipping, and the clipped gradients
                    norms.append(float(torch.nn.utils.clip_grad_norm_(net.parameters(), spec["clip"])))
                grads.append([p.grad.clone() for p in net.parameters()])
                losses.append(step_loss)
                train_mae.append(step_errors / n_total)
                opt.step()
                opt.zero_grad()
                if every and len(losses) % every == 0:  # all the batches, both ranks' shards
                    with torch.no_grad():
                        summed = sum(
                            float(masked_mse(net(x), (y, m))) * int(m.sum()) for x, y, m in data if m.any()
                        )
                        errors = torch.cat([(net(x) - y).squeeze(1)[m].abs() for x, y, m in data])
                    items = sum(int(m.sum()) for _, _, m in data)
                    evals.append((len(losses), summed / items, float(errors.sum()) / items))
        epochs.append(total_loss / total_items)
        epoch_items.append(total_items)
        if len(losses) == limit:
            break
    return {
        "grads": grads,
        "losses": losses,
        "epochs": epochs,
        "epoch_items": epoch_items,
        "evals": evals,
        "train_mae": train_mae,
        "norms": norms,
        "params": list(net.parameters()),
    }


CASES = {
    "k1-uneven-shards-eval-every-steps": {
        "sizes": [4, 3, 5, 2, 4, 1, 3],
        "k": 1,
        "epochs": 2,
        "eval_every_steps": 3,
    },
    "k2-masked-items-no-decay-groups": {
        "sizes": [4, 3, 5, 2, 4, 1, 3],
        "kept": [4, 0, 5, 2, 1, 1, 0],
        "k": 2,
        "optimizer": {"name": "adamw", "lr": 0.01, "weight_decay": 0.1, "no_decay": {"names": ["*bias"]}},
    },
    "k3-two-epochs": {"sizes": [5, 2, 4, 3, 1, 6, 2, 2, 3, 4, 1], "k": 3, "epochs": 2},
    "k2-forward-loss": {
        "sizes": [4, 3, 5, 2, 4, 1, 3],
        "kept": [4, 0, 5, 2, 1, 1, 0],
        "k": 2,
        "forward_loss": True,
    },
    "k2-max-steps-mid-epoch": {"sizes": [4, 3, 5, 2, 4, 1, 3, 2, 5], "k": 2, "epochs": 3, "max_steps": 7},
}


def two_nodes(spec: dict[str, Any], out: Path) -> None:
    """Two torchrun agents on 127.0.0.1, one process each: ``--nnodes=2 --node-rank=0|1``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINTEL__")}
    env["OMP_NUM_THREADS"] = "1"
    port = free_port()
    procs = [
        popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                f"--node-rank={node}",
                "--nproc-per-node=1",
                "--master-addr=127.0.0.1",
                f"--master-port={port}",
                str(SCRIPT),
                json.dumps(spec),
                str(out),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]


@pytest.mark.parametrize(
    ("name", "nodes"), [*((name, 1) for name in CASES), ("k2-masked-items-no-decay-groups", 2)]
)
def test_two_ranks_equal_one_process_on_the_union_of_their_windows(
    name: str, nodes: int, tmp_path: Path
) -> None:
    spec = CASES[name]
    if nodes == 1:
        proc = torchrun(spec, tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    else:
        two_nodes(spec, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    ref = reference(spec)

    given = ["DistributedDataParallel"] if spec.get("forward_loss") else []  # forward_loss's model
    for rank in ranks:  # every rank ends with the reference's parameters and took its gradients
        assert rank["status"] == "completed"
        assert rank["forward_loss_models"] == given
        assert len(rank["grads"]) == len(ref["grads"])
        for got, want in zip(rank["grads"], ref["grads"], strict=True):
            for g, w in zip(got, want, strict=True):
                torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)
        for p, w in zip(rank["params"], ref["params"], strict=True):
            torch.testing.assert_close(p, w.detach(), rtol=1e-12, atol=1e-14)

    records = [rank["records"] for rank in ranks]
    steps = [[r for r in recs if r["event"] == "train.step"] for recs in records]
    local = ("rank", "window_size")  # who wrote it, and how many micro-batches it ran
    same = [[{k: v for k, v in s.items() if k not in local} for s in rank_steps] for rank_steps in steps]
    assert same[0] == same[1]  # global values: the same on every rank
    stepped = [s for s in steps[0] if not s["skipped"]]
    assert [s["loss"] for s in stepped] == pytest.approx(ref["losses"], rel=1e-12)
    _check_train_metric(spec, steps[0], ref["train_mae"])
    epochs = [r for r in records[0] if r["event"] == "train.epoch"]
    assert [e["loss"] for e in epochs] == pytest.approx(ref["epochs"], rel=1e-12)
    assert [e["items"] for e in epochs] == ref["epoch_items"]
    evals = [r for r in records[0] if r["event"] == "eval.epoch"]
    assert [r["step"] for r in evals] == [s for s, _, _ in ref["evals"]]
    assert [r["loss"] for r in evals] == pytest.approx([v for _, v, _ in ref["evals"]], rel=1e-12)
    # the metrics cover both ranks' shards (uneven): equal to one process over all the items
    assert [r["metrics"]["ignite_mae"] for r in evals] == pytest.approx(
        [m for *_, m in ref["evals"]], rel=1e-6
    )
    assert [r["metrics"]["mae"] for r in evals] == pytest.approx([m for *_, m in ref["evals"]], rel=1e-6)
    assert [r["metrics"] for r in evals] == [r["metrics"] for r in records[1] if r["event"] == "eval.epoch"]
    (end,) = [r for r in records[0] if r["event"] == "run.end"]
    assert (end["reason"], end["step"]) == (
        "max_steps" if "max_steps" in spec else "max_epochs",
        len(ref["losses"]),
    )
    assert {(r["rank"], r["world_size"]) for r in records[1]} == {(1, WORLD)}
    _check_logged(spec, len(ref["epochs"]), records)

    # the ranks' batch losses of a window sum to the step loss; each is its exact share
    for step in steps[0]:
        shares = [
            b for recs in records for b in recs
            if b["event"] == "train.batch" and b["epoch"] == step["epoch"] and b["step"] == step["step"] - 1
        ]  # fmt: skip
        assert math.fsum(b["loss"] for b in shares) == pytest.approx(step["loss"], rel=1e-12, abs=1e-300)
        assert sum(b["items"] for b in shares) == step["items"]
        for b in shares:
            assert b["loss_scale"] == (b["items"] / step["items"] if b["items"] else 0.0)
            assert b["diagnostics"]["scale_ok"] in (True, None)

    # one gradient reduction per optimizer step; besides it, one agreement per step, one telemetry
    # collective per delivery and one per evaluation (plus the epoch-length agreement at start)
    stepped_so_far = [sum(not s["skipped"] for s in steps[0][: i + 1]) for i in range(len(steps[0]))]
    for rank in ranks:
        c = rank["counts"]
        assert rank["hooks_per_step"] == stepped_so_far
        assert c["agree"] == len(steps[0])
        assert (
            len(epochs) <= c["sum_floats"] <= c["deliveries"] + len(epochs) + len(evals)
        )  # one an evaluation
        ours = c["agree"] + c["hook"] + c["sum_floats"] + 1
        if spec.get("eval_every_steps"):  # the metrics sum their states over the ranks themselves too
            assert c["all_reduce"] > ours
        else:
            assert c["all_reduce"] == ours


def _check_train_metric(spec: dict[str, Any], steps: list[dict[str, Any]], want: list[float]) -> None:
    """A training metric of each step is the item-weighted mean over the ranks of each one's own: the
    value over the union of their windows (none for ``forward_loss``, whose outputs are the loss)."""
    if spec.get("forward_loss"):
        assert {len(s["metrics"]) for s in steps} == {0}
    else:
        got = [s["metrics"]["mae"] for s in steps if not s["skipped"]]
        assert got == pytest.approx(want, rel=1e-12)


def _check_logged(spec: dict[str, Any], epochs: int, records: list[list[dict[str, Any]]]) -> None:
    """``Run.log``'s values at each ended epoch (a step limit cuts the last): each rank's own."""
    ended = epochs - 1 if "max_steps" in spec else epochs
    for rank, recs in enumerate(records):
        logged = [(r["epoch"], r["metrics"]) for r in recs if r["event"] == "metric"]
        assert logged == [(e, {"rank_value": float(rank)}) for e in range(1, ended + 1)]


DISTRIBUTED_TASKS = RANKS


def traintel_under_torchrun(
    tmp_path: Path, *overrides: str, launcher: str = "torch.distributed.run"
) -> Child:
    """``python -m LAUNCHER --standalone --nproc-per-node=2 -m traintel train`` with ``--set`` each of
    ``overrides`` (``traintel.cli.torchrun`` exits with the workers' status, torch's own 1 on any failure)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINTEL__")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(DISTRIBUTED_TASKS))
    sets = [
        arg
        for o in (*overrides, f"run.dir={tmp_path / 'run'}", "sinks.prometheus.port=0")
        for arg in ("--set", o)
    ]
    return popen(
        [sys.executable, "-m", launcher, "--standalone", f"--nproc-per-node={WORLD}",
         "-m", "traintel", "train", *sets],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_torchrun_traintel_train_writes_one_json_stream_and_a_diagnostic_file_per_rank(
    tmp_path: Path,
) -> None:
    from tests.helpers.lines import strict_object
    from traintel.schema import validate_lines

    proc = traintel_under_torchrun(tmp_path, "trainer.max_epochs=2", "telemetry.every=1")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    lines = out.splitlines()
    rows = [strict_object(line) for line in lines]
    assert validate_lines(lines) == len(lines)
    events = [r["event"] for r in rows]
    assert events.count("run.start") == 1 and events.count("run.end") == 1
    assert {(r["rank"], r["world_size"]) for r in rows} == {(0, 2)}
    start = rows[0]
    assert start["run_id"] == rows[-1]["run_id"]
    # 1000 samples, 500 per rank in batches of 32: 16 micro-batches, 6 windows of k=3 per epoch
    epochs = [r for r in rows if r["event"] == "train.epoch"]
    assert [(e["epoch"], e["step"], e["items"], e["batches"], e["steps"]) for e in epochs] == [
        (1, 6, 1000, 32, 6),
        (2, 12, 1000, 32, 6),
    ]
    run_dir = tmp_path / "run"
    files = sorted(p.name for p in run_dir.iterdir())
    assert files == ["config.yaml", "diagnostic.jsonl", "diagnostic.rank1.jsonl"]
    for name, rank in (("diagnostic.jsonl", 0), ("diagnostic.rank1.jsonl", 1)):
        diag = (run_dir / name).read_text().splitlines()
        assert validate_lines(diag) == len(diag)
        diag_rows = [strict_object(line) for line in diag]
        assert {r["rank"] for r in diag_rows} == {rank}
        batches = [r for r in diag_rows if r["event"] == "train.batch"]
        assert len(batches) == 2 * 16 and all(b["scale_ok"] for b in batches)
        assert sum(b["items"] for b in batches) == 2 * 500
        assert diag_rows[0]["run_id"] == start["run_id"]
    report = run_child(
        [sys.executable, "-m", "traintel", "report", str(run_dir)],
        timeout=120,
    )
    assert report.returncode == 0, report.stderr
    assert "ranks: 2 of 2 (0, 1)" in report.stdout.splitlines()


def test_a_rank_that_raises_ends_every_rank_and_rank_0_names_it(tmp_path: Path) -> None:
    from tests.helpers.lines import strict_object

    t0 = time.monotonic()
    proc = traintel_under_torchrun(tmp_path, "task.factory=tasks:fails_on_rank", "task.params={call: 7}")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 60
    end = strict_object(out.splitlines()[-1])
    assert (end["event"], end["status"], end["rank"], end["step"]) == ("run.end", "failed", 0, 2)
    assert end["reason"].startswith("rank 1: RuntimeError: loss exploded on rank 1 (here: ")
    rank1 = [
        strict_object(line) for line in (tmp_path / "run" / "diagnostic.rank1.jsonl").read_text().splitlines()
    ]
    assert (rank1[-1]["event"], rank1[-1]["status"], rank1[-1]["reason"]) == (
        "run.end", "failed", "RuntimeError: loss exploded on rank 1"
    )  # fmt: skip


def test_sigterm_to_torchrun_ends_every_rank_after_the_same_step(tmp_path: Path) -> None:
    from tests.helpers.lines import strict_object

    proc = traintel_under_torchrun(tmp_path, "task.factory=tasks:slow", "trainer.max_epochs=50")
    assert proc.stdout is not None
    for line in proc.stdout:  # wait until training is under way
        if '"train.step"' in line:
            break
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert time.monotonic() - t0 < 10
    end = strict_object(out.splitlines()[-1])
    assert (end["event"], end["status"], end["reason"]) == ("run.end", "terminated", "SIGTERM")
    rank1 = [
        strict_object(line) for line in (tmp_path / "run" / "diagnostic.rank1.jsonl").read_text().splitlines()
    ]
    assert (rank1[-1]["event"], rank1[-1]["status"]) == ("run.end", "terminated")
    assert (rank1[-1]["step"], rank1[-1]["items_total"]) == (end["step"], end["items_total"])
    assert end["step"] >= 1


def rank_records(run_dir: Path, rank: int) -> list[dict[str, Any]]:
    from tests.helpers.lines import strict_object

    name = "diagnostic.jsonl" if rank == 0 else f"diagnostic.rank{rank}.jsonl"
    return [strict_object(line) for line in (run_dir / name).read_text().splitlines()]


def test_a_subset_random_sampler_is_sharded_each_index_trained_once_per_epoch(tmp_path: Path) -> None:
    """100 samples, a SubsetRandomSampler over the first 50 for training and one over the other 50
    for validation: each epoch trains exactly the 50 training indices, 25 on each rank, in a new
    order, and evaluates the 50 others."""
    reads = tmp_path / "reads"
    proc = traintel_under_torchrun(
        tmp_path, "task.factory=tasks:split", f"task.params={{record: '{reads}'}}", "trainer.max_epochs=2"
    )
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    records = rank_records(tmp_path / "run", 0)
    epochs = [(r["epoch"], r["items"], r["batches"]) for r in records if r["event"] == "train.epoch"]
    assert epochs == [(1, 50, 6), (2, 50, 6)]  # 25 per rank in batches of 10, 10, 5
    evals = [(r["epoch"], r["items"], r["batches"]) for r in records if r["event"] == "eval.epoch"]
    assert evals == [(1, 50, 6), (2, 50, 6)]
    trained = [[int(i) for i in Path(f"{reads}.rank{r}").read_text().split()] for r in range(WORLD)]
    assert [len(t) for t in trained] == [50, 50]
    per_epoch = [[t[:25], t[25:]] for t in trained]
    for epoch in (0, 1):
        assert sorted(per_epoch[0][epoch] + per_epoch[1][epoch]) == list(range(50))
    assert per_epoch[0][0] != per_epoch[0][1]  # one seeded permutation per epoch


@pytest.mark.parametrize(
    ("params", "line"),
    [
        (
            "{sampler: weighted, loader: train}",
            "traintel: error: task.train_loader: has a WeightedRandomSampler as its sampler, which traintel "
            "cannot shard over the ranks (it shards a SequentialSampler, a RandomSampler without replacement "
            "or num_samples, a SubsetRandomSampler); give it a DistributedSampler, or shard the data in the "
            "task, for a run of several ranks",
        ),
        (
            "{sampler: own, loader: val}",
            "traintel: error: task.val_loader: has a TaskSampler as its sampler, which traintel cannot shard "
            "over the ranks (it shards a SequentialSampler, a RandomSampler without replacement or "
            "num_samples, a SubsetRandomSampler); give it a DistributedSampler, or shard the data in the "
            "task, for a run of several ranks",
        ),
    ],
    ids=["weighted-train", "own-val"],
)
def test_a_sampler_that_cannot_be_sharded_is_refused_with_exit_2(
    tmp_path: Path, params: str, line: str
) -> None:
    proc = traintel_under_torchrun(
        tmp_path, "task.factory=tasks:sampled", f"task.params={params}", launcher="traintel.cli.torchrun"
    )
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-3000:]
    assert err.splitlines().count(line) == WORLD  # each rank's one line
    assert "Traceback" not in err.split("ChildFailedError")[0]
    assert out == ""
    assert [p for p in (tmp_path / "run").rglob("*") if not p.is_dir()] == []  # nothing written


def test_one_training_sample_trains_on_rank_0_while_rank_1_takes_part_with_empty_windows(
    tmp_path: Path,
) -> None:
    """Rank 1's share of one sample is empty (and of one validation sample): it joins every step with
    an empty window and every evaluation with nothing, and the run logs what one process logs."""
    params = ("task.params={train_samples: 1, val_samples: 1}", "trainer.max_epochs=2", "telemetry.every=1")
    proc = traintel_under_torchrun(tmp_path, *params)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["event"], r.get("epoch"), r.get("step"), r.get("items"), r.get("batches")) for r in rows] == [
        ("run.start", None, None, None, None),
        ("train.batch", 1, 0, 1, 1),
        ("train.step", 1, 1, 1, None),
        ("train.epoch", 1, 1, 1, 1),
        ("eval.epoch", 1, 1, 1, 1),
        ("train.batch", 2, 1, 1, 1),
        ("train.step", 2, 2, 1, None),
        ("train.epoch", 2, 2, 1, 1),
        ("eval.epoch", 2, 2, 1, 1),
        ("run.end", 2, 2, None, None),
    ]
    assert (rows[-1]["status"], rows[-1]["items_total"]) == ("completed", 2)
    rank1 = rank_records(tmp_path / "run", 1)
    assert [
        (r["event"], r.get("window_size"), r.get("items")) for r in rank1 if r["event"] != "run.start"
    ] == [
        ("train.step", 0, 1),
        ("train.epoch", None, 1),
        ("eval.epoch", None, 1),
        ("train.step", 0, 1),
        ("train.epoch", None, 1),
        ("eval.epoch", None, 1),
        ("run.end", None, None),
    ]
    assert rank1[-1]["status"] == "completed"

    one = run_child(
        [sys.executable, "-m", "traintel", "train", *(a for p in params for a in ("--set", p)),
         "--set", f"run.dir={tmp_path / 'one'}", "--set", "sinks.prometheus.enabled=false"],
        tmp_path, child_env(), timeout=120,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]

    def losses(text: str) -> list[tuple[str, str]]:
        return [
            (r["event"], float(r["loss"]).hex()) for r in map(json.loads, text.splitlines()) if "loss" in r
        ]

    assert losses(out) == losses(one.stdout)  # rank 1's passes of zero weight change nothing
