"""The run's position (``state.progress``): counted by the update step, saved and restored whole."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from ignite.engine import Events

from tests.helpers.runs import train_in_memory
from tests.helpers.tasks import make_batches
from traintel.engine.progress import Progress


def test_progress_counts_a_run_and_round_trips_mid_epoch(tmp_path: Path) -> None:
    saved: dict[str, Any] = {}
    batches = make_batches([4, 4, 4, 2, 3, 4, 1])  # k=2: windows of 8, 6, 7 and 1 items

    def attach(run: Any) -> None:
        def save(engine: Any) -> None:
            path = tmp_path / "progress.pt"
            torch.save(engine.state.progress.state_dict(), path)
            saved["dict"] = torch.load(path, weights_only=True)
            saved["epoch_loss"] = float(engine.state.progress.loss_sum)

        run.trainer.add_event_handler(Events.ITERATION_COMPLETED(once=6), save)  # epoch 2, window 2

    sink, run = train_in_memory(tmp_path, batches, accumulation_steps=2, max_epochs=2, attach=attach)
    state = saved["dict"]
    assert {k: v for k, v in state.items() if k != "loss"} == {
        "epoch": 2, "windows": 2, "batches": 4, "steps": 2, "items": 14, "run_steps": 6, "run_items": 36,
    }  # fmt: skip
    loss = state["loss"]  # the folded sum and the windows not yet folded, as they were
    assert loss["sum"].dtype == torch.float64 and loss["sum"].device.type == "cpu"
    assert float(loss["sum"]) == 0.0
    assert [(w.tolist(), n) for w, n in loss["waiting"]] == [
        (w.tolist(), n) for w, n in _windows_of(run, epoch=2)[:2]
    ]

    restored = Progress()
    restored.load_state_dict(state)
    again = restored.state_dict()
    assert again.keys() == state.keys()
    assert {k: v for k, v in again.items() if k != "loss"} == {k: v for k, v in state.items() if k != "loss"}
    assert float(restored.loss_sum) == saved["epoch_loss"]  # folded the same way: the same bits
    restored.start_epoch(2)  # the restored epoch keeps its counts
    assert (restored.windows, restored.items) == (2, 14)
    restored.start_epoch(3)
    assert (restored.epoch, restored.windows, restored.items, restored.run_items) == (3, 0, 0, 36)
    assert float(restored.loss_sum) == 0.0

    final = run.trainer.state.progress
    epoch_2 = sink.of("train.epoch")[-1]
    assert (final.epoch, final.windows, final.steps, final.items) == (2, 4, 4, 22)
    assert epoch_2.loss == float(final.loss_sum) / 22  # type: ignore[attr-defined]


def _windows_of(run: Any, epoch: int) -> list[tuple[torch.Tensor, int]]:
    """The s_b of each window of ``epoch`` (float64 tensors: the exact values of the records) and its
    items N_t, from the memory sink's batch records."""
    sink = run.fanout.sinks[-1]
    windows: dict[int, list[Any]] = {}
    for b in sink.of("train.batch"):
        if b.epoch == epoch:
            windows.setdefault(b.step, []).append(b)
    return [
        (torch.tensor([b.loss for b in w], dtype=torch.float64), sum(b.items for b in w))
        for _, w in sorted(windows.items())
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"windows": -1}, "progress 'windows' must be an integer >= 0, got -1"),
        ({"epoch": 1.0}, "progress 'epoch' must be an integer >= 0, got 1.0"),
        ({"loss": 0.5}, "progress 'loss' must be a mapping, got float"),
        ({"loss": {"sum": 0.5}}, "progress 'loss' sum must be a one-element tensor, got float"),
    ],
)
def test_a_bad_progress_state_is_refused_whole(change: dict[str, Any], message: str) -> None:
    progress = Progress()
    state = {**Progress().state_dict(), "run_steps": 5, **change}
    with pytest.raises(ValueError, match=f"^{message}$"):
        progress.load_state_dict(state)
    assert progress.run_steps == 0  # nothing was half-loaded
