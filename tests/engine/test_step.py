"""Exact gradient accumulation: the invariants of the update step."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from ignite.engine import Engine, Events

from tests.helpers.runs import train_in_memory
from tests.helpers.tasks import make_batches, make_model
from traintel.engine.events import TraintelEvents
from traintel.engine.trainer import create_trainer
from traintel.engine.windows import WindowedLoader
from traintel.records import BatchRecord, EpochRecord, StepRecord


def _capture_window_grads(sizes: list[int], k: int) -> tuple[list[list[torch.Tensor]], torch.nn.Module]:
    """Run one epoch with lr=0 and capture .grad at OPTIMIZER_STEP_STARTED of every window."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    trainer = create_trainer(model, torch.nn.functional.mse_loss, opt)
    grads: list[list[torch.Tensor]] = []

    @trainer.on(TraintelEvents.OPTIMIZER_STEP_STARTED)
    def _grab(_: Engine) -> None:
        grads.append([p.grad.detach().clone() for p in model.parameters()])  # type: ignore[union-attr]

    trainer.run(WindowedLoader(make_batches(sizes), k), max_epochs=1)
    return grads, model


@pytest.mark.parametrize(
    ("sizes", "k"),
    [
        ([4, 4, 4], 3),  # equal sizes, full window
        ([5, 5, 2], 3),  # unequal last batch
        ([4, 4, 4, 6, 3], 3),  # a full window, then a partial window r=2 < k
        ([7], 4),  # a single short window
    ],
    ids=["equal", "short-last-batch", "partial-window", "single"],
)
def test_window_gradient_equals_full_batch_gradient(sizes: list[int], k: int) -> None:
    grads, model = _capture_window_grads(sizes, k)
    batches = make_batches(sizes)
    windows = [batches[i : i + k] for i in range(0, len(batches), k)]
    assert len(grads) == len(windows) == math.ceil(len(sizes) / k)
    for got, window in zip(grads, windows, strict=True):
        x = torch.cat([b[0] for b in window])
        y = torch.cat([b[1] for b in window])
        model.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        for g, p in zip(got, model.parameters(), strict=True):
            torch.testing.assert_close(g, p.grad, rtol=1e-12, atol=1e-14)


def test_step_losses_and_parameters_do_not_depend_on_k(tmp_path: Path) -> None:
    data = make_batches([24] * 4)  # 4 optimizer steps of 24 items each
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    results = []
    for k in (1, 2, 3, 4, 6):
        mb = 24 // k
        batches = [(x[i : i + mb], y[i : i + mb]) for i in range(0, len(x), mb)]
        model = make_model()
        sink, _ = train_in_memory(tmp_path / f"k{k}", batches, model=model, accumulation_steps=k)
        losses = [r.loss for r in sink.of("train.step")]
        params = torch.cat([p.detach().flatten() for p in model.parameters()])
        results.append((k, losses, params))
    _, ref_losses, ref_params = results[0]
    assert len(ref_losses) == 4
    for _k, losses, params in results[1:]:
        assert losses == pytest.approx(ref_losses, rel=1e-12)
        torch.testing.assert_close(params, ref_params, rtol=1e-12, atol=1e-14)


def test_each_epoch_has_ceil_b_over_k_optimizer_and_scheduler_steps(tmp_path: Path) -> None:
    sink, run = train_in_memory(
        tmp_path,
        make_batches([4] * 10),
        accumulation_steps=3,
        max_epochs=3,
        scheduler={"name": "step", "step_size": 1, "gamma": 0.5},
    )
    steps = sink.of("train.step")
    assert [r.step for r in steps] == list(range(1, 13))  # ceil(10/3) = 4 per epoch, 3 epochs
    assert [r.epoch for r in steps] == [1] * 4 + [2] * 4 + [3] * 4
    assert [r.window_size for r in steps] == [3, 3, 3, 1] * 3
    assert [r.lr for r in steps] == [0.1 * 0.5**i for i in range(12)]
    assert run.scheduler.last_epoch == 12
    epochs = sink.of("train.epoch")
    assert [(r.steps, r.batches, r.items) for r in epochs] == [(4, 10, 40)] * 3


def test_gradients_are_zero_at_the_start_of_every_epoch(tmp_path: Path) -> None:
    from tests.helpers.runs import quiet_config
    from traintel.run.api import build
    from traintel.task import Task

    model = make_model()
    run = build(
        quiet_config(tmp_path, accumulation_steps=3, max_epochs=3),
        Task(model=model, loss_fn=torch.nn.functional.mse_loss, train_loader=make_batches([4] * 5)),
    )
    seen = []

    @run.trainer.on(Events.EPOCH_STARTED)
    def _check(_: Engine) -> None:
        seen.append([p.grad is None or bool((p.grad == 0).all()) for p in model.parameters()])

    run.run()
    assert seen == [[True] * 4] * 3


def test_epoch_loss_is_sum_over_items_divided_by_items(tmp_path: Path) -> None:
    batches = make_batches([8, 8, 8, 8, 2])  # short last batch: mean of batch means differs
    model = make_model()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    sink, _ = train_in_memory(
        tmp_path, batches, model=model, accumulation_steps=2, optimizer={"name": "sgd", "lr": 1e-300}
    )
    for n, p in model.named_parameters():  # lr so small the parameters do not move in float64
        torch.testing.assert_close(p.detach(), frozen[n], rtol=0, atol=0)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    with torch.no_grad():
        expected = float(torch.nn.functional.mse_loss(model(x), y, reduction="sum")) / len(x)
        mean_of_means = sum(float(torch.nn.functional.mse_loss(model(b[0]), b[1])) for b in batches) / 5
    (epoch,) = sink.of("train.epoch")
    assert epoch.loss == pytest.approx(expected, rel=1e-13)
    assert abs(epoch.loss - mean_of_means) > 1e-3


def test_conservation_of_loss_across_records(tmp_path: Path) -> None:
    sink, _ = train_in_memory(
        tmp_path, make_batches([5, 7, 3, 6, 6, 2, 4]), accumulation_steps=3, max_epochs=2
    )
    batches = [r for r in sink.records if isinstance(r, BatchRecord)]
    steps = [r for r in sink.records if isinstance(r, StepRecord)]
    epochs = [r for r in sink.records if isinstance(r, EpochRecord)]
    assert len(steps) == 6 and len(batches) == 14
    for step in steps:
        window = [b for b in batches if b.step + 1 == step.step]
        assert len(window) == step.window_size
        assert sum(b.items for b in window) == step.items
        assert math.fsum(b.loss for b in window) == pytest.approx(step.loss, rel=1e-15)
        for b in window:
            assert b.loss_scale == b.items / step.items
            assert b.loss == pytest.approx(b.raw_loss * b.items / step.items, rel=1e-15)
    for epoch in epochs:
        mine = [s for s in steps if s.epoch == epoch.epoch]
        weighted = math.fsum(s.loss * s.items for s in mine) / math.fsum(s.items for s in mine)
        assert weighted == pytest.approx(epoch.loss, rel=1e-14)
        assert epoch.items == 33


def test_the_original_bug_is_not_possible(tmp_path: Path) -> None:
    """k=3, equal batches: the logged loss is raw/3, the value given to backward."""
    sink, _ = train_in_memory(tmp_path, make_batches([6] * 3), accumulation_steps=3)
    for b in sink.of("train.batch"):
        assert isinstance(b, BatchRecord)
        assert b.loss_scale == 1 / 3
        assert b.loss == pytest.approx(b.raw_loss / 3, rel=1e-15)
    # the self-checks are part of the record whichever sinks are on (here: only the memory sink)
    checks = [{k: v for k, v in b.diagnostics.items() if k != "rss_bytes"} for b in sink.of("train.batch")]
    assert checks == [
        {
            "expected_loss_scale": 1 / 3,
            "observed_loss_scale": 1 / 3,
            "scale_ok": True,
            "accumulation_position": position,
            "window_items": 18,
            "loss_dtype": "float64",
        }
        for position in (1, 2, 3)
    ]


def test_empty_window_is_a_reported_skip(tmp_path: Path) -> None:
    from tests.helpers.runs import quiet_config
    from traintel.run.api import build
    from traintel.sinks.memory import MemorySink
    from traintel.task import Task

    batches = make_batches([4, 4, 4, 4])
    weights = [1, 1, 0, 0]  # the second window holds no items
    counted = [(x, y, w) for (x, y), w in zip(batches, weights, strict=True)]
    model = make_model()
    with torch.no_grad():  # the first window's objective before any step: s_1 + s_2, as the step sums it
        (x1, y1), (x2, y2) = batches[:2]
        mse = torch.nn.functional.mse_loss
        first_loss = float((mse(model(x1), y1) * 0.5).double() + mse(model(x2), y2) * 0.5)
    sink = MemorySink()
    run = build(
        quiet_config(tmp_path, accumulation_steps=2),
        Task(
            model=model,
            loss_fn=torch.nn.functional.mse_loss,
            train_loader=counted,
            count_items=lambda b: len(b[1]) * b[2],
            prepare=lambda b, device: (b[0].to(device), b[1].to(device)),
        ),
        sinks=[sink],
    )
    end = run.run()
    steps = sink.of("train.step")
    assert [(s.step, s.items, s.skipped, s.loss) for s in steps] == [
        (1, 8, False, first_loss),
        (1, 0, True, 0.0),
    ]
    assert all(math.isfinite(float(p.detach().abs().max())) for p in model.parameters())
    skipped_batches = sink.of("train.batch")[2:]
    assert [(b.items, b.loss, b.loss_scale) for b in skipped_batches] == [(0, 0.0, 0.0), (0, 0.0, 0.0)]
    assert all(math.isnan(b.raw_loss) for b in skipped_batches)
    assert end.status == "completed"
    (epoch,) = sink.of("train.epoch")
    assert (epoch.items, epoch.steps, epoch.batches) == (8, 1, 4)


def test_custom_item_counter_weights_by_items(tmp_path: Path) -> None:
    """A task that counts items itself (e.g. non-ignored tokens) gets item-weighted scaling."""
    from tests.helpers.runs import quiet_config
    from traintel.run.api import build
    from traintel.sinks.memory import MemorySink
    from traintel.task import Task

    sizes = [6, 2, 5]
    batches = make_batches(sizes)

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((out - y) ** 2).mean()

    model = make_model()
    grads: list[torch.Tensor] = []
    sink = MemorySink()
    run = build(
        quiet_config(tmp_path, accumulation_steps=3, optimizer={"name": "sgd", "lr": 1e-300}),
        Task(model=model, loss_fn=loss_fn, train_loader=batches, count_items=lambda b: b[0].shape[0]),
        sinks=[sink],
    )
    run.trainer.add_event_handler(
        TraintelEvents.OPTIMIZER_STEP_STARTED,
        lambda _: grads.extend(p.grad.detach().clone() for p in model.parameters()),  # type: ignore[union-attr]
    )
    run.run()
    model.zero_grad()
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    loss_fn(model(x), y).backward()
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-12, atol=1e-14)
    assert [b.loss_scale for b in sink.of("train.batch")] == [6 / 13, 2 / 13, 5 / 13]


def test_epoch_totals_fold_many_windows_of_different_sizes(tmp_path: Path) -> None:
    """More windows than one fold takes (EpochLoss.FOLD_EVERY), with two window sizes: the epoch loss
    is still the sum of per-item losses over the items."""
    from traintel.engine.progress import EpochLoss

    sizes = [3, 1] * 80  # k=2: 80 windows of 4 items... and batches of 1 and 3 items
    sizes += [5]  # a last window of one micro-batch, 5 items
    batches = make_batches(sizes)
    model = make_model()
    sink, _ = train_in_memory(
        tmp_path, batches, model=model, accumulation_steps=2, optimizer={"name": "sgd", "lr": 1e-300}
    )
    assert len(sink.of("train.step")) == 81 > EpochLoss.FOLD_EVERY
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    with torch.no_grad():
        expected = float(torch.nn.functional.mse_loss(model(x), y, reduction="sum")) / len(x)
    (epoch,) = sink.of("train.epoch")
    assert epoch.items == 3 * 80 + 80 + 5  # type: ignore[attr-defined]
    assert epoch.loss == pytest.approx(expected, rel=1e-13)  # type: ignore[attr-defined]


def test_the_step_loss_is_summed_only_when_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from traintel.engine.loss import WindowLoss

    sums: list[int] = []
    original = WindowLoss.resolve

    def counting(self: WindowLoss) -> torch.Tensor:
        sums.append(1)
        return original(self)

    monkeypatch.setattr(WindowLoss, "resolve", counting)
    sink, run = train_in_memory(tmp_path, make_batches([4] * 7), accumulation_steps=3, max_epochs=2, every=2)
    assert sums == []  # the records take the step loss from the emitted floats
    out = run.trainer.state.step_output
    first, again = out.loss, out.loss
    assert first is again and first.dtype == torch.float64 and not first.requires_grad
    assert float(first) == sink.of("train.step")[-1].loss  # type: ignore[attr-defined]
    assert run.trainer.state.output is first
    assert len(sums) == 3  # three reads, one tensor (the identities above)
    assert math.isfinite(float(first))


def test_the_update_step_gives_a_plain_ignite_engine_a_tensor_output() -> None:
    from traintel.engine.step import AccumulatingStep

    model = make_model()
    step = AccumulatingStep(
        model,
        torch.nn.functional.mse_loss,
        torch.optim.SGD(model.parameters(), lr=0.0),
        device=torch.device("cpu"),
    )
    engine = Engine(step)  # Ignite's own Engine and State, not a TraintelEngine
    outputs: list[object] = []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(e.state.output))
    batches = make_batches([4] * 4)
    engine.run(WindowedLoader(batches, 2), max_epochs=1)
    assert [type(o) for o in outputs] == [torch.Tensor, torch.Tensor]
    with torch.no_grad():  # lr=0: the model is the same at every step
        means = [float(torch.nn.functional.mse_loss(model(x), y)) for x, y in batches]
    expected = [means[0] * 0.5 + means[1] * 0.5, means[2] * 0.5 + means[3] * 0.5]
    assert [float(o) for o in outputs] == pytest.approx(expected, rel=1e-15)  # type: ignore[arg-type]


def test_micro_batch_completed_holds_each_micro_batch_as_its_records_report_it(tmp_path: Path) -> None:
    """A handler on MICRO_BATCH_COMPLETED sees every micro-batch, in order, with the values of its
    train.batch record (a micro-batch without items included); without a handler the state holds the
    last micro-batch all the same."""
    from traintel.engine.outputs import MicroBatchOutput

    batches = make_batches([5, 3, 4, 2, 6])  # k=3: windows of 12 items, then one of 8
    seen: list[MicroBatchOutput] = []

    def grab(engine: Engine) -> None:
        seen.append(engine.state.micro_batch)

    sink, run = train_in_memory(
        tmp_path / "listened",
        batches,
        accumulation_steps=3,
        attach=lambda run: run.trainer.add_event_handler(TraintelEvents.MICRO_BATCH_COMPLETED, grab),
    )
    assert [(m.position, m.batch, m.items, m.scale) for m in seen] == [
        (1, 1, 5, 5 / 12),
        (2, 2, 3, 3 / 12),
        (3, 3, 4, 4 / 12),
        (1, 4, 2, 2 / 8),
        (2, 5, 6, 6 / 8),
    ]
    records = sink.of("train.batch")
    assert [(float(m.raw_loss), float(m.loss)) for m in seen] == [(r.raw_loss, r.loss) for r in records]
    assert all(not m.loss.requires_grad and not m.raw_loss.requires_grad for m in seen)
    assert run.trainer.state.micro_batch is seen[-1]

    _, quiet = train_in_memory(tmp_path / "unlistened", batches, accumulation_steps=3)
    last = quiet.trainer.state.micro_batch
    assert last is not None
    assert (last.position, last.batch, last.items, last.scale) == (2, 5, 6, 6 / 8)
    assert (float(last.raw_loss), float(last.loss)) == (float(seen[-1].raw_loss), float(seen[-1].loss))


def test_a_plain_ignite_engine_fires_traintel_events_once_it_registers_them() -> None:
    """The update step fires its events on a plain Ignite ``Engine`` that registered them, and runs
    without them on one that did not (its ``fire_event`` would raise for an unregistered event)."""
    from traintel.engine.step import AccumulatingStep

    def run(register: bool) -> tuple[list[tuple[str, int, int]], Engine]:
        model = make_model()
        step = AccumulatingStep(
            model,
            torch.nn.functional.mse_loss,
            torch.optim.SGD(model.parameters(), lr=0.1),
            device=torch.device("cpu"),
        )
        engine = Engine(step)
        seen: list[tuple[str, int, int]] = []
        if register:
            engine.register_events(*TraintelEvents)
            engine.add_event_handler(
                TraintelEvents.MICRO_BATCH_COMPLETED,
                lambda e: seen.append(("micro", e.state.micro_batch.batch, e.state.micro_batch.items)),
            )
            engine.add_event_handler(
                TraintelEvents.OPTIMIZER_STEP_STARTED, lambda e: seen.append(("step", e.state.iteration, 0))
            )
        engine.run(WindowedLoader(make_batches([4, 3, 5, 2, 6]), 2), max_epochs=2)
        return seen, engine

    seen, engine = run(register=True)
    epoch = [("micro", 1, 4), ("micro", 2, 3), ("step", 1, 0), ("micro", 3, 5), ("micro", 4, 2), ("step", 2, 0),
             ("micro", 5, 6), ("step", 3, 0)]  # fmt: skip
    assert seen == epoch + [(kind, b if kind == "micro" else b + 3, n) for kind, b, n in epoch]
    assert engine.state.iteration == 6
    quiet, plain = run(register=False)
    assert quiet == [] and plain.state.iteration == 6
    last = plain.state.micro_batch  # type: ignore[attr-defined]  # an extra attribute of Ignite's State
    assert (last.batch, last.items) == (5, 6)


def test_the_trainer_fires_its_events_once_a_handler_listens_alone_or_in_a_list(tmp_path: Path) -> None:
    """The trainer fires MICRO_BATCH_COMPLETED and OPTIMIZER_STEP_STARTED once a handler is attached
    to them, on its own or in an events list."""
    seen: list[tuple[str, int]] = []

    def attach(run: Any) -> None:
        run.trainer.add_event_handler(
            TraintelEvents.MICRO_BATCH_COMPLETED, lambda e: seen.append(("micro", e.state.micro_batch.batch))
        )
        run.trainer.add_event_handler(
            TraintelEvents.OPTIMIZER_STEP_STARTED | Events.EPOCH_COMPLETED,
            lambda e: seen.append(("step", e.state.progress.run_steps)),
        )

    train_in_memory(tmp_path, make_batches([4, 3, 5, 2, 6]), attach=attach, accumulation_steps=2)
    assert seen == [
        ("micro", 1), ("micro", 2), ("step", 0), ("micro", 3), ("micro", 4), ("step", 1), ("micro", 5),
        ("step", 2), ("step", 3),
    ]  # fmt: skip
