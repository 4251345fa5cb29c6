"""One rank of a distributed test run, started by torchrun: ``train_rank.py SPEC_JSON OUT_DIR``.

Trains the spec's micro-batches (a list of ready batches: torchrun's rank r takes batches r, r+W,
...) through ``traintel.build`` with a MemorySink, and saves what the test compares with a
single-process reference: every record, each optimizer step's gradients, the final parameters,
and how many collectives of each kind the run made.
"""

# No ``from __future__ import annotations``: DDP reads the counting hook's annotations as classes.
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torchmetrics
from ignite.engine import Events
from ignite.metrics import MeanAbsoluteError
from torch.distributed.tensor import DTensor

from traintel.engine import ddp
from traintel.engine.coordination import ProcessGroupCoordinator
from traintel.engine.events import TraintelEvents
from traintel.run.api import build
from traintel.sinks.fanout import FanOut
from traintel.sinks.memory import MemorySink
from traintel.task import Task


def dtype(spec: dict[str, Any]) -> torch.dtype:
    """The spec's ``dtype``: float64 unless it says ``float32``."""
    return torch.float32 if spec.get("dtype") == "float32" else torch.float64


def batches(spec: dict[str, Any]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Micro-batches of ``spec["sizes"]`` items (float64), each with a mask of counted items."""
    g = torch.Generator().manual_seed(spec.get("seed", 0))
    out = []
    for n, kept in zip(spec["sizes"], spec.get("kept") or spec["sizes"], strict=True):
        x = torch.randn(n, 3, generator=g, dtype=torch.float64)
        y = x.sum(dim=1, keepdim=True) * 0.5 + 0.1 * torch.randn(n, 1, generator=g, dtype=torch.float64)
        x, y = x.to(dtype(spec)), y.to(dtype(spec))
        mask = torch.zeros(n, dtype=torch.bool)
        mask[:kept] = True
        out.append((x, y, mask))
    return out


def model(spec: dict[str, Any] | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    return net.to(dtype(spec or {}))


def masked_mse(out: torch.Tensor, target: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean squared error over the counted items only."""
    y, mask = target
    return ((out - y) ** 2).squeeze(1)[mask].mean()


class MaskedMAE(torchmetrics.MeanAbsoluteError):
    """torchmetrics' mean absolute error over the counted items only."""

    def update(self, preds: torch.Tensor, target: tuple[torch.Tensor, torch.Tensor]) -> None:
        y, mask = target
        super().update(preds.squeeze(1)[mask], y.squeeze(1)[mask])


def masked(
    output: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ignite's ``output_transform``: the counted items' predictions and targets."""
    preds, (y, mask) = output
    return preds.squeeze(1)[mask], y.squeeze(1)[mask]


def train_mae(out: Any) -> torch.Tensor:
    """A training metric: the mean absolute error of this rank's counted items in the step's window."""
    errors = [(pred - y).squeeze(1)[mask].abs().sum() for pred, (y, mask) in out.outputs]
    items = sum(out.counts)
    if not items:  # weighed by 0 items over the ranks
        return torch.zeros((), dtype=torch.float64)
    return torch.stack(errors).sum() / items


def prepare(batch: Any, device: torch.device) -> tuple[Any, Any]:
    x, y, mask = batch
    return x.to(device), (y.to(device), mask.to(device))


def plain(value: Any) -> Any:
    """Records' read-only mappings and tuples as dicts and lists (picklable)."""
    if hasattr(value, "items"):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def run_config(spec: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """The run's config: every step's records, in memory and the diagnostic file; the spec's
    optimizer, step limit, strategy, clipping and checkpoints."""
    config: dict[str, Any] = {
        "run": {"dir": str(out_dir / "run"), "id": "dist-test"},
        "trainer": {"device": "cpu", "max_epochs": spec.get("epochs", 1), "accumulation_steps": spec["k"],
                    "max_steps": spec.get("max_steps"),
                    "optimizer": spec.get("optimizer", {"name": "sgd", "lr": 0.1, "momentum": 0.9})},
        "telemetry": {"every": 1, "max_delay_seconds": spec.get("max_delay", 0.0)},
        "sinks": {"json": {"enabled": False}, "diagnostic": {"enabled": True}, "prometheus": {"enabled": False}},
    }  # fmt: skip
    if spec.get("strategy") == "fsdp":
        config["trainer"]["distributed"] = {"strategy": "fsdp", "fsdp": {"shard_modules": ["Linear"]}}
        if spec.get("mixed_precision"):
            precision = {"param_dtype": "bf16", "reduce_dtype": "fp32"}
            config["trainer"]["distributed"]["fsdp"]["mixed_precision"] = precision
    if spec.get("clip"):
        config["trainer"]["grad_clip_norm"] = spec["clip"]
    return config


def main() -> None:
    spec = json.loads(sys.argv[1])
    out_dir = Path(sys.argv[2])
    counts = {"agree": 0, "sum_floats": 0, "hook": 0, "all_reduce": 0, "deliveries": 0, "reduce_scatter": 0}

    def counted(name: str, fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return fn(*args, **kwargs)

        return call

    summing = ddp.sum_hook

    def counting_hook(state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        counts["hook"] += 1  # DDP checks a hook's signature: it must name ``bucket``
        return summing(state, bucket)

    ddp.sum_hook = counting_hook
    ProcessGroupCoordinator.agree = counted("agree", ProcessGroupCoordinator.agree)  # type: ignore[method-assign]
    summed = ProcessGroupCoordinator.sum_floats

    def sum_floats(self: ProcessGroupCoordinator, values: Any) -> list[float]:
        counts["sum_floats"] += bool(values)  # an empty sum takes no collective
        return summed(self, values)

    ProcessGroupCoordinator.sum_floats = sum_floats  # type: ignore[method-assign]
    FanOut.emit_many = counted("deliveries", FanOut.emit_many)  # type: ignore[method-assign]
    dist.all_reduce = counted("all_reduce", dist.all_reduce)
    dist.reduce_scatter_single = counted("reduce_scatter", dist.reduce_scatter_single)  # FSDP's
    fsdp = spec.get("strategy") == "fsdp"

    def full(tensor: torch.Tensor) -> torch.Tensor:
        """A sharded tensor gathered whole (every rank calls this in the same order)."""
        return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor

    memory = MemorySink()
    task = Task(model=model(spec), loss_fn=masked_mse, train_loader=batches(spec), prepare=prepare,
                count_items=lambda b: int(b[2].sum()), train_metrics={"mae": train_mae})  # fmt: skip
    called_with: set[str] = set()  # the classes of the models forward_loss was given
    if spec.get("forward_loss"):

        def forward_loss(net: torch.nn.Module, batch: Any) -> torch.Tensor:
            called_with.add(type(net).__name__)
            x, y, mask = batch  # the whole batch, on the device
            return masked_mse(net(x), (y, mask))

        task.loss_fn, task.prepare, task.forward_loss = None, None, forward_loss
        task.train_metrics = None  # its outputs are the loss: no predictions to measure
    config = run_config(spec, out_dir)
    if spec.get("eval_every_steps"):  # the training batches again, as the validation data, by steps
        task.val_loader = batches(spec)
        config["eval"] = {"every_steps": spec["eval_every_steps"], "every_epochs": None}
        task.metrics = {"mae": MaskedMAE(), "ignite_mae": MeanAbsoluteError(output_transform=masked)}
    run = build(config, task, sinks=[memory])
    grads: list[list[torch.Tensor]] = []
    hooks_per_step: list[int] = []
    run.trainer.add_event_handler(
        TraintelEvents.OPTIMIZER_STEP_STARTED,
        lambda e: grads.append([full(p.grad).detach().clone() for p in task.model.parameters()]),
    )
    reductions = "reduce_scatter" if fsdp else "hook"
    run.trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: hooks_per_step.append(counts[reductions])
    )
    params: list[torch.Tensor] = []  # gathered while the process group is up
    run.trainer.add_event_handler(
        Events.COMPLETED, lambda e: params.extend(full(p).detach().clone() for p in task.model.parameters())
    )
    rank = run.coordinator.rank
    run.trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: run.log({"rank_value": rank}))
    end = run.run()
    records = [plain({"event": r.event, **r.fields(), "diagnostics": r.diagnostics}) for r in memory.records]
    torch.save(
        {
            "rank": rank,
            "status": end.status,
            "records": records,
            "grads": grads,
            "params": params,
            "counts": counts,
            "hooks_per_step": hooks_per_step,
            "forward_loss_models": sorted(called_with),
        },
        out_dir / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    main()
