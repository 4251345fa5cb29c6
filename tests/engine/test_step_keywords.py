"""Models called with keywords, and models that compute their own loss (``Task.forward_loss``): the
same item-weighted step as ``loss_fn``, bit for bit against a plain PyTorch loop."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch

from tests.helpers.plain import plain_loop
from tests.helpers.runs import quiet_config
from tests.helpers.tasks import make_batches, make_model
from traintel.engine.step import to_device
from traintel.engine.trainer import create_trainer
from traintel.engine.windows import WindowedLoader
from traintel.run.api import build
from traintel.sinks.memory import MemorySink
from traintel.task import Task

SIZES = [5, 2, 4, 3, 1, 6, 2]  # k=3: windows of 11, 10 and 2 items
K = 3
mse = torch.nn.functional.mse_loss


class Gated(torch.nn.Module):
    """A model whose inputs are keyword-only: ``model(inputs)`` cannot call it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(3, 1).double()

    def forward(self, *, features: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return self.linear(features) * gate


def gated_batches(sizes: list[int]) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        {"x": x, "gate": torch.rand(len(x), 1, generator=g, dtype=torch.float64), "y": y}
        for x, y in make_batches(sizes)
    ]


def sgd_steps(model: torch.nn.Module, batches: list[Any], **calls: Any) -> list[float]:
    """The plain loop (``tests.helpers.plain``) with SGD(lr=0.1) over windows of K: each step's loss;
    ``calls``: its ``loss`` and ``items``, for batches that are not ``(x, y)``."""
    return plain_loop(model, batches, K, torch.optim.SGD(model.parameters(), lr=0.1), **calls)[0]


def train(tmp_path: Path, task: Task, **trainer: Any) -> MemorySink:
    sink = MemorySink()
    build(quiet_config(tmp_path, accumulation_steps=K, **trainer), task, sinks=[sink]).run()
    return sink


def assert_same_parameters(got: torch.nn.Module, want: torch.nn.Module) -> None:
    pairs = list(zip(got.parameters(), want.parameters(), strict=True))
    assert pairs
    assert all(torch.equal(g, w) for g, w in pairs)


def test_a_mapping_of_inputs_is_passed_as_keywords(tmp_path: Path) -> None:
    batches, val = gated_batches(SIZES), gated_batches([3, 5])

    def prepare(
        b: dict[str, torch.Tensor], device: torch.device
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return {"features": b["x"].to(device), "gate": b["gate"].to(device)}, b["y"].to(device)

    model = Gated()
    task = Task(
        model=model, loss_fn=mse, train_loader=batches, val_loader=val, prepare=prepare,
        count_items=lambda b: len(b["y"]),
    )  # fmt: skip
    sink = train(tmp_path, task)

    reference = Gated()
    steps = sgd_steps(
        reference,
        batches,
        loss=lambda b: mse(reference(features=b["x"], gate=b["gate"]), b["y"]),
        items=lambda b: len(b["y"]),
    )
    assert [r.loss for r in sink.of("train.step")] == steps
    assert [r.items for r in sink.of("train.step")] == [11, 10, 2]
    assert_same_parameters(model, reference)
    with torch.no_grad():
        raws = [float(mse(reference(features=b["x"], gate=b["gate"]), b["y"])) for b in val]
    (evaluation,) = sink.of("eval.epoch")
    assert (evaluation.loss, evaluation.items) == ((raws[0] * 3 + raws[1] * 5) / 8, 8)


@dataclass
class Output:
    """What a model that computes its own loss returns (as a Hugging Face ``ModelOutput`` does)."""

    loss: Any
    prediction: torch.Tensor | None = None


@pytest.mark.parametrize("returns", ["tensor", "output"])
def test_forward_loss_trains_like_a_plain_loop(tmp_path: Path, returns: str) -> None:
    batches = make_batches(SIZES)
    seen: list[tuple[type, type]] = []

    def forward_loss(model: torch.nn.Module, batch: Any) -> Any:
        seen.append((type(model), type(batch)))
        x, y = batch
        prediction = model(x)
        loss = mse(prediction, y)
        return loss if returns == "tensor" else Output(loss, prediction)

    model = make_model()
    sink = train(tmp_path, Task(model=model, forward_loss=forward_loss, train_loader=batches))

    reference = make_model()
    steps = sgd_steps(reference, batches)
    assert [r.loss for r in sink.of("train.step")] == steps
    assert [(r.items, r.loss_scale) for r in sink.of("train.batch")] == [
        (5, 5 / 11), (2, 2 / 11), (4, 4 / 11), (3, 3 / 10), (1, 1 / 10), (6, 6 / 10), (2, 1.0),
    ]  # fmt: skip
    assert_same_parameters(model, reference)
    assert seen == [(torch.nn.Sequential, tuple)] * len(SIZES)  # the model itself; the batch whole


class Pair(NamedTuple):
    first: torch.Tensor
    second: list[Any]


def test_to_device_moves_every_tensor_and_keeps_the_structure() -> None:
    meta = torch.device("meta")
    batch = {
        "ids": torch.ones(2),
        "parts": (torch.zeros(1), [torch.zeros(3), "text", 7]),
        "pair": Pair(torch.ones(1), []),
    }
    moved = to_device(batch, meta)
    assert moved.keys() == batch.keys()
    assert moved["ids"].device == meta and moved["ids"].shape == (2,)
    parts = moved["parts"]
    assert type(parts) is tuple and type(parts[1]) is list
    assert (parts[0].device, parts[1][0].device, parts[1][1:]) == (meta, meta, ["text", 7])
    assert type(moved["pair"]) is Pair and moved["pair"].first.device == meta and moved["pair"].second == []
    on_cpu = torch.ones(1)
    assert to_device(on_cpu, torch.device("cpu")) is on_cpu  # already there: not copied


def test_prepare_gives_forward_loss_its_batch(tmp_path: Path) -> None:
    got: list[Any] = []

    def forward_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        got.append(batch)
        return mse(model(batch["x"]), batch["y"])

    batches = make_batches([2, 3])
    task = Task(
        model=make_model(), forward_loss=forward_loss, train_loader=batches,
        prepare=lambda b, device: {"x": b[0].to(device), "y": b[1].to(device)}, count_items=lambda b: len(b[0]),
    )  # fmt: skip
    train(tmp_path, task)
    assert [(b.keys(), len(b["y"])) for b in got] == [({"x", "y"}, 2), ({"x", "y"}, 3)]


def test_bf16_autocast_wraps_forward_loss_but_not_prepare(tmp_path: Path) -> None:
    calls: list[tuple[str, bool]] = []

    def prepare(batch: Any, device: torch.device) -> Any:
        calls.append(("prepare", torch.is_autocast_enabled("cpu")))
        return batch

    def forward_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        calls.append(("forward_loss", torch.is_autocast_enabled("cpu")))
        return mse(model(batch[0]), batch[1])

    model = torch.nn.Linear(3, 1)
    batches = [(x.float(), y.float()) for x, y in make_batches([2, 3])]
    task = Task(
        model=model, forward_loss=forward_loss, train_loader=batches, val_loader=batches[:1], prepare=prepare
    )
    train(tmp_path, task, precision="bf16")
    assert calls == [("prepare", False), ("forward_loss", True)] * 3  # two to train, one to evaluate


@pytest.mark.parametrize(
    ("returned", "got"),
    [
        (0.5, "a float"),
        (None, "None"),
        (Output(None), "an Output whose .loss is None"),
        (Output(0.5), "an Output whose .loss is a float"),
    ],
    ids=["float", "none", "output-without-loss", "output-float-loss"],
)
def test_forward_loss_returning_no_tensor_fails_the_run_naming_it(
    tmp_path: Path, returned: Any, got: str
) -> None:
    task = Task(
        model=make_model(), forward_loss=lambda model, batch: returned, train_loader=make_batches([2])
    )
    sink = MemorySink()
    run = build(quiet_config(tmp_path), task, sinks=[sink])
    message = f"forward_loss returned {got}; it must return the mean loss as a tensor or as a .loss tensor"
    with pytest.raises(TypeError) as raised:
        run.run()
    assert str(raised.value) == message
    (end,) = sink.of("run.end")
    assert (end.status, end.reason, end.step) == ("failed", f"TypeError: {message}", 0)


def test_create_trainer_takes_a_forward_loss_in_place_of_loss_fn() -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = create_trainer(model, None, opt, forward_loss=lambda m, b: mse(m(b[0]), b[1]))
    trainer.run(WindowedLoader(make_batches([4, 2]), 2), max_epochs=1)
    assert trainer.state.step_output.items == 6
    for loss_fn, forward_loss in [(None, None), (mse, lambda m, b: mse(m(b[0]), b[1]))]:
        with pytest.raises(TypeError, match=r"^give exactly one of loss_fn and forward_loss$"):
            create_trainer(model, loss_fn, opt, forward_loss=forward_loss)
