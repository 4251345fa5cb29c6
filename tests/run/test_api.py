"""The Python API: configs from files, dicts or objects; cadence; precision; clipping; schedulers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers.runs import quiet_config, train_in_memory
from tests.helpers.tasks import make_batches, make_model
from traintel.config import Config, validate
from traintel.run.api import build
from traintel.sinks.memory import MemorySink
from traintel.task import Task


def _task(sizes: list[int] | None = None) -> Task:
    return Task(
        model=make_model(), loss_fn=torch.nn.functional.mse_loss, train_loader=make_batches(sizes or [4] * 7)
    )


def test_build_from_yaml_path_dict_and_config_agree(tmp_path: Path) -> None:
    losses = []
    for i, kind in enumerate(("path", "dict", "object")):
        cfg = quiet_config(tmp_path / str(i), accumulation_steps=2, max_epochs=2)
        source: object = cfg
        if kind == "path":
            path = tmp_path / "cfg.yaml"
            path.write_text(yaml.safe_dump(cfg))
            source = str(path)
        elif kind == "object":
            source = validate(cfg)
            assert isinstance(source, Config)
        sink = MemorySink()
        build(source, _task(), sinks=[sink]).run()  # type: ignore[arg-type]
        losses.append([r.loss for r in sink.of("train.step")])  # type: ignore[attr-defined]
    assert len(losses[0]) == 8
    assert losses[0] == losses[1] == losses[2]


@pytest.mark.parametrize(("every", "emitted"), [(1, [1, 2, 3, 4, 5, 6]), (2, [2, 4, 6]), (4, [4]), (7, [])])
def test_every_n_emits_batch_and_step_records_of_every_nth_step(
    tmp_path: Path, every: int, emitted: list[int]
) -> None:
    # 7 micro-batches, k=3: windows 3,3,1 -> 3 steps per epoch, 2 epochs
    sink, _ = train_in_memory(
        tmp_path, make_batches([4] * 7), accumulation_steps=3, max_epochs=2, every=every
    )
    assert [r.step for r in sink.of("train.step")] == emitted  # type: ignore[attr-defined]
    batch_steps = sorted({r.step + 1 for r in sink.of("train.batch")})  # type: ignore[attr-defined]
    assert batch_steps == emitted
    assert len(sink.of("train.epoch")) == 2
    assert sink.records[0].event == "run.start"
    assert sink.records[-1].event == "run.end"


def test_bf16_autocast_reports_a_consistent_scale(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 1)
    batches = [(x.float(), y.float()) for x, y in make_batches([4] * 6)]
    sink = MemorySink()
    cfg = quiet_config(tmp_path, accumulation_steps=3, precision="bf16")
    cfg["sinks"]["diagnostic"]["enabled"] = True
    run = build(
        cfg, Task(model=model, loss_fn=torch.nn.functional.mse_loss, train_loader=batches), sinks=[sink]
    )
    outputs: list[torch.dtype] = []
    model.register_forward_hook(lambda _module, _inputs, out: outputs.append(out.dtype))
    end = run.run()
    assert end.status == "completed"
    assert outputs == [torch.bfloat16] * 6  # every training forward ran under autocast
    batch = sink.of("train.batch")
    assert len(batch) == 6
    assert all(r.diagnostics["scale_ok"] is True for r in batch)
    assert all(r.loss == pytest.approx(r.raw_loss / 3, rel=1e-2) for r in batch)  # type: ignore[attr-defined]


def test_grad_clip_reports_the_pre_clip_norm(tmp_path: Path) -> None:
    model = make_model()
    batches = make_batches([4, 4])
    expected_model = make_model()
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    torch.nn.functional.mse_loss(expected_model(x), y).backward()
    expected = float(
        torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in expected_model.parameters()]))
    )  # type: ignore[union-attr]
    sink, _ = train_in_memory(tmp_path, batches, model=model, accumulation_steps=2, grad_clip_norm=1e-3)
    (step,) = sink.of("train.step")
    assert step.grad_norm == pytest.approx(expected, rel=1e-12)  # type: ignore[attr-defined]
    sink2, _ = train_in_memory(tmp_path / "b", batches, model=make_model(), accumulation_steps=2)
    assert sink2.of("train.step")[0].grad_norm is None  # type: ignore[attr-defined]
    sink3, _ = train_in_memory(
        tmp_path / "c", batches, model=make_model(), accumulation_steps=2, report_grad_norm=True
    )
    assert sink3.of("train.step")[0].grad_norm == pytest.approx(expected, rel=1e-12)  # type: ignore[attr-defined]


def test_linear_warmup_and_cosine_schedules_are_stepped_per_optimizer_step(tmp_path: Path) -> None:
    sink, _ = train_in_memory(
        tmp_path,
        make_batches([2] * 8),
        accumulation_steps=2,
        scheduler={"name": "linear_warmup", "warmup_steps": 4},
    )
    assert [r.lr for r in sink.of("train.step")] == pytest.approx([0.025, 0.05, 0.075, 0.1])  # type: ignore[attr-defined]
    sink, _ = train_in_memory(
        tmp_path / "cos",
        make_batches([2] * 8),
        accumulation_steps=2,
        max_epochs=2,
        scheduler={"name": "cosine"},
    )
    lrs = [r.lr for r in sink.of("train.step")]  # type: ignore[attr-defined]
    assert lrs == pytest.approx([0.05 * (1 + math.cos(math.pi * t / 8)) for t in range(8)])


def test_a_run_that_never_ran_closes_its_sinks(tmp_path: Path) -> None:
    sink = MemorySink()
    with build(quiet_config(tmp_path), _task(), sinks=[sink]) as run:
        assert run.trainer.state.iteration == 0
        assert (sink.opened, sink.closed) == (1, 0)
    assert (sink.opened, sink.closed) == (1, 1)
    assert sink.records == []


def test_config_yaml_is_written_to_the_run_dir(tmp_path: Path) -> None:
    cfg = quiet_config(tmp_path, accumulation_steps=2)
    cfg["sinks"]["diagnostic"]["enabled"] = True
    cfg["task"] = {"params": {"api_token": "s3cret"}}
    run = build(cfg, _task())
    run.run()
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["trainer"]["accumulation_steps"] == 2
    assert saved["task"]["params"] == {"api_token": "***"}
    assert [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")] == []


def _initial_weights(tmp_path: Path, seed: int) -> dict[str, torch.Tensor]:
    """The weights a model factory's model has once ``build`` returns, under ``run.seed: seed``."""
    cfg = quiet_config(tmp_path)
    cfg["run"]["seed"] = seed
    task = Task(
        model=lambda: torch.nn.Linear(3, 2).double(),
        loss_fn=torch.nn.functional.mse_loss,
        train_loader=make_batches([4]),
    )
    with build(cfg, task) as run:
        return {name: value.clone() for name, value in run.model.state_dict().items()}


def test_run_seed_decides_a_model_factorys_initial_weights(tmp_path: Path) -> None:
    """The factory is called right after torch is seeded with ``run.seed``, whatever the global
    generator was before: its weights are those of the same model made after ``torch.manual_seed``."""
    torch.manual_seed(123)
    first = _initial_weights(tmp_path / "a", 7)
    torch.rand(5)
    again = _initial_weights(tmp_path / "b", 7)
    other = _initial_weights(tmp_path / "c", 8)
    torch.manual_seed(7)
    expected = torch.nn.Linear(3, 2).double().state_dict()

    assert sorted(first) == sorted(again) == sorted(other) == ["bias", "weight"]
    assert all(torch.equal(first[name], expected[name]) for name in first)
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not any(torch.equal(first[name], other[name]) for name in first)


def _no_weights() -> torch.nn.Module:
    msg = "no weights file"
    raise FileNotFoundError(msg)


@pytest.mark.parametrize(
    ("model", "error"),
    [
        (3, "task: task.model must be a torch.nn.Module or a zero-argument callable returning one, got int"),
        (lambda: "weights.pt", "task: task.model() must return a torch.nn.Module, got str"),
        (_no_weights, "task: task.model() raised FileNotFoundError: no weights file"),
    ],
    ids=["not-a-model", "factory-returns-no-model", "factory-raises"],
)
def test_a_model_that_is_no_module_nor_makes_one_is_refused(
    tmp_path: Path, model: object, error: str
) -> None:
    from traintel.errors import ConfigError

    task = Task(model=model, loss_fn=torch.nn.functional.mse_loss, train_loader=make_batches([4]))
    with pytest.raises(ConfigError) as raised:
        build(quiet_config(tmp_path), task)
    assert str(raised.value) == error
    assert not (tmp_path / "run").exists()
