"""Two FSDP2 ranks under a real torchrun (gloo on CPU): per-step gradients (gathered whole), final
parameters and every logged loss equal a single process that trains the union of the ranks'
windows, with exactly one reduce-scatter per sharded module per optimizer step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.engine.test_ddp import WORLD, _check_train_metric, reference, torchrun

pytestmark = pytest.mark.slow

UNITS = 2
"""The worker shards each ``Linear`` of the model (two); the root holds no parameter of its own."""

SIZES = [5, 2, 4, 3, 1, 6, 2, 2, 3, 4, 1]
CASES: dict[str, dict[str, Any]] = {
    "k1-uneven-shards-float32": {"sizes": [4, 3, 5, 2, 4, 1, 3], "k": 1, "dtype": "float32"},
    "k3-masked-items-clipped-two-epochs": {
        "sizes": SIZES,
        "kept": [5, 0, 4, 0, 1, 6, 0, 2, 3, 0, 1],
        "k": 3,
        "epochs": 2,
        "clip": 0.5,
    },
    "k2-no-decay-eval-every-steps": {
        "sizes": [4, 3, 5, 2, 4, 1, 3],
        "k": 2,
        "epochs": 2,
        "eval_every_steps": 3,
        "optimizer": {"name": "adamw", "lr": 0.01, "weight_decay": 0.1, "no_decay": {"names": ["*bias"]}},
    },
}


@pytest.mark.parametrize("name", list(CASES))
def test_fsdp_ranks_equal_one_process_on_the_union_of_their_windows(name: str, tmp_path: Path) -> None:
    spec = {**CASES[name], "strategy": "fsdp"}
    proc = torchrun(spec, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    ref = reference(spec)
    tol = {"rtol": 1e-6, "atol": 1e-7} if spec.get("dtype") == "float32" else {"rtol": 1e-12, "atol": 1e-14}

    for rank in ranks:
        assert rank["status"] == "completed"
        assert len(rank["grads"]) == len(ref["grads"])
        for got, want in zip(rank["grads"], ref["grads"], strict=True):
            for g, w in zip(got, want, strict=True):
                torch.testing.assert_close(g, w, **tol)
        for p, w in zip(rank["params"], ref["params"], strict=True):
            torch.testing.assert_close(p, w.detach(), **tol)

    records = [rank["records"] for rank in ranks]
    steps = [[r for r in recs if r["event"] == "train.step"] for recs in records]
    local = ("rank", "window_size")
    same = [[{k: v for k, v in s.items() if k not in local} for s in rank_steps] for rank_steps in steps]
    assert same[0] == same[1]
    rel = tol["rtol"]
    assert [s["loss"] for s in steps[0] if not s["skipped"]] == pytest.approx(ref["losses"], rel=rel)
    if spec.get("clip"):
        assert [s["grad_norm"] for s in steps[0]] == pytest.approx(ref["norms"], rel=rel)
        assert min(ref["norms"]) > spec["clip"]  # every step clipped: the clipped gradients compared
    if spec.get("dtype") != "float32":
        _check_train_metric(spec, steps[0], ref["train_mae"])
    epochs = [r for r in records[0] if r["event"] == "train.epoch"]
    assert [e["loss"] for e in epochs] == pytest.approx(ref["epochs"], rel=rel)
    assert [e["items"] for e in epochs] == ref["epoch_items"]
    evals = [r for r in records[0] if r["event"] == "eval.epoch"]
    assert [r["step"] for r in evals] == [s for s, _, _ in ref["evals"]]
    assert [r["loss"] for r in evals] == pytest.approx([v for _, v, _ in ref["evals"]], rel=rel)
    starts = [next(r for r in recs if r["event"] == "run.start") for recs in records]
    assert [s["config"]["trainer"]["distributed"]["strategy"] for s in starts] == ["fsdp", "fsdp"]

    # one reduce-scatter per sharded module per optimizer step taken, none for a window with no items
    stepped_so_far = [sum(not s["skipped"] for s in steps[0][: i + 1]) for i in range(len(steps[0]))]
    for rank in ranks:
        c = rank["counts"]
        assert rank["hooks_per_step"] == [UNITS * n for n in stepped_so_far]
        assert c["hook"] == 0
        assert c["agree"] == len(steps[0])
        clip = len(stepped_so_far) and stepped_so_far[-1] if spec.get("clip") else 0  # the norm's sum
        ours = c["agree"] + c["sum_floats"] + clip + 1
        if spec.get("eval_every_steps"):  # the metrics sum their states over the ranks themselves too
            assert c["all_reduce"] > ours
        else:
            assert c["all_reduce"] == ours


def test_fsdp_mixed_precision_computes_in_bf16_and_keeps_fp32_shards_and_gradients(tmp_path: Path) -> None:
    """``fsdp.mixed_precision: {param_dtype: bf16, reduce_dtype: fp32}`` on a float32 model: the
    losses are the float32 reference's to bf16's precision, and not to float32's (the forward ran in
    bf16), while the parameters and the gradients the optimizer steps with stay float32."""
    spec = {
        "sizes": [4, 3, 5, 2, 4, 1, 3],
        "k": 2,
        "dtype": "float32",
        "strategy": "fsdp",
        "mixed_precision": True,
    }
    proc = torchrun(spec, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    ref = reference(spec)
    for rank in ranks:
        assert rank["status"] == "completed"
        assert {g.dtype for step in rank["grads"] for g in step} == {torch.float32}
        assert {p.dtype for p in rank["params"]} == {torch.float32}
        for p, w in zip(rank["params"], ref["params"], strict=True):
            torch.testing.assert_close(p, w.detach(), rtol=0.05, atol=0.02)
    steps = [r for r in ranks[0]["records"] if r["event"] == "train.step"]
    got = [s["loss"] for s in steps]
    assert got == pytest.approx(ref["losses"], rel=0.03)
    assert got != pytest.approx(ref["losses"], rel=1e-5)
