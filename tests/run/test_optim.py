"""Your optimizer and schedule: any torch optimizer by name or factory, parameter groups without
weight decay, warm-up then cosine, one-cycle, a scheduler factory, and optimizer and scheduler
objects given by the task; each against a plain PyTorch loop, bit for bit."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers.plain import plain_loop
from tests.helpers.runs import quiet_config
from tests.helpers.tasks import make_batches, make_model
from traintel.errors import ConfigError
from traintel.run.api import build
from traintel.sinks.memory import MemorySink
from traintel.task import Task

Batches = list[tuple[torch.Tensor, torch.Tensor]]


def traintel_run(
    tmp_path: Path, task: Task, *, epochs: int = 1, **trainer: Any
) -> tuple[list[float], list[float], Any]:
    cfg = quiet_config(tmp_path, accumulation_steps=3, max_epochs=epochs, **trainer)
    sink = MemorySink()
    run = build(cfg, task, sinks=[sink])
    run.run()
    steps = sink.of("train.step")
    run.started = sink.records[0]  # run.start
    return [r.loss for r in steps], [r.lr for r in steps], run  # type: ignore[attr-defined]


SIZES = [4, 3, 5, 2, 4, 1, 3, 2]  # windows of 3, 3 and 2 micro-batches of uneven sizes


def _task(model: torch.nn.Module, **given: Any) -> Task:
    return Task(model=model, loss_fn=torch.nn.functional.mse_loss, train_loader=make_batches(SIZES), **given)


def _same_parameters(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name


class Tagged(torch.nn.Module):
    """An embedding, two linear layers and a norm: the parameters a transformer recipe sorts."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(2, 3)
        self.lin = torch.nn.Linear(3, 4)
        self.norm = torch.nn.LayerNorm(4)
        self.out = torch.nn.Linear(4, 1)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.emb(torch.zeros(len(x), dtype=torch.long))
        return self.out(torch.tanh(self.norm(self.lin(h))))


def test_no_decay_groups_by_name_pattern_and_module_class_train_as_a_plain_loop(tmp_path: Path) -> None:
    ours = Tagged()
    no_decay = {"names": ["*bias"], "modules": ["LayerNorm", "Embedding"]}
    optimizer = {"name": "adamw", "lr": 0.01, "weight_decay": 0.1, "no_decay": no_decay}
    losses, _, run = traintel_run(tmp_path, _task(ours), epochs=2, optimizer=optimizer)

    names = {id(p): n for n, p in ours.named_parameters()}
    groups = [([names[id(p)] for p in g["params"]], g["weight_decay"]) for g in run.optimizer.param_groups]
    assert groups == [
        (["lin.weight", "out.weight"], 0.1),
        (["emb.weight", "lin.bias", "norm.weight", "norm.bias", "out.bias"], 0.0),
    ]
    theirs = Tagged()
    by_name = dict(theirs.named_parameters())
    plain_optimizer = torch.optim.AdamW(
        [
            {"params": [by_name["lin.weight"], by_name["out.weight"]]},
            {"params": [by_name[n] for n in ("emb.weight", "lin.bias", "norm.weight", "norm.bias", "out.bias")],
             "weight_decay": 0.0},
        ],
        lr=0.01,
        weight_decay=0.1,
    )  # fmt: skip
    want, _ = plain_loop(theirs, make_batches(SIZES), 3, plain_optimizer, epochs=2)
    assert losses == want
    _same_parameters(ours, theirs)


@pytest.mark.parametrize(
    ("name", "extra", "make"),
    [
        ("RMSprop", {"momentum": 0.5, "alpha": 0.9}, lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5, alpha=0.9)),
        ("nadam", {}, lambda p: torch.optim.NAdam(p, lr=0.01)),
        ("tests.helpers.optim_factories:nesterov_sgd", {"momentum": 0.7},
         lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.7, nesterov=True)),
    ],
)  # fmt: skip
def test_any_torch_optimizer_by_name_or_a_factory_trains_as_a_plain_loop(
    tmp_path: Path, name: str, extra: dict[str, Any], make: Callable[[Any], torch.optim.Optimizer]
) -> None:
    ours = make_model()
    losses, _, run = traintel_run(tmp_path, _task(ours), optimizer={"name": name, "lr": 0.01, **extra})
    theirs = make_model()
    want, _ = plain_loop(theirs, make_batches(SIZES), 3, make(theirs.parameters()))
    assert type(run.optimizer) is type(make(make_model().parameters()))
    assert losses == want
    _same_parameters(ours, theirs)


def test_warmup_cosine_ramps_then_falls_to_min_lr_at_the_runs_last_step(tmp_path: Path) -> None:
    schedule = {"name": "warmup_cosine", "warmup_steps": 2, "min_lr": 0.001}
    _, lrs, _ = traintel_run(tmp_path, _task(make_model()), epochs=3, scheduler=schedule)
    # 3 steps an epoch, 3 epochs: 9 steps; steps 1-2 ramp to 0.1, steps 3-9 fall along a half cosine
    peak, floor = 0.1, 0.001
    want = [peak * 1 / 2, peak * 2 / 2]
    want += [floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * t / 7)) for t in range(1, 8)]
    assert lrs == pytest.approx(want, rel=1e-14, abs=0)
    assert lrs[-1] == pytest.approx(floor, rel=1e-14)
    assert lrs[1] == peak


def test_onecycle_and_a_scheduler_factory_default_to_the_runs_steps(tmp_path: Path) -> None:
    ours = make_model()
    losses, lrs, run = traintel_run(
        tmp_path / "one", _task(ours), epochs=2, optimizer={"name": "adamw", "lr": 0.05},
        scheduler={"name": "onecycle", "pct_start": 0.4},
    )  # fmt: skip
    assert run.scheduler.total_steps == 6
    assert (run.started.optimizer, run.started.scheduler) == (
        "torch.optim.adamw.AdamW",
        "torch.optim.lr_scheduler.OneCycleLR",
    )
    theirs = make_model()
    opt = torch.optim.AdamW(theirs.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=6, pct_start=0.4)
    want_losses, want_lrs = plain_loop(theirs, make_batches(SIZES), 3, opt, scheduler=sched, epochs=2)
    assert (losses, lrs) == (want_losses, want_lrs)
    _same_parameters(ours, theirs)

    _, lrs, run = traintel_run(
        tmp_path / "factory", _task(make_model()), epochs=2,
        scheduler={"name": "tests.helpers.optim_factories:halving", "every": 2},
    )  # fmt: skip
    assert run.scheduler.given_total == 6
    assert lrs == [0.1, 0.1, 0.05, 0.05, 0.025, 0.025]


def test_the_tasks_optimizer_and_scheduler_objects_or_callables_train_as_a_plain_loop(tmp_path: Path) -> None:
    theirs = make_model()
    opt = torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.8)
    want, want_lrs = plain_loop(theirs, make_batches(SIZES), 3, opt, scheduler=sched, epochs=2)

    objects = make_model()
    given_opt = torch.optim.SGD(objects.parameters(), lr=0.05, momentum=0.9)
    task = _task(
        objects, optimizer=given_opt, scheduler=torch.optim.lr_scheduler.ExponentialLR(given_opt, 0.8)
    )
    losses, lrs, run = traintel_run(tmp_path / "objects", task, epochs=2)
    assert run.optimizer is given_opt
    assert (run.started.optimizer, run.started.scheduler) == (
        "torch.optim.sgd.SGD",
        "torch.optim.lr_scheduler.ExponentialLR",
    )  # what the run steps, though trainer.optimizer (not used) says sgd with lr 0.1
    assert (losses, lrs) == (want, want_lrs)
    _same_parameters(objects, theirs)

    made = make_model()
    task = _task(
        made,
        optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
        scheduler=lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.8),
    )
    losses, lrs, _ = traintel_run(tmp_path / "callables", task, epochs=2)
    assert (losses, lrs) == (want, want_lrs)
    _same_parameters(made, theirs)


def _checkpointed(tmp_path: Path, epochs: int, **given: Any) -> tuple[list[float], Any]:
    cfg = quiet_config(tmp_path, accumulation_steps=3, max_epochs=epochs)
    cfg["run"]["resume"] = "auto"
    cfg["checkpoint"] = {"every_epochs": 1}
    sink = MemorySink()
    run = build(cfg, _task(make_model(), **given), sinks=[sink])
    run.run()
    return [r.loss for r in sink.of("train.step")], run  # type: ignore[attr-defined]


def sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def decay(optimizer: torch.optim.Optimizer) -> Any:
    return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.8)


def test_the_tasks_optimizer_and_scheduler_resume_from_a_checkpoint_and_are_checked_by_class(
    tmp_path: Path,
) -> None:
    whole, _ = _checkpointed(tmp_path / "whole", 3, optimizer=sgd, scheduler=decay)
    first, _ = _checkpointed(tmp_path / "split", 2, optimizer=sgd, scheduler=decay)
    rest, run = _checkpointed(tmp_path / "split", 3, optimizer=sgd, scheduler=decay)
    assert run.resumed_from_step == 6
    assert first + rest == whole
    assert run.scheduler.last_epoch == 9  # its state came back: 6 steps before, 3 after

    where = str(tmp_path / "split" / "run")
    with pytest.raises(ConfigError) as caught:
        _checkpointed(
            tmp_path / "split", 4, optimizer=lambda m: torch.optim.Adam(m.parameters()), scheduler=decay
        )
    assert str(caught.value) == (
        f"trainer.optimizer: cannot change when resuming the run in {where!r}: its checkpoint has "
        "'torch.optim.sgd.SGD', this attempt 'torch.optim.adam.Adam'"
    )
    with pytest.raises(ConfigError) as caught:
        _checkpointed(tmp_path / "split", 4, optimizer=sgd)
    assert str(caught.value) == (
        f"trainer.scheduler: cannot change when resuming the run in {where!r}: its checkpoint has "
        "'torch.optim.lr_scheduler.ExponentialLR', this attempt None"
    )


def _error(tmp_path: Path, task: Task, **trainer: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        build(quiet_config(tmp_path, **trainer), task)
    return str(caught.value)


def test_what_the_optimizer_settings_cannot_be_is_one_line_naming_the_key(tmp_path: Path) -> None:
    t = lambda **given: _task(make_model(), **given)  # noqa: E731
    assert _error(tmp_path / "a", t(), optimizer={"name": "adamw", "no_decay": {"names": ["*bais"]}}) == (
        "trainer.optimizer.no_decay.names[0]: '*bais' matches no trainable parameter of the model "
        "(a name: '0.weight')"
    )
    assert _error(
        tmp_path / "b", t(), optimizer={"name": "adamw", "no_decay": {"modules": ["LayerNorm"]}}
    ) == (
        "trainer.optimizer.no_decay.modules[0]: no module of class 'LayerNorm' holds a trainable parameter "
        "of the model"
    )
    assert _error(tmp_path / "c", t(), optimizer={"name": "rprop", "no_decay": {"names": ["*bias"]}}) == (
        "trainer.optimizer.no_decay: rprop has no weight_decay to leave out"
    )
    assert _error(tmp_path / "d", t(), optimizer={"name": "sgd", "momentum": -1}) == (
        "trainer.optimizer: sgd rejected its arguments: ValueError: Invalid momentum value: -1"
    )
    assert _error(
        tmp_path / "e", t(), optimizer={"name": "tests.helpers.optim_factories:not_an_optimizer"}
    ) == (
        "trainer.optimizer.name: tests.helpers.optim_factories:not_an_optimizer returned list, "
        "not a torch.optim.Optimizer"
    )
    assert _error(tmp_path / "f", t(), optimizer={"name": "adagrad"}, scheduler={"name": "onecycle"}) == (
        "trainer.scheduler.cycle_momentum: Adagrad has no momentum or beta1 to cycle; set it to false"
    )
    assert _error(tmp_path / "g", t(), scheduler={"name": "warmup_cosine", "warmup_steps": 3}) == (
        "trainer.scheduler.warmup_steps: must be less than the schedule's 3 optimizer steps, got 3"
    )
    assert _error(
        tmp_path / "h", t(), scheduler={"name": "warmup_cosine", "warmup_steps": 1, "min_lr": 0.5}
    ) == ("trainer.scheduler.min_lr: must not exceed the learning rate 0.1, got 0.5")
    assert _error(
        tmp_path / "i", t(), scheduler={"name": "tests.helpers.optim_factories:halving", "evry": 2}
    ) == (
        "trainer.scheduler: tests.helpers.optim_factories:halving does not take these arguments: "
        "got an unexpected keyword argument 'evry'"
    )


def test_what_the_tasks_optimizer_and_scheduler_cannot_be_is_one_line(tmp_path: Path) -> None:
    other = make_model()
    foreign = torch.optim.SGD(other.parameters(), lr=0.1)
    assert _error(tmp_path / "a", _task(make_model(), optimizer=foreign)) == (
        "task.optimizer: holds parameters that are not the model's; build it from task.model's parameters "
        "(or give a callable taking the model)"
    )
    assert _error(tmp_path / "b", _task(make_model(), optimizer=lambda m: "adam")) == (
        "task.optimizer: returned str, not a torch.optim.Optimizer"
    )
    assert _error(tmp_path / "c", _task(make_model(), optimizer=3)) == (
        "task.optimizer: must be a torch.optim.Optimizer or a callable taking the model, got int"
    )
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau  # a class: called with the optimizer
    assert _error(tmp_path / "d", _task(make_model(), scheduler=plateau)).startswith(
        "task.scheduler: ReduceLROnPlateau is stepped with a metric; "
    )
    assert _error(tmp_path / "e", _task(make_model(), scheduler=decay), scheduler={"name": "cosine"}) == (
        "trainer.scheduler: the task gives its own scheduler: set trainer.scheduler to null, or leave the "
        "task's out"
    )
    assert _error(
        tmp_path / "f",
        _task(make_model(), optimizer=sgd),
        optimizer={"name": "adamw", "no_decay": {"names": ["*"]}},
    ) == (
        "trainer.optimizer.no_decay: the task gives its own optimizer: make its parameter groups there, or "
        "leave the task's out"
    )


def _resumed_with(tmp_path: Path, scheduler: dict[str, Any], epochs: int) -> None:
    cfg = quiet_config(tmp_path, accumulation_steps=3, max_epochs=epochs, scheduler=scheduler)
    cfg["run"]["resume"] = "auto"
    cfg["checkpoint"] = {"every_epochs": 1}
    build(cfg, _task(make_model())).run()


@pytest.mark.parametrize(
    ("scheduler", "message"),
    [
        ({"name": "cosine"}, "trainer.scheduler: cosine keeps its 6 steps from when the run began; this "
         "attempt trains to step 12, so after step 6 the learning rate rises again"),
        ({"name": "warmup_cosine", "warmup_steps": 2}, "trainer.scheduler: warmup_cosine was 6 steps long and "
         "is 12 from step 7, where the learning rate goes from 0 to 0.05; it reaches min_lr at step 12"),
    ],
)  # fmt: skip
def test_a_resume_that_lengthens_a_schedule_tied_to_the_runs_steps_says_what_the_rate_will_do(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, scheduler: dict[str, Any], message: str
) -> None:
    _resumed_with(tmp_path, scheduler, 2)
    caplog.clear()
    _resumed_with(tmp_path, scheduler, 4)
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [message]


def test_a_resume_past_the_end_of_a_onecycle_schedule_is_refused(tmp_path: Path) -> None:
    scheduler = {"name": "onecycle"}
    _resumed_with(tmp_path, scheduler, 2)
    with pytest.raises(ConfigError) as caught:
        _resumed_with(tmp_path, scheduler, 3)
    assert str(caught.value) == (
        "trainer.max_epochs: the onecycle schedule was set for 6 optimizer steps when the run began, and "
        "this attempt would train to step 9, past its end; keep the run at 6 steps or set "
        "trainer.scheduler.total_steps when a run begins"
    )
