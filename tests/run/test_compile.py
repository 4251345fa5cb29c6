"""``trainer.compile``: the steps and the evaluation call ``torch.compile(model)`` (inductor, a real
C++ build on CPU), the losses equal a plain compiled loop's, and checkpoints hold the plain keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers.plain import plain_loop
from tests.helpers.runs import quiet_config
from traintel.errors import ConfigError
from traintel.run import checkpoint
from traintel.run.api import build
from traintel.sinks.memory import MemorySink
from traintel.task import Task

pytestmark = pytest.mark.slow

SIZES = [4, 3, 5, 2, 4, 1, 3, 2]


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(n, 3, generator=g), torch.randn(n, 1, generator=g)) for n in SIZES]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def test_a_compiled_run_equals_a_plain_compiled_loop_and_checkpoints_plain_keys(tmp_path: Path) -> None:
    ours = _model()
    cfg = quiet_config(tmp_path, accumulation_steps=3, max_epochs=2, compile=True)
    cfg["checkpoint"] = {"every_epochs": 1}
    sink = MemorySink()
    task = Task(
        model=ours, loss_fn=torch.nn.functional.mse_loss, train_loader=_batches(), val_loader=_batches()
    )
    run = build(cfg, task, sinks=[sink])
    assert run.model is ours
    assert isinstance(run.trainer.update_step.model, torch._dynamo.eval_frame.OptimizedModule)
    run.run()
    losses = [r.loss for r in sink.of("train.step")]  # type: ignore[attr-defined]
    evals = [r.loss for r in sink.of("eval.epoch")]  # type: ignore[attr-defined]

    theirs = _model()
    compiled = torch.compile(theirs)
    opt = torch.optim.SGD(theirs.parameters(), lr=0.1)
    want: list[float] = []
    want_evals: list[float] = []
    data = _batches()
    for _ in range(2):
        compiled.train()
        want += plain_loop(theirs, data, 3, opt, forward=compiled)[0]
        compiled.eval()
        with torch.no_grad():
            summed = sum(float(torch.nn.functional.mse_loss(compiled(x), y)) * len(y) for x, y in data)
        want_evals.append(summed / sum(SIZES))

    assert losses == pytest.approx(want, rel=1e-6, abs=1e-7)
    assert evals == pytest.approx(want_evals, rel=1e-6, abs=1e-7)
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    _, state = checkpoint.newest(tmp_path / "run" / "checkpoints", 0) or (None, {})
    assert list(state["model"]) == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_an_unknown_compile_backend_is_one_line_before_training(tmp_path: Path) -> None:
    task = Task(model=_model(), loss_fn=torch.nn.functional.mse_loss, train_loader=_batches())
    with pytest.raises(ConfigError) as caught:
        build(quiet_config(tmp_path, compile=True, compile_backend="bogus"), task)
    assert str(caught.value) == (
        "trainer.compile_backend: InvalidBackend: Invalid backend: 'bogus', see "
        "`torch._dynamo.list_backends()` for available backends."
    )
